"""What each of the tutorial's ten extension ideas does to held-out bits/char on Alice.

Trains the tutorial-small recipe, then the same recipe with one idea switched on at a time,
each for the same wall-clock budget, and the default recipe for reference; prints one table
of validation nats/char and bits/char on Alice's last 10 %, characters/s and the change from
the tutorial-small baseline. Ideas that change the vocabulary are scored on their own cleaned
validation text and marked as not comparable.

    python benchmarks/extensions.py --text ../shared/corpora/pg11.txt --budget 180
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from charlstm import Corpus, Normalization, fit
from charlstm.evaluate import LN2


@dataclass(frozen=True)
class Idea:
    number: str
    name: str
    option: str
    overrides: dict = field(default_factory=dict)
    preset: str = "tutorial-small"
    strip_punctuation: bool = False
    trained: bool = True   # False: a generation or workflow option, nothing to train


IDEAS = [
    Idea("-", "baseline: the tutorial's small recipe", "--preset tutorial-small"),
    Idea("1", "fewer than 1,000 generated characters", "generate --length N, --stop", trained=False),
    Idea("2", "no punctuation in text or vocabulary", "--strip-punctuation", strip_punctuation=True),
    Idea("3", "one-hot input", "--input onehot", {"input": "onehot"}),
    Idea("4", "padded sentences instead of windows", "--batching sentences --target all",
         {"batching": "sentences", "target": "all"}),
    Idea("5", "many more epochs", "--epochs, --resume, --patience, --time-budget", trained=False),
    Idea("6", "dropout on the visible input", "--input-dropout 0.2", {"input_dropout": 0.2}),
    Idea("6", "more dropout after the LSTM", "--dropout 0.5", {"dropout": 0.5}),
    Idea("7", "smaller batches", "--batch-size 32", {"batch_size": 32}),
    Idea("7", "batch size 1", "--batch-size 1", {"batch_size": 1}),
    Idea("8", "more layers", "--layers 2", {"layers": 2}),
    Idea("8", "more memory units", "--units 512", {"units": 512}),
    Idea("9", "temperature when sampling", "generate --temperature T", trained=False),
    Idea("10", "stateful LSTM across batches", "--stateful", {"stateful": True}),
    Idea("ref", "charlstm's default recipe", "--preset default", preset="default"),
]


@dataclass
class Outcome:
    idea: Idea
    val_nats: float | None = None
    chars_per_s: float | None = None
    epochs: float = 0.0


def run_idea(idea: Idea, text_path: Path, budget: float, seed: int, threads: int) -> Outcome:
    corpus = Corpus.from_files(text_path, Normalization(strip_punctuation=idea.strip_punctuation))
    with tempfile.TemporaryDirectory() as out:
        result = fit(corpus, idea.preset, log=lambda _: None, progress=False, output_dir=out,
                     time_budget=budget, seed=seed, threads=threads, **idea.overrides)
    vals = [r.val_loss for r in result.history if r.val_loss is not None]
    rates = [r.chars_per_s for r in result.history]
    return Outcome(idea, min(vals) if vals else None, sum(rates) / max(len(rates), 1), len(result.history))


def table(outcomes: list[Outcome]) -> str:
    base = next(o.val_nats for o in outcomes if o.idea.number == "-")
    lines = ["| idea | what | option | val nats/char | val bits/char | Δ bits/char vs baseline | chars/s |",
             "|---|---|---|---:|---:|---:|---:|"]
    for o in outcomes:
        if not o.idea.trained:
            lines.append(f"| {o.idea.number} | {o.idea.name} | `{o.idea.option}` | — | — | not a training change | — |")
            continue
        bits = o.val_nats / LN2
        if o.idea.strip_punctuation:
            delta = "not comparable (own vocabulary and validation text)"
        elif o.idea.number == "-":
            delta = "0 (baseline)"
        else:
            delta = f"{(o.val_nats - base) / LN2:+.3f}"
        lines.append(f"| {o.idea.number} | {o.idea.name} | `{o.idea.option}` | {o.val_nats:.4f} | {bits:.3f} "
                     f"| {delta} | {o.chars_per_s:,.0f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--text", type=Path, default=Path("../shared/corpora/pg11.txt"))
    parser.add_argument("--budget", type=float, default=180.0, help="seconds of training per idea")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads per run (0 = torch's choice)")
    parser.add_argument("--only", help="comma-separated idea numbers to run (the baseline always runs)")
    args = parser.parse_args()
    chosen = set(args.only.split(",")) | {"-"} if args.only else None
    threads = args.threads or torch.get_num_threads()
    print(f"machine: {platform.processor() or platform.machine()}, {threads} torch threads per run, "
          f"torch {torch.__version__}; budget {args.budget:.0f} s per idea; text {args.text}", flush=True)
    outcomes = []
    for idea in IDEAS:
        if chosen and idea.number not in chosen:
            continue
        if not idea.trained:
            outcomes.append(Outcome(idea))
            continue
        start = time.perf_counter()
        outcome = run_idea(idea, args.text, args.budget, args.seed, args.threads)
        outcomes.append(outcome)
        print(f"{idea.option}: val {outcome.val_nats:.4f} nats/char after {outcome.epochs} evaluations, "
              f"{outcome.chars_per_s:,.0f} chars/s ({time.perf_counter() - start:.0f} s)", flush=True)
    print()
    print(table(outcomes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
