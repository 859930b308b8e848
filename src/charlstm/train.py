"""Stage 5: the training loop. ``TrainConfig`` says how, ``Trainer`` does it.

Presets: ``tutorial-small`` and ``tutorial-large`` are the tutorial's two Keras networks and
recipes; ``default`` is charlstm's own (embedding input, every position a target, carried
state, AdamW with warm-up and cosine decay, clipping, validation-selected checkpoints).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import checkpoint
from .checkpoint import TrainedModel
from .corpus import Corpus
from .data import StreamBatches, WindowBatches, random_windows, split_train_val
from .errors import CharLSTMError
from .model import CharLSTM, ModelConfig, detach_state
from .vocab import Vocab

LN2 = math.log(2.0)
SEED_WINDOWS = 200


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 20
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.0
    optimizer: str = "adamw"            # adam | adamw
    schedule: str = "cosine"            # constant | cosine
    warmup_steps: int = 100
    clip: float = 1.0                   # max gradient norm, 0 = off
    batching: str = "streams"           # windows | streams
    bptt: int = 100                     # stream piece length
    val_fraction: float = 0.1
    monitor: str = "val_loss"           # loss | val_loss
    checkpoint_template: str = "weights-improvement-{epoch:02d}-{loss:.4f}"
    output_dir: str = "checkpoints"
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"             # auto | fp32 | bf16
    time_budget: float | None = None    # seconds; the schedule is planned to end on time
    patience: int = 0                   # early stopping: epochs without improvement, 0 = off

    def validate(self) -> None:
        positive = {"epochs": self.epochs, "batch_size": self.batch_size, "bptt": self.bptt}
        for name, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise CharLSTMError(f"--{name.replace('_', '-')} must be a positive integer, not {value!r}")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise CharLSTMError(f"--lr must be positive, not {self.lr}")
        choices = {"optimizer": ("adam", "adamw"), "schedule": ("constant", "cosine"),
                   "batching": ("windows", "streams"), "monitor": ("loss", "val_loss"),
                   "precision": ("auto", "fp32", "bf16")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise CharLSTMError(f"--{name} must be one of {', '.join(allowed)}, not {getattr(self, name)!r}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise CharLSTMError(f"--val-fraction must be in [0, 1), not {self.val_fraction}")
        if self.time_budget is not None and not self.time_budget > 0:
            raise CharLSTMError(f"--time-budget must be positive seconds, not {self.time_budget}")
        if self.clip < 0 or self.warmup_steps < 0 or self.patience < 0 or self.weight_decay < 0:
            raise CharLSTMError("--clip, --warmup-steps, --patience and --weight-decay must not be negative")
        if self.monitor == "val_loss" and self.val_fraction == 0:
            raise CharLSTMError("--monitor val_loss needs validation text: set --val-fraction above 0")


_TUTORIAL_MODEL = dict(input="scaled", layers=1, units=256, dropout=0.2, target="last", window=100)
_TUTORIAL_TRAIN = dict(epochs=20, batch_size=128, lr=1e-3, optimizer="adam", schedule="constant",
                       warmup_steps=0, clip=0.0, batching="windows", monitor="loss", precision="fp32")
PRESETS: dict[str, tuple[dict, dict]] = {
    "tutorial-small": (_TUTORIAL_MODEL, _TUTORIAL_TRAIN),
    "tutorial-large": (
        {**_TUTORIAL_MODEL, "layers": 2},
        {**_TUTORIAL_TRAIN, "epochs": 50, "batch_size": 64,
         "checkpoint_template": "weights-improvement-{epoch:02d}-{loss:.4f}-bigger"},
    ),
    "default": (
        dict(input="embedding", embedding_dim=64, layers=2, units=256, dropout=0.25, target="all", window=100),
        dict(epochs=30, batch_size=64, lr=3e-3, weight_decay=0.01, optimizer="adamw", schedule="cosine",
             warmup_steps=50, clip=1.0, batching="streams", bptt=100, monitor="val_loss", patience=0),
    ),
}


def preset_configs(preset: str, vocab_size: int, **overrides) -> tuple[ModelConfig, TrainConfig]:
    """The preset's configs with ``overrides`` (any field of either config; None = keep)."""
    if preset not in PRESETS:
        raise CharLSTMError(f"--preset must be one of {', '.join(PRESETS)}, not {preset!r}")
    model_kw, train_kw = (dict(d) for d in PRESETS[preset])
    model_fields, train_fields = ModelConfig.__dataclass_fields__, TrainConfig.__dataclass_fields__
    for key, value in overrides.items():
        if value is None:
            continue
        if key in model_fields:
            model_kw[key] = value
        elif key in train_fields:
            train_kw[key] = value
        else:
            raise CharLSTMError(f"unknown training option {key!r}")
    if "monitor" not in overrides or overrides["monitor"] is None:
        if train_kw.get("val_fraction", TrainConfig.val_fraction) == 0:
            train_kw["monitor"] = "loss"
    train = TrainConfig(**train_kw)
    train.validate()
    return ModelConfig(vocab_size=vocab_size, **model_kw), train


