"""Generation speed against the machine's own limits: the tutorial's window re-run, stateful
generation on every step path, fp32 and bf16, one table.

    PYTHONPATH=src python benchmarks/generate_speed.py [--threads 1] [--quick]
        [--checkpoint best.safetensors ...]

First probes the machine (``machine_probe``: CPU and flags, streaming bytes/s at 0.25-16 MB
on one core and on all, fp32/bf16 GEMM rates), then measures, through the public
``Generator`` API (sampling and the Python loop included), characters per second for the
tutorial-small model (1 x 256, scaled input, target last; also with Keras 2's hard-sigmoid
gates, as imported Keras checkpoints have, whose full forward pass is a Python loop) and the
2 x 256 default (embedding 64, target all):

* ``window``: the tutorial's way, the last 100 characters re-run for every new one;
* ``stateful`` on each step path (``module`` = nn.LSTM one step at a time, ``torch`` and
  ``native`` = the lean path), one stream and batches of 8 and 64 streams, one thread and
  two (how two threads share a native step is chosen by timing, see ``fast_step``), fp32
  and ``--precision bf16``;
* time to the first character from a fresh ``Generator`` with a 100-character prime.

A second table gives each row as a share of the limit that binds it: the weights' bytes per
step at the measured streaming rate for a working set of that size (one stream), or the
FLOPs per character at the measured GEMM rate (big batches). With ``--checkpoint``, a third
compares bf16 with fp32 on trained models: largest probability difference and bits/char on
the last 10 % of Alice (the validation text of training).

Models are randomly initialised: speed does not depend on what the weights say. Greedy
(the tutorial's argmax) unless a row says otherwise. Timings are wall-clock and share the
machine with whatever else runs; compare ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import string
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine_probe import Roofline, print_roofline, probe  # noqa: E402

from charlstm import CharLSTM, Generator, ModelConfig, SamplingConfig, TrainedModel, Vocab  # noqa: E402
from charlstm import checkpoint  # noqa: E402
from charlstm.corpus import Corpus  # noqa: E402
from charlstm.data import split_train_val  # noqa: E402
from charlstm.fast_step import LeanWeights, make_stepper  # noqa: E402
from charlstm.native import NATIVE_CACHE_ENV, native_library, plans_file  # noqa: E402

KERAS_TUTORIAL_CHARS_PER_S = 12.4  # the tutorial's code under Keras 3.15 / TF 2.21 here (issue 4)
DEFAULT_TEXT = Path(__file__).resolve().parents[2] / "shared" / "keras" / "wonderland.txt"
ALICE = Path(__file__).resolve().parents[2] / "shared" / "corpora" / "pg11.txt"
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
    precision: str = "fp32"


def cases(quick: bool) -> list[Case]:
    scale = 0.2 if quick else 1.0
    n = lambda x: max(20, int(x * scale))  # noqa: E731
    return [
        Case("window re-run per character (the tutorial's way)", "window", "auto", 1, n(150)),
        Case("stateful, nn.LSTM one step per call (module)", "stateful", "module", 1, n(3000)),
        Case("stateful, lean torch, 1 stream", "stateful", "torch", 1, n(6000)),
        Case("stateful, native, 1 stream", "stateful", "native", 1, n(30000)),
        Case("stateful, native, 1 stream, temperature 1.0", "stateful", "native", 1, n(30000), 1.0),
        Case("stateful, native, 1 stream, 2 threads", "stateful", "native", 1, n(30000), threads=2),
        Case("stateful, native bf16, 1 stream", "stateful", "native", 1, n(30000), precision="bf16"),
        Case("stateful, native bf16, 1 stream, 2 threads", "stateful", "native", 1, n(30000), threads=2,
             precision="bf16"),
        Case("stateful, native, 8 streams (total)", "stateful", "native", 8, n(6000)),
        Case("stateful, native, 64 streams (total)", "stateful", "native", 64, n(1000)),
        Case("stateful, native, 64 streams (total), 2 threads", "stateful", "native", 64, n(1000), threads=2),
        Case("stateful, native bf16, 64 streams (total)", "stateful", "native", 64, n(1000), precision="bf16"),
        Case("stateful, native bf16, 64 streams (total), 2 threads", "stateful", "native", 64, n(1000), threads=2,
             precision="bf16"),
        Case("stateful, lean torch, 64 streams (total)", "stateful", "torch", 64, n(1000)),
        Case("stateful, lean torch bf16 (oneDNN), 64 streams (total), 2 threads", "stateful", "torch", 64, n(1000),
             threads=2, precision="bf16"),
        Case("stateful, auto bf16 (native or oneDNN, timed), 64 streams (total), 2 threads", "stateful", "auto", 64,
             n(1000), threads=2, precision="bf16"),
    ]


def chars_per_second(gen: Generator, prime: str, case: Case, repeats: int) -> float:
    """Median of ``repeats`` runs (after a warm-up: caches, allocations, the timed choice of
    how threads share a step)."""
    samplings = [SamplingConfig(case.temperature)] * case.streams
    seeds = list(range(case.streams))
    gen.generate_batch(prime, 5, samplings, seeds, mode=case.mode)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        texts = gen.generate_batch(prime, case.steps, samplings, seeds, mode=case.mode)
        rates.append(sum(map(len, texts)) / (time.perf_counter() - start))
    return float(np.median(rates))


def step_cost(model: CharLSTM, precision: str) -> tuple[float, float]:
    """(weight bytes read per step, FLOPs per character) of the lean step: every recurrent
    matrix and the head once (layer 0's input projection is a table row)."""
    weights = LeanWeights.from_model(model)
    count = sum(m.numel() for m in weights.recurrent) + weights.head_weight.numel()
    return count * (2 if precision == "bf16" else 4), 2.0 * count


def limit_of(roof: Roofline, model: CharLSTM, case: Case, threads: int) -> tuple[float, str]:
    weight_bytes, flops = step_cost(model, case.precision)
    steps = model.config.window if case.mode == "window" else 1
    cores = min(threads, roof.cores)
    return roof.limit(weight_bytes, flops, case.streams, steps, case.precision, cores)


def bf16_against_fp32(path: Path, text_path: Path, threads: int) -> dict[str, float]:
    """Score the validation tenth of the text with fp32 and bf16 stateful steps, one stream."""
    trained = checkpoint.load(path)
    corpus = Corpus.from_files([text_path], trained.normalization)
    ids = split_train_val(trained.vocab.encode(corpus.text, unknown="skip"), 0.1)[1]
    out: dict[str, float] = {"characters": len(ids) - 1}
    probs = {}
    for precision in ("fp32", "bf16"):
        stepper = make_stepper(trained.model, 1, "native", precision=precision)
        rows = np.empty((len(ids) - 1, len(trained.vocab)), dtype=np.float64)
        for t in range(len(ids) - 1):
            rows[t] = stepper.step(ids[t:t + 1])[0]
        rows -= rows.max(axis=1, keepdims=True)
        rows = np.exp(rows)
        rows /= rows.sum(axis=1, keepdims=True)
        probs[precision] = rows
        out[f"bits/char {precision}"] = float(-np.log2(rows[np.arange(len(ids) - 1), ids[1:]]).mean())
    out["largest probability difference"] = float(np.abs(probs["bf16"] - probs["fp32"]).max())
    return out


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
    parser.add_argument("--repeats", type=int, default=3, help="runs per row, the median is shown (default 3)")
    parser.add_argument("--checkpoint", type=Path, action="append", default=[],
                        help="a trained checkpoint to compare bf16 with fp32 on (repeatable)")
    parser.add_argument("--eval-text", type=Path, default=ALICE, help="its training text (default: Alice)")
    args = parser.parse_args()
    # a fresh kernel cache: how threads share a step is timed now, under this run's load
    cache = tempfile.TemporaryDirectory()
    os.environ[NATIVE_CACHE_ENV] = cache.name
    torch.set_num_threads(args.threads)
    text = load_text(args.text)
    vocab, prime = Vocab.from_text(text), text[10_000:10_100]
    print(f"# generation speed, torch {torch.__version__}, {args.threads} thread(s) unless a row says 2, "
          f"median of {args.repeats}, load average {os.getloadavg()[0]:.2f}")
    print(f"native kernel compile (once per machine): {native_compile_seconds():.2f} s")
    roof = probe(args.quick)
    print_roofline(roof)
    source = args.text if args.text.is_file() else f"a stand-in alphabet ({args.text} is missing)"
    print(f"\nvocabulary {len(vocab)} characters from {source}, prime {len(prime)} characters, "
          "randomly initialised models")

    results: dict[str, dict[str, float]] = {}
    limits: dict[str, dict[str, tuple[float, str]]] = {}
    first_char: dict[str, dict[str, float]] = {}
    for name, config in MODELS.items():
        torch.manual_seed(0)
        trained = TrainedModel(CharLSTM(ModelConfig(vocab_size=len(vocab), **config)).eval(), vocab)
        results[name], limits[name] = {}, {}
        for case in cases(args.quick):
            threads = case.threads or args.threads
            torch.set_num_threads(threads)
            gen = Generator(trained, backend=case.backend, precision=case.precision)
            results[name][case.label] = chars_per_second(gen, prime, case, args.repeats)
            limits[name][case.label] = limit_of(roof, trained.model, case, threads)
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

    print("\n| share of the binding limit (limit in chars/s, what binds) | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))
    for case in cases(args.quick):
        cells = []
        for n in names:
            limit, binds = limits[n][case.label]
            cells.append(f"{results[n][case.label] / limit:.0%} of {limit:,.0f} ({binds})")
        print(f"| {case.label} | " + " | ".join(cells) + " |")
    print_plans(plans_file(native_library()))
    for path in args.checkpoint:
        report = bf16_against_fp32(path, args.eval_text, args.threads)
        print(f"\nbf16 against fp32, {path.name}, {report.pop('characters'):,} validation characters: "
              + ", ".join(f"{k} {v:.4f}" for k, v in report.items()))
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")


def print_plans(path: Path) -> None:
    """How two threads shared each step size, as timed at first use in this run (plans file ``path``)."""
    plans = json.loads(path.read_text()) if path.is_file() else {}
    print("\nchosen by timing at first use (median µs per step of each way; timed again when a kept way ran slow):")
    for key, plan in sorted(plans.items()):
        chosen = plan.get("split") or plan.get("backend")
        timings = ", ".join(f"{k} {v * 1e6:,.0f} µs" for k, v in plan["seconds_per_step"].items())
        again = f", timed again {plan['retimes']}x" if plan.get("retimes") else ""
        print(f"  {key}: {chosen} ({timings}{again})")


if __name__ == "__main__":
    main()
