"""Train the English base model that ``charlstm train --init english`` starts from.

Corpus: the books of ``../shared/corpora/gutenberg/`` (Gutenberg header and footer removed by
``charlstm.corpus``, CRLF normalised, case kept). Held out of training: every book by one
author (Kipling by default; its "The Jungle Book" is the "book it never saw" of
``benchmarks/quality.py``) and four validation books, one by each other author (their first
``--val-chars-per-book`` characters are the validation text that selects ``best``).

The vocabulary is fixed, not read from the text: printable ASCII, newline, curly quotes, dashes,
the ellipsis, the pound sign and the accented letters that English books use; a no-break space
becomes a space and rarer characters are dropped. Fine-tuning maps other characters onto new
rows (``charlstm.init``).

The run is one pass (or less) over ~100 M characters: a training loop of its own (streams with
the state carried, AdamW, warm-up then a cosine planned on the wall-clock budget, bf16 autocast
where the CPU has it) that every ``--save-every`` seconds scores the validation text and writes
``last.safetensors`` and, when it improved, ``best.safetensors``, so stopping it at any time
leaves a usable model. The shipped base is two runs of this script, 105 minutes on one core in
all (one torch thread trains this network as fast as two on the 2-core CPU it was made on): the
defaults (2 x 384, 55 minutes), then 50 minutes more that start from its weights with a fresh,
lower cosine and read on where its streams stopped (``--init``)::

    OMP_WAIT_POLICY=PASSIVE python scripts/train_base.py --out ../quality-runs/base384
    OMP_WAIT_POLICY=PASSIVE python scripts/train_base.py --out ../quality-runs/base384b \
        --init ../quality-runs/base384/last.safetensors --lr 2e-3 --warmup 100 --time-budget 3000
    python scripts/train_base.py --ship ../quality-runs/base384b/best.safetensors

``--measure`` only prints the training throughput of a few model sizes on this corpus;
``--ship CHECKPOINT`` stores a run's checkpoint as the package's base (weights in bf16).
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from charlstm import checkpoint
from charlstm.checkpoint import TrainedModel, seed_windows
from charlstm.corpus import Normalization, normalize, read_text_file
from charlstm.data import StreamBatches
from charlstm.evaluate import LN2, evaluate_ids
from charlstm.model import CharLSTM, ModelConfig, detach_state
from charlstm.records import TrainingRecord
from charlstm.train import autocast_dtype
from charlstm.vocab import Vocab

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CORPUS = REPO.parent / "shared" / "corpora" / "gutenberg"
HELD_OUT_AUTHOR = "Kipling"
VAL_BOOKS = (
    "Wells, H. G. (Herbert George)/The Time Machine.txt",
    "Stevenson, Robert Louis/The Strange Case of Dr. Jekyll and Mr. Hyde.txt",
    "Baum, L. Frank (Lyman Frank)/Dot and Tot of Merryland.txt",
    "Twain, Mark/Tom Sawyer Abroad.txt",
)
NORMALIZATION = Normalization(lowercase=False, strip_punctuation=False, strip_gutenberg=True)
EXTRA_CHARS = "‘’“”–—…£éèêëàâäçñüöôïîæœÉ"
BOOK_SEPARATOR = "\n\n\n"


def english_vocab() -> Vocab:
    """What English books contain: printable ASCII, newline and the usual typographic extras."""
    chars = {chr(c) for c in range(0x20, 0x7F)} | {"\n"} | set(EXTRA_CHARS)
    return Vocab(tuple(sorted(chars)))


def book_text(path: Path) -> str:
    return normalize(read_text_file(path), NORMALIZATION).replace("\u00a0", " ").replace("\t", " ")


def split_books(corpus: Path, held_out_author: str) -> tuple[list[Path], list[Path]]:
    """(training books, validation books); the held-out author's books are in neither."""
    books = sorted(corpus.glob("*/*.txt"))
    if not books:
        sys.exit(f"error: no books under {corpus}")
    val = [corpus / name for name in VAL_BOOKS]
    missing = [str(p) for p in val if not p.is_file()]
    if missing:
        sys.exit(f"error: validation books missing: {missing}")
    train = [p for p in books if p not in val and held_out_author not in p.parent.name]
    return train, val


def encode_books(paths: list[Path], vocab: Vocab, chars_per_book: int | None = None) -> np.ndarray:
    parts = []
    for path in paths:
        text = book_text(path)
        parts.append(vocab.encode((text[:chars_per_book] if chars_per_book else text) + BOOK_SEPARATOR,
                                  unknown="skip"))
    return np.concatenate(parts)


