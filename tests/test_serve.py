"""radlads serve on CPU: the official openai client against a server on 127.0.0.1 (in this process,
its own thread) with tiny random models. Outputs must equal generate()'s greedy tokens."""

from __future__ import annotations

import http.client
import importlib
import json
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, MistralConfig, Qwen2Config

from radlads.convert.transfer import transfer
from radlads.models.graphs import decode_graphs
from radlads.serve import ServeConfig, create_app, load_engine
from radlads.serve import running as serve_in_thread
from radlads.serve.batch import (
    PaddedCaches,
    Running,
    SeparateCaches,
    SequenceCost,
    StackedStates,
    cache_bytes,
    decode_batch,
    forward,
)
from radlads.serve.prefix_cache import PrefixCache
from radlads.serve.sampling import Sampler, SamplingParams
from radlads.serve.scheduler import Engine
from radlads.serve.text import TextStream
from tiny_models import make_teacher_folder

KEY = "test-key"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SERVER = dict(api_key=KEY, max_batch=8, max_prompt_tokens=400, max_new_tokens=64, prefix_cache_bytes=1 << 24)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Tiny teacher, its student, a hybrid student and one whose softmax layer attends over a window,
    each a folder with a chat-template tokenizer."""
    tmp = tmp_path_factory.mktemp("serve")
    teacher = make_teacher_folder(tmp)
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(teacher)
    out = {"teacher": teacher}
    windowed = {"softmax_layers": [-1], "softmax_window": 8, "softmax_sinks": 2}
    for name, options in (("student", {}), ("hybrid", {"softmax_layers": [-1]}), ("windowed", windowed)):
        out[name] = tmp / name
        transfer(teacher, "rad-rwkv7", **options).save_pretrained(out[name])
        tokenizer.save_pretrained(out[name])
    return out


@contextmanager
def running(folder, **config):
    """A server on a free loopback port: (base URL, engine)."""
    engine, name = load_engine(folder, ServeConfig(**config), "cpu")
    with serve_in_thread(create_app(engine, name)) as url:
        yield url, engine


@pytest.fixture(scope="module")
def student_server(folders):
    with running(folders["student"], **SERVER) as served:
        yield served


def client(url: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


def raw(url: str, method: str, path: str, body: bytes | dict | None = None, headers: dict | None = None):
    """(status, parsed JSON or text) of a plain HTTP request: what a client without openai sends."""
    connection = http.client.HTTPConnection(urlsplit(url).netloc, timeout=30)
    content = json.dumps(body).encode() if isinstance(body, dict) else body
    connection.request(method, path, body=content, headers=headers or {})
    response = connection.getresponse()
    data = response.read().decode()
    connection.close()
    kind = response.getheader("content-type", "")
    return response.status, json.loads(data) if kind.startswith("application/json") else data


class Reference:
    """generate()'s greedy continuation from a separately loaded copy of the served model."""

    def __init__(self, folder):
        self.model = AutoModelForCausalLM.from_pretrained(folder).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.eos = self.tokenizer.eos_token_id

    def tokens(self, ids: list[int], n: int) -> list[int]:
        with torch.no_grad():
            out = self.model.generate(
                torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=self.eos
            )[0, len(ids) :].tolist()
        return out[: out.index(self.eos)] if self.eos in out else out

    def text(self, ids: list[int], n: int) -> str:
        return self.tokenizer.decode(self.tokens(ids, n), skip_special_tokens=True)

    def chat_ids(self, messages: list[dict]) -> list[int]:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]


@pytest.fixture(scope="module")
def reference(folders):
    return Reference(folders["student"])


def stream_text(chunks, chat: bool = False) -> tuple[str, str | None]:
    text, finish = "", None
    for chunk in chunks:
        choice = chunk.choices[0]
        text += (choice.delta.content or "") if chat else choice.text
        finish = choice.finish_reason or finish
    return text, finish


def test_completions_equal_generate_greedy(student_server, reference):
    url, _ = student_server
    api = client(url)
    prompt = "The cat sat on the mat."
    ids = reference.tokenizer.encode(prompt)
    want = reference.tokens(ids, 12)
    for given in (prompt, ids):
        out = api.completions.create(model="student", prompt=given, max_tokens=12, temperature=0)
        assert out.model_extra["token_ids"] == want
        assert out.choices[0].text == reference.tokenizer.decode(want, skip_special_tokens=True)
        assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == len(want)
    stream = api.completions.create(model="student", prompt=prompt, max_tokens=12, temperature=0, stream=True)
    text, finish = stream_text(stream)
    assert text == reference.tokenizer.decode(want, skip_special_tokens=True)
    assert finish == ("length" if len(want) == 12 else "stop")


