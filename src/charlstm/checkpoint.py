"""Checkpoints: one self-contained ``.safetensors`` file per save.

Tensors: the model's weights under ``model.``, optional extra tensors (optimiser state for
resuming) under their own prefixes. Metadata: one JSON document under the key ``charlstm``
holding the model config, vocabulary, text normalisation, training record and seed windows,
so that generating never needs the corpus. Files are written atomically and validated on
load (header size, JSON, config ranges, every tensor's name and shape); nothing is unpickled.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

from .corpus import Normalization
from .errors import CharLSTMError
from .fileio import atomic_write_bytes
from .model import CharLSTM, ModelConfig
from .records import TrainingRecord
from .vocab import Vocab

FORMAT = "charlstm"
FORMAT_VERSION = 1
MODEL_PREFIX = "model."
MAX_HEADER_BYTES = 64 * 1024 * 1024
SUFFIX = ".safetensors"
SEED_WINDOWS = 200                # random training windows stored as generation seeds


@dataclass
class TrainedModel:
    """Everything generation needs: network, vocabulary, normalisation and training record."""

    model: CharLSTM
    vocab: Vocab
    normalization: Normalization = field(default_factory=Normalization)
    training: TrainingRecord = field(default_factory=TrainingRecord)
    seed_windows: list[str] = field(default_factory=list)
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    path: Path | None = field(default=None, compare=False)  # the file it was loaded from

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    def info_lines(self, path: str | Path) -> list[str]:
        """What ``charlstm info`` prints: the network, its vocabulary, and how it was trained."""
        return [
            f"checkpoint: {path}",
            "model: " + ", ".join(f"{k}={v}" for k, v in self.config.to_dict().items()),
            f"parameters: {self.model.num_parameters():,}",
            f"vocabulary: {len(self.vocab)} characters {_shown_chars(self.vocab.chars)}"
            + (f", unknown symbol {self.vocab.unknown_char!r}" if self.vocab.unknown_char else ""),
            "normalization: " + ", ".join(f"{k}={v}" for k, v in self.normalization.to_dict().items()),
            *self.training.info_lines(path),
        ]

    def metadata(self) -> dict:
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "model": self.config.to_dict(),
            "vocab": self.vocab.to_jsonable(),
            "normalization": self.normalization.to_dict(),
            "training": self.training.to_json(),
            "seed_windows": self.seed_windows,
        }


def _shown_chars(chars: tuple[str, ...], limit: int = 200) -> str:
    """All of a small alphabet; the start of a large one (a CJK vocabulary has thousands)."""
    shown = "".join(chars[:limit])
    return repr(shown) + (f" and {len(chars) - limit:,} more" if len(chars) > limit else "")


def seed_windows(vocab: Vocab, ids: np.ndarray, window: int, seed: int, count: int = SEED_WINDOWS) -> list[str]:
    """``count`` random windows of the training text, decoded: the seeds a checkpoint carries so that
    generating can start as the tutorial does (from a random window) without the corpus."""
    if len(ids) <= window:
        return [vocab.decode(ids)]
    starts = np.random.default_rng(seed).integers(0, len(ids) - window, size=count)
    return [vocab.decode(ids[s:s + window]) for s in starts]


def checkpoint_name(template: str, epoch: int, loss: float, **fields) -> str:
    """Fill a Keras-style template such as ``weights-improvement-{epoch:02d}-{loss:.4f}``."""
    try:
        name = template.format(epoch=epoch, loss=loss, **fields)
    except (KeyError, IndexError, ValueError) as err:
        raise CharLSTMError(f"--checkpoint-template {template!r}: {err}") from None
    return name if name.endswith(SUFFIX) else name + SUFFIX


def save(path: str | Path, trained: TrainedModel) -> Path:
    tensors = {MODEL_PREFIX + k: v.detach().to("cpu").contiguous() for k, v in trained.model.state_dict().items()}
    for key, value in trained.extra.items():
        if key.startswith(MODEL_PREFIX):
            raise ValueError(f"extra tensor name {key!r} clashes with the model's prefix")
        tensors[key] = value.detach().to("cpu").contiguous()
    meta = {FORMAT: json.dumps(trained.metadata(), ensure_ascii=False)}
    return atomic_write_bytes(path, safetensors_bytes(tensors, metadata=meta))


def load(path: str | Path, device: str | torch.device = "cpu") -> TrainedModel:
    path = Path(path)
    _check_header(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            raw_meta = (handle.metadata() or {}).get(FORMAT)
            if raw_meta is None:
                raise CharLSTMError(f"{path}: a safetensors file, but not a charlstm checkpoint")
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except SafetensorError as err:
        raise CharLSTMError(f"{path}: corrupted or truncated checkpoint ({err})") from None
    meta = _parse_metadata(path, raw_meta)
    try:
        config = ModelConfig.from_dict(meta["model"])
        vocab = Vocab.from_json(meta["vocab"])
        normalization = Normalization.from_dict(meta.get("normalization", {}))
        training = TrainingRecord.from_json(meta.get("training", {}))
    except (KeyError, TypeError, ValueError) as err:
        raise CharLSTMError(f"{path}: incomplete checkpoint metadata ({err})") from None
    if len(vocab) != config.vocab_size:
        raise CharLSTMError(f"{path}: vocabulary has {len(vocab)} characters, model expects {config.vocab_size}")
    model = CharLSTM(config)
    model.load_state_dict(_model_weights(path, model, tensors))
    extra = {k: v for k, v in tensors.items() if not k.startswith(MODEL_PREFIX)}
    return TrainedModel(
        model=model.to(device).eval(),
        vocab=vocab,
        normalization=normalization,
        training=training,
        seed_windows=[s for s in meta.get("seed_windows", []) if isinstance(s, str)],
        extra=extra,
        path=path,
    )


def _check_header(path: Path) -> None:
    if not path.is_file():
        raise CharLSTMError(f"{path}: no such checkpoint file")
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
    if len(head) < 8:
        raise CharLSTMError(f"{path}: too short to be a checkpoint ({size} bytes)")
    (header_len,) = struct.unpack("<Q", head)
    if header_len > MAX_HEADER_BYTES or header_len + 8 > size:
        raise CharLSTMError(f"{path}: not a charlstm checkpoint (not a safetensors file, or truncated)")


def _parse_metadata(path: Path, raw: str) -> dict:
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError:
        raise CharLSTMError(f"{path}: checkpoint metadata is not valid JSON") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CharLSTMError(f"{path}: not a charlstm checkpoint")
    if meta.get("version", 0) > FORMAT_VERSION:
        raise CharLSTMError(f"{path}: written by a newer charlstm (format {meta['version']}); upgrade charlstm")
    return meta


def _model_weights(path: Path, model: CharLSTM, tensors: dict) -> dict:
    expected = model.state_dict()
    weights = {k[len(MODEL_PREFIX):]: v for k, v in tensors.items() if k.startswith(MODEL_PREFIX)}
    missing, unexpected = expected.keys() - weights.keys(), weights.keys() - expected.keys()
    if missing or unexpected:
        detail = sorted(missing)[:3] + sorted(unexpected)[:3]
        raise CharLSTMError(f"{path}: weights do not match the model config ({', '.join(detail)})")
    for key, tensor in weights.items():
        if tensor.shape != expected[key].shape:
            raise CharLSTMError(
                f"{path}: weight {key} has shape {tuple(tensor.shape)}, config needs {tuple(expected[key].shape)}"
            )
        if not tensor.is_floating_point():
            raise CharLSTMError(f"{path}: weight {key} is not a floating-point tensor")
    return {k: v.to(expected[k].dtype) for k, v in weights.items()}
