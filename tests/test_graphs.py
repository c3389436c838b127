"""CUDA-graph decoding, compiled or not, gives what eager decoding gives (GPU only), and stays out
of the way elsewhere; the one-token step it captures compiles to one graph (CPU)."""

from __future__ import annotations

import pytest
import torch

from radlads.models.cache import RadladsCache
from radlads.models.graphs import LentState, buffer_capacity, decode_graphs, one_token
from test_models import VARIANTS, perturbed_student

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(autouse=True)
def fresh_compiler():
    """Each test compiles its own students' steps: an earlier test's code must not count against
    Dynamo's recompile limit, past which it would run the step uncompiled without failing."""
    torch.compiler.reset()


def decode(student, ids, prompt_len, graphed: bool):
    student.config.cuda_graph_decode = graphed
    with torch.no_grad():
        out = student(ids[:, :prompt_len], use_cache=True)
        steps, cache = [out.logits[:, -1:]], out.cache
        for t in range(prompt_len, ids.shape[1]):
            out = student(ids[:, t : t + 1], cache=cache, use_cache=True)
            steps.append(out.logits)
    return torch.cat(steps, 1), cache


def cuda_student(variant):
    return perturbed_student(**VARIANTS[variant]).cuda()


@gpu
@needs_cuda
@pytest.mark.parametrize("compiled", [False, True], ids=["captured", "compiled"])
@pytest.mark.parametrize(
    "variant", ["rwkv7", "rwkv6", "rwkv7-groupnorm-lowrank-gate", "rwkv7-hybrid", "rwkv6-hybrid-first"]
)
def test_graphed_decoding_equals_eager(variant, compiled):
    student = cuda_student(variant)
    student.config.compile_decode = compiled
    ids = torch.randint(0, 320, (3, 24), generator=torch.Generator().manual_seed(0)).cuda()
    eager, eager_cache = decode(student, ids, 11, graphed=False)
    graphed, graphed_cache = decode(student, ids, 11, graphed=True)
    graphs = decode_graphs(student).graphs
    assert graphs, "the graph path was not taken"
    assert all(g.compiled is compiled for g in graphs.values())
    # Compiled, the state update is summed in another order than fla's kernel sums it (on an H100:
    # 4 of 3,072 state entries 1.4-2.3e-5 apart); captured as it is, the same kernels run.
    tolerance = dict(rtol=1e-4, atol=1e-4) if compiled else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(graphed, eager, **tolerance)
    assert graphed_cache.seen_tokens == eager_cache.seen_tokens == 24
    for g, e in zip(graphed_cache.states, eager_cache.states):
        torch.testing.assert_close(g, e, **tolerance)


@gpu
@needs_cuda
def test_two_caches_interleaved_keep_their_own_state():
    student = cuda_student("rwkv7")
    a, b = (torch.randint(0, 320, (2, 20), generator=torch.Generator().manual_seed(s)).cuda() for s in (1, 2))
    expected = [decode(student, ids, 8, graphed=False)[0] for ids in (a, b)]
    student.config.cuda_graph_decode = True
    with torch.no_grad():
        caches = [student(ids[:, :8], use_cache=True).cache for ids in (a, b)]
        logits = [[], []]
        for t in range(8, 20):  # alternate: each step rebinds the graph to the other cache
            for i, ids in enumerate((a, b)):
                logits[i].append(student(ids[:, t : t + 1], cache=caches[i], use_cache=True).logits)
    for i in range(2):
        torch.testing.assert_close(torch.cat(logits[i], 1), expected[i][:, 1:], rtol=1e-5, atol=1e-5)


