"""Does a from-scratch model learn to answer? Exact answers to unseen questions per training second.

    python benchmarks/bench_qa.py --plot --out bench-qa        # default vs qa recipe, 3 min each
    python benchmarks/bench_qa.py --recipe qa --threads 1      # one recipe
    python benchmarks/bench_qa.py --quick                      # a smoke run (< 1 min)
    python benchmarks/bench_qa.py --recipe default --variant "w64:n_embd=64,n_head=2"

Synthetic question/answer tasks, generated from ``--seed``:

- ``reverse``: ``QUESTION: reverse abc ANSWER: cba`` (a word of 3-8 random lowercase letters);
- ``next letter``: ``QUESTION: next c d e ANSWER: f`` (3-5 consecutive letters);
- ``next number``: ``QUESTION: next 4 5 6 ANSWER: 7`` (3-5 consecutive numbers, answers <= 100).

The test questions are drawn first and never occur in training (asserted). The training records
are a ``.jsonl`` of ``{"question", "answer"}`` records (``--format qa``: lmtrain renders them as
``QUESTION: ... ANSWER: ...`` and, with ``LOSS_ON=auto``, takes the loss on the answers) or of
the rendered ``{"text": ...}`` (``--format text``: plain text, the loss on every token); the end
of text (a blank line for a character vocabulary) follows each record. Each recipe trains
through lmtrain's session (``lmtrain.train.session.train``, as ``lmtrain train`` does) on the
CPU, in segments that resume exactly from the previous segment's checkpoint; after each segment
the checkpoint is loaded as ``lmtrain eval`` loads it and every test question is answered
greedily (:func:`lmtrain.answers.answer_accuracy`). Training seconds are the session's own
training and batch timings, so evaluation, checkpoints and start-up are not counted.

``--seconds`` is a training-time budget: two short segments within warmup measure the speed (the
faster of the two counts: the less disturbed by other load), and the run's length
(``TRAINING_STEPS``, and the cosine horizon) is set from it; ``--steps`` fixes it instead
(reproducible to the step). Several recipes (``--recipe a,b``, ``--variant NAME:K=V,...``) run
interleaved, segment by segment, so the load of other processes falls on all of them alike. On a
machine that other processes load, ``--threads 1`` is much faster than two threads that contend
for the cores.
Writes ``table.md``, ``results.json`` (and ``qa.png`` with ``--plot``) under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import string
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

TEMPLATE = "QUESTION: {question} ANSWER: {answer}"
PREFIX = "ANSWER:"
TASKS = ("reverse", "next letter", "next number")
TARGET = 0.90  # exact answers on unseen questions ...
BUDGET_S = 180.0  # ... within this many training seconds
CALIBRATION_ROUNDS = 2  # segments that measure the speed (the first one includes start-up)

#: The recipes: TrainingConfig settings over lmtrain's defaults. ``qa``: the question/answer
#: preset of a small search (width, depth, batch, learning rate, block size, answers-only loss,
#: docs/question-answering.md): in four interleaved runs half the width first reached 90% at
#: 46-97 s of training where the defaults did at 67-129 s.
RECIPES: dict[str, dict[str, Any]] = {
    "default": {},
    "qa": {"n_embd": 64, "n_head": 2},
}
#: Settings of every run here (not the recipe): where it writes, the CPU, no end-of-run sample,
#: cheap loss evaluations at the segment ends only.
FIXED: dict[str, Any] = {
    "device": "cpu", "max_new_tokens": 0, "eval_iters": 4, "eval_interval": 10**9,
    "checkpoint_interval": 10**9, "keep_last_checkpoints": 1, "log_interval": 100,
    "eval_answers": 0,  # the bench answers its own unseen questions after each segment
}


# ---------------------------------------------------------------- the tasks


def reverse(rng: random.Random) -> tuple[str, str]:
    word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 8)))
    return f"reverse {word}", word[::-1]


def next_letter(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(3, 5)
    start = rng.randint(0, 26 - n - 1)
    seq = string.ascii_lowercase[start:start + n + 1]
    return "next " + " ".join(seq[:-1]), seq[-1]


def next_number(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(3, 5)
    start = rng.randint(0, 100 - n)
    return "next " + " ".join(str(i) for i in range(start, start + n)), str(start + n)


GENERATORS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "reverse": reverse, "next letter": next_letter, "next number": next_number}
WEIGHTS = {"reverse": 0.5, "next letter": 0.25, "next number": 0.25}


@dataclass(frozen=True)
class Question:
    task: str
    question: str
    answer: str

    def text(self) -> str:
        return TEMPLATE.format(question=self.question, answer=self.answer)

    def pair(self):
        from lmtrain.answers import QAPair

        return QAPair(TEMPLATE.format(question=self.question, answer="").rstrip(), self.answer)


def make_questions(seed: int, n_train: int, n_test: dict[str, int]
                   ) -> tuple[list[Question], list[Question]]:
    """(training records, test questions): the test questions first, distinct, then training
    records drawn (with repeats) from the rest of each task's questions."""
    rng = random.Random(seed)
    test: list[Question] = []
    held: set[str] = set()
    for task, n in n_test.items():
        tries = 0
        while sum(q.task == task for q in test) < n:
            question, answer = GENERATORS[task](rng)
            tries += 1
            if tries > 100 * n:
                raise SystemExit(f"cannot draw {n} distinct {task} questions")
            if question not in held:
                held.add(question)
                test.append(Question(task, question, answer))
    train: list[Question] = []
    tasks, weights = list(WEIGHTS), list(WEIGHTS.values())
    while len(train) < n_train:
        task = rng.choices(tasks, weights)[0]
        question, answer = GENERATORS[task](rng)
        if question not in held:
            train.append(Question(task, question, answer))
    assert not held & {q.question for q in train}, "a test question is in the training text"
    return train, test


