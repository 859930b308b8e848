"""Generation speed of an older charlstm against this one, alternating in one run.

    git worktree add /tmp/old-speed 8af9c6f     # main just before issue 13's speed work
    PYTHONPATH=src python benchmarks/generate_before_after.py --before /tmp/old-speed [--rounds 7]

Each tree is imported by a worker process of its own (``PYTHONPATH=TREE/src``, a fresh native
kernel cache each, so that how threads share a step is timed now, under this run's load).
After one untimed warm-up of every row in each, the rounds alternate: every row is measured
in the old tree and then the new one (the order swapped every other round), so that a busy
moment of the machine hits both alike. Rows are the fp32 generation rows both trees have
(``Generator.generate_batch`` on the native backend, greedy unless the row says otherwise,
randomly initialised models, the public API only). Printed: the median characters/s of each
tree, their ratio, and the range of the per-round ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
MODELS = ("tutorial-small 1×256", "default 2×256")  # generate_speed's models of these names


@dataclass(frozen=True)
class Row:
    model: str
    streams: int
    threads: int
    steps: int
    temperature: float = 0.0

    @property
    def label(self) -> str:
        threads = f", {self.threads} threads" if self.threads > 1 else ""
        sampled = f", temperature {self.temperature}" if self.temperature else ""
        return f"{self.streams} stream{'s' * (self.streams > 1)}{sampled}{threads}"


def rows(scale: float) -> list[Row]:
    n = lambda steps: max(20, int(steps * scale))  # noqa: E731
    return [Row(model, streams, threads, n(steps), temperature) for model in MODELS
            for streams, threads, steps, temperature in ((1, 1, 6000, 0.0), (1, 1, 6000, 1.0), (1, 2, 6000, 0.0),
                                                         (8, 1, 1500, 0.0), (64, 1, 300, 0.0), (64, 2, 300, 0.0))]


# ----------------------------------------------------------------------------- worker


def worker(text_path: str, models: str) -> None:
    """Reads one row (JSON) per line, answers its characters/s: the tree on PYTHONPATH's code
    (which may be older than this file: the public API only)."""
    import torch
    from charlstm import CharLSTM, Generator, ModelConfig, SamplingConfig, TrainedModel, Vocab

    text = Path(text_path).read_text(encoding="utf-8").lower()
    vocab, prime = Vocab.from_text(text), text[10_000:10_100]
    generators = {}
    for name, config in json.loads(models).items():
        torch.manual_seed(0)
        model = CharLSTM(ModelConfig(vocab_size=len(vocab), **config)).eval()
        generators[name] = Generator(TrainedModel(model, vocab), backend="native")
    print(json.dumps(str(Path(sys.modules["charlstm"].__file__).parents[1])), flush=True)  # ready: where from
    for line in sys.stdin:
        row = Row(**json.loads(line))
        torch.set_num_threads(row.threads)  # read when each generate_batch makes its stepper
        samplings, seeds = [SamplingConfig(row.temperature)] * row.streams, list(range(row.streams))
        start = time.perf_counter()
        texts = generators[row.model].generate_batch(prime, row.steps, samplings, seeds, mode="stateful")
        rate = sum(map(len, texts)) / (time.perf_counter() - start)
        print(json.dumps(rate), flush=True)


class Tree:
    """A worker process running one tree's code."""

    def __init__(self, tree: Path, cache: Path, text: Path, models: dict[str, dict]) -> None:
        env = {**os.environ, "PYTHONPATH": str(tree / "src"), "CHARLSTM_NATIVE_CACHE": str(cache)}
        command = [sys.executable, __file__, "--worker", str(text), json.dumps(models)]
        self.process = subprocess.Popen(command, env=env, text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.commit = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True,
                                     text=True).stdout.strip() or "?"
        self.source = self._answer()  # the folder the worker imported charlstm from
        if Path(self.source).resolve() != (tree / "src").resolve():
            raise SystemExit(f"the worker for {tree} imported charlstm from {self.source}")

    def measure(self, row: Row) -> float:
        self.process.stdin.write(json.dumps(asdict(row)) + "\n")
        self.process.stdin.flush()
        return float(self._answer())

    def _answer(self):
        answer = self.process.stdout.readline()
        if not answer:
            raise SystemExit(f"the worker for commit {self.commit} ended (see its error above)")
        return json.loads(answer)

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


# ----------------------------------------------------------------------------- main


def main() -> None:
    # this tree's benchmark (its models, text and CPU probe; needs PYTHONPATH=src): not imported
    # by the workers, whose charlstm may be older
    import generate_speed
    from machine_probe import cpu_name

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path, required=True, help="the older tree (e.g. a git worktree of 8af9c6f)")
    parser.add_argument("--after", type=Path, default=REPO, help="the newer tree (default: this one)")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds per row and tree (default 7)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies every row's length")
    args = parser.parse_args()
    for tree in (args.before, args.after):
        if not (tree / "src" / "charlstm" / "generate.py").is_file():
            parser.error(f"{tree} is not a charlstm tree (no src/charlstm/generate.py)")
    if not generate_speed.DEFAULT_TEXT.is_file():
        parser.error(f"the vocabulary and prime come from {generate_speed.DEFAULT_TEXT}, which is missing")
    models = {name: generate_speed.MODELS[name] for name in MODELS}
    with tempfile.TemporaryDirectory() as caches:
        trees = {side: Tree(path, Path(caches) / side, generate_speed.DEFAULT_TEXT, models)
                 for side, path in (("before", args.before), ("after", args.after))}
        print(f"# {cpu_name()}, {os.cpu_count()} cores; before = {trees['before'].commit}, "
              f"after = {trees['after'].commit}; load average {os.getloadavg()[0]:.2f}; "
              f"{args.rounds} rounds, alternating")
        table = rows(args.scale)
        for row in table:  # warm-up: caches, and the timed choice of how threads share a step
            for tree in trees.values():
                tree.measure(row)
        rates = {(row, side): [] for row in table for side in trees}
        for round_ in range(args.rounds):
            for row in table:
                for side in (("before", "after") if round_ % 2 == 0 else ("after", "before")):
                    rates[row, side].append(trees[side].measure(row))
        for tree in trees.values():
            tree.close()
        print_table(table, rates, trees["before"].commit, trees["after"].commit)
        for path in sorted((Path(caches) / "after").glob("*.plans.json")):
            generate_speed.print_plans(path)
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")


def print_table(table: list[Row], rates: dict[tuple[Row, str], list[float]], before: str, after: str) -> None:
    print(f"\n| model | row (fp32, native) | before {before} | after {after} | after ÷ before | per-round ratios |")
    print("|---|---|---:|---:|---:|---|")
    for row in table:
        old, new = (np.array(rates[row, side]) for side in ("before", "after"))
        ratios = new / old
        print(f"| {row.model} | {row.label} | {np.median(old):,.0f} | {np.median(new):,.0f} "
              f"| {np.median(new) / np.median(old):.2f}× | {ratios.min():.2f}–{ratios.max():.2f}× |")

if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(*sys.argv[2:])
    else:
        main()
