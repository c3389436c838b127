"""Hybrid students keep softmax attention in the teacher's induction layers (auto:N), and the measures behind it."""

from __future__ import annotations

import json

import pytest
import torch

from radlads.cli.main import main
from radlads.convert import pipeline
from radlads.convert.layer_choice import (
    CopyHeads,
    attention_reach,
    auto_count,
    copy_heads,
    copy_scores,
    strongest,
)
from tiny_models import make_teacher, make_teacher_folder, write_corpus


def test_attention_reach_is_the_far_weight_of_late_queries():
    teacher = make_teacher("llama")
    ids = torch.randint(0, teacher.config.vocab_size, (2, 160), generator=torch.Generator().manual_seed(0))
    reach = attention_reach(teacher, ids, distances=(32, 64), sink_tokens=4, late=0.25)
    assert teacher.config._attn_implementation == "sdpa"  # put back after the measurement
    teacher.set_attn_implementation("eager")
    with torch.no_grad():
        weights = teacher(input_ids=ids, output_attentions=True).attentions
    q, k = torch.arange(120, 160)[:, None], torch.arange(160)[None]
    for i, w in enumerate(weights):
        late = w[:, :, 120:]  # [B, H, the last 40 queries, T]
        for d in (32, 64):
            expected = (late * ((q - k > d) & (k >= 4))).sum(-1).mean()
            assert reach.beyond[d][i] == pytest.approx(expected.item(), rel=1e-5)
        assert reach.sinks[i] == pytest.approx(late[..., :4].sum(-1).mean().item(), rel=1e-5)


def test_copy_scores_find_the_induction_and_previous_token_heads():
    L = 8
    weights = torch.full((1, 3, 2 * L, 2 * L), 0.0)
    t = torch.arange(1, 2 * L)
    weights[0, 0, t, t - 1] = 1.0  # a previous-token head
    second = torch.arange(L, 2 * L - 1)
    weights[0, 1, second, second - L + 1] = 1.0  # an induction head, on the second copy only
    weights[0, 2] = 1.0 / (2 * L)  # a diffuse head
    induction, previous = copy_scores(weights, L).tolist()
    assert induction == pytest.approx(1.0) and previous == pytest.approx(1.0)
    weights[0, 1] = 0.0
    assert copy_scores(weights, L)[0].item() == pytest.approx(1 / (2 * L))  # the diffuse head's share


def test_copy_heads_scores_every_layer_of_a_teacher():
    teacher = make_teacher("llama")
    heads = copy_heads(teacher, teacher.config.vocab_size, length=16, batch=2)
    layers = teacher.config.num_hidden_layers
    assert len(heads.induction) == len(heads.previous_token) == layers
    assert all(0.0 <= s <= 1.0 for s in heads.induction + heads.previous_token)
    assert teacher.config._attn_implementation == "sdpa"


def test_strongest_and_bad_specs():
    assert strongest([0.1, 0.7, 0.2, 0.6], 2) == [1, 3]
    assert auto_count("auto:2") == 2 and auto_count([1, 2]) is None
    with pytest.raises(ValueError, match="auto:N"):
        auto_count("auto:two")
    with pytest.raises(ValueError, match="between 1 and 3"):
        strongest([0.1, 0.7, 0.2, 0.6], 4)


