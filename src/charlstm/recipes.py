"""The recipe book: ``TrainConfig``, the presets, and how options are routed to the model or the
training config."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from .errors import CharLSTMError
from .model import ModelConfig

UNLIMITED_EPOCHS = 1_000_000


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

    def validate(self) -> None:
        positive = {"epochs": self.epochs, "batch_size": self.batch_size, "bptt": self.bptt,
                    "sample_length": self.sample_length}
        for name, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise CharLSTMError(f"--{name.replace('_', '-')} must be a positive integer, not {value!r}")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise CharLSTMError(f"--lr must be positive, not {self.lr}")
        choices = {"optimizer": ("adam", "adamw"), "schedule": ("constant", "cosine"),
                   "batching": ("windows", "streams", "sentences"), "monitor": ("loss", "val_loss"),
                   "precision": ("auto", "fp32", "bf16")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise CharLSTMError(f"--{name} must be one of {', '.join(allowed)}, not {getattr(self, name)!r}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise CharLSTMError(f"--val-fraction must be in [0, 1), not {self.val_fraction}")
        if self.time_budget is not None and not self.time_budget > 0:
            raise CharLSTMError(f"--time-budget must be positive seconds, not {self.time_budget}")
        non_negative = {"clip": self.clip, "warmup_steps": self.warmup_steps, "patience": self.patience,
                        "weight_decay": self.weight_decay, "threads": self.threads,
                        "sample_every": self.sample_every}
        for name, value in non_negative.items():
            if value < 0:
                raise CharLSTMError(f"--{name.replace('_', '-')} must not be negative, not {value}")
        if not 0.0 <= self.final_lr_fraction <= 1.0:
            raise CharLSTMError(f"--final-lr-fraction must be in [0, 1], not {self.final_lr_fraction}")
        if not self.sample_temperatures or any(not 0.0 <= t <= 100.0 for t in self.sample_temperatures):
            raise CharLSTMError("--sample-temperatures must be numbers in [0, 100], e.g. 0.2,0.5,1.0")
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
        if "sample_temperatures" in values:
            values["sample_temperatures"] = tuple(values["sample_temperatures"])
        return cls(**values)


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
             patience=20),
    ),
}


# How a fine-tuning run differs from the preset's recipe (chosen by measurement: README,
# "Fine-tuning from the English base"): the weights already work, so a shorter warm-up and a
# lower peak learning rate keep the first steps from undoing them.
FINE_TUNING = dict(lr=3e-3, warmup_steps=20)


def preset_configs(preset: str, vocab_size: int, **overrides) -> tuple[ModelConfig, TrainConfig]:
    """The preset's configs with ``overrides`` (any field of either config; None = keep)."""
    if preset not in PRESETS:
        raise CharLSTMError(f"--preset must be one of {', '.join(PRESETS)}, not {preset!r}")
    model_kw, train_kw = (dict(d) for d in PRESETS[preset])
    model_over, train_over = split_overrides(overrides)
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


def _fine_tuning_preset(preset: str, config: ModelConfig) -> str:
    """The asked-for preset if it trains this kind of model, else the one that does."""
    if preset not in PRESETS:
        raise CharLSTMError(f"--preset must be one of {', '.join(PRESETS)}, not {preset!r}")
    if PRESETS[preset][0].get("target", "all") == config.target:
        return preset
    return "tutorial-small" if config.target == "last" else "default"
