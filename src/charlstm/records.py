"""What a checkpoint records about its training, as typed records with one JSON layout each."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from .evaluate import LN2


@dataclass
class EpochRecord:
    epoch: int
    loss: float
    val_loss: float | None
    chars_per_s: float
    elapsed: float
    lr: float
    step: int = 0

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

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Position":
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})