def test_chat_equals_generate_on_the_chat_template(student_server, reference):
    url, _ = student_server
    api = client(url)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello world!"}]
    want = reference.text(reference.chat_ids(messages), 16)
    out = api.chat.completions.create(model="student", messages=messages, max_tokens=16, temperature=0)
    assert out.choices[0].message.content == want and out.choices[0].message.role == "assistant"
    stream = api.chat.completions.create(
        model="student", messages=messages, max_tokens=16, temperature=0, stream=True
    )
    assert stream_text(stream, chat=True)[0] == want
    parts = [{**m, "content": [{"type": "text", "text": m["content"]}]} for m in messages]
    out = api.chat.completions.create(model="student", messages=parts, max_tokens=16, temperature=0)
    assert out.choices[0].message.content == want  # content as text parts, as the openai client may send it


def test_a_stream_asked_for_usage_ends_with_a_usage_chunk(student_server, reference):
    api = client(student_server[0])
    ids = reference.tokenizer.encode("The cat")
    messages = [{"role": "user", "content": "Hello world!"}]
    for chat in (False, True):
        kind = api.chat.completions if chat else api.completions
        prompt = {"messages": messages} if chat else {"prompt": ids}
        want = kind.create(model="student", max_tokens=6, temperature=0, **prompt).usage
        options = {"include_usage": True}
        chunks = list(
            kind.create(
                model="student", max_tokens=6, temperature=0, stream=True, stream_options=options, **prompt
            )
        )
        assert chunks[-1].choices == [] and chunks[-1].usage == want, chat
        assert all(c.choices and c.usage is None for c in chunks[:-1]), chat
        plain = kind.create(model="student", max_tokens=6, temperature=0, stream=True, **prompt)
        assert all(c.choices and c.usage is None for c in plain), chat


def test_32_concurrent_clients_all_get_their_own_greedy_output(student_server, reference):
    url, engine = student_server
    rng = random.Random(0)
    jobs = [
        ([rng.randrange(1, 300) for _ in range(rng.randint(2, 12))], rng.randint(2, 5), i % 2 == 0)
        for i in range(32)
    ]
    want = [reference.text(ids, n) for ids, n, _ in jobs]

    def ask(job):
        ids, n, streamed = job
        out = client(url).completions.create(
            model="student", prompt=ids, max_tokens=n, temperature=0, stream=streamed
        )
        return stream_text(out)[0] if streamed else out.choices[0].text

    start = time.monotonic()
    with ThreadPoolExecutor(32) as pool:
        got = list(pool.map(ask, jobs, timeout=90))
    assert got == want
    assert time.monotonic() - start < 90
    assert engine.active() == 0


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_leaving_frees_its_slot(folders, stream):
    # A request far longer than the test: it cannot finish before the server sees its client leave.
    with running(folders["student"], **{**SERVER, "max_new_tokens": 4096}) as (url, engine):
        body = {
            "model": "student",
            "prompt": "The cat",
            "max_tokens": 4096,
            "ignore_eos": True,
            "stream": stream,
        }
        connection = http.client.HTTPConnection(urlsplit(url).netloc, timeout=30)
        connection.request("POST", "/v1/completions", json.dumps(body), {"Authorization": f"Bearer {KEY}"})
        deadline = time.monotonic() + 15
        if stream:
            response = connection.getresponse()
            assert response.status == 200 and response.readline().startswith(b"data: ")  # a first token
        else:
            while not engine.active():  # admitted and generating
                assert time.monotonic() < deadline, "the request was never admitted"
                time.sleep(0.01)
        connection.close()
        while engine.active() or not engine.metrics.requests.labels("cancelled")._value.get():
            assert time.monotonic() < deadline, "the stream's slot was not freed"
            time.sleep(0.05)


