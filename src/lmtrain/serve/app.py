"""The HTTP front end: an OpenAI-compatible API over the :class:`~lmtrain.serve.engine.Engine`
(FastAPI), and the playground page.

``GET /health`` and the page are open; every other route needs the bearer token when an API key
is set. Requests are read and checked here (body size, JSON, parameters, model name) before
anything reaches the engine; a bad one is an OpenAI-shaped error and changes nothing.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from lmtrain.config import GenerationSettings
from lmtrain.data.qa_format import QATemplate
from lmtrain.errors import UserError
from lmtrain.serve.conversation import chat_prompt, chat_stops, hold_whitespace
from lmtrain.serve.engine import FINISHES, Engine, Event, Job
from lmtrain.serve.protocol import ApiError, ChatRequest, CompletionRequest, parse, sampling

#: The largest request body read, by default (bytes).
MAX_BODY = 1 << 20
#: The most tokens one request may ask for, by default.
MAX_TOKENS = 4096


@dataclass
class Served:
    """What the app serves: the engine, the model's name, the run's template and sampling
    defaults, and the limits on requests."""

    engine: Engine
    model_id: str
    template: QATemplate
    defaults: GenerationSettings
    api_key: str | None = None
    max_tokens: int = MAX_TOKENS
    max_body: int = MAX_BODY
    created: int = field(default_factory=lambda: int(time.time()))
    relay: Relay = field(default_factory=lambda: Relay())



def create_app(served: Served) -> FastAPI:
    """The FastAPI app; the engine's thread runs while the app does."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        served.engine.start()
        try:
            yield
        finally:
            served.engine.stop()

    app = FastAPI(title="lmtrain", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    _add_error_handlers(app)
    _add_routes(app, served)
    _add_completion_routes(app, served)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's shape: the API's own, and FastAPI's 404 and 405."""

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, exc: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return JSONResponse(ApiError(exc.status_code, str(exc.detail), code=code).body(),
                            status_code=exc.status_code)



def _add_routes(app: FastAPI, served: Served) -> None:
    """``/health``, the page and the model list."""

    @app.get("/health")
    async def health() -> dict[str, Any]:
        ended = served.engine.ended
        return {"status": "ok", "in_flight": served.engine.in_flight,
                "ended": {reason: ended[reason] for reason in FINISHES}}

    playground = resources.files("lmtrain.serve").joinpath("page.html").read_text()  # once

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(playground)

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        _authorize(request, served.api_key)
        return {"object": "list", "data": [_model_card(served)]}

    @app.get("/v1/models/{name:path}")
    async def model(request: Request, name: str) -> dict[str, Any]:
        _authorize(request, served.api_key)
        _check_model(served, name)
        return _model_card(served)



def _add_completion_routes(app: FastAPI, served: Served) -> None:
    """``/v1/completions`` and ``/v1/chat/completions``."""

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        _authorize(request, served.api_key)
        req: CompletionRequest = parse(CompletionRequest, await _read_json(request,
                                                                           served.max_body))
        _check_model(served, req.model)
        if not req.text:
            raise ApiError(400, "prompt: the prompt is empty", "prompt", "invalid_value")
        return await _answer(request, served, req, req.text, req.stops, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        _authorize(request, served.api_key)
        req: ChatRequest = parse(ChatRequest, await _read_json(request, served.max_body))
        _check_model(served, req.model)
        if not req.messages:
            raise ApiError(400, "messages: the message list is empty", "messages",
                           "invalid_value")
        turns, question = req.turns()
        if not question:
            raise ApiError(400, "messages: the question is empty", "messages", "invalid_value")
        tokenizer = served.engine.tokenizer
        prompt = chat_prompt(served.template, turns, question, tokenizer)
        stops = chat_stops(served.template, tokenizer) + req.stops
        return await _answer(request, served, req, prompt, stops, chat=True)


def _authorize(request: Request, api_key: str | None) -> None:
    if api_key is None:
        return
    given = request.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                             api_key.encode()):
        raise ApiError(401, "a valid API key is needed: send the header "
                            "'Authorization: Bearer <key>'", code="invalid_api_key")


def _check_model(served: Served, name: str) -> None:
    if name != served.model_id:
        raise ApiError(404, f"the model {name!r} does not exist; this server serves "
                            f"{served.model_id!r}", "model", "model_not_found")


def _model_card(served: Served) -> dict[str, Any]:
    return {"id": served.model_id, "object": "model", "created": served.created,
            "owned_by": "lmtrain"}


async def _read_json(request: Request, limit: int) -> Any:
    """The body as JSON: over ``limit`` bytes is a 413, not JSON a 400."""
    too_big = ApiError(413, f"the request body is over {limit} bytes", code="body_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_big
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the body is not valid JSON ({exc})", code="invalid_json") from None


async def _answer(request: Request, served: Served, req: Any, prompt: str, stops: list[str],
                  chat: bool) -> Any:
    """Queue the request, then stream its events or gather them into one response."""
    settings = sampling(req, served.defaults, served.max_tokens)
    events: asyncio.Queue[Event] = asyncio.Queue()
    emit = served.relay.to(events)
    try:
        job = served.engine.job(prompt, settings, emit, seed=req.seed, stops=stops)
    except UserError as exc:
        raise ApiError(400, str(exc), "messages" if chat else "prompt", "invalid_value") from None
    served.engine.submit(job)
    reply = _Reply(served.model_id, chat, job)
    if req.stream:
        usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(reply.stream(events, usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    return await reply.whole(events, request)


class _Reply:
    """One response in OpenAI's shape, whole or as server-sent events."""

    def __init__(self, model_id: str, chat: bool, job: Job) -> None:
        self.model_id, self.chat, self.job = model_id, chat, job
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"
        self.started = False

    def usage(self, tokens: int) -> dict[str, int]:
        prompt = self.job.prompt_tokens
        return {"prompt_tokens": prompt, "completion_tokens": tokens,
                "total_tokens": prompt + tokens}

    def choice(self, text: str, finish: str | None, delta: bool = False) -> dict[str, Any]:
        if not self.chat:
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        body = {"role": "assistant", "content": text}
        if delta:
            body = {"content": text} if text else {}
        return {"index": 0, ("delta" if delta else "message"): body, "logprobs": None,
                "finish_reason": finish}

    def envelope(self, choices: list[dict[str, Any]], streamed: bool) -> dict[str, Any]:
        kind = self.object + (".chunk" if streamed and self.chat else "")
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model_id,
                "choices": choices}

    async def whole(self, events: asyncio.Queue[Event], request: Request) -> dict[str, Any]:
        watch = asyncio.create_task(_cancel_on_disconnect(request, self.job))
        parts: list[str] = []
        try:
            while (event := await events.get()).finish is None:
                parts.append(event.text)
        finally:
            watch.cancel()
        if event.error:
            raise ApiError(500, event.error, kind="server_error", code="decoding_failed")
        text = "".join(parts)
        out = self.envelope([self.choice(text.strip() if self.chat else text, _finish(event))],
                            streamed=False)
        return out | {"usage": self.usage(event.tokens)}

    async def stream(self, events: asyncio.Queue[Event], usage: bool) -> AsyncIterator[str]:
        try:
            if self.chat:
                first = self.choice("", None, delta=True)
                first["delta"] = {"role": "assistant", "content": ""}
                yield _sse(self.envelope([first], streamed=True))
            held = ""  # a chat answer's whitespace, sent once text follows it (it is stripped)
            while True:
                text, end = await _next_events(events)
                if self.chat:
                    text, held = hold_whitespace(held + text, self.started)
                    self.started = self.started or bool(text)
                if text:
                    yield _sse(self.envelope([self.choice(text, None, delta=True)], True))
                if end is None:
                    continue
                if end.error:
                    yield _sse(ApiError(500, end.error, kind="server_error").body())
                else:
                    yield _sse(self.envelope([self.choice("", _finish(end), delta=True)], True))
                    if usage:
                        yield _sse(self.envelope([], True) | {"usage": self.usage(end.tokens)})
                yield "data: [DONE]\n\n"
                return
        finally:  # the client went away (or all was sent): stop generating for it
            self.job.cancel()


async def _next_events(events: asyncio.Queue[Event]) -> tuple[str, Event | None]:
    """The text of the next events, all those queued joined (one chunk, not many, when the
    client reads slower than the model writes), and the end event if it came."""
    got = [await events.get()]
    while not events.empty():
        got.append(events.get_nowait())
    end = next((event for event in got if event.finish is not None), None)
    return "".join(event.text for event in got), end


async def _cancel_on_disconnect(request: Request, job: Job) -> None:
    """Cancel ``job`` once its client has gone away (checked twice a second)."""
    while not await request.is_disconnected():
        await asyncio.sleep(0.5)
    job.cancel()


class Relay:
    """Events from the engine's thread to the event loop's queues, with one wake-up of the
    loop per batch of events rather than one per event."""

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self.pending: list[tuple[asyncio.Queue[Event], Event]] = []
        self.lock = threading.Lock()

    def to(self, events: asyncio.Queue[Event]) -> Callable[[Event], None]:
        """An ``emit`` for the engine that puts events into ``events``."""
        self.loop = asyncio.get_running_loop()

        def emit(event: Event) -> None:
            with self.lock:
                self.pending.append((events, event))
                first = len(self.pending) == 1
            if first:
                assert self.loop is not None
                self.loop.call_soon_threadsafe(self._deliver)

        return emit

    def _deliver(self) -> None:
        with self.lock:
            pending, self.pending = self.pending, []
        for events, event in pending:
            events.put_nowait(event)


def _finish(event: Event) -> str:
    return "length" if event.finish == "length" else "stop"


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
