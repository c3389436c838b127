"""Prefill: long inputs in pieces give what one pass gives; compiled layers are one graph each and
give what eager layers give; a layer that fails to compile runs eagerly."""

from __future__ import annotations

import logging

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch._dynamo.utils import counters

from radlads.models import prefill
from radlads.models.modeling import RadladsModel
from test_kernels import op_device, rel_err  # noqa: F401 (op_device: a fixture)
from test_models import VARIANTS, perturbed_student


@given(length=st.integers(1, 700), batch=st.integers(1, 9), chunk=st.sampled_from([None, 1, 100, 640, 4096]))
def test_pieces_cover_the_input_in_order_within_the_budget(length, batch, chunk):
    pieces = prefill.spans(length, batch, chunk)
    assert pieces[0][0] == 0 and pieces[-1][1] == length
    assert all(a[1] == b[0] for a, b in zip(pieces, pieces[1:]))
    if len(pieces) > 1:
        step = pieces[0][1]
        assert step % 64 == 0 and (batch * step <= chunk or step == 64)
        assert all(end - start == step for start, end in pieces[:-1])
    else:
        assert not chunk or batch * length <= chunk or length <= 64


def count_passes(monkeypatch) -> list[int]:
    lengths = []
    run_layers = RadladsModel.run_layers

    def counted(self, hidden, *args):
        lengths.append(hidden.shape[1])
        return run_layers(self, hidden, *args)

    monkeypatch.setattr(RadladsModel, "run_layers", counted)
    return lengths


