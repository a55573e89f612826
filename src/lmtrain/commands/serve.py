"""``lmtrain serve PATH``: an OpenAI-compatible server for a trained model (the ``serve``
extra: FastAPI and uvicorn), with a playground page at ``/``."""

from __future__ import annotations

import argparse
import os
import socket
from typing import Any

from lmtrain.config import GenerationSettings

#: The sampling settings a server (or a chat) takes as its defaults: the run's own values,
#: changed by these flags or their env vars; each request may change them again.
SERVE_SETTINGS = [name for name in GenerationSettings.model_fields if name != "prompt"]
#: The tokens an answer may have when the run's ``MAX_NEW_TOKENS`` is 0 (no end-of-run sample).
ANSWER_TOKENS = 256


def add_model_flags(p: argparse.ArgumentParser) -> None:
    """PATH, ``--step``, the sampling settings, ``--device`` and ``--base``."""
    from lmtrain.cli import add_base_flag, add_setting_flags

    p.add_argument("path", metavar="PATH",
                   help="a .pt checkpoint, or a run folder (its best checkpoint, or --step N)")
    p.add_argument("--step", type=int, default=None,
                   help="in a run folder, the checkpoint of this step [default: the best]")
    add_setting_flags(p, SERVE_SETTINGS, default_text="the run's")
    add_setting_flags(p, ["device"])
    add_base_flag(p)


def register(sub) -> None:
    from lmtrain.serve import MAX_BATCH

    p = sub.add_parser(
        "serve", help="serve a trained model over an OpenAI-compatible API",
        description="Serve a checkpoint over an OpenAI-compatible HTTP API (/v1/models, "
                    "/v1/completions, /v1/chat/completions, /health) with a playground page "
                    "at /. Concurrent requests decode together in one batch. A chat request "
                    "is rendered through the run's question/answer template. The sampling "
                    "settings below are the defaults of requests that leave them out.")
    add_model_flags(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on [default: 127.0.0.1, this machine only]")
    p.add_argument("--port", type=int, default=8000,
                   help="port; 0: a free one, named in the startup line [default: 8000]")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every route but /health and "
                        "the page [env LMTRAIN_API_KEY; default: none]")
    p.add_argument("--model-name", default=None,
                   help="the model id clients name [default: the run's name]")
    p.add_argument("--max-batch", type=int, default=MAX_BATCH,
                   help=f"requests decoded together at most; 1 serves one at a time "
                        f"[default: {MAX_BATCH}]")
    p.add_argument("--max-tokens-limit", type=int, default=None,
                   help="the most tokens one request may ask for [default: 4096]")
    p.set_defaults(func=run)


def load_engine(args: argparse.Namespace, max_batch: int) -> tuple[Any, Any, GenerationSettings]:
    """The checkpoint PATH names, an engine over its model, and the sampling defaults."""
    from lmtrain.cli import base_override, setting_value
    from lmtrain.device import select_device
    from lmtrain.inference import find_checkpoint, load_trained_model
    from lmtrain.serve.engine import Engine

    device = select_device(setting_value(args, "device", "auto"))
    path, run = find_checkpoint(args.path, args.step)  # a run folder's newest: loaded once
    loaded = load_trained_model(path, device, label="PATH", base=base_override(args), run=run)
    run_values = loaded.config.generation.model_dump()
    run_values["max_new_tokens"] = run_values["max_new_tokens"] or ANSWER_TOKENS  # 0: no sample
    defaults = GenerationSettings(**{name: setting_value(args, name, run_values[name])
                                     for name in SERVE_SETTINGS})
    engine = Engine(loaded.model, loaded.tokenizer, loaded.config.model.block_size, device,
                    max_batch=max_batch)
    return loaded, engine, defaults


def _bind(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (port 0: a free one the system picks), made before the
    model loads, so that an address it cannot listen on fails at once."""
    from lmtrain.errors import UserError

    if not 0 <= port <= 65535:
        raise UserError(f"--port {port} is not a port (0-65535)")
    sock: socket.socket | None = None
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        if sock is not None:
            sock.close()
        raise UserError(f"cannot listen on --host {host} --port {port}: "
                        f"{exc.strerror or exc}") from None
    return sock


def _url(host: str, sock: socket.socket) -> str:
    """The address ``sock`` listens on, with the port it got (``--port 0``)."""
    port = sock.getsockname()[1]
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def run(args: argparse.Namespace) -> int:
    from lmtrain.errors import UserError

    try:
        from lmtrain.serve.app import MAX_TOKENS, Served, create_app
        from lmtrain.serve.server import serve
    except ImportError as exc:
        raise UserError(f"lmtrain serve needs the serve extra ({exc.name} is missing): "
                        f"pip install 'lmtrain[serve]'") from None
    from lmtrain.data.qa_format import QATemplate

    if args.max_batch < 1:
        raise UserError("--max-batch must be at least 1")
    limit = args.max_tokens_limit or MAX_TOKENS
    if limit < 1:
        raise UserError("--max-tokens-limit must be at least 1")
    with _bind(args.host, args.port) as sock:
        loaded, engine, defaults = load_engine(args, args.max_batch)
        api_key = args.api_key or os.environ.get("LMTRAIN_API_KEY", "").strip() or None
        name = args.model_name or loaded.checkpoint.run_name or loaded.checkpoint.where
        served = Served(engine, name, QATemplate(loaded.config.data.qa_template), defaults,
                        api_key=api_key, max_tokens=limit)
        sock.listen()  # from here a client waits for the server rather than being refused
        print(f"serving {name!r} (step {loaded.checkpoint.step}) at {_url(args.host, sock)}"
              f" {'(API key required)' if api_key else ''}".rstrip(), flush=True)
        serve(create_app(served), sock)
    return 0
