"""Scale: prepare throughput and memory, training memory on 1 GB, DDP throughput, large vocabularies.

    flock /tmp/charlstm-bench.lock env PYTHONPATH=src python benchmarks/scale.py [--quick] [--skip-1gb]
        [--prepare-only | --ddp-only | --vocab-only] [--rounds N]

Prints, with the machine and its load average:

1. ``charlstm prepare`` on the shared Gutenberg folder (126 MB, 420 books) and on a 1 GB corpus
   (the folder 8 times, through symbolic links in a temporary folder that is removed
   afterwards): MB/s of input and the peak resident memory of the process. The books are read
   from the page cache after the first pass: this measures preparation, not the disk.
2. ``charlstm train --data`` on the 1 GB prepared corpus (default 2 x 256 model, one thread):
   resident memory sampled every half second, peak and over time.
3. Training throughput of the default model on the prepared Gutenberg data: 1 process x 1
   thread, 1 process x 2 threads, 2 processes x 1 thread under torchrun (DDP), the same
   global batch of 64 streams, and two independent processes with half the batch each (the
   ceiling for DDP), in ``--rounds`` interleaved rounds whose order alternates, each variant's
   ratio to 1 x 1 taken within its round (the host's speed drifts over minutes); and the time
   of summing the model's gradients between 2 processes (gloo all-reduce, shared memory).
4. Training and generation characters/s (generation in fp32 and in bf16, whose products
   include the output layer's) with a 5,000-symbol vocabulary, full and adaptive head
   (counts by Zipf's law, the training batch drawn from them), against the 45-symbol Alice
   one (randomly initialised models: speed does not depend on the weights), the share of the
   output head in the multiply-adds, and the training step with either head for 250 to 2,000
   symbols (where ``--head auto`` switches).

Every measurement runs in a child process, one after another, so that they never share the
cores with each other; other users of the machine still may (see the load average).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine_probe import cpu_name, median_of_ratios  # benchmarks/ is on the path when this script runs

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from charlstm.adaptive import projection_size  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CHARLSTM_SHARED", REPO.parent / "shared"))
GUTENBERG = SHARED / "corpora" / "gutenberg"
ALICE = SHARED / "corpora" / "pg11.txt"
COPIES_FOR_1GB = 8
MODEL = ["--layers", "2", "--units", "256", "--embedding-dim", "64"]  # pinned: the default recipe adapts its size


def env(threads: int) -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": str(threads)}


def run_measured(cmd: list[str], threads: int = 1, sample: bool = False) -> dict:
    """Run ``cmd``: its output, wall time and, with ``sample``, its RSS every half second."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env(threads), cwd=REPO,
                            text=True)
    samples = []
    if sample:
        while proc.poll() is None:
            samples.append((time.perf_counter() - start, _rss_mb(proc.pid)))
            time.sleep(0.5)
    out, err = proc.communicate()
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-2000:]}\n{err[-2000:]}")
    return {"wall": wall, "samples": [s for s in samples if s[1]], "stdout": out, "stderr": err}


def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def charlstm(*args: str) -> list[str]:
    return [sys.executable, "-m", "charlstm", *args]


# ----------------------------------------------------------------------- 1. prepare


def bench_prepare(inputs: list[str], out: Path) -> dict:
    # a wrapper interpreter per run reports its one child's peak RSS (ru_maxrss) and wall time
    code = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
            "r = subprocess.run(sys.argv[1:]); w = time.perf_counter() - t; u = resource.getrusage(resource.RUSAGE_CHILDREN); "
            "print(u.ru_maxrss, w, u.ru_utime + u.ru_stime); sys.exit(r.returncode)")
    cmd = [sys.executable, "-c", code, *charlstm("prepare", *inputs, "-o", str(out), "--no-progress")]
    result = run_measured(cmd)
    lines = result["stdout"].strip().splitlines()
    peak_kb, wall, cpu = lines[-1].split()
    size = sum(s["bytes"] for s in json.loads((out / "manifest.json").read_text())["sources"])
    summary = next((line for line in lines if line.startswith("sources:")), "")
    return {"mb": size / 1e6, "seconds": float(wall), "cpu": float(cpu), "peak_mb": int(peak_kb) / 1024,
            "summary": summary}