BAD = [
    ("not json", b"{model: student", 400, "invalid_json"),
    ("unknown model", {"model": "gpt-4", "prompt": "hi"}, 404, "model_not_found"),
    ("prompt too long", {"model": "student", "prompt": [5] * 401}, 400, "context_length_exceeded"),
    ("max_tokens 0", {"model": "student", "prompt": "hi", "max_tokens": 0}, 400, None),
    ("max_tokens negative", {"model": "student", "prompt": "hi", "max_tokens": -3}, 400, None),
    ("max_tokens absurd", {"model": "student", "prompt": "hi", "max_tokens": 10**9}, 400, None),
    ("token out of vocab", {"model": "student", "prompt": [10**6]}, 400, None),
    ("token ids as floats", {"model": "student", "prompt": [5.0, 6.0]}, 400, None),
    ("token ids as booleans", {"model": "student", "prompt": [True]}, 400, None),
    ("empty prompt", {"model": "student", "prompt": ""}, 400, None),
    ("two choices", {"model": "student", "prompt": "hi", "n": 2}, 400, None),
    ("five stop strings", {"model": "student", "prompt": "hi", "stop": list("abcde")}, 400, None),
    ("seed past 64 bits", {"model": "student", "prompt": "hi", "seed": 2**64}, 400, None),
    (
        "stream_options without stream",
        {"model": "student", "prompt": "hi", "stream_options": {"include_usage": True}},
        400,
        None,
    ),
    ("logprobs", {"model": "student", "prompt": "hi", "logprobs": 2}, 400, "unsupported_parameter"),
    ("echo", {"model": "student", "prompt": "hi", "echo": True}, 400, "unsupported_parameter"),
    ("best_of", {"model": "student", "prompt": "hi", "best_of": 3}, 400, "unsupported_parameter"),
    ("penalty", {"model": "student", "prompt": "hi", "presence_penalty": 1.5}, 400, "unsupported_parameter"),
    (
        "logit_bias",
        {"model": "student", "prompt": "hi", "logit_bias": {"5": 100}},
        400,
        "unsupported_parameter",
    ),
]


def test_bad_input_gets_an_openai_error_and_leaves_other_streams_alone(student_server, reference):
    url, engine = student_server
    api = client(url)
    ids = reference.tokenizer.encode("Hello world!")
    long_stream = api.completions.create(
        model="student", prompt=ids, max_tokens=40, temperature=0, stream=True
    )
    first = next(long_stream)  # running while the bad requests arrive
    headers = {"Authorization": f"Bearer {KEY}"}
    for what, body, status, code in BAD:
        got, answer = raw(url, "POST", "/v1/completions", body, headers)
        assert got == status, (what, answer)
        assert answer["error"]["message"] and answer["error"]["type"] == "invalid_request_error", what
        assert code is None or answer["error"]["code"] == code, what
    defaults = dict(
        logprobs=None, echo=False, best_of=1, presence_penalty=0, frequency_penalty=0.0, logit_bias={}
    )
    got, answer = raw(
        url, "POST", "/v1/completions", {"model": "student", "prompt": "hi", **defaults}, headers
    )
    assert got == 200, answer
    nulls = dict(temperature=None, top_p=None, n=None, stream=None, stop=None, seed=None, max_tokens=None)
    got, answer = raw(url, "POST", "/v1/completions", {"model": "student", "prompt": "hi", **nulls}, headers)
    assert got == 200 and answer["choices"][0]["finish_reason"], answer  # null: the default
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        messages = [{"role": "user", "content": "hi"}]
        api.chat.completions.create(model="student", messages=messages, logprobs=True, top_logprobs=2)
    for auth in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        got, answer = raw(url, "POST", "/v1/completions", {"model": "student", "prompt": "hi"}, auth)
        assert got == 401 and answer["error"]["code"] == "invalid_api_key"
    assert raw(url, "GET", "/v1/models")[0] == 401
    for method, path, status in (("POST", "/v1/embeddings", 404), ("GET", "/v1/completions", 405)):
        got, answer = raw(url, method, path, {}, headers)
        assert got == status and answer["error"]["message"] and answer["error"]["type"], (path, answer)
    with pytest.raises(openai.AuthenticationError):
        client(url, "wrong").models.list()
    with pytest.raises(openai.NotFoundError):
        api.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert first.choices[0].text + stream_text(long_stream)[0] == reference.text(ids, 40)
    assert [m.id for m in api.models.list()] == ["student"]
    assert api.models.retrieve("student").id == "student"
    with pytest.raises(openai.NotFoundError):
        api.models.retrieve("gpt-4")