def test_convert_keeps_the_chosen_layers_from_step_0_on(tmp_path, capsys, monkeypatch):
    teacher, corpus = make_teacher_folder(tmp_path), write_corpus(tmp_path / "corpus")
    out = tmp_path / "student"
    args = [
        "--teacher", str(teacher), "--data", str(corpus), "--out", str(out), "--seq-len", "256",
        "--batch-size", "2", "--step1-tokens", "1k", "--step3-tokens", "0", "--quiet",
    ]  # fmt: skip
    too_many = [*args[:5], str(tmp_path / "other"), *args[6:], "--softmax-layers", "auto:3"]
    assert main(["step0", *too_many]) == 2  # all 3 layers: nothing would be converted
    assert "between 1 and 2" in capsys.readouterr().err
    calls = []

    def heads(teacher, vocab_size):  # layer 1 holds the induction head, whatever the random teacher
        calls.append(vocab_size)
        return CopyHeads(induction=[0.1, 0.5, 0.2], previous_token=[0.9, 0.0, 0.0])

    monkeypatch.setattr(pipeline, "copy_heads", heads)
    assert main(["step0", *args, "--softmax-layers", "auto:1"]) == 0
    chosen = json.loads((out / "config.json").read_text())["softmax_layers"]
    assert chosen == [1] and len(calls) == 1
    # later steps build on step 0's student: the same layer, measured once
    assert main(["step1", *args, "--softmax-layers", "auto:1"]) == 0
    assert json.loads((out / "checkpoints/step1/config.json").read_text())["softmax_layers"] == chosen
    assert len(calls) == 1


def test_auto_keeps_the_teachers_strongest_induction_layer(tmp_path):
    teacher_dir, corpus = make_teacher_folder(tmp_path), write_corpus(tmp_path / "corpus")
    out = tmp_path / "student"
    args = ["--teacher", str(teacher_dir), "--data", str(corpus), "--out", str(out), "--seq-len", "128"]
    assert main(["step0", *args, "--softmax-layers", "auto:1", "--quiet"]) == 0
    teacher = pipeline.load_teacher(teacher_dir)
    expected = strongest(copy_heads(teacher, teacher.config.vocab_size).induction, 1)
    assert json.loads((out / "config.json").read_text())["softmax_layers"] == expected


def test_layer_fit_swaps_and_trains_a_group_of_layers(tmp_path, monkeypatch):
    """scripts/layer_fit.py --together: the listed layers are fitted and probed as one group, the
    teacher's own figures beside them, under step 2's loss as well as cross-entropy."""
    import runpy
    import sys
    from pathlib import Path

    teacher, corpus = make_teacher_folder(tmp_path), write_corpus(tmp_path / "corpus", documents=120)
    shards = tmp_path / "shards"
    assert main(["prepare-data", "--teacher", str(teacher), "--data", str(corpus), "--out", str(shards)]) == 0
    script = Path(__file__).parents[1] / "scripts" / "layer_fit.py"
    common = ["--seq-len", "64", "--train-windows", "4", "--heldout-windows", "2", "--updates", "2"]
    runs = {
        "group": ["--layers", "0,2", "--together", "--lm-updates", "2", "--lm-loss", "kl"],
        "one": ["--layers", "2"],
    }
    records = {}
    for name, extra in runs.items():
        monkeypatch.setattr(
            sys, "argv", ["layer_fit.py", str(teacher), str(shards), str(tmp_path / name), *common, *extra]
        )
        runpy.run_path(str(script), run_name="__main__")
        records[name] = json.loads((tmp_path / name / "layer_fit.json").read_text())
    group, one = records["group"]["layers"], records["one"]["layers"]
    assert list(group) == ["0,2"] and sorted(group["0,2"]["fit"]) == ["0", "2"]
    assert list(one) == ["2"] and "relative_error" in one["2"]  # one layer keeps the flat record
    for entry, record in ((group["0,2"], records["group"]), (one["2"], records["one"])):
        assert sorted(entry["copy_nll_swapped"]) == sorted(record["copy_nll_teacher"]) == ["0", "64"]
        # the mixers barely trained, so swapping them in must move the teacher's loss
        assert entry["heldout_nll_swapped"] != pytest.approx(record["heldout_nll_teacher"], abs=1e-3)
    assert group["0,2"]["heldout_nll_swapped"] != pytest.approx(one["2"]["heldout_nll_swapped"], abs=1e-3)