def write_corpus(path: Path, records: list[Question], form: str = "qa") -> Path:
    """One record per line: ``{"question", "answer"}`` (``form="qa"``), which lmtrain renders
    through its template with the answer mask from the record; or the rendered
    ``{"text": ...}`` (``form="text"``), plain text to lmtrain. Either way the end of text (a
    blank line for a character vocabulary) follows each record."""
    with path.open("w", encoding="utf-8") as fh:
        for q in records:
            record = ({"question": q.question, "answer": q.answer} if form == "qa"
                      else {"text": q.text()})
            fh.write(json.dumps(record) + "\n")
    return path


# ---------------------------------------------------------------- training and evaluation


@dataclass
class Point:
    step: int
    train_s: float
    accuracy: float
    correct: int
    total: int
    by_task: dict[str, float]
    val_loss: float
    wrong: list[list[str]] = field(default_factory=list)


@dataclass
class Result:
    recipe: str
    settings: dict[str, Any]
    steps: int
    points: list[Point] = field(default_factory=list)
    wall_s: float = 0.0
    speed: dict[str, Any] = field(default_factory=dict)

    def first_at_target(self) -> Point | None:
        return next((p for p in self.points if p.accuracy >= TARGET), None)

    def at_budget(self, seconds: float) -> Point | None:
        """The last evaluation within ``seconds`` of training (2% slack)."""
        within = [p for p in self.points if p.train_s <= seconds * 1.02]
        return within[-1] if within else None


def session(flags: dict[str, Any]):
    from lmtrain.config import explicit_settings
    from lmtrain.train.session import train

    values, sources = explicit_settings(flags=flags, env={})
    return train(values, sources)


def evaluate(ckpt: Path, test: list[Question], batch_size: int) -> tuple[Any, Any]:
    """(AnswerReport, LoadedModel) of a checkpoint on the test questions."""
    import torch

    from lmtrain.answers import answer_accuracy
    from lmtrain.inference import load_trained_model

    loaded = load_trained_model(ckpt, torch.device("cpu"))
    report = answer_accuracy(loaded.model, loaded.tokenizer, [q.pair() for q in test],
                             device=torch.device("cpu"), block_size=loaded.config.model.block_size,
                             batch_size=batch_size, progress=False)
    return report, loaded


def by_task(test: list[Question], answers: list[str]) -> dict[str, float]:
    out = {}
    for task in TASKS:
        rows = [(q, a) for q, a in zip(test, answers, strict=True) if q.task == task]
        if rows:
            out[task] = sum(q.answer == a for q, a in rows) / len(rows)
    return out


