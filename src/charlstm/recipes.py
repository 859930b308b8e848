"""The recipe book: ``TrainConfig``, the presets, and how options are routed to the model or the
training config."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Callable

import numpy as np

from .adaptive import choose_cutoffs
from .checkpoint import check_template
from .checks import check_device, check_float, check_int, check_seed, check_temperature, check_threads
from .data import check_val_fraction
from .errors import CharLSTMError
from .model import ModelConfig, knob

UNLIMITED_EPOCHS = 1_000_000
DEFAULT_KEEP = 3              # weights-improvement files charlstm's own recipe keeps (tutorial presets: all)


OPTIMIZERS = ("adam", "adamw")
SCHEDULES = ("constant", "cosine")
BATCHINGS = ("windows", "streams", "sentences")
MONITORS = ("loss", "val_loss")
PRECISIONS = ("auto", "fp32", "bf16")
GRADIENT_SUMS = ("auto", "gloo")
HEAD_CHOICES = ("auto", "full", "adaptive")
# --head auto: the adaptive head from this many symbols on. Measured with benchmarks/scale.py
# --vocab-only (the training step of the default model, full vs adaptive head, by vocabulary size).
ADAPTIVE_HEAD_MIN_VOCAB = 1000


@dataclass(frozen=True)
class TrainConfig:
    """How to train: the loop's knobs. A preset fills them, any option overrides them; each
    field's description is its command-line help."""

    epochs: int = knob(20, "passes over the training text (with --time-budget alone: until time is up)")
    batch_size: int = knob(64, "windows, streams or sentences per optimiser step")
    lr: float = knob(2e-3, "learning rate (the peak, after warm-up)")
    weight_decay: float = knob(0.0, "AdamW's decoupled weight decay of the weight matrices")
    optimizer: str = knob("adamw", "Adam (the tutorial's) or AdamW")
    schedule: str = knob("cosine", "learning rate after warm-up: constant, or a cosine down to the final fraction")
    warmup_steps: int = knob(100, "steps of linear warm-up from 0 to --lr")
    final_lr_fraction: float = knob(0.05, "the cosine schedule ends at lr times this")
    clip: float = knob(1.0, "max gradient norm (0 = off)")
    batching: str = knob("streams", "tutorial windows, contiguous streams (truncated BPTT) or padded sentences")
    stateful: bool = knob(False, "windows: consecutive windows in consecutive batches, LSTM state carried "
                                 "(Keras stateful=True)")
    bptt: int = knob(100, "stream piece length for truncated BPTT")
    random_offset: bool = knob(False, "start the streams at a random offset each epoch")
    val_fraction: float = knob(0.1, "held-out share at the end of the text (0 = none)")
    monitor: str = knob("val_loss", "the loss that selects checkpoints and drives --patience")
    checkpoint_template: str = knob("weights-improvement-{epoch:02d}-{loss:.4f}", "checkpoint file names, "
                                    "Keras-style, e.g. 'weights-improvement-{epoch:02d}-{loss:.4f}'")
    output_dir: str = knob("checkpoints", "folder for checkpoints and metrics")
    seed: int = knob(0, "random seed, for reproducible runs")
    device: str = knob("auto", "auto, cpu, cuda, cuda:N or mps")
    precision: str = knob("auto", "bf16 autocast where the hardware has it (auto), or always fp32 or bf16")
    gradient_sum: str = knob("auto", "under torchrun with every rank on this machine's CPU: sum the gradients "
                             "through shared memory (auto), or always with gloo's all-reduce (gloo)")
    threads: int = knob(0, "CPU threads for PyTorch (0 = its own choice)")
    time_budget: float | None = knob(None, "seconds: stop by then, the schedule planned to end on time")
    patience: int = knob(0, "stop after this many epochs without improvement (0 = never)")
    sample_every: int = knob(0, "print generated samples every N epochs (0 = never)")
    sample_temperatures: tuple[float, ...] = knob((0.2, 0.5, 1.0), "temperatures for those samples")
    sample_length: int = knob(200, "characters per sample")
    val_chars: int = knob(0, "score a fixed N-character part of the validation text, spread over it (0 = all)")
    eval_every: int = knob(0, "also validate (and keep the best) every N steps (0 = per epoch only)")
    save_every: int = knob(0, "also write last.safetensors every N steps (0 = per epoch only)")
    max_steps: int = knob(0, "stop after N optimiser steps in all, resumably, as the first Ctrl-C does (0 = no limit)")
    keep: int = knob(0, "keep the newest N weights-improvement files; best and last always stay (0 = all, as "
                        f"Keras; the default recipe keeps {DEFAULT_KEEP})")
    ignore_lock: bool = knob(False, "train into an output folder that another training is using")

    def validate(self) -> None:
        """Every value in range and finite (a NaN --clip or --weight-decay trains to a NaN model),
        the device present and the checkpoint template able to name files: all before any work."""
        for name in ("epochs", "batch_size", "bptt", "sample_length"):
            check_int(name, getattr(self, name), 1, UNLIMITED_EPOCHS if name == "epochs" else 10**9)
        for name in ("warmup_steps", "patience", "sample_every", "keep", "val_chars", "eval_every", "save_every",
                     "max_steps"):
            check_int(name, getattr(self, name), 0, 10**12)
        check_float("lr", self.lr, 0.0, 1e3, low_open=True)
        check_float("weight_decay", self.weight_decay, 0.0, 1e3)
        check_float("clip", self.clip, 0.0, 1e9)
        check_float("final_lr_fraction", self.final_lr_fraction, 0.0, 1.0)
        check_float("val_fraction", self.val_fraction, 0.0, 1.0, high_open=True)
        check_val_fraction(self.val_fraction)
        if self.time_budget is not None:
            check_float("time_budget", self.time_budget, 0.0, 1e9, low_open=True)
        check_seed(self.seed)
        check_threads(self.threads)
        choices = {"optimizer": OPTIMIZERS, "schedule": SCHEDULES, "batching": BATCHINGS, "monitor": MONITORS,
                   "precision": PRECISIONS, "gradient_sum": GRADIENT_SUMS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise CharLSTMError(f"--{name} must be one of {', '.join(allowed)}, not {getattr(self, name)!r}")
        for name in ("stateful", "random_offset", "ignore_lock"):
            if not isinstance(getattr(self, name), bool):
                raise CharLSTMError(f"--{name.replace('_', '-')} must be true or false")
        if not isinstance(self.sample_temperatures, tuple) or not self.sample_temperatures:
            raise CharLSTMError("--sample-temperatures must name at least one temperature, e.g. 0.2,0.5,1.0")
        for temperature in self.sample_temperatures:
            check_temperature(temperature, "--sample-temperatures")
        if not isinstance(self.output_dir, str) or not self.output_dir:
            raise CharLSTMError("-o must name a folder")
        if not isinstance(self.checkpoint_template, str):
            raise CharLSTMError("--checkpoint-template must be text")
        check_template(self.checkpoint_template)
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


# How a fine-tuning run differs from the preset's recipe (chosen by measurement: README,
# "Better text from a small book"): the weights already work, so a shorter warm-up and a much
# lower peak learning rate keep the steps from undoing them (from the shipped base, Alice's
# 3-minute run scored 1.136 at 3e-3 and 1.127 at 1.5e-3).
FINE_TUNING = dict(lr=1.5e-3, warmup_steps=20)
# Passes over the text a fine-tuning run plans, even when a time budget would allow more: from the
# base, Alice's validation loss is best after ~15 passes with the cosine ended (1.126 nats/char);
# with the schedule stretched over 10 minutes it overfit from the 9th pass on, and 30 passes at
# the same peak ended worse (1.131). A longer budget is not spent on making the model worse.
FINE_TUNING_PASSES = 15
# The base was trained without dropout: the default preset's 0.4 dropout and weight drop, switched
# on at once, cost the first fine-tuning epoch more than the base knew and kept Alice's run
# underfitting (training loss above validation loss after 10 minutes), so fine-tuning uses less.
FINE_TUNING_MODEL = dict(dropout=0.1, weight_drop=0.1)


# The default recipe adapts to the text and the time budget (README, "A recipe that fits the
# corpus"). Measured: the Alice row (150 kB: 2 x 256, dropout and weight drop 0.4, BPTT 50).
# The other rows are reasoned, not yet measured: a run that reads each character only a few
# times cannot overfit much, so it needs less dropout and can afford longer BPTT pieces; a wider
# network only pays once the run reads ~100 characters per parameter.
DEFAULT_RATE = 30_000  # chars/s of 2 x 256 on the 2-core CPU the rule was made on (bf16)
WIDTHS = ((512, 1e9, 4.2), (384, 2e8, 2.2), (256, 0.0, 1.0))  # units, chars read at least, time per char
REGULARISATION = ((10.0, 0.4, 50), (3.0, 0.25, 100), (1.0, 0.1, 100), (0.0, 0.0, 100))  # passes, drop, bptt
# More optimiser steps per character read: batch 32 beat the preset's 64 by 0.012-0.032 nats/char
# in every budgeted run measured (0.2 to ~90 passes, one and two threads); the preset keeps 64,
# which fine-tuning was measured with
ADAPTIVE_BATCH = 32


@dataclass(frozen=True)
class AdaptiveChoice:
    """What the default recipe picks for a text of ``train_chars`` and a budget."""

    units: int
    dropout: float
    bptt: int
    chars_read: float
    passes: float
    batch_size: int = ADAPTIVE_BATCH

    def settings(self) -> tuple[dict, dict]:
        return (dict(units=self.units, dropout=self.dropout, weight_drop=self.dropout),
                dict(bptt=self.bptt, batch_size=self.batch_size))

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


def preset_recipe(preset: str) -> tuple[dict, dict]:
    """The preset's model and training settings."""
    if preset not in PRESETS:
        raise CharLSTMError(f"--preset must be one of {', '.join(PRESETS)}, not {preset!r}")
    return PRESETS[preset]


def preset_configs(preset: str, vocab_size: int, train_chars: int | None = None,
                   log: Callable[[str], None] | None = None, symbol_counts: np.ndarray | None = None,
                   **overrides) -> tuple[ModelConfig, TrainConfig]:
    """The preset's configs with ``overrides`` (any field of either config; None = keep). With
    ``train_chars``, the default preset adapts to the text's size and the time budget first.
    The output head follows ``--head`` (auto: adaptive from ``ADAPTIVE_HEAD_MIN_VOCAB``
    symbols), its cutoffs chosen from ``symbol_counts`` (one per id) unless given."""
    model_kw, train_kw = (dict(d) for d in preset_recipe(preset))
    model_over, train_over = split_overrides(overrides)
    if preset == "default" and train_chars is not None:
        choice = adaptive_default(train_chars, train_over.get("time_budget"),
                                  train_over.get("epochs", train_kw["epochs"]))
        model_kw.update(choice.settings()[0])
        train_kw.update(choice.settings()[1])
        if log:
            log(choice.describe({**model_over, **train_over}))
    model_kw.update(model_over)
    train_kw.update(train_over)
    _resolve_head(model_kw, vocab_size, symbol_counts, log)
    return ModelConfig(vocab_size=vocab_size, **model_kw), _finish_train_config(train_kw, train_over)


def _resolve_head(model_kw: dict, vocab_size: int, counts: np.ndarray | None, log) -> None:
    """--head auto -> full or adaptive by the vocabulary's size; the adaptive head's cutoffs."""
    head = model_kw.get("head", "auto")
    if head not in HEAD_CHOICES:
        raise CharLSTMError(f"--head must be one of {', '.join(HEAD_CHOICES)}, not {head!r}")
    if head == "auto":
        head = "adaptive" if vocab_size >= ADAPTIVE_HEAD_MIN_VOCAB else "full"
    model_kw["head"] = head
    if head != "adaptive":
        return
    units = model_kw.get("units", ModelConfig.units)
    if not model_kw.get("head_cutoffs"):
        model_kw["head_cutoffs"] = choose_cutoffs(np.ones(vocab_size) if counts is None else counts, units)
    if log:
        cutoffs = tuple(model_kw["head_cutoffs"])
        log(f"adaptive output head for {vocab_size:,} symbols: the {cutoffs[0]:,} most frequent in a shortlist, "
            f"{len(cutoffs)} cluster(s) of rarer ones (ranks from {', '.join(f'{c:,}' for c in cutoffs)}); "
            "--head full for a softmax over all")


# Every setting a run may override, by name: the fields of both configs (the vocabulary size comes
# from the text). The command line passes each option of the same name.
OPTION_NAMES = frozenset(f.name for cls in (ModelConfig, TrainConfig) for f in fields(cls)) - {"vocab_size"}


def option_help(name: str) -> str:
    """The command-line help of a config field, with its default where no preset sets it."""
    found = {f.name: f for cls in (ModelConfig, TrainConfig) for f in fields(cls)}[name]
    text = found.metadata["help"]
    preset_sets_it = any(name in settings for recipe in PRESETS.values() for settings in recipe)
    if preset_sets_it or found.default is None or isinstance(found.default, bool) or "(0 = " in text:
        return text
    if name == "head":  # the config's default is what checkpoints without the field hold; runs choose
        return f"{text} (default auto: adaptive from {ADAPTIVE_HEAD_MIN_VOCAB:,} symbols)"
    if name == "head_cutoffs":
        return text
    default = ",".join(map(str, found.default)) if isinstance(found.default, tuple) else found.default
    return f"{text} (default {default})"


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


def _finish_train_config(train_kw: dict, explicit: dict, epochs_bound_budget: bool = False) -> TrainConfig:
    """The config; with a time budget the epochs stop bounding the run unless given explicitly
    (or ``epochs_bound_budget``: then the run ends at whichever of the two comes first)."""
    if "monitor" not in explicit and train_kw.get("val_fraction", TrainConfig.val_fraction) == 0:
        train_kw["monitor"] = "loss"
    if train_kw.get("time_budget") and "epochs" not in explicit and not epochs_bound_budget:
        train_kw["epochs"] = UNLIMITED_EPOCHS  # the budget decides when to stop
    config = TrainConfig(**train_kw)
    config.validate()
    return config


def _fine_tuning_preset(preset: str, config: ModelConfig) -> str:
    """The asked-for preset if it trains this kind of model, else the one that does."""
    if preset_recipe(preset)[0].get("target", "all") == config.target:
        return preset
    return "tutorial-small" if config.target == "last" else "default"