def test_stop_strings_cut_the_text_before_them(student_server, reference):
    url, _ = student_server
    ids = reference.tokenizer.encode("A linear attention")
    full = reference.text(ids, 24)
    stop = full[len(full) // 2 : len(full) // 2 + 5]  # longer than 4: a limit on stop's count, not length
    assert len(stop) == 5, f"the greedy text {full!r} is too short for this test"
    api = client(url)
    out = api.completions.create(model="student", prompt=ids, max_tokens=24, temperature=0, stop=[stop])
    assert out.choices[0].text == full[: full.index(stop)] and out.choices[0].finish_reason == "stop"
    stream = api.completions.create(
        model="student", prompt=ids, max_tokens=24, temperature=0, stop=stop, stream=True
    )
    assert stream_text(stream) == (full[: full.index(stop)], "stop")


def test_seeded_sampling_repeats(student_server):
    api = client(student_server[0])

    def sample(seed):
        out = api.completions.create(
            model="student",
            prompt="The cat",
            max_tokens=12,
            temperature=1.0,
            top_p=0.9,
            seed=seed,
            extra_body={"ignore_eos": True},
        )
        return out.model_extra["token_ids"]

    assert sample(7) == sample(7) and len(sample(7)) == 12
    assert len({tuple(sample(s)) for s in range(4)}) > 1


def test_a_tiny_temperature_samples_the_top_token_and_fails_no_stream(student_server, reference):
    # Logits over a tiny temperature overflowed to +inf, whose softmax is NaN: the sampling error
    # failed every stream decoding in the same step, not only this request.
    logits = torch.tensor([4.0, 6.0, -3.0, 5.9])
    for temperature in (1.5e-38, 1e-45):
        sampler = Sampler(SamplingParams(temperature=temperature, top_p=0.9, seed=0), torch.device("cpu"))
        assert [int(sampler.sample(logits)) for _ in range(4)] == [1] * 4
    api = client(student_server[0])
    ids = reference.tokenizer.encode("The cat")
    out = api.completions.create(model="student", prompt=ids, max_tokens=8, temperature=1e-45)
    assert out.model_extra["token_ids"] == reference.tokens(ids, 8)


def test_a_repeated_prefix_skips_its_prefill_and_changes_nothing(student_server, reference):
    url, engine = student_server
    api = client(url)
    rng = random.Random(1)
    document = [rng.randrange(1, 300) for _ in range(190)]
    questions = [[rng.randrange(1, 300) for _ in range(70)] for _ in range(3)]
    skipped = engine.metrics.prefix_tokens_skipped._value.get()
    for question in questions + questions[:1]:
        ids = document + question
        out = api.completions.create(model="student", prompt=ids, max_tokens=8, temperature=0)
        assert out.model_extra["token_ids"] == reference.tokens(ids, 8)
    # Each prompt keeps the state at its last block boundary (256 tokens: 4 blocks of 64), past the
    # document. The second prompt sees where it leaves the first one's blocks and keeps the state
    # there too (128 tokens); the third starts from that, the repeat of the first from its end.
    assert engine.metrics.prefix_tokens_skipped._value.get() - skipped == 128 + 256


def test_prefix_cache_is_bounded_in_bytes_least_recently_used_first():
    from radlads.models.cache import RadladsCache

    def state(value):
        cache = RadladsCache(1)
        cache.states = [torch.full((1, 2, 4, 4), float(value))]  # 128 bytes
        return cache

    cache = PrefixCache(max_bytes=300, block_tokens=4)
    prompts = [[p] * 9 for p in range(3)]
    for p, prompt in enumerate(prompts):
        plan = cache.plan(prompt)
        assert plan.hit == 0 and list(plan.store) == [8]
        cache.store(plan.store[8], state(p))
    assert cache.bytes == 256 and len(cache.entries) == 2  # the first prompt's state went
    assert cache.plan(prompts[0]).hit == 0
    hit = cache.plan(prompts[2])
    assert hit.hit == 8 and hit.cache.states[0].eq(2).all()


def test_text_stream_holds_back_what_may_start_a_stop_string(reference):
    tok = reference.tokenizer
    ids = tok.encode("The cat sat on the mat. Hello world!")
    stream = TextStream(tok, stop=["mat."])
    deltas = [stream.push(t) for t in ids]
    assert "".join(deltas) + stream.finish() == "The cat sat on the " and stream.stopped
    plain = TextStream(tok, stop=[])
    assert "".join(plain.push(t) for t in ids) + plain.finish() == tok.decode(ids)


@pytest.mark.parametrize("kind", ["teacher", "hybrid", "windowed"])
def test_kv_cache_models_are_served_too(folders, kind):
    reference = Reference(folders[kind])
    rng = random.Random(2)
    jobs = [[rng.randrange(1, 300) for _ in range(rng.randint(3, 30))] for _ in range(4)]
    with running(folders[kind], model_name=kind, **SERVER) as (url, engine):
        with ThreadPoolExecutor(4) as pool:
            got = list(
                pool.map(
                    lambda ids: (
                        client(url)
                        .completions.create(model=kind, prompt=ids, max_tokens=10, temperature=0)
                        .model_extra["token_ids"]
                    ),
                    jobs,
                    timeout=60,
                )
            )
        assert got == [reference.tokens(ids, 10) for ids in jobs]
        # A repeated long prompt: a hybrid continues from its cached state (softmax layers' KV,
        # pruned to its window where it has one); a teacher has no prefix cache and prefills it again.
        long = [rng.randrange(1, 300) for _ in range(150)]
        for _ in range(2):
            out = client(url).completions.create(model=kind, prompt=long, max_tokens=6, temperature=0)
            assert out.model_extra["token_ids"] == reference.tokens(long, 6)
        assert engine.metrics.prefix_tokens_skipped._value.get() == (0 if kind == "teacher" else 128)
        text = raw(url, "GET", "/metrics")[1]
    assert "radlads_generated_tokens_total" in text and "radlads_state_memory_bytes" in text


def test_a_teachers_context_limit_is_kept(folders):
    # The tiny teacher has 512 positions: generation went on past them, silently.
    with running(folders["teacher"], model_name="teacher", **{**SERVER, "max_prompt_tokens": 600}) as (
        url,
        _,
    ):
        api = client(url)
        for prompt, asked in (([5] * 500, 20), ([5] * 512, None)):
            with pytest.raises(openai.BadRequestError, match="context") as refused:
                api.completions.create(model="teacher", prompt=prompt, max_tokens=asked)
            assert refused.value.code == "context_length_exceeded"
        out = api.completions.create(
            model="teacher",
            prompt=[5] * 500,
            max_tokens=12,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        assert out.usage.total_tokens == 512
        chat = api.chat.completions.create(  # no max_tokens: it stops at the context's end
            model="teacher",
            messages=[{"role": "user", "content": "hi " * 470}],
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        assert chat.usage.total_tokens == 512 and chat.choices[0].finish_reason == "length"


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, needs_cuda])])
@pytest.mark.parametrize("kind", ["teacher", "hybrid"])
def test_kv_cache_sequences_decode_as_one_padded_batch_exactly_as_alone(folders, kind, device):
    """Sequences of different lengths join the batch at different times and leave it; each gets
    the tokens it gets decoding alone, and a leave drops the padding no one needs any more. On
    CUDA (fp32) this also checks the host's transformers and attention kernels."""
    model = AutoModelForCausalLM.from_pretrained(folders[kind]).to(device).eval()
    assert isinstance(decode_batch(model, 8), PaddedCaches)
    rng = random.Random(3)
    seqs = [Running([rng.randrange(1, 300) for _ in range(n)]) for n in (5, 31, 9, 17)]
    batch = PaddedCaches(model)

    def step():
        for seq, logits in zip(*batch.step()):
            seq.generated.append(int(logits.argmax()))

    with torch.no_grad():
        for seq in seqs:
            logits, seq.cache = forward(model, torch.tensor([seq.prompt], device=device), None)
            seq.generated.append(int(logits.argmax()))
            batch.join(seq)
            for _ in range(3):
                step()
        cached = [len(s.prompt) + len(s.generated) - 1 for s in seqs]  # tokens in each cache
        assert batch.valid.shape == (4, max(cached)) and batch.valid.sum(1).tolist() == cached
        batch.leave(seqs[1])  # the longest: the others' padding before it goes
        step()
        cached = [len(s.prompt) + len(s.generated) - 1 for s in batch.sequences()]
        assert batch.valid.shape == (3, max(cached)) and batch.valid.sum(1).tolist() == cached
        assert batch.nbytes() == cache_bytes(batch.cache) > 0
        for seq in seqs:
            alone, cache = [], None
            ids = seq.prompt
            for _ in seq.generated:
                logits, cache = forward(model, torch.tensor([ids], device=device), cache)
                alone.append(int(logits.argmax()))
                ids = alone[-1:]
            assert seq.generated == alone