@dataclass
class EpochRecord:
    epoch: int
    loss: float
    val_loss: float | None
    chars_per_s: float
    elapsed: float
    lr: float

    @property
    def val_bpc(self) -> float | None:
        return None if self.val_loss is None else self.val_loss / LN2


@dataclass
class TrainResult:
    trained: TrainedModel
    history: list[EpochRecord] = field(default_factory=list)
    best_path: Path | None = None
    interrupted: bool = False


def pick_device(name: str = "auto") -> torch.device:
    if name != "auto":
        try:
            device = torch.device(name)
        except RuntimeError:
            raise CharLSTMError(f"--device {name!r} is not a device name (cpu, cuda, cuda:1, mps)") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise CharLSTMError("--device cuda: no CUDA GPU is available here")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise CharLSTMError("--device mps: Apple MPS is not available here")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 where the hardware does it fast (CUDA, or a CPU with AVX-512-BF16/AMX), else fp32."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return torch.bfloat16
    return None


class Trainer:
    def __init__(
        self,
        model: CharLSTM,
        vocab: Vocab,
        ids: np.ndarray,
        config: TrainConfig,
        corpus: Corpus | None = None,
        log: Callable[[str], None] = print,
        progress: bool = True,
    ) -> None:
        config.validate()
        self.config = config
        self.vocab = vocab
        self.log = log
        self.progress = progress
        self.normalization = corpus.normalization if corpus else None
        self.device = pick_device(config.device)
        self.amp_dtype = autocast_dtype(config.precision, self.device)
        torch.manual_seed(config.seed)
        self.model = model.to(self.device)
        self.train_ids, self.val_ids = split_train_val(ids, config.val_fraction)
        self.batches = self._make_batches()
        self.optimizer = self._make_optimizer()
        self.step_count = 0
        self.history: list[EpochRecord] = []
        self.output_dir = Path(config.output_dir)

    # ---------------------------------------------------------------- set-up
    def _make_batches(self):
        c, m = self.config, self.model.config
        if c.batching == "windows":
            if m.target != "last":
                raise CharLSTMError("--batching windows trains one target per window: use a 'last'-target model")
            return WindowBatches(self.train_ids, m.window, c.batch_size, shuffle=True, seed=c.seed)
        if m.target != "all":
            raise CharLSTMError("--batching streams needs a model that predicts every position (target 'all')")
        return StreamBatches(self.train_ids, c.batch_size, c.bptt)

    def _make_optimizer(self) -> torch.optim.Optimizer:
        c = self.config
        params = list(self.model.parameters())
        if c.optimizer == "adam":
            return torch.optim.Adam(params, lr=c.lr)
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": c.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=c.lr)

    def summary_lines(self) -> list[str]:
        n_patterns = (self.batches.num_patterns if isinstance(self.batches, WindowBatches)
                      else self.batches.num_targets)
        return [
            f"Total Characters: {len(self.train_ids) + len(self.val_ids)}",
            f"Total Vocab: {len(self.vocab)}",
            f"Total Patterns: {n_patterns}",
            f"Validation Characters: {len(self.val_ids)}",
            f"Parameters: {self.model.num_parameters():,}  device: {self.device}  "
            f"precision: {'bf16' if self.amp_dtype else 'fp32'}",
        ]

    # ---------------------------------------------------------------- schedule
    def _planned_steps(self) -> int:
        return self.config.epochs * len(self.batches)

    def lr_at(self, step: int, elapsed: float) -> float:
        c = self.config
        if c.warmup_steps and step < c.warmup_steps:
            return c.lr * (step + 1) / c.warmup_steps
        if c.schedule == "constant":
            return c.lr
        progress = step / max(1, self._planned_steps())
        if c.time_budget:
            progress = max(progress, elapsed / c.time_budget)
        return c.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))

    # ---------------------------------------------------------------- loop
    def fit(self) -> TrainResult:
        for line in self.summary_lines():
            self.log(line)
        result = TrainResult(trained=self._trained_model())
        best = math.inf
        epochs_since_best = 0
        self.started = time.perf_counter()
        try:
            for epoch in range(1, self.config.epochs + 1):
                record = self._run_epoch(epoch)
                self.history.append(record)
                self._append_metrics(record)
                monitored = record.val_loss if self.config.monitor == "val_loss" else record.loss
                self.log(self._epoch_line(record))
                if monitored < best:
                    improvement = "" if best == math.inf else f" improved from {best:.4f}"
                    best, epochs_since_best = monitored, 0
                    result.best_path = self._save_improvement(record)
                    self.log(f"Epoch {epoch:02d}: {self.config.monitor}{improvement} to {best:.4f}, "
                             f"saving {result.best_path}")
                else:
                    epochs_since_best += 1
                if self.config.patience and epochs_since_best >= self.config.patience:
                    self.log(f"early stopping: no improvement in {self.config.patience} epochs")
                    break
                if self._out_of_time():
                    self.log(f"time budget of {self.config.time_budget:.0f} s reached")
                    break
        except KeyboardInterrupt:
            result.interrupted = True
            kept = result.best_path or "nothing saved yet"
            self.log(f"\ninterrupted; the last good checkpoint is kept: {kept}")
        result.history = self.history
        result.trained = self._trained_model()
        if result.best_path:
            result.trained = checkpoint.load(result.best_path, device=self.device)
        return result

    def _out_of_time(self) -> bool:
        budget = self.config.time_budget
        return budget is not None and time.perf_counter() - self.started >= budget

    def _run_epoch(self, epoch: int) -> EpochRecord:
        self.model.train()
        carried = self.config.batching == "streams"
        state = None
        total_loss, total_targets = 0.0, 0
        t0 = time.perf_counter()
        bar = tqdm(total=len(self.batches), desc=f"Epoch {epoch}/{self.config.epochs}",
                   disable=not self.progress, leave=False, unit="batch", dynamic_ncols=True)
        with bar:
            for x, y in self.batches.epoch(epoch):
                lr = self.lr_at(self.step_count, time.perf_counter() - self.started)
                loss, state = self._train_step(x, y, state if carried else None, lr)
                n = y.numel()
                total_loss += loss * n
                total_targets += n
                elapsed = time.perf_counter() - t0
                bar.update(1)
                bar.set_postfix(loss=f"{total_loss / total_targets:.4f}",
                                chars_s=f"{total_targets / max(elapsed, 1e-9):,.0f}", lr=f"{lr:.2e}")
                if self._out_of_time():
                    break
        seconds = time.perf_counter() - t0
        val_loss = self.evaluate() if len(self.val_ids) else None
        return EpochRecord(epoch, total_loss / max(total_targets, 1), val_loss,
                           total_targets / max(seconds, 1e-9), time.perf_counter() - self.started, lr)

    def _train_step(self, x, y, state, lr: float):
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x, y = x.to(self.device), y.to(self.device)
        last_only = self.model.config.target == "last"
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None):
            logits, state = self.model(x, state, last_only=last_only)
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.clip)
        self.optimizer.step()
        self.step_count += 1
        return loss.item(), detach_state(state)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean nats/char over every validation character, conditioned on the text before it."""
        context = self.train_ids[-self.model.config.window:]
        return evaluate_ids(self.model, self.val_ids, context=context, amp_dtype=self.amp_dtype)

    # ---------------------------------------------------------------- output
    def _epoch_line(self, r: EpochRecord) -> str:
        val = "" if r.val_loss is None else f"  val_loss {r.val_loss:.4f} ({r.val_bpc:.3f} bpc)"
        return f"Epoch {r.epoch:02d}  loss {r.loss:.4f}{val}  {r.chars_per_s:,.0f} chars/s  {r.elapsed:.0f} s"

    def _trained_model(self) -> TrainedModel:
        window = self.model.config.window
        seeds = random_windows(self.train_ids, window, SEED_WINDOWS, self.config.seed)
        return TrainedModel(
            model=self.model,
            vocab=self.vocab,
            normalization=self.normalization or TrainedModel.__dataclass_fields__["normalization"].default_factory(),
            training={"config": asdict(self.config), "history": [asdict(r) for r in self.history],
                      "epoch": len(self.history)},
            seed_windows=[self.vocab.decode(row) for row in seeds],
        )

    def _save_improvement(self, record: EpochRecord) -> Path:
        loss = record.val_loss if self.config.monitor == "val_loss" else record.loss
        name = checkpoint.checkpoint_name(self.config.checkpoint_template, record.epoch, loss,
                                          val_loss=record.val_loss or 0.0)
        trained = self._trained_model()
        path = checkpoint.save(self.output_dir / name, trained)
        checkpoint.save(self.output_dir / "best.safetensors", trained)
        return path

    def _append_metrics(self, record: EpochRecord) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        row = {**asdict(record), "val_bpc": record.val_bpc}
        with open(self.output_dir / "metrics.jsonl", "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")


@torch.no_grad()
def evaluate_ids(model: CharLSTM, ids: np.ndarray, context: np.ndarray | None = None,
                 amp_dtype: torch.dtype | None = None, chunk: int = 512) -> float:
    """Cross-entropy in nats/char of ``ids`` given ``context`` before it (not scored).

    Models that predict every position read the text left to right once with the state
    carried; window models score each character from the ``window`` characters before it.
    """
    was_training = model.training
    model.eval()
    device = model.head.weight.device
    context = np.zeros(0, dtype=ids.dtype) if context is None else np.asarray(context)
    full = torch.from_numpy(np.concatenate([context, np.asarray(ids)]).astype(np.int64)).to(device)
    first = len(context)
    total = 0.0
    with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        if model.config.target == "all":
            state = None
            for start in range(0, len(full) - 1, chunk):
                x = full[start:start + chunk][None]
                y = full[start + 1:start + chunk + 1][None]
                x = x[:, :y.shape[1]]
                logits, state = model(x, state)
                losses = F.cross_entropy(logits.float()[0], y[0], reduction="none")
                scored = torch.arange(start + 1, start + 1 + y.shape[1], device=device) >= max(first, 1)
                total += losses[scored].sum().item()
            n_scored = len(full) - max(first, 1)
        else:
            window = model.config.window
            positions = torch.arange(max(first, window), len(full), device=device)
            windows = full.unfold(0, window, 1)  # row i = full[i:i+window]
            for part in positions.split(chunk):
                logits, _ = model(windows[part - window], last_only=True)
                total += F.cross_entropy(logits.float(), full[part], reduction="sum").item()
            n_scored = len(positions)
    model.train(was_training)
    return total / max(n_scored, 1)


def train(
    corpus: Corpus,
    preset: str = "default",
    log: Callable[[str], None] = print,
    progress: bool = True,
    **overrides,
) -> TrainedModel:
    """Train a model on ``corpus``; returns the best model (also saved under ``output_dir``)."""
    return fit(corpus, preset, log=log, progress=progress, **overrides).trained


def fit(corpus: Corpus, preset: str = "default", log: Callable[[str], None] = print,
        progress: bool = True, **overrides) -> TrainResult:
    """Like ``train`` but returns the whole ``TrainResult`` (history, best path, interruption)."""
    vocab = Vocab.from_text(corpus.text)
    model_config, train_config = preset_configs(preset, len(vocab), **overrides)
    ids = vocab.encode(corpus.text)
    min_len = model_config.window + 2 if train_config.batching == "windows" else train_config.batch_size * 2 + 2
    if len(ids) * (1 - train_config.val_fraction) < min_len:
        raise CharLSTMError(f"the text has {len(ids)} characters: too short for a window of "
                            f"{model_config.window} and batch size {train_config.batch_size}")
    torch.manual_seed(train_config.seed)
    model = CharLSTM(model_config)
    trainer = Trainer(model, vocab, ids, train_config, corpus=corpus, log=log, progress=progress)
    return trainer.fit()


def with_overrides(config: TrainConfig, **changes) -> TrainConfig:
    return replace(config, **{k: v for k, v in changes.items() if v is not None})
