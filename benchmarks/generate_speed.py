"""Generation speed: the tutorial's window re-run against stateful generation, one table.

    PYTHONPATH=src python benchmarks/generate_speed.py [--threads 1] [--quick]

Measures, through the public ``Generator`` API (sampling and the Python loop included),
characters per second for the tutorial-small model (1 x 256, scaled input, target last; also
with Keras 2's hard-sigmoid gates, as imported Keras checkpoints have, whose full forward
pass is a Python loop) and the 2 x 256 default (embedding 64, target all):

* ``window``: the tutorial's way, the last 100 characters re-run for every new one;
* ``stateful`` on each step path (``module`` = nn.LSTM one step at a time, ``torch`` and
  ``native`` = the lean path), one stream and batches of 8 and 64 streams (64 also with
  2 threads, each stepping half of the streams);
* time to the first character from a fresh ``Generator`` with a 100-character prime.

Models are randomly initialised: speed does not depend on what the weights say. Greedy
(the tutorial's argmax) unless a row says otherwise. Timings are wall-clock and share the
machine with whatever else runs; compare ratios within one run.
"""

from __future__ import annotations

import argparse
import os
import platform
import string
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from charlstm import CharLSTM, Generator, ModelConfig, SamplingConfig, TrainedModel, Vocab
from charlstm.native import native_library

KERAS_TUTORIAL_CHARS_PER_S = 12.4  # the tutorial's code under Keras 3.15 / TF 2.21 here (issue 4)
DEFAULT_TEXT = Path(__file__).resolve().parents[2] / "shared" / "keras" / "wonderland.txt"
MODELS = {
    "tutorial-small 1×256": dict(input="scaled", layers=1, units=256, target="last", window=100),
    "same, hard-sigmoid gates (Keras import)": dict(input="scaled", layers=1, units=256, target="last", window=100,
                                                    recurrent_activation="hard_sigmoid"),
    "default 2×256": dict(input="embedding", embedding_dim=64, layers=2, units=256, target="all", window=100),
}


@dataclass(frozen=True)
class Case:
    label: str
    mode: str
    backend: str
    streams: int
    steps: int
    temperature: float = 0.0
    threads: int | None = None  # None: the --threads setting


def cases(quick: bool) -> list[Case]:
    scale = 0.2 if quick else 1.0
    n = lambda x: max(20, int(x * scale))  # noqa: E731
    return [
        Case("window re-run per character (the tutorial's way)", "window", "auto", 1, n(150)),
        Case("stateful, nn.LSTM one step per call (module)", "stateful", "module", 1, n(3000)),
        Case("stateful, lean torch, 1 stream", "stateful", "torch", 1, n(6000)),
        Case("stateful, native, 1 stream", "stateful", "native", 1, n(30000)),
        Case("stateful, native, 1 stream, temperature 1.0", "stateful", "native", 1, n(30000), 1.0),
        Case("stateful, native, 8 streams (total)", "stateful", "native", 8, n(6000)),
        Case("stateful, native, 64 streams (total)", "stateful", "native", 64, n(1000)),
        Case("stateful, native, 64 streams (total), 2 threads", "stateful", "native", 64, n(1000), threads=2),
        Case("stateful, lean torch, 64 streams (total)", "stateful", "torch", 64, n(1000)),
    ]


def chars_per_second(gen: Generator, prime: str, case: Case) -> float:
    samplings = [SamplingConfig(case.temperature)] * case.streams
    seeds = list(range(case.streams))
    gen.generate_batch(prime, 5, samplings, seeds, mode=case.mode)  # warm-up: caches, allocations
    start = time.perf_counter()
    texts = gen.generate_batch(prime, case.steps, samplings, seeds, mode=case.mode)
    elapsed = time.perf_counter() - start
    return sum(map(len, texts)) / elapsed


def first_character_ms(trained: TrainedModel, prime: str, mode: str, repeats: int = 5) -> float:
    """Fresh Generator each time (weights rearranged, kernel loaded); best of ``repeats``."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        next(Generator(trained).stream(prime, 1, mode=mode))
        best = min(best, time.perf_counter() - start)
    return best * 1000


def native_compile_seconds() -> float:
    """The one-time cost: compiling the kernel into an empty cache folder."""
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        native_library(Path(folder))
        return time.perf_counter() - start


def load_text(path: Path) -> str:
    if path.is_file():
        return path.read_text(encoding="utf-8").lower()
    return (string.ascii_lowercase + " .,;:!?'\"-\n") * 400


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="PyTorch CPU threads (default 1)")
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="vocabulary and prime come from this text")
    parser.add_argument("--quick", action="store_true", help="fewer characters per measurement")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    text = load_text(args.text)
    vocab, prime = Vocab.from_text(text), text[10_000:10_100]
    print(f"# generation speed, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, {args.threads} thread(s), load average {os.getloadavg()[0]:.2f}")
    print(f"vocabulary {len(vocab)} characters, prime {len(prime)} characters, randomly initialised models")
    print(f"native kernel compile (once per machine): {native_compile_seconds():.2f} s")

    results: dict[str, dict[str, float]] = {}
    first_char: dict[str, dict[str, float]] = {}
    for name, config in MODELS.items():
        torch.manual_seed(0)
        trained = TrainedModel(CharLSTM(ModelConfig(vocab_size=len(vocab), **config)).eval(), vocab)
        results[name] = {}
        for case in cases(args.quick):
            torch.set_num_threads(case.threads or args.threads)
            gen = Generator(trained, backend=case.backend)
            results[name][case.label] = chars_per_second(gen, prime, case)
        torch.set_num_threads(args.threads)
        first_char[name] = {mode: first_character_ms(trained, prime, mode) for mode in ("stateful", "window")}

    names = list(MODELS)
    print()
    print("| characters/s | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))
    for case in cases(args.quick):
        print(f"| {case.label} | " + " | ".join(f"{results[n][case.label]:,.0f}" for n in names) + " |")
    for mode in ("stateful", "window"):
        print(f"| time to first character, {mode} (fresh Generator) | "
              + " | ".join(f"{first_char[n][mode]:.1f} ms" for n in names) + " |")
    single, window = "stateful, native, 1 stream", cases(args.quick)[0].label
    print("| native 1 stream ÷ window | " + " | ".join(
        f"{results[n][single] / results[n][window]:,.0f}×" for n in names) + " |")
    print(f"| native 1 stream ÷ the tutorial's Keras code ({KERAS_TUTORIAL_CHARS_PER_S} chars/s) | " + " | ".join(
        f"{results[n][single] / KERAS_TUTORIAL_CHARS_PER_S:,.0f}×" for n in names) + " |")
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