@pytest.mark.parametrize("variant", ["rwkv7", "rwkv6", "rwkv7-groupnorm-lowrank-gate", "rwkv7-hybrid-window"])
def test_a_prefill_in_pieces_equals_one_pass(variant, monkeypatch):
    student = perturbed_student(**VARIANTS[variant])
    ids = torch.randint(0, 320, (2, 150), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding, as generate() passes it, with its positions
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    lengths = count_passes(monkeypatch)
    runs = {}
    for chunk in (None, 128):  # 128 tokens over a batch of 2: pieces of 64, 64 and 22 positions
        student.config.prefill_chunk_tokens = chunk
        with torch.no_grad():
            cached = student(
                ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=70
            )
            full = student(ids).logits  # no cache asked for: the pieces carry one of their own
            after = student(ids[:, :7], cache=cached.cache, use_cache=True).logits
        runs[chunk] = (cached.logits, full, after, cached.cache)
    assert lengths == [150, 150, 7, 64, 64, 22, 64, 64, 22, 7]
    (logits, full, after, cache), (logits_p, full_p, after_p, cache_p) = runs[None], runs[128]
    assert logits_p.shape == (2, 70, 320) and cache_p.seen_tokens == cache.seen_tokens == 157
    for ours, one_pass in [
        (logits_p, logits),
        (full_p, full),
        (after_p, after),
        *zip(cache_p.states, cache.states),
    ]:
        torch.testing.assert_close(ours, one_pass, rtol=1e-4, atol=1e-4)


def test_hybrids_and_training_prefill_in_one_pass(monkeypatch):
    """A whole-context softmax layer would need a mask over the whole past for each piece (a
    windowed one keeps a bounded past: it runs in pieces); autograd would keep every piece's
    activations anyway."""
    lengths = count_passes(monkeypatch)
    hybrid = perturbed_student(**VARIANTS["rwkv7-hybrid"])
    hybrid.config.prefill_chunk_tokens = 64
    ids = torch.randint(0, 320, (2, 150))
    with torch.no_grad():
        hybrid(ids, use_cache=True)
    linear = perturbed_student(**VARIANTS["rwkv7"])
    linear.config.prefill_chunk_tokens = 64
    linear(ids)
    assert lengths == [150, 150]


def three_prefills(student, monkeypatch, device: str) -> dict[str, list[torch.Tensor]]:
    """Logits from no state and then from the cached one, and the states after, of a prompt run
    by the PyTorch reference, eagerly with the kernels, and compiled (run last: Dynamo's
    counters then hold its graphs)."""
    ids = torch.randint(0, 320, (2, 48), generator=torch.Generator().manual_seed(1)).to(device)
    runs = {}
    for name, compiled, backend in (
        ("reference", False, "chunked"),
        ("eager", False, "auto"),
        ("compiled", True, "auto"),
    ):
        torch.compiler.reset()
        counters.clear()
        student.config.compile_prefill, student.config.kernel_backend = compiled, backend
        if compiled:
            aot_eager_layers(monkeypatch, device)
        with torch.no_grad():
            first = student(ids[:, :32], use_cache=True)
            then = student(ids[:, 32:], cache=first.cache, use_cache=True)
        runs[name] = [first.logits, then.logits, *then.cache.states]
    return runs


def aot_eager_layers(monkeypatch, device: str) -> None:
    """On CPU, compiled layers through aot_eager (Dynamo's graphs, run eagerly: no C++ toolchain)."""
    if device != "cpu":
        return
    compiled = prefill.compiled_call_layer("aot_eager")
    monkeypatch.setattr(prefill, "compiled_call_layer", lambda: compiled)
    monkeypatch.setattr(prefill.CompiledLayers, "applies", lambda self, config, hidden: hidden.shape[1] > 1)


@pytest.mark.parametrize("variant", ["rwkv7", "rwkv6"])
def test_compiled_prefill_is_one_graph_per_layer_and_equals_eager(op_device, variant, monkeypatch):  # noqa: F811
    """With a cache, each layer's state goes in and out as an argument and the recurrence is one
    custom op: no graph break, and the graph serves every layer but the first (which keeps v_first).
    Compiled and eager differ by rounding only: no more than each differs from the PyTorch
    reference (fla's fp32 dots are tf32: its rounding, ~1e-3, sets the scale on a GPU)."""
    student = perturbed_student(**VARIANTS[variant]).to(op_device)
    runs = three_prefills(student, monkeypatch, op_device)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert 1 <= counters["stats"]["unique_graphs"] <= 4, dict(counters["stats"])
    assert not student.model.compiled_layers.failed
    for ours, eager, reference in zip(runs["compiled"], runs["eager"], runs["reference"]):
        assert rel_err(ours, eager) <= max(2 * rel_err(eager, reference), 1e-5)


def test_new_prompt_lengths_and_batch_sizes_reuse_the_compiled_layers(monkeypatch):
    """Lengths and batches (above 1) are symbolic from the first compile: a user's next prompt of
    another length runs the compiled graphs it has, instead of waiting for a compile."""
    import fla_stand_in
    import radlads.kernels

    fla_stand_in.install(monkeypatch)
    monkeypatch.setattr(radlads.kernels, "_fla_runs", lambda backend, on_cuda: True)
    aot_eager_layers(monkeypatch, "cpu")
    torch.compiler.reset()
    counters.clear()
    student = perturbed_student(**VARIANTS["rwkv7"])
    graphs = []
    for batch, length in [(1, 64), (1, 130), (16, 64), (3, 77), (16, 300)]:
        ids = torch.randint(0, 320, (batch, length))
        with torch.no_grad():
            student(ids, attention_mask=torch.ones_like(ids), use_cache=True, logits_to_keep=1)
        graphs.append(counters["stats"]["unique_graphs"])
    # layer 0 and the others, at a batch of 1, then at any other batch
    assert graphs == [2, 2, 4, 4, 4], graphs


def test_a_layer_that_fails_to_compile_runs_eagerly_from_then_on(monkeypatch, caplog):
    student = perturbed_student(**VARIANTS["rwkv7"])
    layer = student.model.layers[1]
    calls = []

    def broken(*args):
        calls.append(args)
        raise RuntimeError("Inductor could not lower this")

    monkeypatch.setattr(prefill, "compiled_call_layer", lambda: broken)
    x = torch.randn(2, 5, student.config.hidden_size)
    pe = student.model.rotary_emb(x, torch.arange(5)[None])
    v_first = torch.randn(2, 5, student.config.num_attention_heads, student.config.head_dim)
    layers = prefill.CompiledLayers()
    with torch.no_grad():
        # A bad input fails eagerly too: the user gets its error, and compiling stays on.
        with pytest.raises(RuntimeError, match="size"):
            layers(layer, x, pe, None, v_first[:, :3], None, True)
        assert not layers.failed
        with caplog.at_level(logging.WARNING, logger="radlads.models.prefill"):
            out = layers(layer, x, pe, None, v_first, None, True)
        expected = layer(x, pe, None, v_first, None, True)
    assert layers.failed and len(calls) == 2
    assert "compiled prefill is off" in caplog.text and "could not lower" in caplog.text
    for ours, eager in zip(out, expected):
        torch.testing.assert_close(ours, eager)


def test_training_leaves_prefill_to_its_own_compile_settings():
    from radlads.convert.steps import prepare_student

    student = perturbed_student(**VARIANTS["rwkv7"])
    assert student.model.compiled_layers.enabled
    prepare_student(student, activation_checkpointing=False, compile=False)
    assert not student.model.compiled_layers.enabled
    assert student.config.compile_prefill  # nothing saved with the model changed