class RecipeRun:
    """One recipe trained in segments, each resumed from the last one's checkpoint and followed
    by an accuracy evaluation."""

    def __init__(self, name: str, settings: dict[str, Any], corpus: Path, out: Path,
                 test: list[Question], args: argparse.Namespace) -> None:
        from lmtrain.config import explicit_settings, load_fresh

        self.name, self.test, self.args = name, test, args
        self.base = {**FIXED, **settings, "training_data_source": str(corpus), "run_name": name,
                     "checkpoint_dir": str(out / "checkpoints"), "log_dir": str(out / "logs"),
                     "output_dir": str(out / "outputs"), "cache_dir": str(out / "cache"),
                     "seed": args.seed}
        self.config = load_fresh(*explicit_settings(flags=self.base, env={})).config
        self.result = Result(name, settings, args.steps or 0)
        self.train_s = 0.0
        self.ckpt: Path | None = None
        self.bounds: list[int] = []
        self.per_step: list[float] = []
        self.started = time.perf_counter()

    def segment(self, to_step: int) -> None:
        """Train up to step ``to_step`` (the cosine horizon is the run's length, once known);
        then measure accuracy."""
        from lmtrain.checkpoint import checkpoint_filename

        horizon = self.result.steps or self.config.optimization.decay_horizon
        flags = {**self.base, "training_steps": to_step, "lr_decay_steps": horizon}
        if self.ckpt is not None:
            flags["checkpoint_path"] = str(self.ckpt)
        summary = session(flags)
        self.train_s += summary.timings.get("train", 0.0) + summary.timings.get("data", 0.0)
        self.ckpt = summary.checkpoint_dir / checkpoint_filename(summary.end_step)
        report, _ = evaluate(self.ckpt, self.test, self.args.eval_batch)
        point = Point(summary.end_step, round(self.train_s, 2), report.accuracy, report.correct,
                      report.total, by_task(self.test, report.answers),
                      round(summary.final_losses.get("val", float("nan")), 4),
                      [[w.prompt, w.expected, w.got] for w in report.wrong[:3]])
        self.result.points.append(point)
        tasks = ", ".join(f"{t} {100 * a:.0f}%" for t, a in point.by_task.items())
        print(f"[{self.name}] step {point.step}: {self.train_s:.1f} s trained, "
              f"{report.summary()} ({tasks}); val loss {point.val_loss}", flush=True)

    def calibration(self) -> list[int]:
        """The steps that end the calibration segments: within warmup (whose learning rates
        ignore the horizon, not yet known), in ``CALIBRATION_ROUNDS`` equal parts."""
        warmup = self.config.optimization.warmup_steps
        first = min(self.args.calibration_steps, warmup) if warmup else \
            self.args.calibration_steps
        parts = min(CALIBRATION_ROUNDS, first)
        return [round(first * k / parts) for k in range(1, parts + 1)]

    def calibrate(self, to_step: int) -> None:
        """One calibration segment; its seconds per step are remembered."""
        before, start = self.train_s, self.result.points[-1].step if self.result.points else 0
        self.segment(to_step)
        self.per_step.append((self.train_s - before) / max(to_step - start, 1))

    def plan(self) -> None:
        """The evaluation steps: of ``--steps``; or, for ``--seconds``, as many steps as fit at
        the fastest speed the calibration segments saw (the least disturbed by other load)."""
        args = self.args
        if args.steps:
            self.bounds = [round(args.steps * k / args.evals) for k in range(1, args.evals + 1)]
            return
        first = self.result.points[-1].step
        per_step = min(self.per_step)
        total = max(first + 1, first + int((args.seconds - self.train_s) / per_step))
        self.result.steps = total
        self.bounds = [first + round((total - first) * k / args.evals)
                       for k in range(1, args.evals + 1)]
        print(f"[{self.name}] {per_step:.3f} s/step: {total} steps for {args.seconds:.0f} s",
              flush=True)

    def finish(self) -> Result:
        if self.args.speed and self.ckpt is not None:
            self.result.speed = measure_speed(self.ckpt, self.test[:self.args.speed],
                                              self.args.eval_batch)
        self.result.wall_s = round(time.perf_counter() - self.started, 1)
        return self.result


def run_interleaved(runs: list[RecipeRun]) -> list[Result]:
    """Every run's segments in turn (segment k of each, then k + 1), so that the load of other
    processes on the machine falls on all of them alike."""
    if not runs[0].args.steps:  # calibration segments, interleaved too
        for k in range(max(len(run.calibration()) for run in runs)):
            for run in runs:
                ends = run.calibration()
                if k < len(ends):
                    run.calibrate(ends[k])
    for run in runs:
        run.plan()
    done = [0] * len(runs)
    while any(n < len(run.bounds) for n, run in zip(done, runs, strict=True)):
        for i, run in enumerate(runs):
            if done[i] < len(run.bounds):
                bound = run.bounds[done[i]]
                if not run.result.points or bound > run.result.points[-1].step:
                    run.segment(bound)
                done[i] += 1
    return [run.finish() for run in runs]


