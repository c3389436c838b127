"""The OpenAI request bodies radlads accepts, its response bodies, and OpenAI's error shape."""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Literal

from pydantic import BaseModel, Field, StrictInt, ValidationInfo, field_validator


class APIError(Exception):
    """A request the server refuses, answered as {"error": {...}} with `status`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    include_usage: bool | None = False  # a last chunk, before [DONE], with the usage and no choices


class Sampling(BaseModel):
    model: str
    max_tokens: int | None = Field(default=None, gt=0)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**64)  # what torch.Generator takes
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=1)  # one choice per request
    ignore_eos: bool = False  # not OpenAI's: generate exactly max_tokens (as vLLM offers)

    @field_validator("temperature", "top_p", "n", "stream", "ignore_eos", mode="before")
    @classmethod
    def null_is_default(cls, value, info: ValidationInfo):
        """OpenAI's schema lets these be null, meaning their default (some clients send every field)."""
        return cls.model_fields[info.field_name].default if value is None else value

    @field_validator("stream_options")
    @classmethod
    def only_when_streaming(cls, value, info: ValidationInfo):
        """As OpenAI answers it: options of a stream on a request that does not stream are a mistake."""
        if value is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed when stream is true")
        return value

    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(Sampling):
    prompt: str | list[StrictInt] | list[str]  # strict: 1.0 or true are not token ids


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[TextPart]  # a list of text parts is their texts joined by newlines

    def for_template(self) -> dict:
        text = self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)
        return {"role": self.role, "content": text}


class ChatRequest(Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, gt=0)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def response(kind: str, rid: str, model: str, choice: dict, **extra) -> dict:
    return {
        "id": rid,
        "object": kind,
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        **extra,
    }


def completion_body(rid: str, model: str, text: str, finish: str | None, **extra) -> dict:
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    return response("text_completion", rid, model, choice, **extra)


def chat_body(rid: str, model: str, text: str, finish: str | None, **extra) -> dict:
    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
    return response("chat.completion", rid, model, choice, **extra)


def usage_chunk(kind: str, rid: str, model: str, usage: dict) -> dict:
    """A stream's last chunk when `stream_options.include_usage` asks for it: no choices, the usage."""
    return {**response(kind, rid, model, {}), "choices": [], "usage": usage}


def chat_chunk(rid: str, model: str, delta: dict, finish: str | None) -> dict:
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    return response("chat.completion.chunk", rid, model, choice)
