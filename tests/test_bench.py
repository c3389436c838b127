"""bench/training.py on CPU: every row is produced, FLOPs are counted right, OOMs fall back. No speed checks."""

from __future__ import annotations

import copy
import gzip
import itertools
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import training  # noqa: E402  (bench/ is scripts, not a package)
from common import ModelCost, build_student, build_teacher  # noqa: E402

FAST = ["--tiny", "--warmup", "1", "--updates", "1"]


def load_results(out: Path) -> dict:
    return json.loads((out / "training.json").read_text())


def test_tiny_run_has_a_finite_row_and_a_ratio_per_step_and_variant(tmp_path):
    training.main([*FAST, "--eager", "--keep", "--graph-break", "--out", str(tmp_path)])
    record = load_results(tmp_path)
    rows = {(r["step"], r["variant"]): r for r in record["results"]}
    assert set(rows) == {(s, v) for s in training.STEPS for v in training.VARIANTS}
    for row in rows.values():
        assert row["status"] == "ok", row
        for key in ("tok_s", "tflops_s", "update_ms"):
            assert math.isfinite(row[key]) and row[key] > 0, (key, row)
        assert 0 < row["mfu"] < 1 and math.isfinite(row["loss"])
    assert all(c["flops"]["total"] > 0 for c in record["cells"])
    ratios = training.ratios(record["results"])
    assert [(r["shape"], r["step"]) for r in ratios] == [("tiny", s) for s in training.STEPS]
    for r in ratios:  # against radlads' tokens/s of the same step (on CPU neither compiles nor keeps)
        tok_s = {v: rows[(r["step"], v)]["tok_s"] for v in training.VARIANTS}
        assert r["compile_gain"] == pytest.approx(tok_s["radlads"] / tok_s["radlads-eager"])
        assert r["keep_gain"] == pytest.approx(tok_s["radlads-keep"] / tok_s["radlads"])
        assert r["op_gain"] == pytest.approx(tok_s["radlads-keep"] / tok_s["radlads-keep-break"])
        assert r["tok_s_ratio"] == pytest.approx(tok_s["radlads"] / tok_s["baseline"])
    assert record["environment"]["torch"] == torch.__version__


def test_baseline_oom_is_recorded_and_retried_at_a_smaller_batch(tmp_path, monkeypatch):
    measure = training.measure

    def small_gpu(cell, teacher, student0, args, device, budget, row):
        if row["variant"] == "baseline" and row["batch"] > 1:
            raise torch.cuda.OutOfMemoryError("simulated")
        measure(cell, teacher, student0, args, device, budget, row)

    monkeypatch.setattr(training, "measure", small_gpu)
    training.main(
        [*FAST, "--steps", "3", "--batch", "4,4,4", "--baseline-batch", "2,2,2", "--out", str(tmp_path)]
    )
    rows = load_results(tmp_path)["results"]
    assert [(r["variant"], r["batch"], r["status"]) for r in rows] == [
        ("radlads", 4, "ok"),
        ("baseline", 4, "OOM"),
        ("baseline", 2, "OOM"),
        ("baseline", 1, "ok"),
    ]
    (ratio,) = training.ratios(rows)
    assert (ratio["radlads_batch"], ratio["baseline_batch"]) == (4, 1) and ratio["tok_s_ratio"] > 0


@pytest.fixture(scope="module")
def tiny_models():
    teacher = build_teacher("tiny", torch.device("cpu"), torch.float32)
    return teacher, build_student(teacher, "rad-rwkv7")


@pytest.mark.parametrize("step", [1, 2, 3])
@pytest.mark.parametrize("variant", ["radlads", "baseline"])
def test_counted_matmul_flops_match_torch_flop_counter(tiny_models, step, variant):
    """Every weight matmul (aten mm/addmm) of one update, forward and backward, against the formula
    (so no step recomputes a matmul behind the formula's back). Attention and the recurrence run as
    batched matmuls (bmm), which this comparison leaves out: their terms are analytic.
    """
    teacher, student0 = tiny_models
    args = training.parse_args(["--tiny"])
    batch, seq_len = 2, args.step3_seq_len if step == 3 else args.seq_len
    student = copy.deepcopy(student0).train()
    trainer = training.make_trainer(variant, step, teacher, student, args, batch, torch.device("cpu"))
    batches = itertools.repeat(torch.randint(0, 512, (batch, seq_len)))
    with FlopCounterMode(display=False) as counter:
        trainer.train_step(batches, trainer.cfg.lr)
    ops = counter.get_flop_counts()["Global"]
    counted = sum(n for op, n in ops.items() if op in (torch.ops.aten.mm, torch.ops.aten.addmm))
    flops = training.step_flops(
        step, ModelCost.of(teacher), ModelCost.of(student0), training.mixer_weights(student0), seq_len
    )
    expected = (flops["teacher_matmul"] + flops["student_matmul"]) * batch * seq_len
    if (step, variant) == (3, "radlads"):  # the last position has no next token: no head matmuls
        expected -= 6 * ModelCost.of(student0).lm_head_params * batch
    assert counted == expected


