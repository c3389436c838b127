"""Tests of radlads.eval: hand-computed scoring math, loaders on the shipped samples, end to end."""

from __future__ import annotations

import importlib.util
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from radlads.eval import (
    SAMPLES_DIR,
    TASKS,
    ModelResults,
    average_zero_shot,
    bench_generate,
    encode_pair,
    evaluate_copying,
    evaluate_passkey,
    evaluate_perplexity,
    evaluate_tasks,
    load_docs,
    make_passkey_prompt,
    register_lm_eval_model,
    write_report,
)
from radlads.eval.passkey import FILLER
from radlads.eval.scoring import Request, cloze_metrics, multiple_choice_metrics, score_requests
from radlads.eval.tasks import Doc, score_docs

# ---------------------------------------------------------------- hand-computable fakes


class CharTokenizer:
    """One token per character of a fixed alphabet; the harness' tokenizer interface, nothing more."""

    bos_token_id = eos_token_id = 0

    def __init__(self, alphabet: str):
        self.ids = {c: i for i, c in enumerate(alphabet)}

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [self.ids[c] for c in text]


class BigramLM(torch.nn.Module):
    """Logits at position t are a fixed row chosen by token t, so every log-prob is known by hand."""

    def __init__(self, log_probs: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(log_probs, requires_grad=False)

    @property
    def device(self) -> torch.device:
        return self.table.device

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return SimpleNamespace(logits=self.table[input_ids])


ALPHABET = "Q ab"  # Q = question mark-like context token, " " = the harness' target delimiter
P = {
    # next-token probabilities after each token, over ALPHABET
    "Q": [0.1, 0.7, 0.1, 0.1],
    " ": [0.0914, 0.0914, math.exp(-1.0), math.exp(-0.8)],
    "a": [0.25, 0.25, 0.25, 0.25],
    "b": [(1 - math.exp(-0.8)) / 3] * 3 + [math.exp(-0.8)],
}


@pytest.fixture
def bigram():
    rows = torch.tensor([P[c] for c in ALPHABET], dtype=torch.float64)
    rows = rows / rows.sum(-1, keepdim=True)  # " " row rounds to 1 only approximately
    return BigramLM(rows.log().float()), CharTokenizer(ALPHABET), rows.log()


def test_encode_pair_moves_trailing_space_to_continuation():
    tok = CharTokenizer(ALPHABET)
    assert encode_pair(tok, "Q ", "a") == ([0], [1, 2])
    assert encode_pair(tok, "Q", " a") == ([0], [1, 2])
    assert encode_pair(tok, "", "ab") == ([tok.bos_token_id], [2, 3])


def test_loglik_and_greedy_by_hand(bigram):
    model, tok, logp = bigram
    a, bb = score_requests(model, tok, [Request("Q", " a"), Request("Q", " bb")], batch_size=2)
    # " a" = P( |Q) P(a| ); " bb" = P( |Q) P(b| ) P(b|b)
    assert a.value == pytest.approx(float(logp[0, 1] + logp[1, 2]), abs=1e-5)
    assert bb.value == pytest.approx(float(logp[0, 1] + logp[1, 3] + logp[3, 3]), abs=1e-5)
    assert not a.is_greedy and bb.is_greedy  # after " ", b (e^-0.8) beats a (e^-1)


def test_acc_and_acc_norm_disagree(bigram):
    model, tok, _ = bigram
    # loglik(" a") ~ log .7 - 1.0 beats loglik(" bb") ~ log .7 - 1.6, but per character of the
    # choice ("a": 1, "bb": 2) the longer choice wins.
    doc = Doc((Request("Q", " a"), Request("Q", " bb")), gold=1, choice_lengths=(1, 2))
    task = TASKS["piqa"]
    assert score_docs(model, tok, task, [doc]) == {"acc": 0.0, "acc_norm": 1.0}
    assert multiple_choice_metrics([[-1.0, -1.6]], [0], [[1, 2]]) == {"acc": 1.0, "acc_norm": 0.0}


def test_lambada_acc_and_perplexity_by_hand(bigram):
    model, tok, logp = bigram
    docs = [TASKS["lambada_openai"].build({"text": text}) for text in ("Q bb", "Q a")]
    assert docs[0].requests[0] == Request("Q", " bb")
    scores = score_docs(model, tok, TASKS["lambada_openai"], docs)
    ll_bb = float(logp[0, 1] + logp[1, 3] + logp[3, 3])
    ll_a = float(logp[0, 1] + logp[1, 2])
    assert scores["acc"] == 0.5
    assert scores["perplexity"] == pytest.approx(math.exp(-(ll_bb + ll_a) / 2), rel=1e-5)


def test_cloze_metrics_on_values():
    from radlads.eval.scoring import Loglik

    scores = cloze_metrics([Loglik(-2.0, True), Loglik(-4.0, False)])
    assert scores == {"acc": 0.5, "perplexity": pytest.approx(math.exp(3.0))}


def test_perplexity_of_uniform_logits_is_vocab_size():
    vocab, batch, length = 37, 3, 20
    model = BigramLM(torch.zeros(vocab, vocab))
    windows = [torch.randint(vocab, (batch, length)) for _ in range(2)]
    result = evaluate_perplexity(model, windows, progress=False)
    assert result.ppl == pytest.approx(vocab, rel=1e-5)
    assert result.tokens == 2 * batch * (length - 1)
    assert result.loss_by_position.shape == (length - 1,)
    np.testing.assert_allclose(result.loss_by_position, math.log(vocab), rtol=1e-5)


def test_perplexity_chunking_and_ragged_windows():
    torch.manual_seed(0)
    model = BigramLM(torch.randn(11, 11).log_softmax(-1))
    windows = [torch.randint(11, (2, 16)), torch.randint(11, (1, 8))]
    whole = evaluate_perplexity(model, windows, chunk_len=1000, progress=False)
    chunked = evaluate_perplexity(model, windows, chunk_len=3, progress=False)
    assert chunked.nll == pytest.approx(whole.nll, rel=1e-6)
    assert whole.tokens == 2 * 15 + 7
    assert whole.loss_by_position.shape == (15,)
    # the last positions come only from the two long windows
    ids = windows[0]
    expected = -model.table[ids[:, -2], ids[:, -1]].mean()
    assert whole.loss_by_position[-1] == pytest.approx(float(expected), rel=1e-5)


# ---------------------------------------------------------------- loaders on the shipped samples

GOLDS = {
    "arc_challenge": [0, 1, 2, 3, 0, 1, 2, 3],
    "arc_easy": [0, 1, 2, 3, 0, 1, 2, 3],
    "hellaswag": [0, 1, 2, 3, 0, 1, 2, 3],
    "lambada_openai": [0] * 8,
    "piqa": [0, 1, 0, 0, 1, 0, 1, 0],
    "sciq": [3] * 8,
    "winogrande": [0, 1, 1, 0, 1, 1, 0, 0],
}
N_CHOICES = {"hellaswag": 4, "lambada_openai": 1, "piqa": 2, "sciq": 4, "winogrande": 2}


@pytest.mark.parametrize("task", sorted(TASKS))
def test_loader_on_sample(task):
    docs = load_docs(task, SAMPLES_DIR / f"{task}.jsonl")
    assert [doc.gold for doc in docs] == GOLDS[task]
    if task in N_CHOICES:
        assert all(len(doc.requests) == N_CHOICES[task] for doc in docs)
    assert len(load_docs(task, SAMPLES_DIR / f"{task}.jsonl", limit=3)) == 3


def test_arc_sample_request_counts():
    # ARC has 3 to 5 choices per question; the samples include a 3-choice and numeric-label item.
    docs = load_docs("arc_easy", SAMPLES_DIR / "arc_easy.jsonl")
    assert sum(len(doc.requests) for doc in docs) == 31


def test_prompts_match_the_harness():
    hella = load_docs("hellaswag", SAMPLES_DIR / "hellaswag.jsonl")[3]
    assert (
        hella.requests[0].context
        == "Home and Garden: How to water a houseplant. Check the soil. push a finger"
    )
    wino = load_docs("winogrande", SAMPLES_DIR / "winogrande.jsonl")[0]
    assert [r.context for r in wino.requests] == [
        "The trophy did not fit in the suitcase because the trophy",
        "The trophy did not fit in the suitcase because the suitcase",
    ]
    assert {r.continuation for r in wino.requests} == {" was too big."}
    piqa = load_docs("piqa", SAMPLES_DIR / "piqa.jsonl")[0]
    assert piqa.requests[1] == Request(
        "Question: To keep bread fresh for longer,\nAnswer:", " leave it open on a sunny windowsill."
    )
    assert piqa.choice_lengths == (
        len("store it in a sealed bag in a cool place."),
        len("leave it open on a sunny windowsill."),
    )


def test_missing_task_files_error_lists_expected_names(tmp_path):
    with pytest.raises(FileNotFoundError, match="hellaswag.jsonl"):
        evaluate_tasks(None, None, tmp_path)
    with pytest.raises(FileNotFoundError, match="piqa.jsonl"):
        evaluate_tasks(None, None, SAMPLES_DIR.parent, tasks=["piqa"])


# ---------------------------------------------------------------- end to end on tiny random models


@pytest.fixture(scope="module")
def tokenizer():
    corpus = [json.dumps(json.loads(line)) for path in SAMPLES_DIR.glob("*.jsonl") for line in open(path)]
    corpus += ["".join(FILLER), "The pass key is 12345. What is the pass key?"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def _tiny(config_cls, model_cls, vocab_size: int, seed: int):
    torch.manual_seed(seed)
    config = config_cls(
        vocab_size=vocab_size,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=2048,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    return model_cls(config).eval()


@pytest.fixture(scope="module")
def teacher(tokenizer):
    return _tiny(transformers.LlamaConfig, transformers.LlamaForCausalLM, len(tokenizer), seed=0)


@pytest.fixture(scope="module")
def student(tokenizer):
    return _tiny(transformers.Qwen2Config, transformers.Qwen2ForCausalLM, len(tokenizer), seed=1)


def test_batching_does_not_change_scores(teacher, tokenizer):
    docs = load_docs("arc_easy", SAMPLES_DIR / "arc_easy.jsonl")
    requests = [r for doc in docs for r in doc.requests]
    one = score_requests(teacher, tokenizer, requests, batch_size=1)
    many = score_requests(teacher, tokenizer, requests, batch_size=7)
    np.testing.assert_allclose([r.value for r in many], [r.value for r in one], rtol=1e-4, atol=1e-4)


def test_end_to_end_report(teacher, student, tokenizer, tmp_path):
    results = {}
    for name, model in (("student", student), ("teacher", teacher)):
        tasks = evaluate_tasks(model, tokenizer, SAMPLES_DIR, batch_size=32, progress=False)
        windows = [
            torch.randint(len(tokenizer), (2, 64), generator=torch.Generator().manual_seed(i))
            for i in range(2)
        ]
        ppl = evaluate_perplexity(model, windows, progress=False)
        results[name] = ModelResults(name, tasks=tasks, task_dir=str(SAMPLES_DIR), perplexity=ppl)
    assert set(results["student"].tasks) == set(TASKS)
    for task, scores in results["teacher"].tasks.items():
        assert set(scores) == set(TASKS[task].metrics)
        assert all(math.isfinite(v) for v in scores.values())

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(
        "".join(
            json.dumps({"step": step, "tokens": 1000 * i, "loss": 3.0 / (i + 1) / step}) + "\n"
            for step in (1, 2, 3)
            for i in range(5)
        )
    )
    report = write_report(tmp_path / "out", results["student"], results["teacher"], metrics_jsonl=metrics)
    text = report.read_text()
    for task, scores in results["student"].tasks.items():
        for metric in scores:
            assert f"| {task}/{metric} |" in text
    assert "| perplexity/ppl | lower ↓ |" in text
    assert "bundled synthetic samples" in text and "Average zero-shot ratio" not in text
    for png in ("task_scores.png", "position_loss.png", "loss_curves.png"):
        assert (tmp_path / "out" / png).stat().st_size > 1000
        assert f"]({png})" in text
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert len(saved["teacher"]["perplexity"]["loss_by_position"]) == 63


def test_average_ratio_only_from_task_files_the_user_gave(tmp_path):
    scores = {"student": {"piqa": {"acc": 0.6}}, "teacher": {"piqa": {"acc": 0.8}}}

    def report(task_dir):
        s, t = (ModelResults(n, tasks=scores[n], task_dir=task_dir) for n in ("student", "teacher"))
        assert (average_zero_shot(s, t) is None) == (task_dir == str(SAMPLES_DIR))
        return write_report(tmp_path / str(hash(task_dir)), s, t).read_text()

    assert "**Average zero-shot ratio (student/teacher): 0.7500**" in report(str(tmp_path))
    assert "Average zero-shot ratio" not in report(str(SAMPLES_DIR))
    # a teacher that scores 0 on every task: no ratio, but the report is written (it raised
    # ZeroDivisionError after every model had been scored)
    zeros = {"piqa": {"acc": 0.0}}
    s, t = (ModelResults(n, tasks=zeros, task_dir=str(tmp_path)) for n in ("student", "teacher"))
    assert (
        "**Average zero-shot ratio (student/teacher): —**" in write_report(tmp_path / "0", s, t).read_text()
    )
    none = write_report(tmp_path / "none", ModelResults("s"), ModelResults("t")).read_text()
    assert "No zero-shot task files were given" in none and "piqa" not in none


def test_report_without_teacher(tmp_path):
    report = write_report(tmp_path, ModelResults("s", tasks={"piqa": {"acc": 0.5, "acc_norm": 0.5}}), None)
    assert "| piqa/acc | higher ↑ | 0.5 | — |" in report.read_text()


# ---------------------------------------------------------------- passkey, speed, lm-eval guard


@pytest.mark.parametrize("target", [256, 1024, 4096])
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_passkey_prompt_length_and_key(tokenizer, target, depth):
    prompt = make_passkey_prompt(tokenizer, target, depth, key="48213")
    assert "48213" in prompt.text
    assert "48213" in tokenizer.decode(tokenizer(prompt.text)["input_ids"])
    assert prompt.n_tokens == len(tokenizer(prompt.text)["input_ids"])
    assert abs(prompt.n_tokens - target) <= 0.05 * target


def test_passkey_needle_depth(tokenizer):
    early = make_passkey_prompt(tokenizer, 1024, 0.0, key="11111").text
    late = make_passkey_prompt(tokenizer, 1024, 1.0, key="11111").text
    assert early.index("11111") < len(early) * 0.2 < len(late) * 0.8 < late.index("11111")


def test_evaluate_passkey_runs_generate(teacher, tokenizer):
    result = evaluate_passkey(teacher, tokenizer, lengths=(128,), depths=(0.0, 1.0), progress=False)
    assert [r["length"] for r in result.records] == [128, 128]
    assert set(result.accuracy_by_length()) == {128}
    assert all(len(r["key"]) == 5 for r in result.records)


class InductionOracle(torch.nn.Module):
    """Copies by rule: at each position, a logit of 20 on the token that followed the latest earlier
    occurrence of the current token (the induction pattern); flat logits where there is none."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def forward(self, input_ids, **kwargs):
        ids = input_ids[0].tolist()
        logits = torch.zeros(1, len(ids), self.vocab_size)
        last_seen: dict[int, int] = {}
        for t, token in enumerate(ids):
            if token in last_seen:
                logits[0, t, ids[last_seen[token] + 1]] = 20.0
            last_seen[token] = t
        return SimpleNamespace(logits=logits)


class Uniform(InductionOracle):
    def forward(self, input_ids, **kwargs):
        return SimpleNamespace(logits=torch.zeros(1, input_ids.shape[1], self.vocab_size))


def test_copying_probe_separates_a_model_that_copies_from_one_that_cannot(tmp_path):
    from tokenizer_fixture import make_wordlevel_tokenizer

    # a large vocabulary, so that a token of the span rarely occurs elsewhere in a probe
    tokenizer = transformers.AutoTokenizer.from_pretrained(make_wordlevel_tokenizer(tmp_path, 32768))
    vocab = len(tokenizer)
    ordinary = vocab - len(tokenizer.all_special_ids)
    oracle = evaluate_copying(InductionOracle(vocab), tokenizer, (0, 64), trials=4, progress=False)
    assert [r["distance"] for r in oracle.records] == [0] * 4 + [64] * 4
    for d, nll in oracle.by_distance().items():
        # first sight: nothing to copy, so ~log(vocab); the repeat: ~0, except where a token of the
        # span occurred earlier in the probe and the oracle copies what followed it there instead
        assert nll["first"] > 0.9 * math.log(vocab), (d, nll)
        assert nll["repeat"] < 1.0, (d, nll)
    flat = evaluate_copying(Uniform(vocab), tokenizer, (0, 64), trials=4, progress=False)
    for nll in flat.by_distance().values():
        assert nll["first"] == pytest.approx(math.log(vocab)) and nll["repeat"] == pytest.approx(nll["first"])
    # probes never contain special tokens, and are the same for every model
    again = evaluate_copying(InductionOracle(vocab), tokenizer, (0, 64), trials=4, progress=False)
    assert again.records == oracle.records and ordinary < vocab
    metrics = ModelResults("oracle", copying=oracle).flat_metrics()
    assert metrics["copy/gain@64"] == pytest.approx(
        oracle.by_distance()[64]["first"] - metrics["copy/nll@64"]
    )


def test_bench_generate_rows(teacher):
    rows = bench_generate(teacher, [16, 32], batch_size=2, new_tokens=4)
    assert [r["context_length"] for r in rows] == [16, 32]
    assert all(r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0 for r in rows)
    assert all(r["memory_source"] in ("cpu_max_rss_growth", None) for r in rows)


@pytest.mark.skipif(
    importlib.util.find_spec("lm_eval") is not None, reason="guard matters only without lm-eval"
)
def test_lm_eval_adapter_import_guard():
    with pytest.raises(ImportError, match="pip install lm-eval"):
        register_lm_eval_model()


def test_lm_eval_scoring_builds_no_cache(tmp_path, monkeypatch):
    """The adapter's model scores batches without building a state it would throw away, and still
    generates with one. lm-eval's HFLM is stood in for by what the adapter uses of it: a class
    whose constructor loads `pretrained` into `self.model`, and a registry."""
    import sys
    import types

    class HFLM:
        def __init__(self, pretrained):
            self.model = transformers.AutoModelForCausalLM.from_pretrained(pretrained)

    modules = {
        "lm_eval": types.ModuleType("lm_eval"),
        "lm_eval.api": types.ModuleType("lm_eval.api"),
        "lm_eval.api.registry": types.SimpleNamespace(register_model=lambda name: lambda cls: cls),
        "lm_eval.models": types.ModuleType("lm_eval.models"),
        "lm_eval.models.huggingface": types.SimpleNamespace(HFLM=HFLM),
    }
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    from radlads.convert.transfer import transfer
    from tiny_models import make_teacher

    transfer(make_teacher("qwen2", num_hidden_layers=2), "rad-rwkv7").save_pretrained(tmp_path)
    lm = register_lm_eval_model.__wrapped__("radlads-test")(pretrained=str(tmp_path))
    ids = torch.randint(0, lm.model.config.vocab_size, (2, 12))
    with torch.no_grad():
        out = lm.model(ids)
        assert out.past_key_values is None and out.logits.shape[:2] == (2, 12)
        generated = lm.model.generate(ids[:1], max_new_tokens=3, do_sample=False)
    assert generated.shape[1] == 15


def test_report_tables_loss_by_position_range_and_the_gap(tmp_path):
    from radlads.eval.perplexity import PerplexityResult
    from radlads.eval.report import position_buckets

    assert position_buckets(2047) == [(0, 63), (64, 255), (256, 1023), (1024, 2046)]
    assert position_buckets(64) == [(0, 63)]
    positions = np.arange(300)
    teacher_loss = 3.0 - positions / 300  # the teacher gains from context ...
    student_loss = np.where(positions < 64, teacher_loss, 2.9)  # ... the student stops after 64
    student, teacher = (
        ModelResults(
            name, perplexity=PerplexityResult(nll=0.0, ppl=1.0, tokens=300, loss_by_position=loss.tolist())
        )
        for name, loss in (("student", student_loss), ("teacher", teacher_loss))
    )
    text = write_report(tmp_path, student, teacher).read_text()
    table = text[text.index("| mean NLL (nats) | 0–63 | 64–255 | 256–299 |") :].splitlines()
    gap = [float(v) for v in table[4].strip("| ").split(" | ")[1:]]
    assert table[4].startswith("| student − teacher |")
    assert gap == pytest.approx([0.0, 2.9 - (3.0 - 159.5 / 300), 2.9 - (3.0 - 277.5 / 300)], abs=1e-3)
    assert (
        "Loss by position range" not in write_report(tmp_path / "none", ModelResults("s"), None).read_text()
    )


def test_max_windows_counts_windows_from_shards_as_from_text(tmp_path):
    """--max-windows N scores N windows whichever the input, not a whole last batch of shard windows."""
    from radlads.data import prepare_shards
    from radlads.eval.suite import EvalSettings, heldout_windows
    from tiny_models import write_corpus
    from tokenizer_fixture import make_tiny_tokenizer

    tok = transformers.AutoTokenizer.from_pretrained(make_tiny_tokenizer(tmp_path))
    corpus = write_corpus(tmp_path / "corpus", documents=80)
    shards = tmp_path / "shards"
    prepare_shards(corpus, tok, shards, held_out_fraction=0.5, progress=False)
    for source in (shards, corpus):
        for n in (1, 5):
            settings = EvalSettings(seq_len=16, batch_size=4, max_windows=n)
            assert sum(len(b) for b in heldout_windows(str(source), tok, settings)) == n, (source, n)


def test_shard_heldout_keeps_its_last_partial_batch(tmp_path):
    """A held-out split of fewer windows than a batch, or with a partial last batch, is scored
    whole, as text is: the shard loader's full-batch pass dropped the rest or refused the split."""
    from radlads.data import PackedLoader, prepare_shards
    from radlads.eval.suite import EvalSettings, heldout_windows
    from tiny_models import write_corpus
    from tokenizer_fixture import make_tiny_tokenizer

    tok = transformers.AutoTokenizer.from_pretrained(make_tiny_tokenizer(tmp_path))
    shards = tmp_path / "shards"
    prepare_shards(
        write_corpus(tmp_path / "corpus", documents=40), tok, shards, held_out_fraction=0.1, progress=False
    )
    available = PackedLoader(shards, 16, 1, split="heldout").num_windows
    for batch_size in (4, available + 1):
        settings = EvalSettings(seq_len=16, batch_size=batch_size, max_windows=1000)
        batches = list(heldout_windows(str(shards), tok, settings))
        assert sum(len(b) for b in batches) == available, batch_size
        assert all(b.shape[1] == 16 and len(b) <= batch_size for b in batches)


def test_bench_generate_command_prints_a_measured_zero_as_zero(monkeypatch, capsys):
    """nan is for no measurement (None); a peak RSS growth of 0 MB on CPU is a measurement."""
    from radlads.cli import commands

    rows = [
        dict(context_length=n, batch_size=1, prefill_tok_s=1.0, decode_tok_s=1.0, peak_memory_mb=mb)
        for n, mb in ((16, 0.0), (32, None), (64, 5.0))
    ]
    monkeypatch.setattr(commands, "load_model", lambda path, device: None)
    monkeypatch.setattr(commands.speed, "bench_generate", lambda *args: rows)
    args = SimpleNamespace(
        model="s", teacher=None, device="cpu", contexts=(16, 32, 64), batch_size=1, new_tokens=4
    )
    assert commands.bench_generate(args) == 0
    peaks = [line.split()[-1] for line in capsys.readouterr().out.splitlines()[1:]]
    assert peaks == ["0", "nan", "5"]


def test_report_reads_a_metrics_log_whose_last_line_a_killed_run_cut_short(tmp_path):
    """A run killed while logging leaves a partial line (a step-2 student is already exported then);
    the loss plot skips it, as a resume does, instead of raising once every model was scored."""
    metrics = tmp_path / "metrics.jsonl"
    rows = "".join(json.dumps({"step": 2, "tokens": 100 * i, "loss": 3.0 - i / 10}) + "\n" for i in range(5))
    metrics.write_text(rows + '\n{"step": 3, "tok')
    report = write_report(tmp_path / "out", ModelResults("s"), None, metrics_jsonl=metrics).read_text()
    assert "](loss_curves.png)" in report and (tmp_path / "out" / "loss_curves.png").stat().st_size > 1000


def test_a_measurement_past_the_teachers_trained_context_is_flagged(tmp_path, caplog):
    from radlads.eval.suite import EvalSettings, warn_past_trained_context
    from tiny_models import make_teacher

    make_teacher("llama").save_pretrained(tmp_path)  # trained context: 512 positions
    for settings, flagged in (
        (EvalSettings(heldout="text", seq_len=512, passkey_lengths=(256,)), False),
        (EvalSettings(heldout="text", seq_len=256, passkey_lengths=(1024,)), True),
        (EvalSettings(copy_distances=(1024,)), True),
        (EvalSettings(seq_len=4096), False),  # no held-out text: no windows of that length
    ):
        caplog.clear()
        with caplog.at_level("WARNING", logger="radlads"):
            warn_past_trained_context(tmp_path, settings)
        assert ("past the teacher's trained context of 512" in caplog.text) == flagged
