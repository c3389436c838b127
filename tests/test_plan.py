"""radlads plan: exact parameter counts from config.json alone, monotone memory estimates, CLI table."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from radlads.cli.main import main
from radlads.convert.plan import GPU_COUNTS, decode_memory, kept_kernel_bytes, plan
from radlads.convert.transfer import transfer
from tiny_models import make_teacher, make_teacher_folder


def _numel(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "llama"])
@pytest.mark.parametrize("arch", ["rad-rwkv7", "rad-rwkv6"])
def test_parameter_counts_match_real_models(tmp_path, family, arch):
    teacher = make_teacher(family)
    teacher.config.save_pretrained(tmp_path)  # config.json only: the plan never reads weights
    student = transfer(teacher, arch=arch, softmax_layers=[-1])
    result = plan(tmp_path, arch=arch, softmax_layers=(-1,))

    assert result.teacher_params == _numel(teacher)
    assert result.student_params == _numel(student)
    mixers = [
        layer.self_attn
        for i, layer in enumerate(student.model.layers)
        if not student.config.is_softmax_layer(i)
    ]
    assert result.mixer_params == sum(_numel(m) for m in mixers)
    student.untie_embeddings()
    assert result.student_params_untied == _numel(student)
    # a config.json path works like its folder
    assert (
        plan(tmp_path / "config.json", arch=arch, softmax_layers=(-1,)).student_params
        == result.student_params
    )


def test_memory_monotone(tmp_path):
    make_teacher("qwen2").config.save_pretrained(tmp_path)
    short = plan(tmp_path, seq_len=256, step3_seq_len=1024)
    long = plan(tmp_path, seq_len=1024, step3_seq_len=4096)
    for s in short.steps:
        per_gpu = [s.per_gpu_bytes(n) for n in GPU_COUNTS]
        assert all(a > b for a, b in zip(per_gpu, per_gpu[1:])), s.name
    for a, b in zip(short.steps, long.steps):
        assert b.activation_bytes > a.activation_bytes, a.name
        assert b.states_bytes == a.states_bytes
    by_name = {s.name: s for s in long.steps}
    assert by_name["step 2 (KL, act. ckpt)"].activation_bytes < by_name["step 2 (KL)"].activation_bytes
    assert by_name["step 3 (CE, act. ckpt)"].activation_bytes < by_name["step 3 (CE)"].activation_bytes
    # a smaller GPU never needs fewer GPUs
    assert plan(tmp_path, gpu_memory_gb=0.001).recommended_gpus() in (None, *GPU_COUNTS)
    assert short.recommended_gpus() == 1


def test_cli_prints_table(tmp_path, capsys):
    folder = make_teacher_folder(tmp_path)
    assert main(["plan", "--teacher", str(folder), "--gpu-memory-gb", "24", "--batch-size", "2"]) == 0
    out = capsys.readouterr().out
    assert "| step 1 (alignment) |" in out and "| step 3 (CE, act. ckpt) |" in out
    assert "teacher parameters:" in out and "Recommended: 1 GPU(s) of 24 GB" in out
    assert main(["plan", "--teacher", str(tmp_path / "missing")]) == 2
    args = ["plan", "--teacher", str(folder), "--batch-size", "64", "--seq-len", "4096"]
    tables = []
    for flags in ([], ["--keep-kernel-intermediates"], ["--keep-kernel-intermediates", "--tilelang"]):
        assert main(args + flags) == 0
        tables.append(capsys.readouterr().out)
    step1 = [next(line for line in t.splitlines() if line.startswith("| step 1")) for t in tables]
    default, triton, tilelang = (float(row.split("|")[3]) for row in step1)  # activations GB/GPU
    assert default < tilelang < triton
    # auto:N plans as N softmax layers (which ones does not change memory)
    assert main(args + ["--softmax-layers", "auto:1"]) == 0
    auto = capsys.readouterr().out
    assert main(args + ["--softmax-layers", "2"]) == 0
    assert auto == capsys.readouterr().out != tables[0]


@pytest.mark.parametrize("arch", ["rad-rwkv7", "rad-rwkv6"])
def test_kept_kernel_intermediates_count_per_converted_layer_token_and_head(tmp_path, arch):
    """RAD-RWKV7 keeps fla's intermediates in every converted layer (2,176 bytes per token and head
    at head size 64: what the custom op's fake outputs hold); under activation checkpointing the
    recomputed layer keeps them either way; RAD-RWKV6's kernels always recompute."""
    make_teacher("qwen2").config.save_pretrained(tmp_path)
    options = dict(arch=arch, softmax_layers=(1,), batch_size=4, seq_len=128, step3_seq_len=512)
    default, kept = plan(tmp_path, **options), plan(tmp_path, keep_kernel_intermediates=True, **options)
    cfg = make_teacher("qwen2").config
    converted = cfg.num_hidden_layers - 1
    per_token = cfg.num_attention_heads * kept_kernel_bytes(cfg.hidden_size // cfg.num_attention_heads)
    extra = {a.name: b.activation_bytes - a.activation_bytes for a, b in zip(default.steps, kept.steps)}
    expected = converted * per_token if arch == "rad-rwkv7" else 0
    assert extra["step 1 (alignment)"] == pytest.approx(4 * 128 * expected)
    assert extra["step 2 (KL)"] == pytest.approx(4 * 128 * expected)
    assert extra["step 3 (CE)"] == pytest.approx(512 * expected)
    assert extra["step 2 (KL, act. ckpt)"] == extra["step 3 (CE, act. ckpt)"] == 0
    assert kept_kernel_bytes(64) == 2176


def test_tilelang_kept_intermediates_match_what_an_h100_measured(tmp_path):
    """fla's TileLang kernels keep 1,344 bytes per token and head at head size 64 (the fake outputs
    of its chunk_dplr_delta_rule_fwd_ctx op: 32-token chunks). On one H100 (Qwen2.5-0.5B shape,
    step 1, 96 x 512 tokens, kept) the peak fell from 72.6 GB on the Triton kernels to 58.9 GB on
    these: the plan's difference must be that difference, within 0.5 GB."""
    assert kept_kernel_bytes(64, tilelang=True) == 1344
    from transformers import Qwen2Config

    shape = dict(hidden_size=896, num_attention_heads=14, num_key_value_heads=2, num_hidden_layers=24)
    config = Qwen2Config(**shape, intermediate_size=4864, vocab_size=151936)
    config.save_pretrained(tmp_path)
    options = dict(batch_size=96, seq_len=512, keep_kernel_intermediates=True)
    triton, tilelang = (
        plan(tmp_path, tilelang=t, **options).steps[0].activation_bytes for t in (False, True)
    )
    assert (triton - tilelang) / 1e9 == pytest.approx(72.6 - 58.9, abs=0.5)


@pytest.mark.parametrize("arch", ["rad-rwkv7", "rad-rwkv6"])
@pytest.mark.parametrize("softmax_layers,window", [([], None), ([-1], None), ([-1], 16)])
def test_decode_memory_is_what_the_caches_hold(arch, softmax_layers, window):
    teacher = make_teacher("llama")
    student = transfer(teacher, arch=arch, softmax_layers=softmax_layers, softmax_window=window)
    ids = torch.randint(0, teacher.config.vocab_size, (1, 40))
    with torch.no_grad():
        kv = teacher(input_ids=ids, use_cache=True).past_key_values
        state = student(input_ids=ids, use_cache=True).past_key_values
    memory = decode_memory(student.config, kv_bytes=4)  # the tiny models run in fp32
    teacher_bytes = sum(
        t.numel() * t.element_size() for layer in kv.layers for t in (layer.keys, layer.values)
    )
    assert memory.teacher(40) == teacher_bytes
    assert memory.student(40) == state.nbytes()
    # A cache that grows with context where a softmax layer keeps every key; a windowed one's is fixed.
    assert (memory.student_kv_bytes_per_token > 0) == (bool(softmax_layers) and not window)
    assert (memory.window_kv_bytes > 0) == bool(window)


def test_cli_prints_decode_memory_up_to_the_trained_context(tmp_path, capsys):
    folder = make_teacher_folder(tmp_path, max_position_embeddings=8192)
    assert main(["plan", "--teacher", str(folder), "--softmax-layers", "auto:1"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith(("| 4,096 |", "| 8,192 |", "| 32,768 |"))]
    assert [r.split("|")[1].strip() for r in rows] == ["4,096", "8,192"]
    student, teacher = (float(cell.strip().split()[0].replace(",", "")) for cell in rows[1].split("|")[2:4])
    assert 0 < student < teacher


def test_cli_plans_the_student_convert_shapes_by_default(tmp_path, capsys):
    """Without --softmax-layers, plan sizes the student `convert --preset auto` builds: for a small
    teacher of 16 layers, two softmax layers windowed at step 3's length (the trained 8,192)."""
    folder = make_teacher_folder(tmp_path, max_position_embeddings=8192, num_hidden_layers=16)
    assert main(["plan", "--teacher", str(folder)]) == 0
    assert "KV cache for its window and sinks (8,196 tokens)" in capsys.readouterr().out
    assert main(["plan", "--teacher", str(folder), "--softmax-layers", "none"]) == 0
    assert "(student: 0.1 MB of recurrent state;" in capsys.readouterr().out  # no KV cache


def test_step3_plans_at_the_teachers_trained_context_unless_told(tmp_path):
    make_teacher("llama", max_position_embeddings=8192).config.save_pretrained(tmp_path)
    assert plan(tmp_path).step3_seq_len == 8192  # as convert runs step 3 for this teacher
    assert plan(tmp_path, step3_seq_len=2048).step3_seq_len == 2048
    make_teacher("llama", max_position_embeddings=131072).config.save_pretrained(tmp_path)
    assert plan(tmp_path).step3_seq_len == 16384


def test_plan_takes_this_machines_gpu_memory_unless_told(tmp_path, capsys, monkeypatch):
    folder = make_teacher_folder(tmp_path)
    assert main(["plan", "--teacher", str(folder)]) == 0  # no GPU here: 80 GB
    assert "On one GPU of 80 GB" in capsys.readouterr().out
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda i: SimpleNamespace(total_memory=143_771 * 2**20)
    )
    assert main(["plan", "--teacher", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "On one GPU of 150.8 GB" in out and "Recommended: 1 GPU(s) of 150.8 GB" in out
    assert main(["plan", "--teacher", str(folder), "--gpu-memory-gb", "24"]) == 0
    assert "On one GPU of 24 GB" in capsys.readouterr().out


def test_one_gpu_table_accumulates_to_the_global_batch_as_convert_does(tmp_path, capsys):
    """--batch-size with --global-batch-size: convert accumulates the rest, and so does the table."""
    folder = make_teacher_folder(tmp_path)
    argv = ["plan", "--teacher", str(folder), "--gpu-memory-gb", "80", "--batch-size", "4"]
    assert main(argv + ["--global-batch-size", "16"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("| 1 |", "| 2 |"))]
    assert len(rows) == 2 and all("| 4 x 512 x 4 |" in row for row in rows)
    assert main(argv + ["--global-batch-size", "10"]) == 2
    assert "make it a multiple" in capsys.readouterr().err


def test_mixer_activations_scale_with_heads_times_head_dim_not_the_hidden_size(tmp_path):
    """Qwen3 sets head_dim apart from hidden / heads (0.6B: 16 x 128 over 1,024): a mixer's r, k, v,
    gate, y... are heads x head_dim wide, so what backward keeps grows with that width, and so
    must the plan's step-1 estimate (the teachers' captured inputs and outputs stay hidden-sized)."""

    def per_layer(head_dim: int) -> tuple[float, float]:
        teacher = make_teacher("qwen3", hidden_size=128, head_dim=head_dim, num_hidden_layers=2)
        folder = tmp_path / str(head_dim)
        teacher.config.save_pretrained(folder)
        row = plan(folder, seq_len=256, batch_size=1).steps[0]
        planned = (row.activation_bytes / 256 - 2 * 2 * 128 * 2) / 2  # per converted layer and token
        mixer = transfer(teacher, "rad-rwkv7").train().model.layers[1].self_attn
        x = torch.randn(1, 256, 128, requires_grad=True)
        kept = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.nbytes) or t, lambda t: t):
            mixer(
                x,
                (torch.ones(1, 256, head_dim), torch.zeros(1, 256, head_dim)),
                v_first=torch.randn(1, 256, 4, head_dim),
            )
        return planned, sum(kept) / 256

    (plan_32, kept_32), (plan_64, kept_64) = per_layer(32), per_layer(64)  # width 128, then 256
    assert kept_64 / kept_32 > 1.7
    assert plan_64 / plan_32 > 1.7


@pytest.mark.parametrize("n", [0, 3, 9])
def test_plan_checks_auto_n_as_convert_does(tmp_path, capsys, n):
    """auto:N keeps 1 to layers - 1 softmax layers (convert's check); plan said nothing of auto:0 and
    named layers the user never gave for auto:9."""
    make_teacher("qwen2").config.save_pretrained(tmp_path)  # 3 layers
    assert main(["plan", "--teacher", str(tmp_path), "--softmax-layers", f"auto:{n}"]) == 2
    assert f"auto:{n} must keep between 1 and 2 of the teacher's 3 layers" in capsys.readouterr().err
