"""The OpenAI API as lmtrain serves it: request bodies (checked strictly), errors in OpenAI's
shape, and the settings a request asks for as :class:`~lmtrain.config.GenerationSettings`.

A parameter lmtrain does not support (``n > 1``, ``logprobs``, ``echo``, penalties, tools...)
is refused with a 400 that names it, rather than ignored; an unknown one too.
"""

from __future__ import annotations

from typing import Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field

from lmtrain.config import GenerationSettings


class ApiError(Exception):
    """An error the client sees: HTTP ``status`` and OpenAI's ``{"error": {...}}`` body."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = (status, message, param,
                                                                      code, kind)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampled(_Strict):
    """What completions and chat completions share."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    def unsupported(self) -> tuple[str, str] | None:
        """``(param, why)`` for the first parameter asked for that lmtrain does not do."""
        if self.n not in (None, 1):
            return "n", "n > 1 is not supported; send one request per completion"
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                return name, f"{name} is not supported"
        if self.logit_bias:
            return "logit_bias", "logit_bias is not supported"
        if isinstance(self.stop, list) and len(self.stop) > 4:
            return "stop", "at most 4 stop sequences"
        if self.stream_options is not None and not self.stream:
            return "stream_options", "stream_options needs stream: true"
        return None

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def limit(self) -> int | None:
        return self.max_tokens


class CompletionRequest(_Sampled):
    """``POST /v1/completions``: the prompt is used as it is."""

    prompt: str | list[str]
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def unsupported(self) -> tuple[str, str] | None:
        if self.logprobs is not None:
            return "logprobs", "logprobs is not supported"
        if self.echo:
            return "echo", "echo is not supported"
        if self.best_of not in (None, 1):
            return "best_of", "best_of > 1 is not supported"
        if self.suffix:
            return "suffix", "suffix is not supported"
        if isinstance(self.prompt, list) and len(self.prompt) != 1:
            return "prompt", "one prompt per request (a list must hold exactly one)"
        return super().unsupported()

    @property
    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    @property
    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatRequest(_Sampled):
    """``POST /v1/chat/completions``: the last user message is the question."""

    messages: list[Message]
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    parallel_tool_calls: bool | None = None

    def unsupported(self) -> tuple[str, str] | None:
        if self.logprobs or self.top_logprobs is not None:
            return "logprobs", "logprobs is not supported"
        for name in ("tools", "tool_choice", "functions", "function_call"):
            if getattr(self, name):
                return name, "tool and function calls are not supported"
        if self.response_format not in (None, {"type": "text"}):
            return "response_format", "only the text response format is supported"
        return super().unsupported()

    @property
    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def turns(self) -> tuple[list[tuple[str, str]], str]:
        """The earlier question/answer pairs, and the last user message (the question)."""
        talk = [m for m in self.messages if m.role in ("user", "assistant")]
        if not talk or talk[-1].role != "user":
            raise ApiError(400, "messages: the last message must be the user's question",
                           "messages")
        pairs, question = [], None
        for message in talk[:-1]:
            if message.role == "user":
                question = message.text
            elif question is not None:
                pairs.append((question.strip(), message.text.strip()))
                question = None
        return pairs, talk[-1].text.strip()


def parse(model: type[_Sampled], body: Any) -> Any:
    """``body`` (decoded JSON) as ``model``; the first problem is a 400 naming its parameter."""
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    try:
        request = model.model_validate(body)
    except pydantic.ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        if first["type"] == "extra_forbidden":
            raise ApiError(400, f"unknown parameter {param!r}", param,
                           "unknown_parameter") from None
        raise ApiError(400, f"{param}: {first['msg']}", param, "invalid_value") from None
    problem = request.unsupported()
    if problem:
        raise ApiError(400, problem[1], problem[0], "unsupported_parameter")
    return request


def sampling(request: _Sampled, defaults: GenerationSettings, max_tokens: int
             ) -> GenerationSettings:
    """The settings a request asks for, the run's own filling in what it leaves out;
    ``temperature: 0`` is greedy decoding. Over ``max_tokens`` is a 400."""
    limit = request.limit
    if limit is not None and limit > max_tokens:
        param = "max_completion_tokens" if getattr(request, "max_completion_tokens",
                                                   None) else "max_tokens"
        raise ApiError(400, f"{param}={limit} is over this server's limit of {max_tokens}",
                       param, "invalid_value")
    values = defaults.model_dump()
    values["max_new_tokens"] = min(limit or defaults.max_new_tokens or max_tokens, max_tokens)
    if request.temperature == 0:
        values["top_k"] = 1
    elif request.temperature is not None:
        values["temperature"] = request.temperature
    if request.top_k is not None and request.temperature != 0:
        values["top_k"] = request.top_k
    if request.top_p is not None:
        values["top_p"] = request.top_p
    try:
        return GenerationSettings(**values)
    except pydantic.ValidationError as exc:
        first = exc.errors()[0]
        name = str(first["loc"][0]) if first["loc"] else None
        raise ApiError(400, f"{name}: {first['msg']}", name, "invalid_value") from None