def test_a_failed_join_leaves_the_running_batch_as_it_was(folders, monkeypatch):
    """Running out of memory halfway through stacking a new sequence's cache: the running
    sequences keep decoding their own tokens; later, every leaver's row goes in one step."""
    import radlads.serve.batch as batch_module

    model = AutoModelForCausalLM.from_pretrained(folders["hybrid"]).eval()
    rng = random.Random(4)
    seqs = [Running([rng.randrange(1, 300) for _ in range(n)]) for n in (7, 12, 20)]
    batch = PaddedCaches(model)
    with torch.no_grad():
        for seq in seqs:
            logits, seq.cache = forward(model, torch.tensor([seq.prompt]), None)
            seq.generated.append(int(logits.argmax()))
        batch.join(seqs[0])
        batch.join(seqs[1])
        before = [t.clone() for t, _ in batch_module._tensors(batch.cache)]
        valid = batch.valid.clone()
        calls = iter(range(1000))
        real = batch_module._left_pad

        def failing(x, width, dim):
            if next(calls) == 3:
                raise torch.OutOfMemoryError("stand-in")
            return real(x, width, dim)

        monkeypatch.setattr(batch_module, "_left_pad", failing)
        with pytest.raises(torch.OutOfMemoryError):
            batch.join(seqs[2])
        monkeypatch.setattr(batch_module, "_left_pad", real)
        after = [t for t, _ in batch_module._tensors(batch.cache)]
        assert all(torch.equal(a, b) for a, b in zip(after, before)) and torch.equal(batch.valid, valid)
        assert batch.sequences() == seqs[:2]
        for _ in range(3):
            for seq, logits in zip(*batch.step()):
                seq.generated.append(int(logits.argmax()))
        for seq in seqs[:2]:
            alone, cache, ids = [], None, seq.prompt
            for _ in seq.generated:
                logits, cache = forward(model, torch.tensor([ids]), cache)
                alone.append(int(logits.argmax()))
                ids = alone[-1:]
            assert seq.generated == alone
        batch.leave(seqs[0])
        assert len(batch) == 1 and batch.valid.shape[0] == 2  # dropped at the next step, not now
        batch.leave(seqs[1])
        assert len(batch) == 0 and batch.cache is None and batch.valid is None


