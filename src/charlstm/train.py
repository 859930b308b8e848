"""Stage 5: the training loop. ``TrainConfig`` says how, ``Trainer`` does it.

Presets: ``tutorial-small`` and ``tutorial-large`` are the tutorial's two Keras networks and
recipes; ``default`` is charlstm's own, chosen by measurement (see the README's "Training
quality"): embedding input, every position a target, contiguous streams with the state carried
between batches (truncated BPTT) starting at a random offset each epoch, variational dropout
and weight drop, AdamW with warm-up and cosine decay planned to end on the time budget,
clipping, bf16 autocast where the hardware has it, validation-selected checkpoints.

Every epoch ends with an evaluation over the whole validation text (nats/char and bits/char,
beside the compressor baselines), a metrics row and, when it is the best so far, a checkpoint.
``last.safetensors`` always holds everything needed to resume exactly: weights, optimiser
moments, the schedule position, random-generator states and the data position (epoch, batch
and the carried recurrent state).
"""

from __future__ import annotations

import hashlib
import math
import signal
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import checkpoint
from .baselines import Baseline, compressor_baselines, format_baselines, versus_best
from .checkpoint import TrainedModel
from .corpus import Corpus
from .data import (IGNORE_INDEX, SentenceBatches, StatefulWindowBatches, StreamBatches, WindowBatches,
                   fixed_sample, random_windows, split_train_val)
from .checks import (check_device, check_float, check_int, check_memory, check_output_dir, check_seed,
                     check_temperature, check_threads, training_bytes)
from .distributed import Distributed
from .errors import CharLSTMError
from .fileio import RunLock, remove_stale_temporaries
from .metrics import MetricsLog
from .prepare import PreparedData
from .finetune import load_init
from .model import REGULARISATION_FIELDS, CharLSTM, ModelConfig, detach_state
from .train_state import pack_carry, pack_optimizer, pack_rng, restore_rng, unpack_carry, unpack_optimizer
from .vocab import Vocab

LN2 = math.log(2.0)
SEED_WINDOWS = 200
BEST_NAME = "best.safetensors"
RESUME_NAME = "last.safetensors"
UNLIMITED_EPOCHS = 1_000_000
WINDOW_EVAL_FLOATS = 1 << 26  # bound on one evaluation chunk's activations
DEFAULT_KEEP = 3              # weights-improvement files charlstm's own recipe keeps (tutorial presets: all)
BASELINE_CONTEXT = 8_000_000  # training characters the compressors see before the validation text
BASELINE_VAL = 2_000_000      # validation characters they compress (all of it for books)
RANK_PREFIX = "rank"          # last.safetensors: the other ranks' random-generator states