def model_config(args, vocab: Vocab) -> ModelConfig:
    return ModelConfig(vocab_size=len(vocab), input="embedding", embedding_dim=args.embedding, layers=args.layers,
                       units=args.units, dropout=args.dropout, variational=True, weight_drop=0.0,
                       target="all", window=100)


def lr_at(args, step: int, elapsed: float) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = min(1.0, elapsed / args.time_budget)
    return args.lr * (args.final_lr + (1 - args.final_lr) * 0.5 * (1 + math.cos(math.pi * progress)))


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class BaseRun:
    def __init__(self, args, vocab: Vocab, train_ids: np.ndarray, val_ids: np.ndarray, sources: list[str],
                 init: TrainedModel | None = None):
        self.args, self.vocab, self.train_ids, self.val_ids = args, vocab, train_ids, val_ids
        torch.manual_seed(args.seed)
        self.model = CharLSTM(model_config(args, vocab))
        if init is not None:
            self.model.load_state_dict(init.model.float().state_dict())
        self.amp = autocast_dtype("auto", torch.device("cpu"))
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        rest = [p for p in self.model.parameters() if p.dim() < 2]
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                            {"params": rest, "weight_decay": 0.0}], lr=args.lr)
        self.batches = StreamBatches(train_ids, args.batch, args.bptt, random_offset=True, seed=args.seed)
        self.seed_windows = seed_windows(vocab, train_ids, 100, args.seed)
        self.history: list[dict] = []
        self.best: float | None = None
        self.sources = sources
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.log_file = (self.out / "log.jsonl").open("a")

    def log(self, row: dict) -> None:
        print(json.dumps(row), flush=True)
        self.log_file.write(json.dumps(row) + "\n")
        self.log_file.flush()

    def step(self, x, y, state, lr: float):
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with torch.autocast("cpu", dtype=self.amp or torch.float32, enabled=self.amp is not None):
            logits, state = self.model(x, state)
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        return loss.item(), detach_state(state)

    def run(self) -> None:
        args, start = self.args, time.perf_counter()
        state, step, chars, loss_sum, loss_n = None, 0, 0, 0.0, 0
        next_save = args.save_every
        epoch = 0
        while True:
            epoch += 1
            for x, y in self.batches.epoch(epoch, start_batch=args.start_batch if epoch == 1 else 0):
                elapsed = time.perf_counter() - start
                loss, state = self.step(x, y, state, lr_at(args, step, elapsed))
                step, chars = step + 1, chars + y.numel()
                loss_sum, loss_n = loss_sum + loss, loss_n + 1
                elapsed = time.perf_counter() - start
                done = elapsed >= args.time_budget - args.reserve
                if elapsed >= next_save or done:
                    self.checkpoint(step, chars, elapsed, loss_sum / loss_n, epoch)
                    loss_sum, loss_n = 0.0, 0
                    next_save = (time.perf_counter() - start) + args.save_every
                if done:
                    return
            state = None

    def checkpoint(self, step: int, chars: int, elapsed: float, train_loss: float, epoch: int) -> None:
        t0 = time.perf_counter()
        val = evaluate_ids(self.model, self.val_ids, amp_dtype=self.amp)
        self.model.train()
        # the fields of charlstm's own epoch records, so ``charlstm info`` reads them
        row = {"step": step, "chars": chars, "epoch": epoch, "elapsed": round(elapsed, 1),
               "loss": round(train_loss, 4), "val_loss": round(val, 4), "val_bpc": round(val / LN2, 4),
               "lr": lr_at(self.args, step, elapsed),
               "chars_per_s": round(chars / elapsed), "eval_s": round(time.perf_counter() - t0, 1),
               "rss_mib": round(rss_mib())}
        self.history.append(row)
        improved = self.best is None or val < self.best
        self.best = val if improved else self.best
        trained = self.trained(row)
        checkpoint.save(self.out / "last.safetensors", trained)
        if improved:
            checkpoint.save(self.out / "best.safetensors", trained)
            row["saved_best"] = True
        self.log(row)

    def trained(self, row: dict) -> TrainedModel:
        args = self.args
        record = {
            "config": {"recipe": "scripts/train_base.py",
                       **{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "measure"}},
            "history": self.history,
            "data": {"sources": self.sources, "characters": int(len(self.train_ids) + len(self.val_ids)),
                     "train_characters": int(len(self.train_ids)),
                     "val_characters": int(len(self.val_ids)), "held_out_author": args.held_out_author,
                     "val_books": list(VAL_BOOKS), "characters_seen": row["chars"]},
            "best": {"val_loss": self.best, "val_bpc": self.best / LN2},
            "time_seconds": row["elapsed"],
        }
        return TrainedModel(model=self.model, vocab=self.vocab, normalization=NORMALIZATION,
                            training=TrainingRecord.from_json(record),
                            seed_windows=self.seed_windows)


