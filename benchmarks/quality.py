"""Better text from a small book: fine-tuning from the English base, dynamic evaluation.

Every number is validation nats/char (and bits/char) on the last 10 % of the text, scored left
to right with the state carried, as training's validation does. Rows (``--rows``):

* ``finetune``: Alice (the tutorial's Gutenberg file, lowercased as the tutorial does)
  fine-tuned from the shipped English base (``charlstm train --init english``) for each budget;
* ``scratch``: the same text trained from scratch with the default recipe, same budgets;
* ``dynamic``: static vs dynamic evaluation of the best Alice checkpoint of this run;
* ``heldout``: the base on a book it never saw (Kipling's "The Jungle Book": the base's
  training held out every Kipling book), static and dynamic, its first ``--heldout-chars``;
* ``prime``: the base after reading the first ``--prime-chars`` of "The Jungle Book" with dynamic
  evaluation's updates (``generate --adapt-to-prime``) against the base as shipped: nats/char on
  the ``--prime-next-chars`` that follow, and the book's words in samples generated after the prime;
* ``sizes``: corpora of ~150 kB, 1 MB, 10 MB and 100 MB cut from the shared Gutenberg books
  (``--sizes``), each trained from scratch for the largest budget with the fixed default
  recipe (the preset's settings given explicitly) and with the adaptive default; a size where
  the adaptive rule picks the preset's own settings is trained once and reported for both;

Training runs are ``charlstm train`` child processes, one at a time (run two copies of this
script pinned to different cores, ``taskset -c N ... --threads 1``, to use both). The table says which CPU,
the torch version and the load average before and after, because the machine may be shared.

    python benchmarks/quality.py --rows finetune,dynamic,heldout --budgets 1,3,10
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import torch  # noqa: E402

from charlstm import checkpoint  # noqa: E402
from charlstm.corpus import Corpus, Normalization, normalize, read_text_file  # noqa: E402
from charlstm.data import split_train_val  # noqa: E402
from charlstm.checkpoint import TrainedModel  # noqa: E402
from charlstm.dynamic_eval import DynamicConfig, adapted_to, dynamic_evaluate  # noqa: E402
from charlstm.generate import Generator, SamplingConfig  # noqa: E402
from charlstm.finetune import PRETRAINED  # noqa: E402
from charlstm.evaluate import evaluate_ids  # noqa: E402
from charlstm.recipes import PRESETS, adaptive_default  # noqa: E402
from train_quality import cpu_name  # noqa: E402

LN2 = math.log(2.0)
SHARED = REPO.parent / "shared" / "corpora"
ALICE = SHARED / "pg11.txt"
HELDOUT_BOOK = SHARED / "gutenberg" / "Kipling, Rudyard" / "The Jungle Book.txt"
SIZES = {"150k": 150_000, "1M": 1_000_000, "10M": 10_000_000, "100M": 100_000_000}
# a fixed part of a big validation text, so that every size is scored on at most this much
SIZES_VAL_CHARS = 200_000


@dataclass
class Row:
    what: str
    budget: str
    nats: float
    seconds: float
    note: str = ""


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def train_run(name: str, budget_min: float, text: Path, out: Path, extra: list[str], threads: int) -> dict:
    """One ``charlstm train`` child process; returns its best checkpoint's training record."""
    run_dir = out / f"{name}-{budget_min:g}min"
    run_dir.mkdir(parents=True, exist_ok=True)
    for old in run_dir.glob("*.safetensors"):
        old.unlink()
    cmd = [sys.executable, "-m", "charlstm", "train", "--text", str(text), "--time-budget",
           str(budget_min * 60), "-o", str(run_dir), "--no-progress", "--threads", str(threads), *extra]
    with open(run_dir / "train.log", "w") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT,
                       env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    best = checkpoint.load(run_dir / "best.safetensors")
    history = best.training.history
    recipe = next((line.strip() for line in (run_dir / "train.log").read_text().splitlines()
                   if line.startswith("Recipe:")), "")
    return {"path": run_dir / "best.safetensors", "val_loss": best.training.best.val_loss,
            "epochs": len(history), "elapsed": history[-1].elapsed,
            "chars_per_s": sum(h.chars_per_s for h in history) / len(history), "recipe": recipe}


