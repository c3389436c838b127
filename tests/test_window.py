"""Hybrids whose softmax layers attend over a sliding window plus sink tokens (`softmax_window`):
the attention a naive loop computes, in one pass, in pieces and token by token, with a cache that
stops growing once the window is full."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from radlads.convert.plan import decode_memory
from radlads.convert.transfer import transfer
from radlads.models import RadladsConfig
from test_kernels import op_device, rel_err  # noqa: F401 (op_device: a fixture)
from test_models import VARIANTS, perturbed_student

WINDOWED = VARIANTS["rwkv7-hybrid-window"]
WHOLE = {k: v for k, v in WINDOWED.items() if k not in ("softmax_window", "softmax_sinks")}  # the same hybrid


def naive_window_attention(layer, x, positions, real, window: int, sinks: int):
    """The windowed layer's output by its definition, one query at a time: softmax over the real
    keys of its row that are at most `window` - 1 tokens back or among the row's first `sinks` real
    tokens (padding rows see only themselves)."""
    q, k, v = layer.project(x, positions)
    k, v = layer.expand_kv(k), layer.expand_kv(v)
    B, T, H, N = q.shape
    out = torch.zeros_like(q)
    for b in range(B):
        rank = real[b].long().cumsum(0)
        for t in range(T):
            seen = [
                j for j in range(t + 1) if j == t or (real[b, j] and (t - j < window or rank[j] <= sinks))
            ]
            scores = torch.einsum("hn,jhn->hj", q[b, t], k[b, seen]) * N**-0.5
            out[b, t] = torch.einsum("hj,jhn->hn", scores.softmax(-1), v[b, seen])
    return layer.o_proj(out.reshape(B, T, H * N))


@pytest.mark.parametrize("window,sinks", [(1, 0), (4, 0), (4, 3), (100, 2)])
def test_windowed_layer_is_the_naive_windowed_attention(window, sinks):
    student = perturbed_student(**{**WINDOWED, "softmax_window": window, "softmax_sinks": sinks})
    layer = student.model.layers[0].self_attn
    x = torch.randn(2, 15, student.config.hidden_size, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 15, dtype=torch.long)
    mask[1, :5] = 0  # left padding: the second row's sinks are its tokens 5, 6, ...
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    position_embeddings = student.model.rotary_emb(x, positions)
    with torch.no_grad():
        ours = layer(x, position_embeddings, attention_mask=mask)[0]
        expected = naive_window_attention(layer, x, position_embeddings, mask.bool(), window, sinks)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_a_window_longer_than_the_context_is_whole_attention_and_a_shorter_one_is_not():
    ids = torch.randint(0, 320, (2, 20), generator=torch.Generator().manual_seed(1))
    whole = perturbed_student(**WHOLE)
    with torch.no_grad():
        expected = whole(ids).logits
        # With 2 sinks, a window of 18 still covers the 20 tokens; one of 17 misses the third.
        for window, same in ((18, True), (500, True), (17, False)):
            windowed = perturbed_student(**{**WINDOWED, "softmax_window": window})
            windowed.load_state_dict(whole.state_dict())
            assert torch.allclose(windowed(ids).logits, expected, atol=1e-5) is same, window


def test_prompt_in_pieces_and_token_by_token_equal_one_pass_with_bounded_keys():
    student = perturbed_student(**WINDOWED)
    window, sinks = WINDOWED["softmax_window"], WINDOWED["softmax_sinks"]
    ids = torch.randint(0, 320, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = student(ids).logits
        cache, logits, sizes = None, [], []
        for start, end in [(0, 9), (9, 10), (10, 23), *((t, t + 1) for t in range(23, 40))]:
            out = student(ids[:, start:end], cache=cache, use_cache=True)
            cache = out.cache
            logits.append(out.logits)
            sizes.append(cache.nbytes())
    torch.testing.assert_close(torch.cat(logits, 1), full, rtol=1e-4, atol=1e-4)
    kept = [s for s in cache.states if isinstance(s, tuple)]
    assert len(kept) == 2 and all(s[0].shape[1] == sinks + window for s in kept)
    assert len(set(sizes)) == 1  # memory per sequence is the same from the first token on


def test_decode_memory_of_a_windowed_hybrid_is_its_window_at_every_length():
    config = perturbed_student(**WINDOWED).config
    window, sinks = config.softmax_window, config.softmax_sinks
    memory = decode_memory(config)
    assert memory.student(10_000) == memory.student(1) > memory.state_bytes
    assert memory.window_kv_bytes == 2 * (window + sinks) * (2 * 2 * 16 * 2 + 16)  # 2 layers, bf16 k and v
    config.softmax_window = None
    assert decode_memory(config).student(10_000) > memory.student(10_000)


@pytest.mark.parametrize("window,sinks", [(0, 4), (-3, 4), (8, -1)])
def test_a_window_of_no_tokens_is_refused(window, sinks):
    with pytest.raises(ValueError, match="softmax_window"):
        RadladsConfig(softmax_window=window, softmax_sinks=sinks)


def test_the_window_can_be_set_when_loading(tmp_path):
    """A hybrid trained with whole attention can be decoded with a window to bound its memory."""
    whole = perturbed_student(**WHOLE)
    whole.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, softmax_window=6).eval()
    built = perturbed_student(**WINDOWED)  # the same weights, window 6 and 2 sinks from the start
    ids = torch.randint(0, 320, (1, 20), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ours = loaded(ids, use_cache=True)
        assert not torch.allclose(ours.logits, whole(ids).logits, atol=1e-4)  # the window acts
        loaded.config.softmax_sinks = 2
        torch.testing.assert_close(loaded(ids).logits, built(ids).logits, rtol=1e-5, atol=1e-5)
    assert ours.cache.states[0][0].shape[1] == 6 + 4  # its window and the default sinks


def test_convert_trains_a_windowed_hybrid_that_decodes_in_bounded_memory(tmp_path, capsys):
    """`convert --softmax-window` trains steps 2 and 3 through the window (their sequences are
    longer than it), and the exported student keeps it; changing it on a finished run, or asking
    for one without softmax layers, is refused without touching what was written."""
    from radlads.cli.main import main
    from test_convert import convert_args
    from tiny_models import make_teacher_folder, write_corpus

    teacher, corpus = make_teacher_folder(tmp_path), write_corpus(tmp_path / "corpus")
    out = tmp_path / "windowed"
    window = ["--softmax-layers", "-1", "--softmax-window", "64", "--softmax-sinks", "2"]
    budgets = ["--step1-tokens", "20k", "--step3-tokens", "8k", "--step3-seq-len", "256"]
    assert main(convert_args(teacher, corpus, out, *window, *budgets)) == 0
    summary = json.loads((out / "radlads.json").read_text())
    assert summary["steps"]["2"]["heldout_end"] < summary["steps"]["2"]["heldout_start"]
    assert summary["steps"]["3"]["tokens"] >= 8_000
    student = AutoModelForCausalLM.from_pretrained(out).eval()
    assert (student.config.softmax_layers, student.config.softmax_window, student.config.softmax_sinks) == (
        [2],
        64,
        2,
    )
    with torch.no_grad():
        cache = student(torch.randint(0, 300, (1, 200)), use_cache=True).cache
    assert cache.states[2][0].shape[1] == 66
    weights = (out / "model.safetensors").read_bytes()
    changed = [*window[:3], "32", *budgets]
    assert main(convert_args(teacher, corpus, out, *changed)) == 2
    refusal = capsys.readouterr().err
    assert "another student" in refusal and "--softmax-layers none for a pure student" in refusal
    assert (out / "model.safetensors").read_bytes() == weights
    assert main(convert_args(teacher, corpus, tmp_path / "pure", "--softmax-window", "64")) == 2
    assert "no layer keeps softmax attention" in capsys.readouterr().err
    assert main(convert_args(teacher, corpus, tmp_path / "sinks", *window[:2], "--softmax-sinks", "2")) == 2
    assert "needs a window" in capsys.readouterr().err

    # `eval --softmax-window` scores the student over another window than it was trained with.
    def perplexity(*extra):
        report = tmp_path / f"eval{len(extra)}"
        args = ["--model", str(out), "--data", str(corpus), "--seq-len", "128", "--out", str(report)]
        assert main(["eval", *args, "--max-windows", "4", "--quiet", *extra]) == 0
        return json.loads((report / "results.json").read_text())["student"]

    narrow, trained = perplexity("--softmax-window", "8", "--softmax-sinks", "1"), perplexity()
    assert narrow["perplexity"]["ppl"] != trained["perplexity"]["ppl"]  # trained with 64 and 2
    assert narrow["name"] == "student: windowed, softmax_window 8, softmax_sinks 1"
    assert trained["name"] == "student: windowed"
    pure = tmp_path / "pure-student"
    transfer(teacher, "rad-rwkv7").save_pretrained(pure)
    AutoTokenizer.from_pretrained(teacher).save_pretrained(pure)
    assert (
        main(["eval", "--model", str(pure), "--data", str(corpus), "--softmax-window", "8", "--quiet"]) == 2
    )
    assert "no layer keeps softmax attention" in capsys.readouterr().err
    generated = ["generate", "--model", str(out), "--prompt", "the ant", "--max-new-tokens", "3"]
    assert main([*generated, "--softmax-window", "8", "--softmax-sinks", "1"]) == 0
    assert main([*generated, "--softmax-window", "0"]) == 2
    assert "at least 1 token" in capsys.readouterr().err


def test_compiled_prefill_of_a_windowed_hybrid_has_no_graph_break_and_equals_eager(op_device, monkeypatch):  # noqa: F811
    """The windowed layer's masking and pruning compile with the layer (on a CPU through aot_eager,
    as Inductor takes the graph on a GPU), from no state and from a pruned one. Compiled and eager
    differ by rounding only: no more than eager differs from the PyTorch reference (fla's fp32
    dots are tf32 on a GPU, as in test_prefill)."""
    from torch._dynamo.utils import counters

    from test_prefill import three_prefills

    student = perturbed_student(**WINDOWED).to(op_device)
    runs = three_prefills(student, monkeypatch, op_device)
    assert counters["stats"]["unique_graphs"] and not counters["graph_break"], dict(counters["graph_break"])
    assert not student.model.compiled_layers.failed

    def flat(run):  # a windowed layer's state is its keys, values, columns and ranks
        return [t for x in run for t in (x if isinstance(x, tuple) else (x,))]

    for ours, eager, reference in zip(*(flat(runs[k]) for k in ("compiled", "eager", "reference"))):
        if ours.is_floating_point():
            assert rel_err(ours, eager) <= max(2 * rel_err(eager, reference), 1e-5)
        else:  # which columns a window keeps is exact
            assert torch.equal(ours, eager) and torch.equal(eager, reference)


def test_a_windowed_hybrid_prefills_in_pieces_of_its_window(monkeypatch):
    """A piece's mask spans the piece and the kept keys: pieces of the window's length (whole
    pieces of 64) keep it small at any prompt length, and give what one pass gives."""
    from test_prefill import count_passes

    student = perturbed_student(**{**WINDOWED, "softmax_window": 70})  # 72 slots: pieces of 128
    ids = torch.randint(0, 320, (2, 300), generator=torch.Generator().manual_seed(3))
    lengths = count_passes(monkeypatch)
    with torch.no_grad():
        pieces = student(ids, use_cache=True, logits_to_keep=1).logits
        student.config.prefill_chunk_tokens = None  # one pass
        one_pass = student(ids, use_cache=True, logits_to_keep=1).logits
    assert lengths == [128, 128, 44, 300]
    torch.testing.assert_close(pieces, one_pass, rtol=1e-4, atol=1e-4)


def test_decoding_buffers_refuse_a_state_of_another_window():
    """A cache made under one window, bound to buffers made for another (the window changed on the
    config meanwhile), is refused by name instead of broadcast into the slots."""
    from radlads.models.attention import WindowKV

    student = perturbed_student(**WINDOWED)
    with torch.no_grad():
        state = student(torch.zeros(1, 3, dtype=torch.long), use_cache=True).cache.states[0]
    WindowKV.like(state, state[0].shape[1]).load(state)
    with pytest.raises(ValueError, match="the window changed"):
        WindowKV.like(state, state[0].shape[1] + 4).load(state)


def test_a_hybrids_unpadded_prompt_prefills_without_a_mask(monkeypatch):
    """A mask of ones (as generate() passes for an unpadded prompt) is dropped before the layers, so
    a whole-context softmax layer runs SDPA's causal kernel rather than a [T, S] mask; a padded
    batch keeps its mask, and both give what they gave."""
    import torch.nn.functional as F

    import radlads.models.attention as attention

    student = perturbed_student(**WHOLE)
    masks, attend = [], F.scaled_dot_product_attention

    def sdpa(*args, attn_mask=None, **kwargs):
        masks.append(attn_mask)
        return attend(*args, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", sdpa)
    ids = torch.randint(0, 320, (2, 30), generator=torch.Generator().manual_seed(4))
    ones = torch.ones_like(ids)
    padded = ones.clone()
    padded[1, :4] = 0
    with torch.no_grad():
        unmasked = student(ids).logits
        assert torch.equal(student(ids, attention_mask=ones).logits, unmasked)
        student(ids, attention_mask=padded)
    assert [m is None for m in masks] == [True, True, True, True, False, False]


def test_a_window_that_covers_the_sequence_runs_causal_attention_without_a_mask(monkeypatch):
    """Training windows no longer than the window (no cache, no padding) take SDPA's causal path, as
    a whole-context layer does, and give what the masked path gives; a longer sequence or a padded
    batch builds the window's mask."""
    import torch.nn.functional as F

    import radlads.models.attention as attention

    masks, attend = [], F.scaled_dot_product_attention

    def sdpa(*args, attn_mask=None, **kwargs):
        masks.append(attn_mask)
        return attend(*args, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", sdpa)
    whole = perturbed_student(**WHOLE)
    ids = torch.randint(0, 320, (2, 30), generator=torch.Generator().manual_seed(5))
    padded = torch.ones_like(ids)
    padded[1, :3] = 0
    with torch.no_grad():
        for window in (30, 29):
            windowed = perturbed_student(**{**WINDOWED, "softmax_window": window, "softmax_sinks": 0})
            windowed.load_state_dict(whole.state_dict())
            masks.clear()
            logits = windowed(ids).logits
            assert all((m is None) == (window == 30) for m in masks) and masks, window
            if window == 30:
                torch.testing.assert_close(logits, whole(ids).logits)
                masks.clear()
                windowed(ids, attention_mask=padded)
                assert masks and all(m is not None for m in masks)


def test_convert_gives_a_small_teacher_its_induction_layers_windowed_by_default(tmp_path):
    """With no --softmax-layers, `convert` (--preset auto) keeps a small teacher's two strongest
    induction layers as softmax attention windowed at step 3's length (the teacher's trained 512
    here), so the exported student's cache stops growing there; `--softmax-layers none` converts a
    pure student."""
    from radlads.cli.main import main
    from test_convert import convert_args
    from tiny_models import make_teacher_folder, write_corpus

    teacher = make_teacher_folder(tmp_path, num_hidden_layers=16)
    corpus = write_corpus(tmp_path / "corpus", documents=60)
    budgets = ["--step1-tokens", "2k", "--step2-tokens", "2k", "--step3-tokens", "0"]
    assert main(convert_args(teacher, corpus, tmp_path / "hybrid", *budgets)) == 0
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "hybrid").eval()
    layers = student.config.softmax_layers
    assert len(layers) == 2 and student.config.softmax_window == 512
    with torch.no_grad():
        cache = student(torch.randint(0, 300, (1, 600)), use_cache=True).cache
    assert cache.states[layers[0]][0].shape[1] == 512 + student.config.softmax_sinks
    assert main(convert_args(teacher, corpus, tmp_path / "pure", *budgets, "--softmax-layers", "none")) == 0
    pure = json.loads((tmp_path / "pure" / "config.json").read_text())
    assert pure["softmax_layers"] == [] and pure["softmax_window"] is None