def batches_read(trained: TrainedModel) -> int:
    """Where a run of this script stopped in its first pass (a continued run counts on from where
    the run it continued started)."""
    config, history = trained.training.config, trained.training.history
    return int(config.get("start_batch") or 0) + (history[-1].step if history else 0)


def measure(args, vocab: Vocab, train_ids: np.ndarray) -> None:
    """Training chars/s of a few sizes on this corpus (same threads, precision and batch)."""
    for layers, units in ((2, 256), (2, 384), (2, 512), (3, 384)):
        args.layers, args.units = layers, units
        run = BaseRun(args, vocab, train_ids[:2_000_000], train_ids[:1000], [])
        batches = run.batches.epoch(1)
        state = None
        for _ in range(3):
            x, y = next(batches)
            _, state = run.step(x, y, state, 1e-3)
        t0, n = time.perf_counter(), 0
        while time.perf_counter() - t0 < args.measure:
            x, y = next(batches)
            _, state = run.step(x, y, state, 1e-3)
            n += y.numel()
        rate = n / (time.perf_counter() - t0)
        params = run.model.num_parameters()
        print(f"{layers}x{units}: {params:,} parameters, {rate:,.0f} chars/s, "
              f"{rate * args.time_budget / 1e6:.0f} M chars in {args.time_budget:.0f} s", flush=True)


def ship(path: Path) -> None:
    """The checkpoint, weights in bf16 (half the bytes; loading converts back to fp32), as the
    package's ``pretrained/english.safetensors``."""
    from charlstm.finetune import PRETRAINED

    trained = checkpoint.load(path)
    trained.model.to(torch.bfloat16)
    target = PRETRAINED["english"]
    checkpoint.save(target, trained)
    print(f"wrote {target}: {target.stat().st_size / 1e6:.2f} MB, best val_loss "
          f"{trained.training.best.val_loss:.4f} nats/char")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--out", type=Path, default=Path("base-run"))
    parser.add_argument("--held-out-author", default=HELD_OUT_AUTHOR)
    parser.add_argument("--val-chars-per-book", type=int, default=60_000)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--units", type=int, default=384)
    parser.add_argument("--embedding", type=int, default=64)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--bptt", type=int, default=100)
    parser.add_argument("--lr", type=float, default=4e-3)
    parser.add_argument("--final-lr", type=float, default=0.05, help="the cosine ends at lr * this")
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--time-budget", type=float, default=3300.0, help="seconds of training")
    parser.add_argument("--reserve", type=float, default=30.0, help="seconds kept for the last save")
    parser.add_argument("--save-every", type=float, default=600.0, help="seconds between saves")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--init", type=Path, metavar="CHECKPOINT",
                        help="continue from this run's weights (same --layers/--units; a fresh optimiser and schedule)")
    parser.add_argument("--start-batch", type=int,
                        help="begin the first pass at this batch (default: where the run --init continues stopped, "
                             "so the streams read on instead of reading the same text again; else 0)")
    parser.add_argument("--measure", type=float, default=0.0, help="only measure chars/s, this many s per size")
    parser.add_argument("--ship", type=Path, metavar="CHECKPOINT", help="store this checkpoint as the package's base")
    args = parser.parse_args()
    if args.ship:
        ship(args.ship)
        return
    torch.set_num_threads(args.threads)
    init = checkpoint.load(args.init) if args.init else None
    if args.start_batch is None:
        args.start_batch = batches_read(init) if init else 0
    vocab = english_vocab()
    train_books, val_books = split_books(args.corpus, args.held_out_author)
    t0 = time.perf_counter()
    train_ids = encode_books(train_books, vocab)
    val_ids = encode_books(val_books, vocab, args.val_chars_per_book)
    print(f"{len(train_books)} training books, {len(train_ids):,} characters; {len(val_ids):,} validation "
          f"characters from {len(val_books)} books; vocabulary {len(vocab)}; encoded in "
          f"{time.perf_counter() - t0:.0f} s; peak RSS {rss_mib():,.0f} MiB", flush=True)
    if args.measure:
        measure(args, vocab, train_ids)
        return
    run = BaseRun(args, vocab, train_ids, val_ids, [str(p.relative_to(args.corpus)) for p in train_books], init)
    print(f"model {args.layers}x{args.units}: {run.model.num_parameters():,} parameters, "
          f"precision {'bf16' if run.amp else 'fp32'}, threads {torch.get_num_threads()}", flush=True)
    run.run()


if __name__ == "__main__":
    main()