def training_rows(kind: str, budgets: list[float], out: Path, threads: int,
                  options: list[str], init: str = "english") -> tuple[list[Row], Path | None]:
    rows, best_path, best_loss = [], None, math.inf
    extra = (["--init", init] if kind == "finetune" else []) + options
    base = "the English base" if init == "english" else Path(init).parent.name
    label = f"Alice, fine-tuned from {base}" if kind == "finetune" else "Alice, from scratch (default)"
    label += f" ({' '.join(options)})" if options else ""
    for budget in budgets:
        run = train_run(kind, budget, ALICE, out, extra, threads)
        rows.append(Row(label, f"{budget:g} min", run["val_loss"], run["elapsed"],
                        f"{run['epochs']} epochs, {run['chars_per_s']:,.0f} chars/s"))
        print(f"# {label}, {budget:g} min: {run['val_loss']:.4f} nats/char", flush=True)
        if run["val_loss"] < best_loss:
            best_loss, best_path = run["val_loss"], run["path"]
    return rows, best_path


def static_and_dynamic(what: str, model_path: Path, context, scored, dynamic: DynamicConfig) -> list[Row]:
    trained = checkpoint.load(model_path)
    start = time.perf_counter()
    static = evaluate_ids(trained.model, scored, context=context[-trained.config.window:])
    static_s = time.perf_counter() - start
    result = dynamic_evaluate(trained.model, scored, context=context, config=dynamic)
    gain = 1 - result.nats_per_char / static
    setting = f"{dynamic.describe()}; {result.what_was_read_first()}"
    return [Row(f"{what}: static", "–", static, static_s, f"{len(scored):,} characters"),
            Row(f"{what}: dynamic", "–", result.nats_per_char, result.seconds,
                f"{gain:.1%} fewer nats/char than static, {result.seconds / static_s:.1f}x its time; {setting}")]


def alice_validation(model_path: Path):
    trained = checkpoint.load(model_path)
    corpus = Corpus.from_files(ALICE, trained.normalization)
    train_ids, val_ids = split_train_val(trained.vocab.encode(corpus.text), 0.1)
    return train_ids, val_ids  # static evaluation carries the state over its window; dynamic reads more


def heldout_rows(chars: int, dynamic: DynamicConfig) -> list[Row]:
    base = PRETRAINED["english"]
    trained = checkpoint.load(base)
    text = normalize(read_text_file(HELDOUT_BOOK), trained.normalization).replace("\u00a0", " ")
    ids = trained.vocab.encode(text[:chars], unknown="skip")
    return static_and_dynamic('the base on "The Jungle Book" (Kipling, never seen)', base, ids[:0], ids, dynamic)


# the book's own words: its names, and what its first stories are about
JUNGLE_WORDS = ("mowgli", "shere khan", "akela", "baloo", "bagheera", "wolf", "wolves", "jungle", "pack", "cub")