@gpu
@needs_cuda
@pytest.mark.parametrize("variant", ["rwkv7", "rwkv7-hybrid", "rwkv7-hybrid-window"])
def test_graphed_generate_with_left_padding_equals_eager(variant):
    student = cuda_student(variant)
    batch = torch.randint(1, 320, (2, 13), generator=torch.Generator().manual_seed(3)).cuda()
    mask = torch.ones_like(batch)
    batch[0, :4], mask[0, :4] = 0, 0
    runs = []
    for graphed in (False, True):
        student.config.cuda_graph_decode = graphed
        runs.append(student.generate(batch, attention_mask=mask, max_new_tokens=12, do_sample=False))
    assert decode_graphs(student).graphs, "the graph path was not taken"
    assert torch.equal(runs[0], runs[1])


@gpu
@needs_cuda
def test_a_hybrid_decoding_past_its_kv_buffers_moves_to_larger_ones():
    """Past 256 positions a hybrid's graph moves to 512-position buffers: generate() gives eager's
    tokens across the move, and the batch keeps only the larger graph."""
    student = cuda_student("rwkv7-hybrid")
    prompt = torch.randint(1, 320, (2, 250), generator=torch.Generator().manual_seed(4)).cuda()
    runs = []
    for graphed in (False, True):
        student.config.cuda_graph_decode = graphed
        runs.append(student.generate(prompt, max_new_tokens=12, do_sample=False))
    assert torch.equal(runs[0], runs[1])
    assert [key[:2] for key in decode_graphs(student).graphs] == [(2, 512)]


@gpu
@needs_cuda
@pytest.mark.parametrize("compiled", [False, True], ids=["captured", "compiled"])
@pytest.mark.parametrize("variant", ["rwkv7", "rwkv7-hybrid", "rwkv7-hybrid-window"])
def test_graphs_captured_under_autocast_stay_valid_after_the_autocast_block(compiled, variant):
    """fp32 weights under bf16 autocast: the graph must not read autocast's per-block weight copies
    (and a hybrid's buffers hold fp32 keys beside bf16 values)."""
    student = cuda_student(variant)
    student.config.compile_decode = compiled
    prompts = [
        torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(s)).cuda() for s in (6, 7)
    ]

    def distance(x, y):
        return ((x.float() - y.float()).norm() / y.float().norm()).item()

    for ids in prompts:  # the second prompt replays a graph captured in the first autocast block
        exact = decode(student, ids, 8, graphed=False)[0]  # fp32
        runs = []
        for graphed in (False, True):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                runs.append(decode(student, ids, 8, graphed=graphed)[0])
            torch.cuda.empty_cache()  # free what a dead autocast cache held, so stale reads show
        # A read of a freed weight copy would be garbage, off by ~100%. Captured as it is, the
        # replay runs eager's kernels: bf16 logits within 1e-2 (on an H200: 0.6% of logits off by
        # 1-2 bf16 ulps). Compiled, it rounds where its fused kernels store, not after every op
        # (1.6% from eager bf16 on an H100), and a windowed layer's buffers attend with their own
        # fp32 softmax where eager runs SDPA under a mask (1.6% from eager bf16 on CPU, and closer
        # to fp32 than eager): either must be as close to fp32 as eager bf16 is, or closer.
        if compiled or variant.endswith("window"):
            assert distance(runs[1], exact) < 2 * distance(runs[0], exact) + 1e-3
        else:
            assert distance(runs[1], runs[0]) < 1e-2
    assert len(decode_graphs(student).graphs) == 1


@gpu
@needs_cuda
def test_a_step_that_fails_to_compile_is_captured_uncompiled(monkeypatch):
    import radlads.models.graphs as graphs

    def broken(*args):
        raise RuntimeError("simulated compile failure")

    monkeypatch.setattr(graphs, "compiled_one_token", lambda: broken)
    student = cuda_student("rwkv7")
    ids = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(5)).cuda()
    eager, _ = decode(student, ids, 8, graphed=False)
    graphed, _ = decode(student, ids, 8, graphed=True)
    captured = decode_graphs(student).graphs
    assert len(captured) == 1 and not next(iter(captured.values())).compiled
    torch.testing.assert_close(graphed, eager, rtol=1e-5, atol=1e-5)


