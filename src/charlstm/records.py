"""What a checkpoint records about its training, as typed records with one JSON layout each."""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields

from .baselines import Baseline
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
class ResumeRecord:
    """The JSON half of an exact resume (``last.safetensors``); the tensors it names (optimiser
    moments, generator states, carried state) are the checkpoint's extra tensors (``train_state``)."""

    position: Position
    optimizer: dict               # optimiser type and param groups (``pack_optimizer``)
    rng: dict                     # generator positions (``pack_rng``)
    fingerprint: str | None = None  # hash of the encoded text, to warn when it changed
    world_size: int = 1           # processes of the run (DDP)
    ranks: list[dict] = field(default_factory=list)  # ranks 1..: their generators' JSON and loss sums
    run_id: str | None = None     # the run's id in its metrics rows; a resumed run keeps it

    def to_json(self) -> dict:
        return {"position": self.position.to_dict(), "optimizer": self.optimizer, "rng": self.rng,
                "fingerprint": self.fingerprint, "world_size": self.world_size, "ranks": self.ranks,
                "run_id": self.run_id}

    @classmethod
    def from_json(cls, data: dict) -> "ResumeRecord":
        return cls(Position.from_dict(_mapping(data.get("position", {}))), _mapping(data.get("optimizer", {})),
                   _mapping(data.get("rng", {})), data.get("fingerprint"), int(data.get("world_size", 1)),
                   [_mapping(r) for r in data.get("ranks", [])], data.get("run_id"))


@dataclass
class DataRecord:
    """The text a model was trained on."""

    sources: list[str] = field(default_factory=list)
    characters: int = 0
    train_characters: int = 0
    val_characters: int = 0
    fingerprint: str | None = None
    prepared: str | None = None   # the ``charlstm prepare`` folder, when trained on one
    other: dict = field(default_factory=dict)  # what other writers (scripts/train_base.py) add

    def to_json(self) -> dict:
        return {**self.other, **{k: v for k, v in asdict(self).items() if k != "other"}}

    @classmethod
    def from_json(cls, data: dict) -> "DataRecord":
        record = _known_fields(cls, data)
        record.other = {k: v for k, v in data.items() if k not in {f.name for f in fields(cls)}}
        return record


@dataclass
class KerasRecord:
    """Where an imported model came from (``import-keras``)."""

    file: str = ""
    format: str = ""
    keras_version: str = ""
    architecture: str = ""
    text: str = ""
    text_reading: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    check_nats_per_char: float | None = None

    @classmethod
    def from_json(cls, data: dict) -> "KerasRecord":
        return _known_fields(cls, data)


@dataclass
class BestEpoch:
    """The epoch with the lowest validation loss."""

    val_loss: float
    val_bpc: float
    epoch: int | None = None

    @classmethod
    def of(cls, history: list[EpochRecord]) -> "BestEpoch | None":
        scored = [r for r in history if r.val_loss is not None]
        if not scored:
            return None
        top = min(scored, key=lambda r: r.val_loss)
        return cls(top.val_loss, top.val_bpc, top.epoch)

    @classmethod
    def from_json(cls, data: dict) -> "BestEpoch | None":
        if data.get("val_loss") is None:
            return None
        val_loss = float(data["val_loss"])
        return cls(val_loss, float(data.get("val_bpc", val_loss / LN2)), data.get("epoch"))