def prime_rows(prime_chars: int, next_chars: int, dynamic: DynamicConfig) -> list[Row]:
    """The base after reading a long prime with dynamic evaluation's updates (``generate
    --adapt-to-prime``): how it scores the text that follows, and the book's words in samples."""
    trained = checkpoint.load(PRETRAINED["english"])
    text = normalize(read_text_file(HELDOUT_BOOK), trained.normalization).replace("\u00a0", " ")
    ids = trained.vocab.encode(text[:prime_chars + next_chars], unknown="skip")
    prime, following = ids[:prime_chars], ids[prime_chars:]
    start = time.perf_counter()
    adaptation = adapted_to(trained.model, prime, dynamic.step_sizes[0], dynamic.segment)
    seconds = time.perf_counter() - start
    window = prime[-trained.config.window:]
    rows = []
    for label, model in (("as shipped", trained.model), ("adapted to the prime", adaptation.model)):
        gen = Generator(TrainedModel(model=model, vocab=trained.vocab, normalization=trained.normalization))
        samples = [gen.generate(trained.vocab.decode(window), 400, sampling=SamplingConfig(0.6), seed=seed).lower()
                   for seed in range(8)]
        words = sum(sample.count(word) for sample in samples for word in JUNGLE_WORDS)
        rows.append(Row(f"the base on the {len(following):,} characters after a {len(prime):,}-character prime "
                        f"of \"The Jungle Book\", {label}", "–", evaluate_ids(model, following, context=window),
                        seconds if model is adaptation.model else 0.0,
                        f"{words} of the book's words ({', '.join(JUNGLE_WORDS)}) in 8 samples of 400 "
                        "characters after the prime (temperature 0.6)"))
    return rows


def size_corpus(label: str, chars: int, out: Path) -> Path:
    """The first ``chars`` characters of the shared books, taken in a fixed shuffled order (so
    that every size mixes authors), each book cleaned of its Gutenberg header and footer."""
    path = out / "sizes" / f"{label}.txt"
    if path.is_file():
        return path
    books = sorted((SHARED / "gutenberg").glob("*/*.txt"))
    random.Random(0).shuffle(books)
    keep_all = Normalization(lowercase=False, strip_punctuation=False, strip_gutenberg=True)
    parts, total = [], 0
    for book in books:
        text = normalize(read_text_file(book), keep_all).strip() + "\n\n\n"
        parts.append(text[: chars - total])
        total += len(parts[-1])
        if total >= chars:
            break
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(parts), encoding="utf-8")
    return path


def rule_settings(train_chars: int, budget_seconds: float) -> dict:
    """What the adaptive default chooses for this text and budget."""
    model, train = adaptive_default(train_chars, budget_seconds, PRESETS["default"][1]["epochs"]).settings()
    return {**model, **train}


def preset_settings(settings: dict) -> dict:
    """The default preset's values of the same settings."""
    preset = {**PRESETS["default"][0], **PRESETS["default"][1]}
    return {name: preset[name] for name in settings}


def as_options(settings: dict) -> list[str]:
    return [word for name, value in settings.items() for word in (f"--{name.replace('_', '-')}", str(value))]


def size_rows(labels: list[str], recipes: list[str], budget_min: float, out: Path, threads: int) -> list[Row]:
    """Each corpus size from scratch: the fixed default against the adaptive one."""
    rows = []
    for label in labels:
        text = size_corpus(label, SIZES[label], out)
        chosen = rule_settings(int(0.9 * SIZES[label]), budget_min * 60)
        fixed = preset_settings(chosen)  # the preset's own values, given explicitly so that the rule leaves them be
        same = chosen == fixed
        for recipe in recipes:
            if same and recipe == "adaptive" and "fixed" in recipes:
                continue
            extra = (as_options(fixed) if recipe == "fixed" else []) + ["--val-chars", str(SIZES_VAL_CHARS)]
            run = train_run(f"size-{label}-{recipe}", budget_min, text, out, extra, threads)
            what = f"{label} corpus, {'fixed and adaptive default (the same settings)' if same else recipe + ' default'}"
            rows.append(Row(what, f"{budget_min:g} min", run["val_loss"], run["elapsed"],
                            f"{run['epochs']} evaluations, {run['chars_per_s']:,.0f} chars/s; {run['recipe']}"))
            print(f"# {what}: {run['val_loss']:.4f} nats/char", flush=True)
    return rows