def test_sequence_cost_is_what_the_caches_hold(folders):
    config = AutoModelForCausalLM.from_pretrained(folders["teacher"]).config
    kv = 2 * config.num_key_value_heads * (config.hidden_size // config.num_attention_heads) * 4  # fp32 k, v
    expected = {
        "teacher": SequenceCost(0, config.num_hidden_layers * kv),
        "hybrid": (True, kv),  # one softmax layer; the other's state is fixed
        "student": (True, 0),
    }
    for kind, want in expected.items():
        cost = SequenceCost.measure(AutoModelForCausalLM.from_pretrained(folders[kind]))
        assert cost == want if isinstance(want, SequenceCost) else (cost.fixed > 0, cost.per_token) == want
    # A windowed layer's 8 + 2 slots of keys, values, columns and ranks are there from the first token.
    windowed = SequenceCost.measure(AutoModelForCausalLM.from_pretrained(folders["windowed"]))
    student = SequenceCost.measure(AutoModelForCausalLM.from_pretrained(folders["student"]))
    assert (windowed.per_token, windowed.fixed) == (0, student.fixed * 2 // 3 + 10 * (kv + 2 * 8))


def test_a_hybrids_projected_cache_is_its_kv_buffers_where_it_decodes_captured(folders, monkeypatch):
    """Admission counts a hybrid's keys and values as its captured step holds them on CUDA: in
    buffers of the next power of two of positions (at least 256); eagerly, at their length."""
    batch = decode_batch(AutoModelForCausalLM.from_pretrained(folders["hybrid"]), 4)
    cost = SequenceCost(fixed=1000, per_token=10)
    assert batch.projected_bytes([300, 20], cost) == 2 * (1000 + 300 * 10)
    monkeypatch.setattr(PaddedCaches, "captured", lambda self: True)
    assert batch.projected_bytes([300, 20], cost) == 2 * (1000 + 512 * 10)
    assert batch.projected_bytes([], cost) == 0


def test_requests_wait_for_memory_and_one_that_never_fits_is_refused(folders):
    """With --max-state-gb room for two requests at their longest (and one prompt's cache in flight
    beside them), five concurrent ones run at most two at a time and all get their own greedy
    tokens; a request larger than the room gets a 400 naming the flag."""
    reference = Reference(folders["teacher"])
    cost = SequenceCost.measure(reference.model)
    rng = random.Random(5)
    jobs = [[rng.randrange(1, 300) for _ in range(20)] for _ in range(5)]
    room = 3 * (20 + 8) * cost.per_token  # two: 2 x 28 + 20 tokens; three: 3 x 28 + 20
    with running(folders["teacher"], model_name="teacher", **{**SERVER, "max_state_bytes": room}) as (
        url,
        engine,
    ):
        admitted = []
        admit = engine._admit
        engine._admit = lambda: (admit(), admitted.append(engine.active()))
        with ThreadPoolExecutor(5) as pool:
            got = list(pool.map(
                lambda ids: client(url).completions.create(model="teacher", prompt=ids, max_tokens=8,
                                                          temperature=0).model_extra["token_ids"],
                jobs, timeout=60))  # fmt: skip
        assert got == [reference.tokens(ids, 8) for ids in jobs]
        assert max(admitted) == 2
        with pytest.raises(openai.BadRequestError, match="max-state-gb"):
            client(url).completions.create(model="teacher", prompt=jobs[0], max_tokens=60, temperature=0)


def test_each_model_gets_the_batch_that_suits_its_cache(folders):
    kinds = {
        "student": StackedStates,
        "teacher": PaddedCaches,
        "hybrid": PaddedCaches,
        "windowed": StackedStates,
    }
    for kind, batch in kinds.items():
        assert isinstance(decode_batch(AutoModelForCausalLM.from_pretrained(folders[kind]), 4), batch)
    # Mistral's window is `sliding_window` alone; Qwen2's is per layer (`layer_types`)
    mistral = MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, sliding_window=6)  # fmt: skip
    qwen2 = Qwen2Config(**{k: v for k, v in mistral.to_dict().items() if k in ("vocab_size", "hidden_size",
                        "intermediate_size", "num_attention_heads", "num_key_value_heads")},
                        num_hidden_layers=2, use_sliding_window=True, sliding_window=6, max_window_layers=1)  # fmt: skip
    for config in (mistral, qwen2):
        assert isinstance(decode_batch(AutoModelForCausalLM.from_config(config), 4), SeparateCaches)


def test_warm_up_prefills_and_steps_at_every_batch_size(folders):
    """Before serving, a student's decoding step runs once at each size its stacked batch takes,
    and a hybrid's at two batch sizes and two KV capacities, so no request waits for a compile; a
    teacher's warm-up is one prefill."""
    prompt = [(1, 64), (1, 64)]  # two pieces: from no state, then from one
    expected = (
        ("student", [*prompt, (1, 1), (4, 1), (16, 1), (20, 1)]),
        ("hybrid", [*prompt, (1, 1), (2, 1), (2, 1)]),  # a second batch size, then KV capacity
        ("windowed", [*prompt, (1, 1), (4, 1), (16, 1), (20, 1)]),  # its states stack as a student's
        ("teacher", prompt),
    )
    for kind, sizes in expected:
        model = AutoModelForCausalLM.from_pretrained(folders[kind]).eval()
        seen = []
        model.register_forward_pre_hook(
            lambda _, args, kw, seen=seen: seen.append(tuple(kw["input_ids"].shape)), with_kwargs=True
        )
        engine = Engine(model, AutoTokenizer.from_pretrained(folders[kind]), ServeConfig(max_batch=20))
        engine.warm_up()
        assert seen == sizes, kind


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("kind", ["student", "windowed"])
def test_on_cuda_the_warm_up_captures_every_graph_serving_uses(folders, kind):
    """After the server starts, requests arriving together and one by one decode through the
    graphs the warm-up captured: none is compiled or captured while streams run."""
    config = ServeConfig(**{**SERVER, "max_batch": 6, "api_key": None})
    engine, name = load_engine(folders[kind], config, "cuda")
    with serve_in_thread(create_app(engine, name)) as url:
        graphs = decode_graphs(engine.model).graphs
        captured = set(graphs)
        assert len(captured) == len(engine.batch.buckets)
        api = openai.OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0, timeout=120)
        prompts = [[7 + i] * (5 + 3 * i) for i in range(6)]
        with ThreadPoolExecutor(6) as pool:
            outs = list(
                pool.map(
                    lambda p: api.completions.create(model=name, prompt=p, max_tokens=12, temperature=0),
                    prompts,
                )
            )
        assert all(len(o.model_extra["token_ids"]) == 12 for o in outs)
        assert set(graphs) == captured
    # A second server over the same model while the first (its batch emptied) still exists: its
    # warm-up and requests rebind the first one's graphs, which must leave the emptied batch alone.
    second = Engine(engine.model, engine.tokenizer, config)
    with serve_in_thread(create_app(second, name)) as url:
        api = openai.OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0, timeout=120)
        again = api.completions.create(model=name, prompt=prompts[0], max_tokens=12, temperature=0)
    assert again.model_extra["token_ids"] == outs[0].model_extra["token_ids"]