@gpu
@needs_cuda
def test_moved_weights_drop_the_captured_graphs():
    student = cuda_student("rwkv7")
    ids = torch.randint(0, 320, (1, 12), generator=torch.Generator().manual_seed(4)).cuda()
    decode(student, ids, 6, graphed=True)
    first = dict(decode_graphs(student).graphs)
    old = [p.data for p in student.parameters()]  # kept alive, so the copies get new addresses
    for p in student.parameters():
        p.data = p.data.clone()
    graphed, _ = decode(student, ids, 6, graphed=True)
    eager, _ = decode(student, ids, 6, graphed=False)
    assert decode_graphs(student).graphs.keys() == first.keys()
    assert all(decode_graphs(student).graphs[k] is not first[k] for k in first)
    torch.testing.assert_close(graphed, eager, rtol=1e-5, atol=1e-5)
    del old


@pytest.mark.parametrize("family", ["qwen2", "llama"])
@pytest.mark.parametrize("variant", ["rwkv7", "rwkv6", "rwkv7-groupnorm-lowrank-gate"])
def test_the_one_token_step_compiles_to_one_graph_equal_to_eager(variant, family):
    """What compiled decoding captures: no graph break (fullgraph) anywhere, the recurrence included
    (fla's kernel would break the graph at every layer), and the eager step's logits and states."""
    student = perturbed_student(family=family, **VARIANTS[variant])
    ids = torch.randint(0, 320, (3, 12), generator=torch.Generator().manual_seed(0))
    step = torch.compile(one_token, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        cache = student(ids[:, :11], use_cache=True).cache
        states = [s.clone() for s in cache.states]
        eager = student(ids[:, 11:], cache=cache, use_cache=True).logits
        compiled = step(
            student, ids[:, 11:], torch.full((3, 1), 11), torch.ones(3, 1, dtype=torch.long), states
        )
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-4)
    for c, e in zip(states, cache.states):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-4)


def test_cpu_students_decode_eagerly():
    student = perturbed_student(**VARIANTS["rwkv7"])
    with torch.no_grad():
        cache = student(torch.ones(1, 5, dtype=torch.long), use_cache=True).cache
        student(torch.ones(1, 1, dtype=torch.long), cache=cache, use_cache=True)
    assert not decode_graphs(student).applies(student, torch.ones(1, 1, dtype=torch.long), cache)
    assert not decode_graphs(student).graphs


def test_lent_state_gives_the_cache_bound_before_a_copy_of_what_it_still_holds():
    """The cache bound before keeps its state when another binds: a copy of each lent tensor it
    still points at, and whatever it holds instead where it dropped or replaced them (a server's
    batch whose last sequence left, or that moved to another size)."""

    def cache(*values):
        c = RadladsCache(2)
        c.states = [torch.full((2, 3), float(v)) for v in values]
        return c

    lent = LentState([torch.zeros(2, 3), torch.zeros(2, 3)])
    first, second, third = cache(1, 2), cache(3, 4), cache(5, 6)
    lent.bind(first)
    assert all(s is t for s, t in zip(first.states, lent.states))
    lent.states[0].add_(10)  # a replay updates the state in place
    lent.bind(second)
    assert not any(s is t for s, t in zip(first.states, lent.states))
    assert [s[0, 0].item() for s in first.states] == [11, 2]
    second.states = [None, None]  # its batch emptied
    lent.bind(third)
    assert second.states == [None, None]
    assert [s[0, 0].item() for s in lent.states] == [5, 6]
    resized = torch.full((4, 3), 8.0)
    third.states[1] = resized
    lent.bind(first)
    assert third.states[0] is not lent.states[0] and third.states[0][0, 0].item() == 5
    assert third.states[1] is resized
    assert [s[0, 0].item() for s in lent.states] == [11, 2]