def test_no_budget_skips_every_cell_and_still_writes_the_json(tmp_path):
    variants = ["--eager", "--keep", "--graph-break"]
    training.main([*FAST, *variants, "--steps", "1", "--budget-s", "0", "--out", str(tmp_path)])
    rows = load_results(tmp_path)["results"]
    assert {r["variant"] for r in rows} == set(training.VARIANTS)
    assert all(r["status"] == "skipped (budget)" for r in rows)


def test_kernel_families_file_fused_kernels_first_and_unknown_ones_as_other():
    family = training.kernel_family
    assert family("triton_poi_fused__to_copy_mul_0") == "compiled (fused)"
    assert family("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_TNT") == "matmul"
    assert family("chunk_dplr_fwd_A_kernel_intra_tensorcore") == family("wu_fwd_kernel") == "recurrence"
    assert family("_kl_rows") == "vocab loss"
    assert family("void at::native::vectorized_elementwise_kernel<4, add>") == "elementwise"


def test_profile_writes_a_gzipped_chrome_trace_of_the_update(tmp_path):
    x = torch.randn(64, 64, requires_grad=True)
    trace = tmp_path / "trace-tiny.json.gz"
    result = training.profile_update(lambda: (x @ x).sum().backward(), top=3, trace=trace)
    with gzip.open(trace, "rt") as f:
        events = json.load(f)["traceEvents"]
    assert any("aten::mm" in e.get("name", "") for e in events)
    assert not trace.with_suffix("").exists()  # only the compressed copy is kept
    assert set(result) >= {"kernel_ms", "kernel_launches", "families", "top_kernels"}


def test_gpu_kernels_leave_out_cpu_ops_and_record_function_spans():
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    kernel = SimpleNamespace(key="nvjet_gemm", device_type=DeviceType.CUDA, is_user_annotation=False)
    span = SimpleNamespace(
        key="Optimizer.step#AdamW.step", device_type=DeviceType.CUDA, is_user_annotation=True
    )
    cpu_op = SimpleNamespace(key="aten::mm", device_type=DeviceType.CPU, is_user_annotation=False)
    assert training.gpu_kernels([kernel, span, cpu_op]) == [kernel]


def test_trace_summary_finds_busy_windows_idle_gaps_and_top_kernels(tmp_path, capsys):
    import trace_summary

    events = [
        dict(cat="cpu_op", name="aten::mm", ts=0, dur=50),
        dict(cat="kernel", name="nvjet_gemm", ts=100, dur=400),  # 0-400 us after the first kernel
        dict(cat="kernel", name="triton_poi_fused_add_0", ts=500, dur=100),  # 400-500
        dict(cat="kernel", name="nvjet_gemm", ts=1100, dur=300),  # after 500 us of idle: 1000-1300
    ]
    trace = tmp_path / "trace.json.gz"
    with gzip.open(trace, "wt") as f:
        json.dump({"traceEvents": events}, f)
    kernels = trace_summary.load_kernels(trace)
    assert [k.start_us for k in kernels] == [0, 400, 1000]
    first, second = trace_summary.windows(kernels, window_us=1000)
    assert first["busy"] == 0.5 and second["busy"] == 0.3
    assert first["families"] == "matmul 0.4, compiled (fused) 0.1"
    (gap,) = trace_summary.gaps(kernels, top=5)
    assert gap["at_ms"] == 0.5 and gap["idle_ms"] == 0.5 and gap["before"] == "nvjet_gemm"
    assert trace_summary.top_kernels(kernels, top=1) == [dict(ms=0.7, calls=2, kernel="nvjet_gemm")]
    trace_summary.main([str(trace), "--window-ms", "1"])
    assert "3 kernels, 0.8 ms of kernel time in a 1.3 ms span" in capsys.readouterr().out