# ----------------------------------------------------------------------- 2. training memory


def bench_train_memory(data: Path, out: Path, seconds: int) -> dict:
    cmd = charlstm("train", "--data", str(data), *MODEL, "--threads", "1", "--val-chars", "20000", "--eval-every", "50",
                   "--save-every", "50", "--time-budget", str(seconds), "--no-progress", "-o", str(out))
    result = run_measured(cmd, threads=1, sample=True)
    samples = result["samples"]
    rows = json.loads("[" + ",".join((out / "metrics.jsonl").read_text().splitlines()) + "]")
    return {"samples": samples, "peak_mb": max(mb for _, mb in samples), "steps": rows[-1]["step"] if rows else 0}


# ----------------------------------------------------------------------- 3. DDP throughput


THROUGHPUT_RUNS = (("1 process x 1 thread", 1, 1), ("1 process x 2 threads", 2, 1),
                   ("2 processes x 1 thread (torchrun, DDP)", 1, 2))
PAIR_LABEL = "2 independent processes x 1 thread, 32 streams each, nothing exchanged"


def bench_throughput(data: Path, out: Path, steps: int, rounds: int) -> dict[str, list[float]]:
    """chars/s of every variant, ``rounds`` times, interleaved and in alternating order, so that
    a change of the host's speed during the benchmark touches every variant alike."""
    args = ["--data", str(data), *MODEL, "--max-steps", str(steps), "--eval-every", str(steps), "--val-chars", "2000",
            "--batch-size", "64", "--bptt", "50", "--no-progress"]
    rates: dict[str, list[float]] = {label: [] for label, _, _ in THROUGHPUT_RUNS} | {PAIR_LABEL: []}
    for r in range(rounds):
        order = list(THROUGHPUT_RUNS) + [(PAIR_LABEL, 1, 0)]
        for label, threads, procs in (order if r % 2 == 0 else order[::-1]):
            target = out / f"round{r}-p{procs}t{threads}"
            rate = (bench_independent_pair(args, target) if label == PAIR_LABEL
                    else bench_training_run(args, target, threads, procs))
            rates[label].append(rate)
        print(f"round {r + 1}/{rounds}: " + ", ".join(f"{v[-1]:,.0f}" for v in rates.values())
              + f" chars/s; load average {os.getloadavg()[0]:.2f}", flush=True)
    return rates


def bench_training_run(args: list[str], target: Path, threads: int, procs: int) -> float:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)]
                if procs > 1 else [sys.executable])
    run_measured([*launcher, "-m", "charlstm", "train", *args, "--threads", str(threads), "-o", str(target)],
                 threads=threads)
    return json.loads((target / "metrics.jsonl").read_text().splitlines()[-1])["chars_per_s"]


def print_throughput(rates: dict[str, list[float]]) -> None:
    """Each variant's median, and the median over rounds of its ratio to that round's 1 x 1."""
    base = rates[THROUGHPUT_RUNS[0][0]]
    print("| run | median chars/s | vs 1 x 1 (median of the rounds' ratios) | the rounds' ratios |")
    print("|---|---:|---:|---|")
    for label, values in rates.items():
        median, ratios = median_of_ratios(values, base)
        print(f"| {label} | {statistics.median(values):,.0f} | {median:.2f}x | " + " ".join(f"{x:.2f}" for x in ratios)
              + " |")
    ddp_share, _ = median_of_ratios(rates[THROUGHPUT_RUNS[2][0]], rates[PAIR_LABEL])
    print(f"\nDDP gives {ddp_share:.0%} of what two processes that exchange nothing get together (median of the rounds)")


def bench_independent_pair(args: list[str], out: Path) -> float:
    """Two single-process runs side by side, each with a DDP rank's half of the batch: what the
    two cores give two processes when nothing is exchanged (summed characters/s)."""
    half = [*args[:args.index("--batch-size")], "--batch-size", "32", *args[args.index("--batch-size") + 2:]]
    procs = [subprocess.Popen(charlstm("train", *half, "--threads", "1", "--seed", str(i), "-o", str(out / str(i))),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env(1), cwd=REPO, text=True)
             for i in range(2)]
    for proc in procs:
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"independent training run failed ({proc.returncode}):\n{err[-2000:]}")
    return sum(json.loads((out / str(i) / "metrics.jsonl").read_text().splitlines()[-1])["chars_per_s"]
               for i in range(2))