def print_table(rows: list[Row], header: str) -> None:
    print(header)
    print("| what | budget | nats/char | bits/char | seconds | notes |")
    print("|---|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r.what} | {r.budget} | {r.nats:.4f} | {r.nats / LN2:.4f} | {r.seconds:.0f} | {r.note} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="finetune,dynamic,heldout")
    parser.add_argument("--budgets", default="1,3,10", help="minutes, comma-separated")
    parser.add_argument("--scratch-budgets", help="minutes for the scratch rows (default: --budgets)")
    parser.add_argument("--train-options", default="", help="extra charlstm train options, e.g. '--lr 8e-3'")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("quality-runs"))
    parser.add_argument("--heldout-chars", type=int, default=100_000)
    parser.add_argument("--prime-chars", type=int, default=20_000, help="the prime of the prime row")
    parser.add_argument("--prime-next-chars", type=int, default=5_000, help="what the prime row scores after it")
    defaults = DynamicConfig()
    parser.add_argument("--dynamic-lr", default=",".join(f"{lr:g}" for lr in defaults.step_sizes),
                        help="step sizes, comma-separated (one adapting copy each)")
    parser.add_argument("--dynamic-static", action=argparse.BooleanOptionalAction, default=defaults.with_static)
    parser.add_argument("--dynamic-context", type=int, default=defaults.context_chars,
                        help="characters before the scored text adapted to first")
    parser.add_argument("--dynamic-segment", type=int, default=defaults.segment)
    parser.add_argument("--dynamic-decay", type=float, default=defaults.decay)
    parser.add_argument("--sizes", default=",".join(SIZES), help="corpus sizes of the sizes row")
    parser.add_argument("--recipes", default="fixed,adaptive", help="recipes of the sizes row")
    parser.add_argument("--size-budget", type=float, default=10.0, help="minutes per run of the sizes row")
    parser.add_argument("--init", default="english", help="what the finetune row starts from (english or a checkpoint)")
    parser.add_argument("--checkpoint", type=Path, help="the Alice checkpoint for the dynamic row "
                        "(default: the best fine-tuned one of this run)")
    args = parser.parse_args(argv)
    rows_wanted = set(args.rows.split(","))
    budgets = [float(b) for b in args.budgets.split(",")]
    dynamic = DynamicConfig(step_sizes=tuple(float(lr) for lr in args.dynamic_lr.split(",")),
                            segment=args.dynamic_segment, decay=args.dynamic_decay,
                            with_static=args.dynamic_static, context_chars=args.dynamic_context)
    torch.set_num_threads(args.threads)
    load_before, started = load_average(), time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    rows: list[Row] = []
    best_alice = args.checkpoint
    if "finetune" in rows_wanted:
        tuned, best_tuned = training_rows("finetune", budgets, args.out, args.threads, args.train_options.split(),
                                          args.init)
        rows += tuned
        best_alice = best_alice or best_tuned
    if "scratch" in rows_wanted:
        scratch_budgets = [float(b) for b in (args.scratch_budgets or args.budgets).split(",")]
        rows += training_rows("scratch", scratch_budgets, args.out, args.threads, args.train_options.split())[0]
    if "dynamic" in rows_wanted:
        if best_alice is None:
            parser.error("the dynamic row needs --checkpoint or the finetune row")
        context, val = alice_validation(best_alice)
        rows += static_and_dynamic(f"Alice's last 10 %, {best_alice.parent.name}", best_alice, context, val, dynamic)
    if "heldout" in rows_wanted:
        rows += heldout_rows(args.heldout_chars, dynamic)
    if "prime" in rows_wanted:
        rows += prime_rows(args.prime_chars, args.prime_next_chars, dynamic)
    if "sizes" in rows_wanted:
        rows += size_rows(args.sizes.split(","), args.recipes.split(","), args.size_budget, args.out, args.threads)
    print_table(rows, f"{cpu_name()}, torch {torch.__version__}, {args.threads} threads, started {started}; "
                      f"load average before {load_before}, after {load_average()}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quality.json").write_text(json.dumps([r.__dict__ for r in rows], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
