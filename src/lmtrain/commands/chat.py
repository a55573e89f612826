"""``lmtrain chat PATH``: ask a trained model questions at a terminal prompt; each answer
streams as it is sampled. ``/reset`` forgets the conversation, ``/quit`` or Ctrl-D ends it."""

from __future__ import annotations

import argparse
import sys

HELP = "Type a question; /reset forgets the conversation, /quit (or Ctrl-D) ends."


def register(sub) -> None:
    from lmtrain.cli import add_setting_flags
    from lmtrain.commands.serve import add_model_flags

    p = sub.add_parser(
        "chat", help="ask a trained model questions at a terminal prompt",
        description="A terminal chat with a checkpoint: each line is a question, rendered "
                    "through the run's question/answer template after the conversation so "
                    "far; the answer streams token by token. " + HELP)
    add_model_flags(p)
    add_setting_flags(p, ["seed"], default_text="the run's")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lmtrain.cli import setting_value
    from lmtrain.data.qa_format import QATemplate
    from lmtrain.errors import UserError
    from lmtrain.serve.conversation import chat_prompt, chat_stops, hold_whitespace
    from lmtrain.serve.engine import Event

    from .serve import load_engine

    loaded, engine, defaults = load_engine(args, max_batch=1)
    seed = setting_value(args, "seed", loaded.config.optimization.seed)
    template = QATemplate(loaded.config.data.qa_template)
    stops = chat_stops(template, loaded.tokenizer)
    turns: list[tuple[str, str]] = []
    print(HELP, flush=True)
    while True:
        try:
            question = input("> ").strip()
        except EOFError:
            print()
            return 0
        if question in ("/quit", "/exit"):
            return 0
        if question == "/reset":
            turns.clear()
            print("(the conversation is forgotten)", flush=True)
            continue
        if not question:
            continue
        shown: list[str] = []
        held = [""]

        def show(event: Event, shown: list[str] = shown, held: list[str] = held) -> None:
            text, held[0] = hold_whitespace(held[0] + event.text, bool(shown))
            if text:
                shown.append(text)
                sys.stdout.write(text)
                sys.stdout.flush()

        try:
            job = engine.job(chat_prompt(template, turns, question, loaded.tokenizer),
                             defaults, show, seed=seed + len(turns), stops=stops)
        except UserError as exc:
            print(f"error: {exc}", flush=True)
            continue
        engine.submit(job)
        while engine.busy:
            engine.step()
        print(flush=True)
        turns.append((question, "".join(shown)))