ALLREDUCE_CODE = r"""
import os, sys, time, torch, torch.distributed as dist
from charlstm import CharLSTM, ModelConfig
torch.set_num_threads(1)
dist.init_process_group("gloo")
n = CharLSTM(ModelConfig(vocab_size=int(sys.argv[1]), input="embedding", embedding_dim=64, layers=2, units=256,
                         target="all")).num_parameters()
grad = torch.randn(n)
for _ in range(5):
    dist.all_reduce(grad)
dist.barrier()
t = time.perf_counter()
for _ in range(50):
    dist.all_reduce(grad)
ms = (time.perf_counter() - t) / 50 * 1000
# what charlstm uses when every rank is on this machine: the sum through shared memory
from charlstm.distributed import Distributed, SharedMemorySum
shared = SharedMemorySum.open(Distributed(dist.get_rank(), dist.get_world_size()), n)
class Bucket:
    def buffer(self):
        return grad
for _ in range(5):
    shared.hook(None, Bucket())
dist.barrier()
t = time.perf_counter()
for _ in range(50):
    shared.hook(None, Bucket())
shm_ms = (time.perf_counter() - t) / 50 * 1000
if dist.get_rank() == 0:
    print(n, ms, shm_ms)
dist.destroy_process_group()
"""


def bench_allreduce(vocab_size: int) -> tuple[int, float, float]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--no-python", sys.executable, "-c", ALLREDUCE_CODE, str(vocab_size)]
    result = run_measured(cmd)
    n, ms, shm_ms = result["stdout"].strip().splitlines()[-1].split()
    return int(n), float(ms), float(shm_ms)


# ----------------------------------------------------------------------- 4. large vocabulary


VOCAB_CODE = r"""
import sys, time, json, numpy as np, torch, torch.nn.functional as F
from charlstm import CharLSTM, ModelConfig, Generator, TrainedModel, Vocab, SamplingConfig
from charlstm.adaptive import choose_cutoffs
from charlstm.corpus import Corpus
torch.set_num_threads(1)
size, head, steps, chars = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
clock = time.process_time if sys.argv[6] == "cpu" else time.perf_counter  # cpu: this process's CPU seconds
rng = np.random.default_rng(0)
if size == 0:  # Alice's own vocabulary and text
    text = Corpus.from_files(sys.argv[5]).text
    vocab = Vocab.from_text(text)
    ids = vocab.encode(text).astype(np.int64)
    counts = np.bincount(ids, minlength=len(vocab))
else:  # CJK ideographs and a newline: a Chinese novel's alphabet, with Zipf's law for the counts
    vocab = Vocab(tuple(sorted([chr(c) for c in range(0x4E00, 0x4E00 + size - 1)] + ["\n"])))
    counts = (1e8 / np.arange(1, size + 1)).astype(np.int64)[rng.permutation(size)]
    ids = rng.choice(size, size=200_000, p=counts / counts.sum())
V = len(vocab)
torch.manual_seed(0)
cutoffs = choose_cutoffs(counts, 256) if head == "adaptive" else ()
model = CharLSTM(ModelConfig(vocab_size=V, input="embedding", embedding_dim=64, layers=2, units=256, target="all",
                             dropout=0.0, head=head, head_cutoffs=cutoffs), symbol_counts=counts)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
starts = rng.integers(0, len(ids) - 51, 64)
batch = torch.from_numpy(np.stack([ids[s:s + 51] for s in starts]))
x, y = batch[:, :-1], batch[:, 1:]
def step():  # what charlstm train does: bf16 autocast, the loss in fp32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = model(x, targets=y)
    opt.zero_grad(); loss.backward(); opt.step()
step()
t = clock()
for _ in range(steps):
    step()
train = steps * 64 * 50 / (clock() - t)
out = {"vocab": V, "head": head, "cutoffs": list(cutoffs), "train": train, "step_ms": 64 * 50 / train * 1000}
prime = vocab.decode(ids[:20])
for precision in ("fp32", "bf16") if chars else ():  # bf16: the recurrence and the output layer in bf16 products
    gen = Generator(TrainedModel(model.eval(), vocab), precision=precision)
    for temperature in (0.0, 1.0):
        gen.generate(prime, 20, sampling=SamplingConfig(temperature), seed=1)
        t = clock()
        text = gen.generate(prime, chars, sampling=SamplingConfig(temperature), seed=1)
        out[f"gen{temperature:g}{'' if precision == 'fp32' else precision}"] = len(text) / (clock() - t)
print(json.dumps(out))
"""