def test_health_and_metrics_are_open_and_count(student_server):
    url, _ = student_server
    client(url).completions.create(model="student", prompt="hi", max_tokens=3, temperature=0)
    assert raw(url, "GET", "/health") == (200, {"status": "ok"})
    metrics = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in raw(url, "GET", "/metrics")[1].splitlines()
        if line and not line.startswith("#")
    }
    assert metrics["radlads_generated_tokens_total"] >= 3
    assert metrics['radlads_requests_total{outcome="rejected"}'] >= 0
    for name in (
        "radlads_active_streams",
        "radlads_generated_tokens_per_second",
        "radlads_prefix_cache_bytes",
    ):
        assert name in metrics


def test_cli_builds_the_server_config(monkeypatch, tmp_path):
    import radlads.serve
    from radlads.cli.main import main

    calls = []
    monkeypatch.setattr(radlads.serve, "serve", lambda *args: calls.append(args))
    main(["serve", "--model", str(tmp_path), "--api-key", "k", "--max-batch", "3", "--prefix-cache-mb", "0"])
    main(
        ["serve", "--model", str(tmp_path), "--no-warm-up", "--max-state-gb", "2.5", "--softmax-window", "4k"]
    )
    ((model, config, device), (_, plain, _)) = calls
    assert model == str(tmp_path) and device is None
    assert (config.host, config.port, config.api_key, config.max_batch) == ("127.0.0.1", 8000, "k", 3)
    assert config.prefix_cache_bytes == 0 and config.warm_up and not plain.warm_up
    assert (config.max_state_bytes, plain.max_state_bytes) == (None, 2_500_000_000)
    assert (config.softmax_window, plain.softmax_window, plain.softmax_sinks) == (None, 4000, None)


