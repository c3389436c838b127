"""The HTTP layer: OpenAI's /v1/completions and /v1/chat/completions (streamed as server-sent
events or not), /v1/models, /health and /metrics, over one Engine."""

from __future__ import annotations

import asyncio
import hmac
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .batch import is_student
from .config import ServeConfig
from .protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    Sampling,
    chat_body,
    chat_chunk,
    completion_body,
    new_id,
    usage,
    usage_chunk,
)
from .sampling import SamplingParams
from .scheduler import Engine, Event, QueueFull, Sequence, TooLarge

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


def create_app(engine: Engine, model_name: str) -> FastAPI:
    """The server's app; it starts the engine's thread on startup and stops it on shutdown."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="radlads", lifespan=lifespan)
    config, metrics = engine.config, engine.metrics

    @app.exception_handler(APIError)
    async def refuse(request: Request, error: APIError) -> JSONResponse:
        if error.status < 500:  # a failed generation was counted as an error already
            metrics.requests.labels("rejected").inc()
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(StarletteHTTPException)
    async def no_route(request: Request, error: StarletteHTTPException) -> JSONResponse:
        """An unknown path or method: OpenAI's error shape too, not FastAPI's {"detail": ...}."""
        metrics.requests.labels("rejected").inc()
        body = APIError(error.status_code, f"{request.method} {request.url.path}: {error.detail}").body()
        return JSONResponse(body, status_code=error.status_code, headers=error.headers)

    async def parse(request: Request, schema: type[Sampling]) -> Sampling:
        check_api_key(request, config.api_key)
        try:
            data = json.loads(await request.body())
        except ValueError as error:
            raise APIError(
                400, f"the request body is not valid JSON ({error})", code="invalid_json"
            ) from None
        refuse_unsupported(data)
        try:
            body = schema.model_validate(data)
        except ValidationError as error:
            raise APIError(400, *validation_message(error)) from None
        if body.model != model_name:
            raise APIError(
                404,
                f"model {body.model!r} is not served here; this server serves {model_name!r} (see /v1/models)",
                param="model",
                code="model_not_found",
            )
        return body

    # A plain HF model's positions end at its max_position_embeddings; a student has no such end.
    context = (
        None if is_student(engine.model) else getattr(engine.model.config, "max_position_embeddings", None)
    )

    def submit(prompt: list[int], body: Sampling, asked: int | None, default: int) -> Sequence:
        max_tokens = asked or default
        check_lengths(prompt, max_tokens, config)
        if context is not None:
            room = context - len(prompt)
            if room < 1 or (asked is not None and asked > room):
                raise APIError(
                    400,
                    f"this model's context is {context} tokens: the prompt's {len(prompt)} plus max_tokens "
                    f"{asked or 1} go past it; shorten the prompt or lower max_tokens",
                    param="max_tokens" if room >= 1 else "prompt",
                    code="context_length_exceeded",
                )
            max_tokens = min(max_tokens, room)  # an unset max_tokens stops at the context's end
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            seed=body.seed,
            stop=body.stop_strings(),
            ignore_eos=body.ignore_eos,
        )
        try:
            return engine.submit(prompt, params)
        except QueueFull as error:
            raise APIError(429, str(error), code="server_busy") from None
        except TooLarge as error:
            raise APIError(400, str(error), param="max_tokens", code="context_length_exceeded") from None

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await parse(request, CompletionRequest)
        prompt = completion_prompt(body.prompt, engine.tokenizer, engine.model.config.vocab_size)
        seq = submit(prompt, body, body.max_tokens, COMPLETION_DEFAULT_MAX_TOKENS)
        rid = new_id("cmpl")
        if body.stream:
            tail = usage_tail(body, "text_completion", rid, model_name)
            return sse(seq, lambda e: [completion_body(rid, model_name, e.text, e.finish_reason)], tail=tail)
        text, last = await collect(request, seq)
        return completion_body(
            rid,
            model_name,
            text,
            last.finish_reason,
            usage=usage(last.prompt_tokens, len(last.tokens)),
            token_ids=last.tokens,  # not OpenAI's: the generated tokens, for exact comparisons
        )

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await parse(request, ChatRequest)
        prompt = chat_prompt(body, engine.tokenizer)
        seq = submit(prompt, body, body.max_completion_tokens or body.max_tokens, config.max_new_tokens)
        rid = new_id("chatcmpl")
        if body.stream:
            opening = [chat_chunk(rid, model_name, {"role": "assistant", "content": ""}, None)]

            def chunks(event: Event) -> list[dict]:
                out = [chat_chunk(rid, model_name, {"content": event.text}, None)] if event.text else []
                if event.finish_reason:
                    out.append(chat_chunk(rid, model_name, {}, event.finish_reason))
                return out

            return sse(seq, chunks, opening, usage_tail(body, "chat.completion.chunk", rid, model_name))
        text, last = await collect(request, seq)
        return chat_body(
            rid, model_name, text, last.finish_reason, usage=usage(last.prompt_tokens, len(last.tokens))
        )

    def card() -> dict:
        return {"id": model_name, "object": "model", "created": int(time.time()), "owned_by": "radlads"}

    @app.get("/v1/models")
    async def models(request: Request):
        check_api_key(request, config.api_key)
        return {"object": "list", "data": [card()]}

    @app.get("/v1/models/{model:path}")
    async def model(request: Request, model: str):
        check_api_key(request, config.api_key)
        if model != model_name:
            raise APIError(
                404,
                f"model {model!r} is not served here; this server serves {model_name!r}",
                code="model_not_found",
            )
        return card()

    @app.get("/health")
    async def health():
        if not engine.thread.is_alive():
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


# --- requests to prompts ---


def check_api_key(request: Request, key: str | None) -> None:
    if key is None:
        return
    given = request.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    # compare_digest: the time taken does not tell how much of a guess was right.
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), key.encode()):
        raise APIError(
            401,
            "missing or wrong API key: send the server's --api-key as `Authorization: Bearer KEY`",
            code="invalid_api_key",
        )


# OpenAI fields this server does not implement. Sent at their defaults (as some clients send every
# field) they change nothing; any other value is refused rather than silently ignored.
UNSUPPORTED = {
    "logprobs": lambda v: True,
    "top_logprobs": lambda v: v != 0,
    "echo": lambda v: True,
    "best_of": lambda v: v != 1,
    "suffix": bool,
    "presence_penalty": lambda v: v != 0,
    "frequency_penalty": lambda v: v != 0,
    "logit_bias": bool,
    "tools": bool,
    "response_format": lambda v: v != {"type": "text"},
}


def refuse_unsupported(data) -> None:
    if not isinstance(data, dict):
        return  # the schema refuses it
    for name, changes_output in UNSUPPORTED.items():
        value = data.get(name)
        if value is not None and value is not False and changes_output(value):
            raise APIError(
                400,
                f"{name} is not supported by this server (see docs/serving.md, Limits)",
                param=name,
                code="unsupported_parameter",
            )


def validation_message(error: ValidationError) -> tuple[str, str]:
    first = error.errors()[0]
    param = ".".join(str(p) for p in first["loc"]) or "body"
    return f"{param}: {first['msg']}", param


def completion_prompt(prompt: str | list, tokenizer, vocab_size: int) -> list[int]:
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        if len(prompt) != 1:
            raise APIError(400, f"one prompt per request, got {len(prompt)}", param="prompt")
        prompt = prompt[0]
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    if not ids:
        raise APIError(400, "the prompt is empty", param="prompt")
    if any(not 0 <= t < vocab_size for t in ids):
        raise APIError(400, f"prompt token ids must lie in [0, {vocab_size})", param="prompt")
    return ids


def chat_prompt(body: ChatRequest, tokenizer) -> list[int]:
    if tokenizer.chat_template is None:
        raise APIError(
            400, "this model's tokenizer has no chat template: use /v1/completions", param="messages"
        )
    messages = [m.for_template() for m in body.messages]
    return list(
        tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
    )


def check_lengths(prompt: list[int], max_tokens: int, config: ServeConfig) -> None:
    if len(prompt) > config.max_prompt_tokens:
        raise APIError(
            400,
            f"the prompt has {len(prompt)} tokens, over this server's limit of {config.max_prompt_tokens} "
            "(--max-prompt-tokens); shorten it",
            param="prompt",
            code="context_length_exceeded",
        )
    if max_tokens > config.max_new_tokens:
        raise APIError(
            400,
            f"max_tokens {max_tokens} is over this server's limit of {config.max_new_tokens} "
            "(--max-new-tokens)",
            param="max_tokens",
        )


# --- responses ---


def usage_tail(body: Sampling, kind: str, rid: str, model: str) -> Callable[[Event], dict] | None:
    """The usage chunk that ends a stream whose `stream_options.include_usage` is set, else None."""
    if not body.include_usage():
        return None
    return lambda last: usage_chunk(kind, rid, model, usage(last.prompt_tokens, len(last.tokens)))


def sse(
    seq: Sequence,
    chunks: Callable[[Event], list[dict]],
    opening: list[dict] = (),
    tail: Callable[[Event], dict] | None = None,
) -> StreamingResponse:
    """Server-sent events: one `data:` line per chunk, then `tail`'s chunk of the last event (if
    given), then `data: [DONE]`. If the client leaves, Starlette cancels this generator, and its
    `finally` frees the request's slot."""

    async def events() -> AsyncIterator[str]:
        try:
            for chunk in opening:
                yield f"data: {json.dumps(chunk)}\n\n"
            async for event in seq.stream():
                if event.error:
                    yield f"data: {json.dumps(APIError(500, event.error).body())}\n\n"
                    return
                for chunk in chunks(event):
                    yield f"data: {json.dumps(chunk)}\n\n"
                if tail is not None and event.finish_reason:
                    yield f"data: {json.dumps(tail(event))}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            seq.cancel()

    return StreamingResponse(events(), media_type="text/event-stream")