def bench_vocab(size: int, head: str, steps: int, chars: int, cpu_time: bool = False) -> dict:
    result = run_measured([sys.executable, "-c", VOCAB_CODE, str(size), head, str(steps), str(chars), str(ALICE),
                           "cpu" if cpu_time else "wall"])
    return json.loads(result["stdout"].strip().splitlines()[-1])


def _prepare_row(label: str, r: dict) -> str:
    """Wall time includes starting Python and PyTorch; CPU seconds (user + system, all
    processes) say what the work costs whatever else the machine runs."""
    return (f"| {label} | {r['mb']:,.0f} | {r['seconds']:.1f} | {r['mb'] / r['seconds']:,.1f} | {r['cpu']:.1f} | "
            f"{r['mb'] / r['cpu']:,.1f} | {r['peak_mb']:,.0f} |")


def head_share(vocab: int, cutoffs=(), units: int = 256, embedding: int = 64, layers: int = 2) -> float:
    """The output layer's share of the multiply-adds per character (forward; backward alike);
    for the adaptive head, its full distribution (every cluster: what generation computes)."""
    lstm = 4 * units * (embedding + units) + (layers - 1) * 4 * units * (2 * units)
    if not cutoffs:
        head = units * vocab
    else:
        edges = [*cutoffs, vocab]
        head = units * (cutoffs[0] + len(cutoffs)) + sum(
            units * projection_size(units, i) + projection_size(units, i) * (stop - start)
            for i, (start, stop) in enumerate(zip(edges, edges[1:])))
    return head / (lstm + head)


# ----------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter measurements")
    parser.add_argument("--skip-1gb", action="store_true", help="no 1 GB corpus (sections 1b and 2)")
    parser.add_argument("--train-seconds", type=int, default=120, help="training-memory run length")
    parser.add_argument("--prepare-only", action="store_true", help="section 1 only")
    parser.add_argument("--vocab-only", action="store_true", help="section 4 only")
    parser.add_argument("--cpu-time", action="store_true",
                        help="section 4 in the process's CPU seconds, not wall time (a busy machine)")
    parser.add_argument("--ddp-only", action="store_true", help="section 3 only (prepares the shared folder first)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of section 3")
    args = parser.parse_args()
    if not GUTENBERG.is_dir():
        raise SystemExit(f"{GUTENBERG}: missing (set CHARLSTM_SHARED)")
    print(f"# scale benchmark, {cpu_name()}, {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.vocab_only:
        bench_vocab_section(args)
        return
    args.skip_1gb = args.skip_1gb or args.ddp_only
    with tempfile.TemporaryDirectory(prefix="charlstm-scale-") as tmp:
        tmp = Path(tmp)
        print("\n## 1. charlstm prepare\n")
        print("| corpus | input MB | seconds | MB/s | CPU seconds | MB per CPU second | peak RSS MB |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        small = bench_prepare([str(GUTENBERG)], tmp / "gutenberg")
        print(_prepare_row("Gutenberg folder (420 books)", small), flush=True)
        big_dir = tmp / "1gb"
        if not args.skip_1gb:
            links = tmp / "links"
            links.mkdir()
            for i in range(COPIES_FOR_1GB):
                (links / f"copy{i + 1}").symlink_to(GUTENBERG, target_is_directory=True)
            big = bench_prepare([str(links / f"copy{i + 1}") for i in range(COPIES_FOR_1GB)], big_dir)
            print(_prepare_row(f"the folder x {COPIES_FOR_1GB} (symbolic links)", big), flush=True)
        print(f"\n{small['summary']}")
        print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)

        if args.prepare_only:
            return
        if not args.skip_1gb:
            print(f"\n## 2. train --data on the 1 GB prepared corpus ({args.train_seconds} s, 2 x 256, 1 thread)\n")
            mem = bench_train_memory(big_dir, tmp / "train-1gb", args.train_seconds)
            samples = mem["samples"]
            marks = [samples[int(f * (len(samples) - 1))] for f in (0.1, 0.25, 0.5, 0.75, 1.0)]
            print("| seconds | " + " | ".join(f"{t:.0f}" for t, _ in marks) + " | peak |")
            print("|---|" + "---:|" * (len(marks) + 1))
            print("| RSS MB | " + " | ".join(f"{mb:,.0f}" for _, mb in marks) + f" | {mem['peak_mb']:,.0f} |")
            print(f"\n{mem['steps']} steps; load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
                  flush=True)
            shutil.rmtree(big_dir)

        steps = 30 if args.quick else 100
        rounds = 1 if args.quick else args.rounds
        print(f"\n## 3. training throughput, default 2 x 256 model, global batch 64 x 50, {steps} steps, "
              f"{rounds} interleaved rounds\n")
        print_throughput(bench_throughput(tmp / "gutenberg", tmp / "throughput", steps, rounds))
        n, ms, shm_ms = bench_allreduce(158)
        print(f"\nsumming the {n:,} gradients (fp32, {n * 4 / 1e6:.1f} MB) of 2 processes, per step: gloo all-reduce "
              f"{ms:.2f} ms, through shared memory (what charlstm uses on one machine) {shm_ms:.2f} ms")
        print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)

    if not args.ddp_only:
        bench_vocab_section(args)