def _silent(message: str) -> None:
    """Ranks other than 0 print nothing."""


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 20
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.0
    optimizer: str = "adamw"            # adam | adamw
    schedule: str = "cosine"            # constant | cosine
    warmup_steps: int = 100
    final_lr_fraction: float = 0.05     # the cosine ends at lr * this
    clip: float = 1.0                   # max gradient norm, 0 = off
    batching: str = "streams"           # windows | streams | sentences
    stateful: bool = False              # windows: consecutive windows in consecutive batches, state carried
    bptt: int = 100                     # stream piece length
    random_offset: bool = False         # streams start at a random offset each epoch
    val_fraction: float = 0.1
    monitor: str = "val_loss"           # loss | val_loss
    checkpoint_template: str = "weights-improvement-{epoch:02d}-{loss:.4f}"
    output_dir: str = "checkpoints"
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"             # auto | fp32 | bf16
    threads: int = 0                    # CPU threads for torch, 0 = torch's choice
    time_budget: float | None = None    # seconds; the schedule is planned to end on time
    patience: int = 0                   # early stopping: epochs without improvement, 0 = off
    sample_every: int = 0               # print samples every N epochs, 0 = never
    sample_temperatures: tuple[float, ...] = (0.2, 0.5, 1.0)
    sample_length: int = 200
    keep: int = 0                       # weights-improvement files kept (newest), 0 = all (as Keras)
    ignore_lock: bool = False           # write into an output folder another training holds
    val_chars: int = 0                  # score this many validation characters (fixed, spread out), 0 = all
    eval_every: int = 0                 # also evaluate (and keep the best) every N steps, 0 = per epoch only
    save_every: int = 0                 # also write last.safetensors every N steps
    max_steps: int = 0                  # stop (resumably) after N optimiser steps in all, 0 = no limit

    def validate(self) -> None:
        """Every value in range and finite (a NaN --clip or --weight-decay trains to a NaN model),
        the device present and the checkpoint template able to name files: all before any work."""
        for name in ("epochs", "batch_size", "bptt", "sample_length"):
            check_int(name, getattr(self, name), 1, 10**9 if name != "epochs" else UNLIMITED_EPOCHS)
        for name in ("warmup_steps", "patience", "sample_every", "keep", "val_chars", "eval_every", "save_every",
                     "max_steps"):
            check_int(name, getattr(self, name), 0, 10**9)
        check_float("lr", self.lr, 0.0, 1e3, low_open=True)
        check_float("weight_decay", self.weight_decay, 0.0, 1e3)
        check_float("clip", self.clip, 0.0, 1e9)
        check_float("val_fraction", self.val_fraction, 0.0, 1.0, high_open=True)
        check_float("final_lr_fraction", self.final_lr_fraction, 0.0, 1.0)
        if self.time_budget is not None:
            check_float("time_budget", self.time_budget, 0.0, 1e9, low_open=True)
        check_seed(self.seed)
        check_threads(self.threads)
        choices = {"optimizer": ("adam", "adamw"), "schedule": ("constant", "cosine"),
                   "batching": ("windows", "streams", "sentences"), "monitor": ("loss", "val_loss"),
                   "precision": ("auto", "fp32", "bf16")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise CharLSTMError(f"--{name} must be one of {', '.join(allowed)}, not {getattr(self, name)!r}")
        for name in ("stateful", "random_offset", "ignore_lock"):
            if not isinstance(getattr(self, name), bool):
                raise CharLSTMError(f"--{name.replace('_', '-')} must be true or false")
        if not isinstance(self.sample_temperatures, tuple) or not self.sample_temperatures:
            raise CharLSTMError("--sample-temperatures must be numbers in [0, 100], e.g. 0.2,0.5,1.0")
        for temperature in self.sample_temperatures:
            check_temperature(temperature, "sample_temperatures")
        if not isinstance(self.output_dir, str) or not self.output_dir:
            raise CharLSTMError("-o must name a folder")
        if not isinstance(self.checkpoint_template, str):
            raise CharLSTMError("--checkpoint-template must be text")
        checkpoint.check_template(self.checkpoint_template)
        if self.device != "auto":
            check_device(self.device)
        if self.monitor == "val_loss" and self.val_fraction == 0:
            raise CharLSTMError("--monitor val_loss needs validation text: set --val-fraction above 0")
        if self.stateful and self.batching != "windows":
            raise CharLSTMError("--stateful applies to --batching windows (streams always carry the state)")

    @property
    def carries_state(self) -> bool:
        """Whether consecutive batches continue each other, so the recurrent state is carried."""
        return self.batching == "streams" or self.stateful

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        """A config stored in a checkpoint (unknown keys from other versions are ignored)."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        if isinstance(values.get("sample_temperatures"), list):
            values["sample_temperatures"] = tuple(values["sample_temperatures"])
        try:
            return cls(**values)
        except TypeError as err:
            raise CharLSTMError(f"the checkpoint's training settings are malformed ({err})") from None


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
    # chosen by measurement on Alice (README, "Training quality")
    "default": (
        dict(input="embedding", embedding_dim=64, layers=2, units=256, dropout=0.4, variational=True,
             weight_drop=0.4, target="all", window=100),
        dict(epochs=50, batch_size=64, lr=8e-3, weight_decay=0.1, optimizer="adamw", schedule="cosine",
             warmup_steps=50, clip=1.0, batching="streams", bptt=50, random_offset=True, monitor="val_loss",
             patience=20, keep=DEFAULT_KEEP),
    ),
}


# The default recipe adapts to the text and the time budget (README, "A recipe that fits the
# corpus"). Measured: the Alice row (150 kB: 2 x 256, dropout and weight drop 0.4, BPTT 50).
# The other rows are reasoned, not yet measured: a run that reads each character only a few
# times cannot overfit much, so it needs less dropout and can afford longer BPTT pieces; a wider
# network only pays once the run reads ~100 characters per parameter.
DEFAULT_RATE = 30_000  # chars/s of 2 x 256 on the 2-core CPU the rule was made on (bf16)
WIDTHS = ((512, 1e9, 4.2), (384, 2e8, 2.2), (256, 0.0, 1.0))  # units, chars read at least, time per char
REGULARISATION = ((10.0, 0.4, 50), (3.0, 0.25, 100), (1.0, 0.1, 100), (0.0, 0.0, 100))  # passes, drop, bptt


@dataclass(frozen=True)
class AdaptiveChoice:
    """What the default recipe picks for a text of ``train_chars`` and a budget."""

    units: int
    dropout: float
    bptt: int
    chars_read: float
    passes: float

    def settings(self) -> tuple[dict, dict]:
        return (dict(units=self.units, dropout=self.dropout, weight_drop=self.dropout), dict(bptt=self.bptt))

    def describe(self, explicit: dict) -> str:
        chosen = {**self.settings()[0], **self.settings()[1]}
        shown = ", ".join(f"{k.replace('_', ' ')} {explicit.get(k, v)}" + (" (yours)" if k in explicit else "")
                          for k, v in chosen.items())
        return (f"Recipe: default, adapted to {self.chars_read / max(self.passes, 1e-9):,.0f} training characters "
                f"read ~{self.passes:,.1f} times: {shown}")


def adaptive_default(train_chars: int, time_budget: float | None, epochs: int) -> AdaptiveChoice:
    """The widest network the run reads enough characters for, regularised by how often it
    reads each one."""
    for units, least, slowdown in WIDTHS:
        chars_read = time_budget * DEFAULT_RATE / slowdown if time_budget else epochs * train_chars
        if chars_read >= least:
            break
    passes = chars_read / max(train_chars, 1)
    for least_passes, drop, bptt in REGULARISATION:
        if passes >= least_passes:
            break
    return AdaptiveChoice(units, drop, bptt, chars_read, passes)


def preset_configs(preset: str, vocab_size: int, train_chars: int | None = None,
                   log: Callable[[str], None] | None = None, **overrides) -> tuple[ModelConfig, TrainConfig]:
    """The preset's configs with ``overrides`` (any field of either config; None = keep). With
    ``train_chars``, the default preset adapts to the text's size and the time budget first."""
    if preset not in PRESETS:
        raise CharLSTMError(f"--preset must be one of {', '.join(PRESETS)}, not {preset!r}")
    model_kw, train_kw = (dict(d) for d in PRESETS[preset])
    model_over, train_over = split_overrides(overrides)
    if preset == "default" and train_chars is not None:
        choice = adaptive_default(train_chars, train_over.get("time_budget"), train_over.get("epochs", train_kw["epochs"]))
        model_kw.update(choice.settings()[0])
        train_kw.update(choice.settings()[1])
        if log:
            log(choice.describe({**model_over, **train_over}))
    model_kw.update(model_over)
    train_kw.update(train_over)
    train = _finish_train_config(train_kw, train_over)
    return ModelConfig(vocab_size=vocab_size, **model_kw), train


def split_overrides(overrides: dict) -> tuple[dict, dict]:
    """Sort options into model and training settings, dropping the ones left unset (None)."""
    model_fields, train_fields = ModelConfig.__dataclass_fields__, TrainConfig.__dataclass_fields__
    model_kw, train_kw = {}, {}
    for key, value in overrides.items():
        if value is None:
            continue
        if key in model_fields:
            model_kw[key] = value
        elif key in train_fields:
            train_kw[key] = tuple(value) if key == "sample_temperatures" else value
        else:
            raise CharLSTMError(f"unknown training option {key!r}")
    return model_kw, train_kw


def _finish_train_config(train_kw: dict, explicit: dict) -> TrainConfig:
    if "monitor" not in explicit and train_kw.get("val_fraction", TrainConfig.val_fraction) == 0:
        train_kw["monitor"] = "loss"
    if train_kw.get("time_budget") and "epochs" not in explicit:
        train_kw["epochs"] = UNLIMITED_EPOCHS  # the budget decides when to stop
    config = TrainConfig(**train_kw)
    config.validate()
    return config


@dataclass
class EpochRecord:
    epoch: int
    loss: float
    val_loss: float | None
    chars_per_s: float
    elapsed: float
    lr: float
    step: int = 0
    batch: int = 0  # 0: the end of the epoch; else an --eval-every evaluation after this batch

    @property
    def val_bpc(self) -> float | None:
        return None if self.val_loss is None else self.val_loss / LN2

    def to_row(self) -> dict:
        return {**asdict(self), "bpc": self.loss / LN2, "val_bpc": self.val_bpc}

    @classmethod
    def from_dict(cls, data: dict) -> "EpochRecord":
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


@dataclass
class Position:
    """Where a run stands: enough to continue it exactly."""

    epoch: int = 1                 # the epoch being trained (1-based)
    batch: int = 0                 # the next batch of that epoch
    step: int = 0                  # optimiser steps so far
    elapsed: float = 0.0           # seconds of training so far, all sessions
    best: float | None = None      # best monitored loss so far
    epochs_since_best: int = 0
    loss_sum: float = 0.0          # this epoch's training loss so far (sum over targets)
    targets: int = 0
    epoch_seconds: float = 0.0
    best_path: str | None = None
    improvements: list[str] = field(default_factory=list)  # weights-improvement files written, oldest first

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Position":
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


@dataclass
class TrainResult:
    trained: TrainedModel
    history: list[EpochRecord] = field(default_factory=list)
    best_path: Path | None = None
    interrupted: bool = False
    resume_path: Path | None = None
    baselines: list[Baseline] = field(default_factory=list)
    stop_signal: int | None = None   # the signal that stopped the run (SIGINT or SIGTERM), if one did


def pick_device(name: str = "auto") -> torch.device:
    if name != "auto":
        return check_device(name)
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


def ids_fingerprint(ids: np.ndarray, chunk: int = 1 << 24) -> str:
    """A short hash of the encoded text, read in pieces so a memory map is never copied whole."""
    digest = hashlib.sha256()
    for start in range(0, len(ids), chunk):
        digest.update(np.ascontiguousarray(ids[start:start + chunk]).tobytes())
    return digest.hexdigest()[:16]


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
        init: dict | None = None,
        val_ids: np.ndarray | None = None,
        data: PreparedData | None = None,
        dist: Distributed = Distributed(),
    ) -> None:
        """``ids`` is split by ``val_fraction`` unless ``val_ids`` are given (prepared data,
        memory-mapped and never read whole); ``dist`` makes this one rank of a DDP run."""
        config.validate()
        self.init = init  # where the weights started: the --init record, kept in every checkpoint
        self.config = config
        self.vocab = vocab
        self.dist = dist
        self.log = log if dist.is_main else _silent
        self.progress = progress and dist.is_main
        self.normalization = corpus.normalization if corpus else (data.normalization if data else None)
        if config.threads:
            torch.set_num_threads(config.threads)
        self.device = pick_device(dist.device_name(config.device))
        self.amp_dtype = autocast_dtype(config.precision, self.device)
        torch.manual_seed(config.seed)
        self.model = model.to(self.device)
        if val_ids is None:
            self.train_ids, self.val_ids = split_train_val(ids, config.val_fraction)
        else:
            self.train_ids, self.val_ids = ids, val_ids
        if config.val_chars:
            self.val_ids = fixed_sample(self.val_ids, config.val_chars)
        self.batches = self._make_batches()
        self.ddp = self._wrap_distributed()
        self.optimizer = self._make_optimizer()
        self.position = Position()
        self.carry = None
        self.history: list[EpochRecord] = []
        self.baselines: list[Baseline] = []
        self.output_dir = Path(config.output_dir)
        self.metrics = MetricsLog(self.output_dir)
        self.data_info = {
            "sources": list(corpus.sources) if corpus else (data.sources if data else []),
            "characters": int(len(self.train_ids) + len(self.val_ids)),
            "train_characters": int(len(self.train_ids)),
            "val_characters": int(len(self.val_ids)),
            # a prepared folder is named by its manifest (sources' SHA-256): no pass over the ids
            "fingerprint": data.fingerprint if data else ids_fingerprint(ids),
        }
        if data:
            self.data_info["prepared"] = str(data.directory)
        seeds = random_windows(self.train_ids, model.config.window, SEED_WINDOWS, config.seed)
        self.seed_windows = [vocab.decode(row) for row in seeds]
        self._stop_requested = False
        self.stop_signal: int | None = None
        self.run_id = uuid.uuid4().hex[:12]   # in every metrics row; a resumed run keeps it
        self._resumed = False
        self._eval_seconds: float | None = None
        self._session_start = time.perf_counter()
        self._session_elapsed0 = 0.0

    # ---------------------------------------------------------------- set-up
    def _make_batches(self):
        c, m = self.config, self.model.config
        if c.batching == "windows":
            if m.target != "last":
                raise CharLSTMError("--batching windows trains one target per window: use --target last")
            if c.stateful:
                return StatefulWindowBatches(self.train_ids, m.window, c.batch_size)
            return WindowBatches(self.train_ids, m.window, c.batch_size, shuffle=True, seed=c.seed)
        if m.target != "all":
            raise CharLSTMError(f"--batching {c.batching} needs a model that predicts every position: "
                                f"use --target all")
        if self.dist.active and c.batching != "streams":
            raise CharLSTMError("distributed training shards contiguous streams: use --batching streams")
        if c.batching == "sentences":
            return self._sentence_batches()
        return StreamBatches(self.train_ids, c.batch_size, c.bptt, random_offset=c.random_offset, seed=c.seed,
                             shard=(self.dist.rank, self.dist.world_size))

    def _wrap_distributed(self) -> torch.nn.Module:
        """DDP averages the gradients of the ranks' equal shares of the batch, which is the
        gradient of the whole batch; dropout masks differ by rank (rank 0 keeps the seed's)."""
        if not self.dist.active:
            return self.model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        wrapped = DistributedDataParallel(self.model, device_ids=ids)
        if self.dist.rank:
            torch.manual_seed(self.config.seed + 7919 * self.dist.rank)
        return wrapped

    def _sentence_batches(self) -> SentenceBatches:
        from .sentences import sentence_spans

        spans = sentence_spans(self.vocab.decode(self.train_ids))
        batches = SentenceBatches(self.train_ids, spans, self.config.batch_size, self.model.config.window,
                                  shuffle=True, seed=self.config.seed)
        self.log(f"Sentences: {len(spans)}; {batches.long_sentences} longer than the window of "
                 f"{self.model.config.window} + 1 were cut into window-length pieces (nothing dropped); "
                 f"padding is masked out of the loss")
        return batches

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
        n_patterns = getattr(self.batches, "num_patterns", None) or self.batches.num_targets
        ranks = (f"  processes: {self.dist.world_size} (DDP, {'nccl' if self.device.type == 'cuda' else 'gloo'})"
                 if self.dist.active else "")
        return [
            f"Total Characters: {len(self.train_ids) + len(self.val_ids)}",
            f"Total Vocab: {len(self.vocab)}",
            f"Total Patterns: {n_patterns}",
            f"Validation Characters: {len(self.val_ids)}",
            f"Parameters: {self.model.num_parameters():,}  device: {self.device}  "
            f"precision: {'bf16' if self.amp_dtype else 'fp32'}  threads: {torch.get_num_threads()}{ranks}",
        ]

    # ---------------------------------------------------------------- resume
    def restore(self, trained: TrainedModel, source: str | Path = "checkpoint") -> bool:
        """Continue from ``trained``; exact when it carries a resume record (``last.safetensors``),
        otherwise fine-tune its weights with a fresh optimiser and schedule. Returns exactness."""
        record = trained.training.get("resume")
        if not record:
            self.log(f"fine-tuning {source}: it holds no optimiser state, so the optimiser and the "
                     f"schedule start fresh")
            return False
        unpack_optimizer(self.optimizer, trained.extra, record.get("optimizer", {}))
        if self.config.optimizer == "adamw":  # a changed --weight-decay wins over the saved one
            self.optimizer.param_groups[0]["weight_decay"] = self.config.weight_decay
        self.position = Position.from_dict(record.get("position", {}))
        m = self.model.config
        self.carry = unpack_carry(trained.extra, m.layers, self.config.batch_size, m.units, self.device)
        self._restore_rank_state(trained, record)
        self.history = [EpochRecord.from_dict(r) for r in trained.training.get("history", [])]
        self.init = trained.training.get("init", self.init)
        self.baselines = [Baseline(b["name"], b["bits_per_char"]) for b in trained.training.get("baselines", [])]
        self.run_id = record.get("run_id") or self.run_id
        self._resumed = True
        if record.get("fingerprint") != self.data_info["fingerprint"]:
            self.log("warning: this text differs from the one the checkpoint was trained on; "
                     "training continues, but not as an exact continuation")
        self.log(f"resuming {source}: epoch {self.position.epoch}, batch {self.position.batch}, "
                 f"step {self.position.step}")
        return True

    def request_stop(self, signum: int | None = None) -> None:
        """Stop cleanly after the current batch (what the first Ctrl-C or SIGTERM does)."""
        self._stop_requested = True
        self.stop_signal = signum

    # ---------------------------------------------------------------- schedule
    def elapsed(self) -> float:
        return self._session_elapsed0 + time.perf_counter() - self._session_start

    def _planned_steps(self) -> int:
        return self.config.epochs * len(self.batches)

    def lr_at(self, step: int, elapsed: float) -> float:
        """Linear warm-up, then a cosine from ``lr`` down to ``lr * final_lr_fraction`` that ends
        with the last planned step or, with a time budget, when the budget runs out."""
        c = self.config
        if c.warmup_steps and step < c.warmup_steps:
            return c.lr * (step + 1) / c.warmup_steps
        if c.schedule == "constant":
            return c.lr
        if c.time_budget:
            progress = elapsed / max(c.time_budget - self._reserve_seconds(), 1e-9)
        else:
            progress = step / max(1, self._planned_steps())
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return c.lr * (c.final_lr_fraction + (1 - c.final_lr_fraction) * cosine)

    def _reserve_seconds(self) -> float:
        """Time kept free at the end of a budget for the last evaluation and checkpoint."""
        if self._eval_seconds is None:
            self._eval_seconds = self._estimate_eval_seconds()
        return 1.2 * self._eval_seconds + 0.5

    def _estimate_eval_seconds(self) -> float:
        """Time a slice of the validation text (after one warm-up call that pays for kernel set-up)
        and scale it; never more than a quarter of the budget, and replaced by the first real
        evaluation's time."""
        if not len(self.val_ids):
            return 0.0
        probe = self.val_ids[: min(len(self.val_ids), 512)]
        self._evaluate_ids(probe[:64])
        start = time.perf_counter()
        self._evaluate_ids(probe)
        estimate = (time.perf_counter() - start) * len(self.val_ids) / len(probe)
        return min(estimate, 0.25 * (self.config.time_budget or math.inf))

    def _out_of_time(self) -> bool:
        budget = self.config.time_budget
        return budget is not None and self.elapsed() + self._reserve_seconds() >= budget

    # ---------------------------------------------------------------- loop
    def fit(self) -> TrainResult:
        """Train under the output folder's lock (one training per folder; a killed run's lock
        dies with it), after removing the temporary files a killed run left there."""
        if not self.dist.is_main:  # rank 0 alone writes, so it alone holds the folder
            return self._fit_locked()
        check_output_dir(self.output_dir)
        with RunLock(self.output_dir, self.run_id).acquire(force=self.config.ignore_lock):
            for stale in remove_stale_temporaries(self.output_dir):
                self.log(f"removed {stale.name}, left by a run that was killed while writing")
            if self._resumed:  # rows a killed session logged after its last save are about to be redone
                self.metrics.forget(self.run_id, after_step=self.position.step)
            return self._fit_locked()

    def _fit_locked(self) -> TrainResult:
        for line in self.summary_lines():
            self.log(line)
        if len(self.val_ids) and not self.baselines and self.dist.is_main:
            # compressors only look back so far; a bounded context keeps this quick on big corpora
            context = self.train_ids[-BASELINE_CONTEXT:]
            self.baselines = compressor_baselines(self.vocab.decode(context),
                                                  self.vocab.decode(self.val_ids[:BASELINE_VAL]))
        if self.baselines:
            self.log(f"Compressor baselines on the validation text (bits/char): {format_baselines(self.baselines)}")
        result = TrainResult(trained=self._trained_model(), baselines=self.baselines)
        self._session_start = time.perf_counter()
        self._session_elapsed0 = self.position.elapsed
        self._stop_requested = False
        with _stop_on_first_interrupt(self):
            try:
                self._loop(result)
            except KeyboardInterrupt:
                result.interrupted = True
                kept = self.position.best_path or "nothing saved yet"
                self.log(f"\ninterrupted; the last good checkpoint is kept: {kept}")
        result.history = self.history
        result.stop_signal = self.stop_signal
        result.best_path = Path(self.position.best_path) if self.position.best_path else None
        result.trained = self._trained_model()
        self.dist.barrier()  # rank 0 has written the best checkpoint
        if result.best_path and result.best_path.is_file():
            result.trained = checkpoint.load(result.best_path, device=self.device)
        self._log_summary()
        return result

    def _loop(self, result: TrainResult) -> None:
        while self.position.epoch <= self.config.epochs:
            outcome = self._train_epoch()
            if outcome in ("stopped", "step limit"):
                result.interrupted = outcome == "stopped"
                result.resume_path = self._save_resume()
                reason = "stopped" if result.interrupted else f"--max-steps {self.config.max_steps} reached"
                self.log(f"\n{reason} at epoch {self.position.epoch}, batch {self.position.batch}; "
                         f"resume with --resume {result.resume_path}")
                return
            record = self._finish_epoch()
            result.resume_path = self._save_resume()
            if self.config.patience and self.position.epochs_since_best >= self.config.patience:
                self.log(f"early stopping: no improvement in {self.config.patience} epochs")
                return
            if outcome == "out of time" or self._out_of_time():
                self.log(f"time budget of {self.config.time_budget:.0f} s reached after epoch {record.epoch}")
                return

    def _train_epoch(self) -> str:
        """Train the rest of the current epoch: 'done', 'out of time' or 'stopped'."""
        pos = self.position
        self.model.train()
        carried = self.config.carries_state
        state = self.carry if (carried and pos.batch) else None
        bar = tqdm(total=len(self.batches), initial=pos.batch, desc=f"Epoch {pos.epoch}",
                   disable=not self.progress, leave=False, unit="batch", dynamic_ncols=True)
        outcome = "done"
        with bar:
            for x, y in self.batches.epoch(pos.epoch, start_batch=pos.batch):
                t0 = time.perf_counter()
                lr = self.lr_at(pos.step, self.elapsed())
                if self.dist.active:  # every rank stops at the same step, with rank 0's schedule
                    stop, (lr, late) = self.dist.agree(self._stop_requested, [lr, float(self._out_of_time())],
                                                       self.device)
                    if stop or late:
                        outcome = "stopped" if stop else "out of time"
                        break
                loss, state = self._train_step(x, y, state if carried else None, lr)
                targets = int((y != IGNORE_INDEX).sum()) if self.config.batching == "sentences" else y.numel()
                pos.loss_sum += loss * targets
                pos.targets += targets
                pos.batch += 1
                pos.epoch_seconds += time.perf_counter() - t0
                self.carry = state if carried else None
                bar.update(1)
                bar.set_postfix(loss=f"{pos.loss_sum / pos.targets:.4f}",
                                chars_s=f"{pos.targets * self.dist.world_size / max(pos.epoch_seconds, 1e-9):,.0f}",
                                lr=f"{lr:.2e}")
                self._every_steps(pos.batch < len(self.batches))
                if self.config.max_steps and pos.step >= self.config.max_steps:
                    outcome = "step limit"
                    break
                if self.dist.active:
                    continue
                if self._stop_requested:
                    outcome = "stopped"
                    break
                if self._out_of_time():
                    outcome = "out of time"
                    break
        pos.elapsed = self.elapsed()
        return outcome

    def _train_step(self, x, y, state, lr: float):
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x, y = x.to(self.device), y.to(self.device)
        last_only = self.model.config.target == "last"
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None):
            logits, state = self.ddp(x, state, last_only=last_only)
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1),
                                   ignore_index=IGNORE_INDEX)
        if not torch.isfinite(loss):
            self._diverged(f"the training loss became {loss.item()}")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.clip)
        self.optimizer.step()
        self.position.step += 1
        return loss.item(), detach_state(state)

    def _every_steps(self, mid_epoch: bool) -> None:
        """--eval-every / --save-every: an epoch over a big corpus is long."""
        c, step = self.config, self.position.step
        if c.eval_every and step % c.eval_every == 0 and mid_epoch:
            self.model.eval()
            self._record_evaluation(batch=self.position.batch)
            self.model.train()
        if c.save_every and step % c.save_every == 0 and mid_epoch:
            self._save_resume()

    def _diverged(self, what: str) -> None:
        """A NaN or infinite loss: stop, and never save the broken weights as anything."""
        pos = self.position
        kept = self.position.best_path or "none was saved yet"
        raise CharLSTMError(f"{what} at epoch {pos.epoch}, batch {pos.batch + 1}: training stopped; the last "
                            f"good checkpoint is kept ({kept}); try a lower --lr or a --clip")

    def _finish_epoch(self) -> EpochRecord:
        """Evaluate, log, keep the checkpoint if it improved, print samples; then move on."""
        pos = self.position
        record = self._record_evaluation()
        if self.config.sample_every and record.epoch % self.config.sample_every == 0 and self.dist.is_main:
            self._print_samples(record.epoch)
        pos.epoch, pos.batch = pos.epoch + 1, 0
        pos.loss_sum, pos.targets, pos.epoch_seconds = 0.0, 0, 0.0
        self.carry = None
        return record

    def _record_evaluation(self, batch: int = 0) -> EpochRecord:
        """Validation loss and the epoch's training loss so far (summed over ranks): a metrics
        row, a log line, and the checkpoint when the monitored loss improved."""
        pos = self.position
        val_loss = self.evaluate() if len(self.val_ids) else None
        if val_loss is not None and not math.isfinite(val_loss):
            self._diverged(f"the validation loss became {val_loss}")
        pos.elapsed = self.elapsed()
        loss_sum, targets = self.dist.sum([pos.loss_sum, pos.targets], self.device)
        record = EpochRecord(pos.epoch, loss_sum / max(targets, 1), val_loss,
                             targets / max(pos.epoch_seconds, 1e-9), pos.elapsed,
                             self.lr_at(pos.step, pos.elapsed), pos.step, batch)
        self.history.append(record)
        if self.dist.is_main:
            self.metrics.append({"run_id": self.run_id, **record.to_row()})
        self.log(self._epoch_line(record))
        monitored = record.val_loss if self.config.monitor == "val_loss" else record.loss
        if pos.best is None or monitored < pos.best:
            improvement = "" if pos.best is None else f" improved from {pos.best:.4f}"
            pos.best, pos.epochs_since_best = monitored, 0
            pos.best_path = str(self._save_improvement(record))
            self.log(f"Epoch {record.epoch:02d}: {self.config.monitor}{improvement} to {monitored:.4f}, "
                     f"saving {pos.best_path}")
        else:
            pos.epochs_since_best += 1
        return record

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean nats/char over every validation character, conditioned on the text before it;
        under DDP each rank scores its own contiguous piece and the sums are added."""
        start = time.perf_counter()
        piece, offset = self.dist.shard(self.val_ids)
        if offset == 0:  # the validation text follows the training text
            mean = self._evaluate_ids(piece)
        else:
            window = self.model.config.window
            mean = self._evaluate_ids(piece, self.val_ids[max(0, offset - window):offset])
        total, count = self.dist.sum([mean * len(piece), len(piece)], self.device)
        self._eval_seconds = time.perf_counter() - start
        return total / max(count, 1)

    def _evaluate_ids(self, ids: np.ndarray, context: np.ndarray | None = None) -> float:
        if context is None:
            context = self.train_ids[-self.model.config.window:]
        return evaluate_ids(self.model, ids, context=context, amp_dtype=self.amp_dtype)

    # ---------------------------------------------------------------- output
    def _epoch_line(self, r: EpochRecord) -> str:
        val = ""
        if r.val_loss is not None:
            versus = versus_best(r.val_bpc, self.baselines)
            val = f"  val_loss {r.val_loss:.4f} ({r.val_bpc:.3f} bpc{'; ' + versus if versus else ''})"
        where = f" step {r.step}" if r.batch else ""
        return (f"Epoch {r.epoch:02d}{where}  loss {r.loss:.4f}{val}  {r.chars_per_s:,.0f} chars/s  "
                f"lr {r.lr:.2e}  {r.elapsed:.0f} s")

    def _log_summary(self) -> None:
        vals = [r.val_loss for r in self.history if r.val_loss is not None]
        if vals:
            best = min(vals)
            self.log(f"best val_loss {best:.4f} nats/char = {best / LN2:.3f} bits/char "
                     f"(compressors: {format_baselines(self.baselines)} bits/char)")

    def _print_samples(self, epoch: int) -> None:
        from .generate import Generator, SamplingConfig  # generation is a later stage

        trained = self._trained_model()
        prime = self.seed_windows[epoch % len(self.seed_windows)]
        generator = Generator(trained, device=self.device)
        try:
            for temperature in self.config.sample_temperatures:
                text = generator.generate(prime, self.config.sample_length,
                                          sampling=SamplingConfig(temperature=temperature), seed=epoch)
                self.log(f"----- sample after epoch {epoch}, temperature {temperature}:\n{prime}|{text}")
        finally:
            self.model.train()

    def _training_record(self) -> dict:
        best = {}
        vals = [r for r in self.history if r.val_loss is not None]
        if vals:
            top = min(vals, key=lambda r: r.val_loss)
            best = {"epoch": top.epoch, "val_loss": top.val_loss, "val_bpc": top.val_bpc}
        return {
            "config": asdict(self.config),
            "history": [asdict(r) for r in self.history],
            "epoch": sum(1 for r in self.history if not r.batch),
            "data": self.data_info,
            "baselines": [asdict(b) for b in self.baselines],
            "best": best,
            **({"init": self.init} if self.init else {}),
        }

    def _trained_model(self, extra: dict | None = None, resume: dict | None = None) -> TrainedModel:
        training = self._training_record()
        if resume is not None:
            training["resume"] = resume
        return TrainedModel(
            model=self.model,
            vocab=self.vocab,
            normalization=self.normalization or TrainedModel.__dataclass_fields__["normalization"].default_factory(),
            training=training,
            seed_windows=self.seed_windows,
            extra=extra or {},
        )

    def _save_improvement(self, record: EpochRecord) -> Path:
        loss = record.val_loss if self.config.monitor == "val_loss" else record.loss
        name = checkpoint.checkpoint_name(self.config.checkpoint_template, record.epoch, loss,
                                          val_loss=record.val_loss or 0.0)
        if not self.dist.is_main:  # one writer; the other ranks only track the name
            return self.output_dir / name
        trained = self._trained_model()
        path = checkpoint.save(self.output_dir / name, trained)
        checkpoint.save(self.output_dir / BEST_NAME, trained)
        self._retain(path)
        return path

    def _retain(self, newest: Path) -> None:
        """Keep the newest ``--keep N`` improvement files of this run (0 = all, as Keras); say what goes."""
        kept = [p for p in self.position.improvements if p != str(newest)] + [str(newest)]
        keep = self.config.keep
        while keep and len(kept) > keep:
            old = Path(kept.pop(0))
            try:
                old.unlink()
                self.log(f"removed {old.name} (--keep {keep}: the newest {keep} improvements, best and last stay)")
            except FileNotFoundError:
                pass
            except OSError as err:
                self.log(f"warning: could not remove {old} ({err.strerror})")
        self.position.improvements = kept

    def _save_resume(self) -> Path:
        """``last.safetensors``: weights plus everything an exact resume needs. Under DDP every
        rank's part (its streams' carried state, random generators, loss sums) is gathered, the
        carried state into one global batch laid out as a single process would have it."""
        path = self.output_dir / RESUME_NAME
        rng_tensors, rng_meta = pack_rng()
        mine = (pack_carry(self.carry), rng_tensors, rng_meta, [self.position.loss_sum, self.position.targets])
        parts = self.dist.gather(mine)
        if not self.dist.is_main:
            return path
        optim_tensors, optim_meta = pack_optimizer(self.optimizer)
        carries = [p[0] for p in parts]
        carry = {k: torch.cat([c[k] for c in carries], dim=1) for k in carries[0]} if carries[0] else {}
        extra = {**optim_tensors, **rng_tensors, **carry}
        ranks = []
        for rank, (_, tensors, meta, sums) in enumerate(parts[1:], start=1):
            extra.update({f"{RANK_PREFIX}{rank}.{k}": v for k, v in tensors.items()})
            ranks.append({"rng": meta, "loss_sum": sums[0], "targets": sums[1]})
        resume = {"position": self.position.to_dict(), "optimizer": optim_meta, "rng": rng_meta,
                  "fingerprint": self.data_info["fingerprint"], "world_size": self.dist.world_size,
                  "run_id": self.run_id,
                  "ranks": ranks}
        return checkpoint.save(path, self._trained_model(extra, resume))

    def _restore_rank_state(self, trained: TrainedModel, record: dict) -> None:
        """This rank's random generators, streams' carried state and loss sums; exact when the
        world size is the one the checkpoint was written with."""
        saved_world = int(record.get("world_size", 1))
        if self.carry is not None and self.dist.active:
            rows = self.dist.rows(self.config.batch_size)
            self.carry = [(h[:, rows].contiguous(), c[:, rows].contiguous()) for h, c in self.carry]
        if saved_world != self.dist.world_size:
            self.log(f"warning: the checkpoint was written by {saved_world} processes, this run has "
                     f"{self.dist.world_size}: it continues, but random draws differ from an unbroken run")
        if self.dist.rank == 0 or saved_world != self.dist.world_size:
            restore_rng(trained.extra, record.get("rng", {}))
            return
        rank_record = record.get("ranks", [])[self.dist.rank - 1]
        prefix = f"{RANK_PREFIX}{self.dist.rank}."
        restore_rng({k[len(prefix):]: v for k, v in trained.extra.items() if k.startswith(prefix)},
                    rank_record.get("rng", {}))
        self.position.loss_sum, self.position.targets = rank_record["loss_sum"], int(rank_record["targets"])


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def _stop_on_first_interrupt(trainer: Trainer):
    """First Ctrl-C or SIGTERM: finish the batch, save the resume checkpoint, stop. A second
    signal: stop at once (the last completed checkpoint stays)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if trainer._stop_requested:
            raise KeyboardInterrupt
        trainer.request_stop(signum)
        trainer.log("\nstopping after this batch (Ctrl-C again to stop at once)")

    previous = {signum: signal.signal(signum, handler) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


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
    with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        if model.config.target == "all":
            with _one_cpu_thread(device):
                total, n_scored = _stream_losses(model, full, len(context), chunk)
        else:
            total, n_scored = _window_losses(model, full, len(context), chunk)
    model.train(was_training)
    return total / max(n_scored, 1)


@torch.no_grad()
def _stream_losses(model: CharLSTM, full: torch.Tensor, first: int, chunk: int) -> tuple[float, int]:
    """Sum of losses of full[max(first, 1):], reading ``full`` once with the state carried."""
    total, state = 0.0, None
    for start in range(0, len(full) - 1, chunk):
        x = full[start:start + chunk][None]
        y = full[start + 1:start + chunk + 1][None]
        logits, state = model(x[:, :y.shape[1]], state)
        losses = F.cross_entropy(logits.float()[0], y[0], reduction="none")
        scored = torch.arange(start + 1, start + 1 + y.shape[1], device=full.device) >= max(first, 1)
        total += losses[scored].sum().item()
    return total, len(full) - max(first, 1)


@torch.no_grad()
def _window_losses(model: CharLSTM, full: torch.Tensor, first: int, chunk: int) -> tuple[float, int]:
    """Sum of losses of every character after the first ``max(first, window)``, each predicted
    from the ``window`` characters before it (the tutorial's way), ``chunk`` windows at a time."""
    window = model.config.window
    positions = torch.arange(max(first, window), len(full), device=full.device)
    windows = full.unfold(0, window, 1)  # row i = full[i:i+window]
    # a chunk's gate activations (windows x window x 4 units floats) stay under ~256 MB
    chunk = max(1, min(chunk, WINDOW_EVAL_FLOATS // (window * 4 * model.config.units)))
    total = 0.0
    for part in positions.split(chunk):
        logits, _ = model(windows[part - window], last_only=True)
        total += F.cross_entropy(logits.float(), full[part], reduction="sum").item()
    return total, len(positions)


@contextmanager
def _one_cpu_thread(device: torch.device):
    """Reading one stream step by step is latency-bound: a second CPU thread only adds
    synchronisation, which on a busy machine made it hundreds of times slower here."""
    threads = torch.get_num_threads()
    if device.type == "cpu" and threads > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


# How a fine-tuning run differs from the preset's recipe (chosen by measurement: README,
# "Fine-tuning from the English base"): the weights already work, so a shorter warm-up and a
# lower peak learning rate keep the first steps from undoing them.
FINE_TUNING = dict(lr=3e-3, warmup_steps=20)


def train(
    corpus: Corpus,
    preset: str = "default",
    log: Callable[[str], None] = print,
    progress: bool = True,
    **overrides,
) -> TrainedModel:
    """Train a model on ``corpus``; returns the best model (also saved under ``output_dir``)."""
    return fit(corpus, preset, log=log, progress=progress, **overrides).trained


def fit(corpus: Corpus | None = None, preset: str = "default", log: Callable[[str], None] = print,
        progress: bool = True, resume: str | Path | None = None, init: str | Path | None = None,
        data: PreparedData | str | Path | None = None, dist: Distributed = Distributed(),
        **overrides) -> TrainResult:
    """Like ``train`` but returns the whole ``TrainResult`` (history, best path, interruption).

    ``resume``: a checkpoint to continue from. ``last.safetensors`` continues exactly (same
    settings unless overridden); any other checkpoint, e.g. an imported Keras model, is
    fine-tuned with its own model settings and a fresh optimiser.

    ``init``: start from a pretrained model (``"english"``, the shipped base, or a checkpoint
    path) remapped onto this corpus's characters, with the preset's regularisation and the
    fine-tuning schedule (``FINE_TUNING``); explicit options win.

    ``data``: a folder written by ``charlstm prepare`` (or its ``PreparedData``) instead of a
    corpus: its memory-mapped ids and validation part are used as they are. ``dist``: this
    process's place in a ``torchrun`` group (``Distributed.from_env()``).
    """
    if resume is not None and init is not None:
        raise CharLSTMError("--init starts a new run and --resume continues one: pass only one of them")
    if (corpus is None) == (data is None):
        raise CharLSTMError("train on either a text or prepared data (--data DIR), not both or neither")
    if data is not None and not isinstance(data, PreparedData):
        data = PreparedData.open(data)
    if init is not None:
        if data is not None:
            raise CharLSTMError("--init remaps a model onto a text's characters; it does not take --data")
        return _fit_from_init(corpus, init, preset, log, progress, overrides)
    if resume is not None:
        return _fit_resumed(corpus, Path(resume), preset, log, progress, overrides, data=data, dist=dist)
    if data is not None:
        overrides.setdefault("val_fraction", None)
        if overrides["val_fraction"] is None:  # the prepared split decides; this only keeps checks consistent
            overrides["val_fraction"] = data.manifest.get("val_fraction", 0.0)
    vocab = data.vocab if data is not None else Vocab.from_text(corpus.text)
    model_config, train_config = preset_configs(preset, len(vocab), train_chars=_training_chars(corpus, data, overrides),
                                                log=log, **overrides)
    ids, val_ids = (data.train_ids, data.val_ids) if data is not None else (vocab.encode(corpus.text), None)
    _check_length(ids, model_config, train_config, prepared=data is not None)
    _check_memory(model_config, train_config)
    torch.manual_seed(train_config.seed)
    model = CharLSTM(model_config)
    trainer = Trainer(model, vocab, ids, train_config, corpus=corpus, log=log, progress=progress,
                      val_ids=val_ids, data=data, dist=dist)
    return trainer.fit()


def _training_chars(corpus: Corpus | None, data: PreparedData | None, overrides: dict) -> int:
    """How many characters the run trains on (the adaptive recipe's measure of the text)."""
    if data is not None:
        return len(data.train_ids)
    val_fraction = overrides.get("val_fraction")
    return int(len(corpus.text) * (1 - (TrainConfig.val_fraction if val_fraction is None else val_fraction)))


def _fit_from_init(corpus: Corpus, init: str | Path, preset: str, log, progress: bool,
                   overrides: dict) -> TrainResult:
    vocab = Vocab.from_text(corpus.text)
    model_over, train_over = split_overrides(overrides)
    preset_model, preset_train = PRESETS[_fine_tuning_preset(preset, ModelConfig(vocab_size=1))]
    regularisation = {k: v for k, v in preset_model.items() if k in REGULARISATION_FIELDS}
    started = load_init(init, vocab, {**regularisation, **model_over})
    train_config = _finish_train_config({**preset_train, **FINE_TUNING, **train_over}, train_over)
    ids = vocab.encode(corpus.text)
    _check_length(ids, started.model.config, train_config)
    record = started.record
    new = "".join(record["new_characters"])
    log(f"starting from {record['init']} ({started.model.num_parameters():,} parameters): "
        f"{record['characters_shared']} of the text's {len(vocab)} characters known"
        + (f", new: {new!r}" if new else ""))
    trainer = Trainer(started.model, vocab, ids, train_config, corpus=corpus, log=log, progress=progress,
                      init=record)
    return trainer.fit()


def _fit_resumed(corpus: Corpus | None, path: Path, preset: str, log, progress: bool, overrides: dict,
                 data: PreparedData | None = None, dist: Distributed = Distributed()) -> TrainResult:
    trained = checkpoint.load(path)
    model_over, train_over = split_overrides(overrides)
    model = _with_regularisation(trained.model, model_over)
    saved = trained.training.get("config")
    if saved and trained.training.get("resume"):
        train_kw = {**asdict(TrainConfig.from_dict(saved)), **train_over}
    else:
        train_kw = {**PRESETS[_fine_tuning_preset(preset, model.config)][1], **train_over}
    train_config = _finish_train_config(train_kw, train_over)
    source = data if data is not None else corpus
    if source.normalization != trained.normalization:
        log("warning: the text is normalised differently from the checkpoint's training text")
    if data is not None:
        if data.vocab != trained.vocab:
            raise CharLSTMError(f"{path}: its vocabulary ({len(trained.vocab)} symbols) is not the one of "
                                f"{data.directory} ({len(data.vocab)}); resume on the data it was trained on")
        ids, val_ids = data.train_ids, data.val_ids
    else:
        ids, val_ids = trained.vocab.encode(corpus.text), None
    _check_length(ids, model.config, train_config, prepared=data is not None)
    trainer = Trainer(model, trained.vocab, ids, train_config, corpus=corpus, log=log, progress=progress,
                      val_ids=val_ids, data=data, dist=dist)
    trainer.restore(trained, source=path)
    return trainer.fit()


def _fine_tuning_preset(preset: str, config: ModelConfig) -> str:
    """The asked-for preset if it trains this kind of model, else the one that does."""
    if preset not in PRESETS:
        raise CharLSTMError(f"--preset must be one of {', '.join(PRESETS)}, not {preset!r}")
    if PRESETS[preset][0].get("target", "all") == config.target:
        return preset
    return "tutorial-small" if config.target == "last" else "default"


def _with_regularisation(model: CharLSTM, model_over: dict) -> CharLSTM:
    """The same weights with new dropout settings; anything else cannot change on resume."""
    fixed = sorted(k for k in model_over if k not in REGULARISATION_FIELDS
                   and model_over[k] != getattr(model.config, k))
    if fixed:
        raise CharLSTMError(f"--{fixed[0].replace('_', '-')} cannot change when resuming a checkpoint "
                            f"(only {', '.join(REGULARISATION_FIELDS)} can)")
    if not model_over:
        return model
    new = CharLSTM(replace(model.config, **model_over))
    new.load_state_dict(model.state_dict())
    return new


def _check_memory(model_config: ModelConfig, train_config: TrainConfig) -> None:
    """Refuse a model whose training would not fit in memory, before allocating it."""
    steps = model_config.window if train_config.batching != "streams" else train_config.bptt
    check_memory(training_bytes(checkpoint.parameter_count(model_config), train_config.batch_size, steps,
                                model_config.units, model_config.layers, model_config.vocab_size),
                 f"training {model_config.layers} x {model_config.units} units")


def _check_length(ids: np.ndarray, model_config: ModelConfig, train_config: TrainConfig,
                  prepared: bool = False) -> None:
    spare = train_config.bptt - 1 if train_config.random_offset else 0
    min_len = (model_config.window + 2 if train_config.batching == "windows"
               else train_config.batch_size * 2 + 2 + spare)
    if len(ids) * (1 if prepared else 1 - train_config.val_fraction) < min_len:
        raise CharLSTMError(f"the text has {len(ids)} characters: too short for a window of "
                            f"{model_config.window} and batch size {train_config.batch_size}")


def with_overrides(config: TrainConfig, **changes) -> TrainConfig:
    return replace(config, **{k: v for k, v in changes.items() if v is not None})
