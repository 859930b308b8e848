"""How much a training recipe learns per second: validation loss reached within wall-clock budgets.

On Alice (the tutorial's Gutenberg file, last 10 % held out), for each budget and recipe this
runs ``charlstm train --time-budget`` in a child process (one at a time, so runs do not compete
for the cores) and prints one table: validation nats/char and bits/char reached, training loss,
characters/s and the time to reach validation CE 1.86 nats/char (what the tutorial's own small
checkpoint scores on the text it was trained on), beside the gzip/bz2/lzma baselines. It also
probes the machine (``machine_probe``: CPU flags, streaming bytes/s, GEMM rates at 1 and all
cores) and measures the GEMM ceiling and the training throughput of the 2 x 256 model (batch
64 x 100 steps) in fp32 and bf16, plain and with the default recipe's regularisation.

    python benchmarks/train_quality.py                      # the full run (about 45 minutes)
    python benchmarks/train_quality.py --budgets 0.5 --recipes default   # a quick look

The tutorial-small recipe needs about 19 epochs to reach 1.86 on its own training text (the
Keras checkpoint is from epoch 19), far beyond these budgets: its time to 1.86 is then
extrapolated as 19 x its measured seconds per epoch, and the table says so.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from charlstm.baselines import compressor_baselines  # noqa: E402
from charlstm.corpus import Corpus  # noqa: E402
from charlstm.data import split_train_val  # noqa: E402
from charlstm.evaluate import LN2  # noqa: E402
from charlstm.model import CharLSTM, ModelConfig  # noqa: E402
from charlstm.vocab import Vocab  # noqa: E402
from machine_probe import cpu_name, gemm_gflops, print_roofline, probe  # noqa: E402

TARGET_CE = 1.86
TUTORIAL_EPOCHS_TO_TARGET = 19
DEFAULT_TEXT = REPO.parent / "shared" / "corpora" / "pg11.txt"


# ----------------------------------------------------------------------- machine


def gemm_ceiling() -> dict[str, float]:
    """The best GEMM rate torch reaches here, over a few shapes (big and LSTM-sized)."""
    shapes = [(2048, 2048, 2048), (6400, 256, 1024), (64, 256, 1024)]
    return {name: max(gemm_gflops(*s, dtype, seconds=1.0) for s in shapes)
            for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}


def model_flops_per_char(config: ModelConfig) -> float:
    """Nominal training FLOPs per target character: 3 x (2 x multiply-adds of the forward)."""
    macs, width = 0, config.input_size
    for _ in range(config.layers):
        macs += 4 * config.units * (width + config.units)
        width = config.units
    macs += config.units * config.vocab_size
    return 3 * 2 * macs


def training_throughput(bf16: bool, regularised: bool, batch: int = 64, steps: int = 100,
                        seconds: float = 6.0) -> float:
    """Target characters/s of full training steps (forward, backward, clipping, AdamW) of the
    2 x 256 model, state carried between batches as in training."""
    torch.manual_seed(0)
    extra = dict(dropout=0.25, variational=True, weight_drop=0.2) if regularised else dict(dropout=0.0)
    model = CharLSTM(ModelConfig(vocab_size=45, layers=2, units=256, embedding_dim=64, **extra)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randint(0, 45, (batch, steps)), torch.randint(0, 45, (batch, steps))
    state = None

    def step():
        nonlocal state
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits, state = model(x, state)
            loss = F.cross_entropy(logits.float().reshape(-1, 45), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        state = [(h.detach(), c.detach()) for h, c in state]

    for _ in range(2):
        step()
    times, deadline = [], time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < 5:
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    times.sort()
    return batch * steps / times[len(times) // 4]  # a low quartile: robust to other processes


# ----------------------------------------------------------------------- quality runs


@dataclass
class Run:
    recipe: str
    budget_min: float
    rows: list[dict]
    wall: float

    @property
    def best(self) -> dict:
        return min((r for r in self.rows if r.get("val_loss") is not None), key=lambda r: r["val_loss"])

    @property
    def chars_per_s(self) -> float:
        return sum(r["chars_per_s"] for r in self.rows) / len(self.rows)

    def time_to(self, target: float) -> float | None:
        for row in self.rows:
            if row.get("val_loss") is not None and row["val_loss"] <= target:
                return row["elapsed"]
        return None


def run_recipe(recipe: str, budget_min: float, text: Path, out: Path, threads: int | None,
               seed: int) -> Run:
    run_dir = out / f"{recipe}-{budget_min:g}min"
    if run_dir.exists():
        for old in run_dir.iterdir():
            old.unlink()
    cmd = [sys.executable, "-m", "charlstm", "train", "--preset", recipe, "--text", str(text),
           "--time-budget", str(budget_min * 60), "-o", str(run_dir), "--no-progress", "--seed", str(seed)]
    if threads:
        cmd += ["--threads", str(threads)]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    start = time.perf_counter()
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "train.log", "w") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, env=env)
    wall = time.perf_counter() - start
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return Run(recipe, budget_min, rows, wall)


def tutorial_epoch_seconds(runs: list[Run], n_patterns: int) -> float | None:
    rates = [r.chars_per_s for r in runs if r.recipe == "tutorial-small"]
    return n_patterns / (sum(rates) / len(rates)) if rates else None


# ----------------------------------------------------------------------- report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budgets", default="1,3,10",
                        help="minutes, comma-separated (default 1,3,10; empty: throughput only)")
    parser.add_argument("--recipes", default="tutorial-small,tutorial-large,default")
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "train_quality")
    parser.add_argument("--threads", type=int, help="CPU threads for training (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--measure-throughput", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure_throughput:
        if args.threads:
            torch.set_num_threads(args.threads)
        print(json.dumps(measure_throughput()))
        return 0
    budgets = [float(b) for b in args.budgets.split(",") if b.strip()]
    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    if args.threads:
        torch.set_num_threads(args.threads)

    corpus = Corpus.from_files([args.text])
    vocab = Vocab.from_text(corpus.text)
    train_ids, val_ids = split_train_val(vocab.encode(corpus.text), 0.1)
    baselines = compressor_baselines(vocab.decode(train_ids), vocab.decode(val_ids))
    print(f"# charlstm training quality — {time.strftime('%Y-%m-%d %H:%M')}")
    print(f"machine: {cpu_name()}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f} at start")
    print(f"text: {args.text.name}: {len(train_ids):,} training + {len(val_ids):,} validation characters")
    print("compressors on the validation text given the training text: "
          + ", ".join(f"{b.name} {b.bits_per_char:.3f} bits/char" for b in baselines))

    if not args.skip_throughput:
        print("\nthe machine's own limits (see benchmarks/machine_probe.py):")
        print_roofline(probe())
        print_throughput(args.threads)

    if not budgets:  # --budgets "" measures throughput only
        return 0
    runs: list[Run] = []
    for budget in budgets:
        for recipe in recipes:
            run = run_recipe(recipe, budget, args.text, args.out, args.threads, args.seed)
            runs.append(run)
            best = run.best
            print(f"  done: {recipe} {budget:g} min: best val {best['val_loss']:.4f} "
                  f"(epoch {best['epoch']}), {run.chars_per_s:,.0f} chars/s, {run.wall:.0f} s wall", flush=True)
    print_table(runs, baselines)
    print_time_to_target(runs, len(train_ids) - 100)
    print(f"load average {os.getloadavg()[0]:.2f} at the end")
    return 0


def measure_throughput() -> dict:
    """GEMM ceiling and training rates, measured in this process (see ``print_throughput``)."""
    ceiling = gemm_ceiling()
    rates = {f"{'reg' if reg else 'plain'}-{'bf16' if bf16 else 'fp32'}": training_throughput(bf16, reg)
             for reg in (False, True) for bf16 in (False, True)}
    return {"ceiling": ceiling, "rates": rates, "threads": torch.get_num_threads()}


def print_throughput(threads: int | None) -> None:
    """Each OpenMP wait policy needs a fresh process: OpenMP's default (threads spin while they
    wait: fastest alone) and OMP_WAIT_POLICY=PASSIVE (threads sleep: better when several jobs
    share the cores)."""
    flops = model_flops_per_char(ModelConfig(vocab_size=45, layers=2, units=256, embedding_dim=64))
    results = {}
    for policy in ("default", "PASSIVE"):
        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
        if policy == "PASSIVE":
            env["OMP_WAIT_POLICY"] = policy
        cmd = [sys.executable, __file__, "--measure-throughput"] + (["--threads", str(threads)] if threads else [])
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
        results[policy] = json.loads(out.strip().splitlines()[-1])
    ceiling = results["default"]["ceiling"]
    print(f"\nGEMM ceiling measured here (best of 3 shapes, {results['default']['threads']} threads): "
          f"fp32 {ceiling['fp32']:.0f} GFLOP/s, bf16 {ceiling['bf16']:.0f} GFLOP/s")
    print(f"training throughput, 2 x 256 LSTM, embedding 64, batch 64 x 100 steps "
          f"({flops / 1e6:.2f} MFLOP per target character, nominal):\n")
    print("| model | precision | OpenMP threads wait | target chars/s | GFLOP/s | share of GEMM ceiling |")
    print("|---|---|---|---:|---:|---:|")
    for key, name in (("plain", "no dropout"), ("reg", "variational dropout + weight drop")):
        for precision in ("fp32", "bf16"):
            for policy, how in (("default", "spinning (OpenMP default)"), ("PASSIVE", "sleeping (PASSIVE)")):
                rate = results[policy]["rates"][f"{key}-{precision}"]
                gflops = rate * flops / 1e9
                print(f"| {name} | {precision} | {how} | {rate:,.0f} | {gflops:.0f} | "
                      f"{gflops / ceiling[precision]:.0%} |")


def print_table(runs: list[Run], baselines) -> None:
    print("\n| recipe | budget | epochs | best val nats/char | best val bits/char | train loss | chars/s "
          "| time to val 1.86 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for run in runs:
        best, reached = run.best, run.time_to(TARGET_CE)
        when = f"{reached:.0f} s" if reached is not None else "not reached"
        print(f"| {run.recipe} | {run.budget_min:g} min | {run.rows[-1]['epoch']} | {best['val_loss']:.4f} | "
              f"{best['val_loss'] / LN2:.3f} | {run.rows[-1]['loss']:.4f} | {run.chars_per_s:,.0f} | {when} |")
    for b in baselines:
        print(f"| {b.name} (compressor) | – | – | {b.bits_per_char * LN2:.4f} | {b.bits_per_char:.3f} | – | – | – |")


def print_time_to_target(runs: list[Run], n_patterns: int) -> None:
    default_times = [(r.time_to(TARGET_CE), r) for r in runs if r.recipe == "default" and r.time_to(TARGET_CE)]
    if not default_times:
        print("\ndefault recipe: validation CE 1.86 not reached in these budgets")
        return
    fastest, run = min(default_times, key=lambda pair: pair[0])
    print(f"\ntime to validation CE {TARGET_CE}: default recipe {fastest:.1f} s "
          f"(fastest of its runs: the {run.budget_min:g}-minute one)")
    tutorial = [(r.time_to(TARGET_CE), r) for r in runs if r.recipe == "tutorial-small" and r.time_to(TARGET_CE)]
    if tutorial:
        t_tut = min(t for t, _ in tutorial)
        how = "measured"
    else:
        epoch_s = tutorial_epoch_seconds(runs, n_patterns)
        if epoch_s is None:
            print("tutorial-small was not run: no ratio")
            return
        t_tut = TUTORIAL_EPOCHS_TO_TARGET * epoch_s
        how = (f"extrapolated: not reached within its budgets; {TUTORIAL_EPOCHS_TO_TARGET} epochs "
               f"x {epoch_s:.0f} s per epoch measured here")
    print(f"tutorial-small: {t_tut:,.0f} s ({how})")
    print(f"ratio: the default recipe gets there {t_tut / fastest:,.0f}x sooner")


if __name__ == "__main__":
    sys.exit(main())