def bench_vocab_section(args) -> None:
    clock = "CPU seconds" if args.cpu_time else "wall time"
    print(f"\n## 4. large vocabulary (2 x 256, bf16 training step 64 x 50, 1 thread; generation 1 stream, native; "
          f"{clock})\n")
    train_steps, gen_chars = (3, 1000) if args.quick else (10, 4000)
    alice = bench_vocab(0, "full", train_steps, gen_chars, args.cpu_time)
    rows = [alice, *(bench_vocab(5000, head, train_steps, gen_chars, args.cpu_time) for head in ("full", "adaptive"))]
    gens = ("gen0", "gen1", "gen0bf16", "gen1bf16")
    print("| vocabulary | head | head share of multiply-adds | training chars/s | greedy chars/s "
          "| temperature 1 chars/s | bf16 greedy chars/s | bf16 temperature 1 chars/s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['vocab']:,} symbols | {_head_name(r)} | {head_share(r['vocab'], r['cutoffs']):.0%} | "
              f"{r['train']:,.0f} | " + " | ".join(f"{r[g]:,.0f}" for g in gens) + " |")
    for r in rows[1:]:
        print(f"| ratio {alice['vocab']} / {r['vocab']:,} | {_head_name(r)} | | {alice['train'] / r['train']:.2f}x | "
              + " | ".join(f"{alice[g] / r[g]:.2f}x" for g in gens) + " |")
    print("\nwhere the adaptive head pays off: the training step, full vs adaptive head, by vocabulary size "
          "(--head auto's threshold)\n")
    print("| vocabulary | full head ms/step | adaptive head ms/step | adaptive / full |")
    print("|---|---:|---:|---:|")
    for size in (250, 500, 1000, 2000):
        full, adaptive = (bench_vocab(size, head, max(3, train_steps // 2), 0, args.cpu_time)
                          for head in ("full", "adaptive"))
        print(f"| {size:,} | {full['step_ms']:,.0f} | {adaptive['step_ms']:,.0f} | "
              f"{adaptive['step_ms'] / full['step_ms']:.2f} |", flush=True)
    print(f"\nload average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


def _head_name(r: dict) -> str:
    return "full" if r["head"] == "full" else f"adaptive {','.join(map(str, r['cutoffs']))}"


if __name__ == "__main__":
    main()