def graph_free_step(step, student, lents: dict, ids, positions, mask, cache):
    """What DecodeGraph.__call__ does around a replay, with `step` run instead of the replay, on
    the state buffers of the cache's KV capacity (new buffers once it outgrows them)."""
    capacity = buffer_capacity(student.config, cache.states)
    lent = lents.setdefault(capacity, LentState(cache.states, capacity))
    length = lent.begin(cache, mask)
    logits = step(student, ids, positions, mask[:, -1:], lent.states)
    lent.end(cache, length)
    return logits


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("variant", ["rwkv7-hybrid", "rwkv6-hybrid-first"])
def test_hybrid_step_on_fixed_capacity_kv_buffers_equals_eager_decoding(variant, compiled):
    """A hybrid decodes through the captured step with its keys and values in StaticKV buffers: a
    left-padded batch, decoded past the first buffer's 256 positions into a second one, gives the
    eager step's logits at every token (the capture itself needs CUDA: tests marked gpu)."""
    student = perturbed_student(**VARIANTS[variant])
    prompt, steps = 250, 10  # positions 250..259: the buffers of 256 fill up and grow to 512
    ids = torch.randint(0, 320, (2, prompt + steps), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, prompt + steps, dtype=torch.long)
    mask[1, :7] = 0  # the second row is left-padded
    step = torch.compile(one_token, backend="aot_eager", fullgraph=True) if compiled else one_token
    with torch.no_grad():
        caches = [
            student(ids[:, :prompt], attention_mask=mask[:, :prompt], use_cache=True).cache for _ in "ab"
        ]
        lents: dict = {}
        for t in range(prompt, prompt + steps):
            positions = (mask[:, : t + 1].cumsum(-1) - 1).clamp(min=0)[:, -1:]
            inputs = (ids[:, t : t + 1], positions, mask[:, : t + 1])
            eager = student(inputs[0], position_ids=positions, attention_mask=inputs[2], cache=caches[0])
            graphed = graph_free_step(step, student, lents, *inputs, caches[1])
            torch.testing.assert_close(graphed, eager.logits, rtol=1e-4, atol=1e-4)
    assert sorted(lents) == [256, 512]
    # A shorter sequence then takes the 256-position buffers that the longer one filled: it must
    # see none of what the longer one left there.
    with torch.no_grad():
        short = [student(ids[:, :100], attention_mask=mask[:, :100], use_cache=True).cache for _ in "ab"]
        positions = (mask[:, :101].cumsum(-1) - 1)[:, -1:]
        inputs = (ids[:, 100:101], positions, mask[:, :101])
        eager = student(inputs[0], position_ids=positions, attention_mask=inputs[2], cache=short[0])
        graphed = graph_free_step(step, student, lents, *inputs, short[1])
    torch.testing.assert_close(graphed, eager.logits, rtol=1e-4, atol=1e-4)
    for ours, theirs in zip(caches[1].states, caches[0].states):
        for a, b in zip(
            ours if isinstance(ours, tuple) else (ours,), theirs if isinstance(theirs, tuple) else (theirs,)
        ):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_windowed_hybrid_step_on_its_window_buffers_equals_eager_decoding(compiled):
    """A windowed hybrid decodes through the captured step in buffers of window + sinks slots from
    the first step on, evicting on the device: a left-padded batch decoded far past its window gives
    the eager step's logits at every token, and a second, shorter sequence taking the same buffers
    sees nothing the first left there."""
    student = perturbed_student(**VARIANTS["rwkv7-hybrid-window"])
    capacity = student.config.softmax_window + student.config.softmax_sinks
    ids = torch.randint(0, 320, (2, 40), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, :3] = 0  # the second row is left-padded: its sinks are tokens 3 and 4
    step = torch.compile(one_token, backend="aot_eager", fullgraph=True) if compiled else one_token
    lents: dict = {}
    with torch.no_grad():
        for prompt in (5, 2):
            caches = [
                student(ids[:, :prompt], attention_mask=mask[:, :prompt], use_cache=True).cache for _ in "ab"
            ]
            for t in range(prompt, 40 if prompt == 5 else 12):
                positions = (mask[:, : t + 1].cumsum(-1) - 1).clamp(min=0)[:, -1:]
                inputs = (ids[:, t : t + 1], positions, mask[:, : t + 1])
                eager = student(inputs[0], position_ids=positions, attention_mask=inputs[2], cache=caches[0])
                graphed = graph_free_step(step, student, lents, *inputs, caches[1])
                torch.testing.assert_close(graphed, eager.logits, rtol=1e-4, atol=1e-4)
    assert list(lents) == [capacity]