def measure_speed(ckpt: Path, test: list[Question], batch_size: int) -> dict[str, Any]:
    """Seconds to answer ``test``: batched + KV cache, one at a time with the cache, and one at
    a time re-reading the window every token; the answers must agree."""
    import torch

    from lmtrain.answers import answer_budget, default_stops, naive_greedy_answers

    report, loaded = evaluate(ckpt, test, batch_size)  # warm, then timed below
    report, _ = evaluate(ckpt, test, batch_size)
    prompts = [q.pair().prompt for q in test]
    budget = answer_budget(loaded.tokenizer, [q.answer for q in test])
    stops = default_stops([q.answer for q in test])
    times, outputs = {"batched": report.seconds}, {}
    for label, cache in (("one_cached", True), ("one_uncached", False)):
        t0 = time.perf_counter()
        outputs[label] = naive_greedy_answers(
            loaded.model, loaded.tokenizer, prompts, budget, device=torch.device("cpu"),
            block_size=loaded.config.model.block_size, stops=stops, use_cache=cache)
        times[label] = time.perf_counter() - t0
    agree = all([a.strip() for a in got] == report.answers for got in outputs.values())
    speed = {"questions": len(test), "max_new_tokens": budget, "batch_size": batch_size,
             "seconds": {k: round(v, 3) for k, v in times.items()}, "answers_agree": agree,
             "speedup_vs_uncached": round(times["one_uncached"] / times["batched"], 1),
             "speedup_vs_cached": round(times["one_cached"] / times["batched"], 1)}
    print(f"answering {len(test)} questions: batched {times['batched']:.2f} s, one at a time "
          f"cached {times['one_cached']:.2f} s, uncached {times['one_uncached']:.2f} s "
          f"(x{speed['speedup_vs_uncached']} / x{speed['speedup_vs_cached']}); answers agree: "
          f"{agree}", flush=True)
    return speed


# ---------------------------------------------------------------- reporting