def test_a_model_given_as_dot_is_served_under_its_folders_name(folders, monkeypatch):
    """`radlads serve --model .` from inside the model's folder: clients name it by the folder."""
    monkeypatch.chdir(folders["student"])
    assert load_engine(".", ServeConfig(), "cpu")[1] == "student"


def test_a_hybrid_is_served_with_the_window_asked_for(folders):
    """`serve --softmax-window` bounds a whole-context hybrid's cache: its streams then stack as a
    pure student's. A model without softmax layers, or sinks without a window, is refused."""
    engine, _ = load_engine(folders["hybrid"], ServeConfig(softmax_window=16, softmax_sinks=2), "cpu")
    assert (engine.model.config.softmax_window, engine.model.config.softmax_sinks) == (16, 2)
    assert isinstance(engine.batch, StackedStates)
    with pytest.raises(ValueError, match="no layer keeps softmax attention"):
        load_engine(folders["student"], ServeConfig(softmax_window=16), "cpu")
    with pytest.raises(ValueError, match="needs a window"):
        load_engine(folders["hybrid"], ServeConfig(softmax_sinks=2), "cpu")


def test_bench_tiny_mode_runs(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    serve_bench = importlib.import_module("serve")
    argv = ["--tiny", "--contexts", "64", "--streams", "1,3", "--new-tokens", "4"]
    argv += ["--models", "student,teacher,hybrid"]
    payload = serve_bench.main(
        [*argv, "--prefix-tokens", "256", "--prefix-questions", "3", "--out", str(tmp_path)]
    )
    rows = payload["results"]
    assert [(r["model"], r["streams"]) for r in rows] == [
        (m, n) for m in ("student", "teacher", "hybrid") for n in (1, 3)
    ]
    for row in rows:
        assert row["status"] == "ok" and row["tokens"] == 4 * row["streams"], row
        assert row["tok_s"] > 0 and 0 < row["ttft_p50_s"] <= row["ttft_max_s"] and row["itl_p99_ms"] > 0
        assert row["decode_tok_s"] > 0, row
    off, on = payload["prefix_cache"]
    # The second prompt leaves the first at the document's end (256 tokens), the third starts there.
    assert (off["skipped_tokens"], on["skipped_tokens"]) == (0, 256)
    assert json.loads((tmp_path / "serve.json").read_text())["results"] == json.loads(json.dumps(rows))