@pytest.mark.parametrize("variant", ["rwkv7-hybrid", "rwkv7-hybrid-window"])
def test_kv_buffers_hold_keys_and_values_each_in_its_own_dtype_under_autocast(variant):
    """fp32 weights under bf16 autocast: RoPE leaves the keys in fp32 while the values come out in
    bf16, and the buffers the captured step writes into must take each as it is. The captured step
    then comes as close to the fp32 logits as eager decoding does (bf16 rounding, ~0.2 here)."""
    student = perturbed_student(**VARIANTS[variant])
    ids = torch.randint(0, 320, (2, 20), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    lents: dict = {}
    with torch.no_grad():
        exact = student(ids).logits[:, 8:]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            caches = [student(ids[:, :8], attention_mask=mask[:, :8], use_cache=True).cache for _ in "ab"]
            kv = next(s for s in caches[0].states if isinstance(s, tuple))
            assert (kv[0].dtype, kv[1].dtype) == (torch.float32, torch.bfloat16)
            eager, graphed = [], []
            for t in range(8, 20):
                positions = torch.full((2, 1), t)
                inputs = (ids[:, t : t + 1], positions, mask[:, : t + 1])
                eager.append(
                    student(
                        inputs[0], position_ids=positions, attention_mask=inputs[2], cache=caches[0]
                    ).logits
                )
                graphed.append(graph_free_step(one_token, student, lents, *inputs, caches[1]))
    errors = [(torch.cat(run, 1).float() - exact).abs().max() for run in (eager, graphed)]
    assert errors[1] <= 1.5 * errors[0], errors


@pytest.mark.parametrize("variant,kept", [("rwkv7-hybrid-window", 3), ("rwkv7-hybrid", 1)])
def test_graphs_with_fixed_kv_buffers_are_kept_per_batch_size(variant, kept, monkeypatch):
    """A windowed hybrid's buffers have one size, so its graph at each batch size stays, as a pure
    student's does, for a server's stack moving between sizes and back; a whole-context hybrid
    keeps one graph with KV buffers at a time, since its buffers grow. (Capture stubbed: CPU.)"""
    import contextlib

    from radlads.models import graphs

    captures = []

    class Captured:
        def __init__(self, compiled: bool):
            self.compiled = compiled

        def __call__(self, ids, positions, mask, cache):
            return torch.zeros(ids.shape[0], 1, 320)

    def capture(self, model, cache, batch, mask_dtype, compiled, capacity):
        captures.append(batch)
        return Captured(compiled)

    monkeypatch.setattr(graphs.DecodeGraphs, "_capture", capture)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    student = perturbed_student(**VARIANTS[variant])
    steps = decode_graphs(student)
    with torch.no_grad():
        prefilled = student(torch.zeros(1, 5, dtype=torch.long), use_cache=True).cache
        for _ in range(2):
            for rows in (1, 4, 6):
                cache = RadladsCache(len(prefilled.states))
                cache.states = [
                    tuple(t.expand(rows, *t.shape[1:]) for t in s)
                    if isinstance(s, tuple)
                    else s.expand(rows, -1, -1, -1)
                    for s in prefilled.states
                ]
                ids = torch.zeros(rows, 1, dtype=torch.long)
                steps(student, ids, cache, None, ids + 5)
    assert len(steps.graphs) == kept
    assert len(captures) == (3 if kept == 3 else 6)