def table(results: list[Result], seconds: float) -> str:
    lines = ["| recipe | step | train s | exact answers | reverse | next letter | next number "
             "| val loss |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        for p in r.points:
            tasks = " | ".join(f"{100 * p.by_task.get(t, float('nan')):.0f}%" for t in TASKS)
            lines.append(f"| {r.recipe} | {p.step} | {p.train_s:.0f} | {100 * p.accuracy:.1f}% "
                         f"({p.correct}/{p.total}) | {tasks} | {p.val_loss:.3f} |")
    marks = (seconds / 3, seconds / 2, seconds)
    lines += ["", "| recipe | settings over the defaults | "
              + " | ".join(f"by {m:.0f} s" for m in marks)
              + f" | first >= {100 * TARGET:.0f}% |", "|---|---|" + "---:|" * (len(marks) + 1)]
    for r in results:
        hit = r.first_at_target()
        shown = ", ".join(f"{k.upper()}={v}" for k, v in r.settings.items()) or "none"
        cells = []
        for mark in marks:
            at = r.at_budget(mark)
            cells.append(f"{100 * at.accuracy:.1f}% ({at.train_s:.0f} s)" if at else "-")
        lines.append(f"| {r.recipe} | {shown} | {' | '.join(cells)} | "
                     f"{f'{hit.train_s:.0f} s (step {hit.step})' if hit else 'not reached'} |")
    lines.append(f"\nby N s: the last evaluation after at most N training seconds (2% slack); "
                 f"first >= {100 * TARGET:.0f}%: the first evaluation that reached it.")
    return "\n".join(lines)


def plot(results: list[Result], path: Path, seconds: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r in results:
        ax.plot([p.train_s for p in r.points], [100 * p.accuracy for p in r.points], "o-",
                label=r.recipe)
    ax.axhline(100 * TARGET, color="grey", ls="--", lw=0.8)
    ax.axvline(seconds, color="grey", ls=":", lw=0.8)
    ax.set_xlabel("training seconds (CPU)")
    ax.set_ylabel("exact answers on unseen questions (%)")
    ax.set_ylim(0, 100)
    ax.set_title("bench_qa: reverse a word, next letter / number")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_set(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected NAME=VALUE")
        out[key.strip().lower()] = value.strip()
    return out


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """``NAME:KEY=VALUE,KEY=VALUE`` -> (NAME, settings over lmtrain's defaults)."""
    name, sep, rest = text.partition(":")
    if not sep or not name.strip():
        raise SystemExit(f"--variant {text!r}: expected NAME:KEY=VALUE[,KEY=VALUE...]")
    return name.strip(), parse_set([item for item in rest.split(",") if item.strip()])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default="default,qa",
                   help=f"comma list of {', '.join(RECIPES)} [default: default,qa]")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="a setting over every recipe (repeatable), e.g. --set n_layer=2")
    p.add_argument("--variant", action="append", default=[], metavar="NAME:K=V,K=V",
                   help="one more run: these settings over lmtrain's defaults (repeatable); "
                        "all runs are interleaved")
    p.add_argument("--name", help="a single recipe's name in the table")
    p.add_argument("--seconds", type=float, default=BUDGET_S, help="training-time budget")
    p.add_argument("--steps", type=int, help="train this many steps instead of --seconds")
    p.add_argument("--evals", type=int, help="accuracy evaluations per recipe after the "
                                               "calibration [default: 6; --quick: 2]")
    p.add_argument("--calibration-steps", type=int, default=20)
    p.add_argument("--train-records", type=int, default=50_000)
    p.add_argument("--test", default="200,16,64",
                   help="test questions per task: reverse,next letter,next number")
    p.add_argument("--format", choices=["qa", "text"], default="qa",
                   help="training records: qa {question, answer} (answers-only loss by "
                        "default) or text {text} (loss on every token) [default: qa]")
    p.add_argument("--eval-batch", type=int, default=64)
    p.add_argument("--speed", type=int, default=0, metavar="N",
                   help="time batched vs one-at-a-time answering on N test questions at the end")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--threads", type=int, help="torch threads [default: torch's]")
    p.add_argument("--quick", action="store_true", help="a smoke run (< 1 min)")
    p.add_argument("--plot", action="store_true", help="write qa.png")
    p.add_argument("--out", default="bench-qa-out")
    args = p.parse_args(argv)
    if args.quick:
        args.seconds, args.train_records, args.test = 15.0, 4000, "30,6,12"
        args.calibration_steps = min(args.calibration_steps, 5)
    args.evals = args.evals or (2 if args.quick else 6)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.recipe.split(",") if n.strip()]
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        raise SystemExit(f"--recipe: unknown {unknown}; choose from {list(RECIPES)}")
    overrides = parse_set(args.set)
    variants = [parse_variant(v) for v in args.variant]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    n_test = dict(zip(TASKS, map(int, args.test.split(",")), strict=True))
    train, test = make_questions(args.seed, args.train_records, n_test)
    corpus = write_corpus(out / "qa_train.jsonl", train, args.format)
    load = os.getloadavg()
    print(f"{len(train)} training records, {len(test)} unseen test questions; "
          f"{torch.get_num_threads()} torch threads; load average {load[0]:.2f} "
          f"{load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} CPUs", flush=True)
    runs = []
    for label, settings in [*((args.name if args.name and len(names) == 1 else n,
                               {**RECIPES[n], **overrides}) for n in names),
                            *((n, {**overrides, **v}) for n, v in variants)]:
        run_out = out / label
        if run_out.exists():
            import shutil

            shutil.rmtree(run_out)
        runs.append(RecipeRun(label, settings, corpus, run_out, test, args))
    results = run_interleaved(runs)
    text = table(results, args.seconds)
    load_end = os.getloadavg()
    text += (f"\n\n{len(train)} training records ({args.format} format), {len(test)} unseen "
             f"test questions, seed "
             f"{args.seed}; {torch.get_num_threads()} torch threads; load average "
             f"{load[0]:.2f} at the start, {load_end[0]:.2f} at the end, on {os.cpu_count()} "
             f"CPUs.\n")
    print("\n" + text)
    (out / "table.md").write_text(text, encoding="utf-8")
    (out / "results.json").write_text(json.dumps(
        {"args": vars(args), "load": [load, load_end],
         "results": [asdict(r) for r in results]}, indent=1), encoding="utf-8")
    if args.plot:
        plot(results, out / "qa.png", args.seconds)
        print(f"plot: {out / 'qa.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