@dataclass
class TrainingRecord:
    """A checkpoint's ``training`` metadata: how its weights came about."""

    config: dict | None = None           # the TrainConfig's fields (``TrainConfig.from_dict`` reads them)
    history: list[EpochRecord] = field(default_factory=list)
    epoch: int = 0                       # epochs trained (for an import: the Keras file name's)
    best: BestEpoch | None = None
    data: DataRecord | None = None
    baselines: list[Baseline] = field(default_factory=list)
    resume: ResumeRecord | None = None   # only in ``last.safetensors``
    init: dict | None = None             # the pretrained start (``finetune.load_init``'s record)
    keras: KerasRecord | None = None     # an imported Keras model's origin
    loss: float | None = None            # the training loss a Keras file name states
    other: dict = field(default_factory=dict)  # keys from other versions, kept as they are

    @property
    def imported_from(self) -> str | None:
        return "keras" if self.keras else None

    def to_json(self) -> dict:
        out = {**self.other, "config": self.config, "epoch": self.epoch,
               "data": self.data.to_json() if self.data else None, "baselines": [asdict(b) for b in self.baselines],
               "best": asdict(self.best) if self.best else {}}
        if self.history or "history" not in self.other:
            out["history"] = [asdict(r) for r in self.history]
        optional = {"resume": self.resume.to_json() if self.resume else None, "init": self.init,
                    "keras": asdict(self.keras) if self.keras else None, "loss": self.loss}
        out.update({k: v for k, v in optional.items() if v is not None})
        if self.keras:
            out["imported_from"] = "keras"
        return out

    @classmethod
    def from_json(cls, data: dict) -> "TrainingRecord":
        data = _mapping(data)
        known = {f.name for f in fields(cls)} | {"imported_from"}
        resume, keras, info = data.get("resume"), data.get("keras"), data.get("data")
        rows = [_mapping(r) for r in data.get("history", [])]
        typed = all(_has_fields(EpochRecord, r) for r in rows)
        if not typed:  # another layout (e.g. scripts/train_base.py's log rows): kept as it is
            known.discard("history")
        return cls(
            config=_mapping(data["config"]) if data.get("config") else None,
            history=[EpochRecord.from_dict(r) for r in rows] if typed else [],
            epoch=int(data.get("epoch", len(rows))),
            best=BestEpoch.from_json(_mapping(data.get("best") or {})),
            data=DataRecord.from_json(_mapping(info)) if info else None,
            baselines=[Baseline(str(b["name"]), float(b["bits_per_char"])) for b in data.get("baselines", [])],
            resume=ResumeRecord.from_json(_mapping(resume)) if resume else None,
            init=_mapping(data["init"]) if data.get("init") else None,
            keras=KerasRecord.from_json(_mapping(keras)) if keras else None,
            loss=float(data["loss"]) if data.get("loss") is not None else None,
            other={k: v for k, v in data.items() if k not in known},
        )

    def info_lines(self, path) -> list[str]:
        """What ``charlstm info`` says about the training."""
        lines = []
        if self.data:
            d = self.data
            lines.append(f"data: {', '.join(d.sources) or '?'}: {d.characters:,} characters "
                         f"({d.train_characters:,} training, {d.val_characters:,} validation)")
        if self.config:
            keys = ("batch_size", "bptt", "lr", "weight_decay", "optimizer", "schedule", "precision", "time_budget")
            lines.append("training: " + ", ".join(f"{k}={self.config[k]}" for k in keys if k in self.config))
        if self.keras:
            lines.append(f"imported from Keras: {self.keras.file} ({self.keras.format}), text {self.keras.text}"
                         + (f", training loss {self.loss}" if self.loss is not None else ""))
        if self.init:
            lines.append(f"fine-tuned from: {self.init.get('init')} (sha256 {str(self.init.get('sha256'))[:12]}, "
                         f"{self.init.get('characters_new', 0)} new characters)")
        lines.append(f"epochs trained: {self.epoch}")
        if self.best:
            best = self.best.val_loss
            lines.append(f"best val_loss: {best:.4f} nats/char ({best / LN2:.4f} bits/char)")
        if self.baselines:
            lines.append("compressors on the validation text: "
                         + ", ".join(f"{b.name} {b.bits_per_char:.3f}" for b in self.baselines) + " bits/char")
        if self.history:
            lines.append(f"last training loss: {self.history[-1].loss:.4f}")
        if self.resume:
            pos = self.resume.position
            lines.append(f"resumable: epoch {pos.epoch}, batch {pos.batch}, step {pos.step} "
                         f"(charlstm train --resume {path})")
        return lines


def _mapping(value) -> dict:
    if not isinstance(value, dict):
        raise TypeError(f"expected a JSON object, found {type(value).__name__}")
    return value


def _has_fields(cls, data: dict) -> bool:
    """Whether ``data`` holds every field of ``cls`` that has no default."""
    return all(f.name in data for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING)


def _known_fields(cls, data: dict):
    return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})