async def collect(request: Request, seq: Sequence) -> tuple[str, Event]:
    """A whole completion's text and last event; a client that leaves first cancels it."""
    watcher = asyncio.create_task(cancel_on_disconnect(request, seq))
    parts = []
    try:
        async for event in seq.stream():
            parts.append(event.text)
    finally:
        watcher.cancel()
        seq.cancel()
    if event.error:
        raise APIError(500, f"generation failed: {event.error}", code="generation_failed")
    return "".join(parts), event


async def cancel_on_disconnect(request: Request, seq: Sequence) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
    seq.cancel()


# --- running it ---


def load_engine(model: str | Path, config: ServeConfig, device: str | None = None) -> tuple[Engine, str]:
    """The engine over a model folder (a student, or any HF causal LM; a GGUF teacher is imported
    first), and the name it is served as."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import radlads.models  # noqa: F401  (registers the student architecture with the Auto classes)
    from radlads.models.configuration import window_overrides

    from ..teachers import resolve_teacher

    folder = resolve_teacher(model)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    window = window_overrides(folder, config.softmax_window, config.softmax_sinks)
    net = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **window).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return Engine(net, tokenizer, config), config.model_name or Path(model).resolve().name


@contextmanager
def running(
    app: FastAPI, host: str = "127.0.0.1", port: int = 0, start_timeout_s: float = 900
) -> Iterator[str]:
    """Serve `app` from a thread of this process (port 0: a free one) while the block runs; yields
    its base URL. For tests and benchmarks, which talk to it over real HTTP. Starting includes the
    engine's warm-up, minutes for a student on a GPU: hence the long default `start_timeout_s`."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    sock = socket.socket()
    sock.bind((host, port))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError(f"the server did not start within {start_timeout_s:.0f} s")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=start_timeout_s)
        sock.close()


def serve(model: str | Path, config: ServeConfig, device: str | None = None) -> None:
    import uvicorn

    engine, name = load_engine(model, config, device)
    uvicorn.run(create_app(engine, name), host=config.host, port=config.port, log_level="info")