def test_layer_fit_centre_keys_leaves_no_mean_key():
    """scripts/layer_fit.py's centre_keys: over the inputs it was given, every KV head's keys
    (with a bias, as Qwen has) average to zero afterwards, from far off zero before."""
    import runpy
    from pathlib import Path

    from radlads.convert.transfer import transfer
    from tiny_models import make_teacher

    centre_keys = runpy.run_path(str(Path(__file__).parents[1] / "scripts" / "layer_fit.py"))["centre_keys"]
    student = transfer(make_teacher("qwen2", num_hidden_layers=2), "rad-rwkv7")
    cfg = student.config
    inputs = torch.randn(2, 3, 16, cfg.hidden_size) + 2.0  # a shared offset gives the keys a mean

    def mean_keys() -> torch.Tensor:
        return torch.stack(
            [layer.self_attn.k_proj(x).mean((0, 1)) for layer, x in zip(student.model.layers, inputs)]
        ).detach()

    before = mean_keys()
    centre_keys(student, inputs)
    assert before.abs().max() > 0.1
    assert mean_keys().abs().max() < 1e-4 * before.abs().max()


def test_align_by_position_trains_both_arms_and_reports_each_bucket(tmp_path, monkeypatch):
    """scripts/align_by_position.py: in each arm (the default student, the output GroupNorm, the
    per-head decay init) step 1's loss falls on the same batches, and every layer's held-out
    figures come per position bucket, cut to the window."""
    import runpy
    import sys
    from pathlib import Path

    teacher, corpus = make_teacher_folder(tmp_path), write_corpus(tmp_path / "corpus", documents=200)
    shards = tmp_path / "shards"
    assert main(["prepare-data", "--teacher", str(teacher), "--data", str(corpus), "--out", str(shards)]) == 0
    script = Path(__file__).parents[1] / "scripts" / "align_by_position.py"
    out = tmp_path / "report.json"
    argv = [
        "--arms",
        "default,groupnorm,per-head-decay",
        "--layers",
        "1",
        "--updates",
        "12",
        "--seq-len",
        "32",
        "--batch",
        "2",
        "--eval-len",
        "96",
        "--heldout-windows",
        "2",
    ]
    monkeypatch.setattr(sys, "argv", ["align_by_position.py", str(teacher), str(shards), str(out), *argv])
    runpy.run_path(str(script), run_name="__main__")
    report = json.loads(out.read_text())
    assert report["buckets"] == [[0, 64], [64, 96]]
    for arm in ("default", "groupnorm", "per-head-decay"):
        losses = report["arms"][arm]["train_loss"]
        assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3]), (arm, losses)
        for when in ("init", "trained"):
            cells = report["arms"][arm][when]["1"]
            assert len(cells) == 2 and all(c["loss"] > 0 and -1 <= c["cos"] <= 1 for c in cells)
        held_out = {
            when: sum(c["loss"] for c in report["arms"][arm][when]["1"]) for when in ("init", "trained")
        }
        assert held_out["trained"] < held_out["init"], (arm, held_out)
    # each arm's option takes effect: their first outputs differ from the default's
    first = {arm: report["arms"][arm]["init"]["1"][0]["loss"] for arm in report["arms"]}
    assert first["groupnorm"] != pytest.approx(first["default"])
    assert first["per-head-decay"] != pytest.approx(first["default"])


@pytest.mark.parametrize("arch", ["rad-rwkv7", "rad-rwkv6"])
def test_step1_outputs_of_listed_layers_are_those_of_all_layers(arch):
    """student_attention_outputs(layers=...): the listed mixers' outputs as when every mixer runs
    (the first mixer runs anyway: its v is the others' v_first), None for the rest."""
    from radlads.convert.alignment import student_attention_outputs, teacher_attention_io
    from radlads.convert.transfer import transfer

    teacher = make_teacher("qwen2", num_hidden_layers=4).eval()
    student = transfer(teacher, arch=arch, softmax_layers=[0]).eval()
    ids = torch.randint(0, teacher.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    io = teacher_attention_io(teacher, ids)
    with torch.no_grad():
        every = student_attention_outputs(student, io)
        listed = student_attention_outputs(student, io, layers=[3])
    assert every[0] is None and all(y is not None for y in every[1:])
    assert listed[0] is None and listed[2] is None and listed[1] is not None  # 1: the first mixer
    torch.testing.assert_close(listed[3], every[3], rtol=0, atol=0)