def test_a_failing_row_is_recorded_and_fails_the_run(tmp_path, monkeypatch):
    """An exception in a row (e.g. torch.compile rejecting an option) is written down and the run
    exits non-zero, so a script running the benchmark sees the failure."""

    def broken(cell, teacher, student0, args, device, budget, row):
        raise RuntimeError("Unexpected optimization option")

    monkeypatch.setattr(training, "measure", broken)
    with pytest.raises(SystemExit, match="3 row"):
        training.main([*FAST, "--no-baseline", "--out", str(tmp_path)])
    rows = load_results(tmp_path)["results"]
    assert [r["status"] for r in rows] == ["error: RuntimeError: Unexpected optimization option"] * 3


def test_compare_runs_pairs_rows_of_two_runs_by_shape_step_variant_and_batch():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import compare_runs

    def run(*rows):
        keys = ("shape", "step", "variant", "batch", "tok_s", "update_ms", "mfu")
        return {"environment": {}, "results": [dict(zip(keys, r)) for r in rows]}

    base = run(("s", 2, "radlads-keep", 48, 100.0, 10.0, 0.3), ("s", 1, "radlads-keep", 96, 50.0, 5.0, 0.2))
    new = run(("s", 2, "radlads-keep", 48, 110.0, 9.1, 0.33), ("s", 1, "radlads-keep", 80, 60.0, 4.0, 0.22))
    (row,) = compare_runs.compare(base, new)  # step 1 ran at another batch: no pair
    assert (row["step"], row["tok_s_ratio"]) == (2, pytest.approx(1.1))


def test_step1_overlap_runs_the_teacher_as_each_workload_says(tiny_models, tmp_path):
    import step1_overlap

    teacher, student0 = tiny_models
    student = copy.deepcopy(student0).train()
    args = training.parse_args(["--tiny"])
    trainer = training.make_trainer("radlads-keep", 1, teacher, student, args, 2, torch.device("cpu"))
    ids = [torch.randint(0, teacher.config.vocab_size, (2, 16)) for _ in range(2)]
    runs = step1_overlap.workloads(teacher, student, trainer, ids, torch.device("cpu"))
    calls = []
    teacher.model.layers[0].self_attn.register_forward_hook(lambda *_: calls.append(1))
    counted = {}
    for name, run in runs.items():
        calls.clear()
        run()
        counted[name] = len(calls)
    # "student" trains on teacher I/O computed beforehand: it must not run the teacher again.
    assert counted == dict(teacher=1, student=0, update=1, serial=2, overlapped=2)
    step1_overlap.main(["--tiny", "--out", str(tmp_path)])
    results = json.loads((tmp_path / "step1-overlap-b2.json").read_text())["results"]
    assert all(math.isfinite(results[name]) for name in runs)


def test_a_hybrids_cost_counts_its_softmax_and_linear_layers_apart(tiny_models):
    """The memory and FLOP floors of bench/inference.py's rows: a teacher's KV cache in every layer,
    a pure student's state in every layer, a hybrid's KV in its softmax layers and state elsewhere."""
    from radlads.models.cache import RadladsCache

    teacher, student = tiny_models
    hybrid = build_student(teacher, "rad-rwkv7", softmax_layers=[-1])
    costs = {
        name: ModelCost.of(m) for name, m in (("teacher", teacher), ("student", student), ("hybrid", hybrid))
    }
    layers = teacher.config.num_hidden_layers
    assert [c.softmax_layers for c in costs.values()] == [layers, 0, 1]
    ids = torch.randint(0, 64, (1, 5))
    for name in ("student", "hybrid"):
        with torch.no_grad():
            cache = {"student": student, "hybrid": hybrid}[name](
                ids, cache=RadladsCache(layers), use_cache=True
            ).cache
        assert cache.nbytes() == costs[name].state_bytes() + 5 * costs[name].kv_bytes_per_token(), name
    assert costs["hybrid"].piece_tokens is None and costs["student"].piece_tokens
    assert costs["teacher"].state_bytes() == 0 and costs["teacher"].recurrence_flops_per_token() == 0
    assert costs["hybrid"].recurrence_flops_per_token() * layers == costs[
        "student"
    ].recurrence_flops_per_token() * (layers - 1)
    # A windowed hybrid keeps its window and sinks (3 here) of keys: the 5 tokens leave 3.
    windowed = build_student(teacher, "rad-rwkv7", softmax_layers=[-1], softmax_window=2, softmax_sinks=1)
    cost = ModelCost.of(windowed)
    with torch.no_grad():
        cache = windowed(ids, cache=RadladsCache(layers), use_cache=True).cache
    assert cache.nbytes() == cost.state_bytes() + 3 * cost.kv_bytes_per_token() and cost.kept(5) == 3
    assert cost.piece_tokens  # a windowed hybrid prefills in pieces
