"""Checkpoints: one self-contained ``.safetensors`` file per save.

Tensors: the model's weights under ``model.``, optional extra tensors (optimiser state for
resuming) under their own prefixes. Metadata: one JSON document under the key ``charlstm``
holding the model config, vocabulary, text normalisation, training record and seed windows,
so that generating never needs the corpus. Files are written atomically and validated on
load (header size, JSON, config ranges, every tensor's name and shape); nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import math
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

from .corpus import Normalization
from .checks import check_name, check_no_nul
from .errors import CharLSTMError
from .fileio import NAME_MAX, atomic_write_bytes
from .adaptive import AdaptiveHead
from .model import CharLSTM, ModelConfig
from .records import TrainingRecord
from .vocab import Vocab

FORMAT = "charlstm"
FORMAT_VERSION = 2          # 2: the checksum below is required
MODEL_PREFIX = "model."
CHECKSUM_KEY = "charlstm.sha256"   # sha256 of the metadata and every tensor's name, dtype, shape, bytes
MAX_HEADER_BYTES = 64 * 1024 * 1024
SUFFIX = ".safetensors"
MAX_SEED_TEXT = 2_000_000  # characters of seed windows a checkpoint's metadata may hold
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
    count = max(1, min(count, MAX_SEED_TEXT // window))  # metadata small enough to load for huge windows
    starts = np.random.default_rng(seed).integers(0, len(ids) - window, size=count)
    return [vocab.decode(ids[s:s + window]) for s in starts]


def checkpoint_name(template: str, epoch: int, loss: float, **fields) -> str:
    """Fill a Keras-style template such as ``weights-improvement-{epoch:02d}-{loss:.4f}``."""
    if len(template) > NAME_MAX:
        raise CharLSTMError(f"--checkpoint-template is {len(template)} characters long; names have at most {NAME_MAX}")
    try:
        name = template.format(epoch=epoch, loss=loss, **fields)
    except (KeyError, IndexError, ValueError, TypeError, AttributeError) as err:
        raise CharLSTMError(f"--checkpoint-template {template!r}: {err}") from None
    name = name if name.endswith(SUFFIX) else name + SUFFIX
    check_name(name, f"--checkpoint-template {template!r}")
    return name


def check_template(template: str) -> None:
    """Refuse a template that cannot name a file, before training starts (epochs up to 10^6,
    any loss)."""
    for epoch, loss in ((1, 0.0), (999_999, 123.456789)):
        checkpoint_name(template, epoch, loss, val_loss=loss)


def save(path: str | Path, trained: TrainedModel) -> Path:
    tensors = {MODEL_PREFIX + k: v.detach().to("cpu").contiguous() for k, v in trained.model.state_dict().items()}
    for key, value in trained.extra.items():
        if key.startswith(MODEL_PREFIX):
            raise ValueError(f"extra tensor name {key!r} clashes with the model's prefix")
        tensors[key] = value.detach().to("cpu").contiguous()
    text = json.dumps(trained.metadata(), ensure_ascii=False)
    meta = {FORMAT: text, CHECKSUM_KEY: content_checksum(text, tensors)}
    return atomic_write_bytes(path, safetensors_bytes(tensors, metadata=meta))


def content_checksum(meta_text: str, tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the metadata text, then the tensors in name order (name, dtype, shape, raw
    bytes). A flipped byte inside the weights or the metadata passes every shape check; this
    catches it."""
    digest = hashlib.sha256(meta_text.encode("utf-8", "surrogatepass") + b"\0")
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def load(path: str | Path, device: str | torch.device = "cpu") -> TrainedModel:
    path = Path(path)
    _check_header(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            header = handle.metadata() or {}
            raw_meta = header.get(FORMAT)
            if raw_meta is None:
                raise CharLSTMError(f"{path}: a safetensors file, but not a charlstm checkpoint")
            meta = _parse_metadata(path, raw_meta)  # before any tensor is read
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except SafetensorError as err:
        raise CharLSTMError(f"{path}: corrupted or truncated checkpoint ({err})") from None
    except (OSError, RuntimeError, ValueError, TypeError) as err:  # e.g. an unsupported dtype
        raise CharLSTMError(f"{path}: corrupted checkpoint ({str(err).splitlines()[0][:200]})") from None
    _verify_checksum(path, header.get(CHECKSUM_KEY), raw_meta, meta, tensors)
    try:
        config = ModelConfig.from_dict(meta["model"])
        vocab = Vocab.from_json(meta["vocab"])
        normalization = Normalization.from_dict(meta.get("normalization", {}))
        training = TrainingRecord.from_json(meta.get("training", {}))
    except (KeyError, TypeError, AttributeError, ValueError) as err:
        raise CharLSTMError(f"{path}: incomplete checkpoint metadata ({type(err).__name__}: {err})") from None
    except CharLSTMError as err:
        raise CharLSTMError(f"{path}: {err}") from None
    if len(vocab) != config.vocab_size:
        raise CharLSTMError(f"{path}: vocabulary has {len(vocab)} characters, model expects {config.vocab_size}")
    model = _build_model(path, config, tensors)
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


def _verify_checksum(path: Path, stored: str | None, raw_meta: str, meta: dict, tensors: dict) -> None:
    if stored is None:
        if meta.get("version", 0) >= 2:
            raise CharLSTMError(f"{path}: the checksum is missing (the file is corrupted)")
        return  # format 1 files had none
    if stored != content_checksum(raw_meta, tensors):
        raise CharLSTMError(f"{path}: the data does not match its checksum (the file is corrupted)")


def _build_model(path: Path, config: ModelConfig, tensors: dict) -> CharLSTM:
    """The network, after checking that the file really holds its weights: a config may claim
    any size, so the parameter count is compared with the tensors before allocating."""
    have = sum(v.numel() for k, v in tensors.items() if k.startswith(MODEL_PREFIX))
    need = parameter_count(config)
    if need != have:
        raise CharLSTMError(f"{path}: the model config needs {need:,} weights, the file holds {have:,}")
    model = CharLSTM(config)
    model.load_state_dict(_model_weights(path, model, tensors))
    if isinstance(model.head, AdaptiveHead):
        try:
            model.head.check_order()
        except CharLSTMError as err:
            raise CharLSTMError(f"{path}: {err}") from None
    return model


def parameter_count(config: ModelConfig) -> int:
    """Parameters of ``CharLSTM(config)``, computed without building it."""
    units, vocab = config.units, config.vocab_size
    inputs = config.input_size
    total = vocab * config.embedding_dim if config.input == "embedding" else 0
    for layer in range(config.layers):
        width = inputs if layer == 0 else units
        total += 4 * units * (width + units) + 8 * units
    return total + config.head_parameters()


def _check_header(path: Path) -> None:
    """A regular file whose 8-byte header length fits the file (a FIFO would block, a folder
    cannot be read), refused before anything is allocated."""
    check_no_nul(path, "checkpoint")
    try:
        info = path.stat()
        if stat.S_ISDIR(info.st_mode):
            raise CharLSTMError(f"{path}: is a folder, not a checkpoint file")
        if not stat.S_ISREG(info.st_mode):
            raise CharLSTMError(f"{path}: not a regular file (a device, FIFO or socket), not a checkpoint")
        with open(path, "rb") as handle:
            head = handle.read(8)
    except FileNotFoundError:
        raise CharLSTMError(f"{path}: no such checkpoint file") from None
    except OSError as err:
        raise CharLSTMError(f"{path}: cannot read the checkpoint ({err.strerror or err})") from None
    if len(head) < 8:
        raise CharLSTMError(f"{path}: too short to be a checkpoint ({info.st_size} bytes)")
    (header_len,) = struct.unpack("<Q", head)
    if header_len > MAX_HEADER_BYTES or header_len + 8 > info.st_size:
        raise CharLSTMError(f"{path}: not a charlstm checkpoint (not a safetensors file, or truncated)")


def _parse_metadata(path: Path, raw: str) -> dict:
    try:
        meta = json.loads(raw)
    except (json.JSONDecodeError, RecursionError):
        raise CharLSTMError(f"{path}: checkpoint metadata is not valid JSON") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CharLSTMError(f"{path}: not a charlstm checkpoint")
    version = meta.get("version", 0)
    if not _is_int(version) or version < 0:
        raise CharLSTMError(f"{path}: checkpoint metadata: version must be a whole number, not {version!r}")
    if version > FORMAT_VERSION:
        raise CharLSTMError(f"{path}: written by a newer charlstm (format {version}); upgrade charlstm")
    problem = metadata_problem(meta)
    if problem:
        raise CharLSTMError(f"{path}: checkpoint metadata: {problem}")
    return meta


# --------------------------------------------------------------------------- metadata shape
# What each stored field must look like; the loaders after this point may rely on it.

def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def _is_optional_number(v) -> bool:
    return v is None or _is_number(v)


def _is_str_list(v) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


_HISTORY_ROW = {"epoch": _is_int, "loss": _is_number, "val_loss": _is_optional_number,
                "chars_per_s": _is_number, "elapsed": _is_number, "lr": _is_number, "step": _is_int}
_POSITION = {"epoch": _is_int, "batch": _is_int, "step": _is_int, "elapsed": _is_number,
             "best": _is_optional_number, "epochs_since_best": _is_int, "loss_sum": _is_number,
             "targets": _is_int, "epoch_seconds": _is_number,
             "best_path": lambda v: v is None or isinstance(v, str), "improvements": _is_str_list}
_DATA = {"sources": _is_str_list, "characters": _is_int, "train_characters": _is_int,
         "val_characters": _is_int, "fingerprint": lambda v: v is None or isinstance(v, str)}
_BASELINE = {"name": lambda v: isinstance(v, str), "bits_per_char": _is_number}


def _record_problem(value, fields: dict, where: str, required: tuple = ()) -> str | None:
    if not isinstance(value, dict):
        return f"{where} must be an object, not {type(value).__name__}"
    for name in required:
        if name not in value:
            return f"{where} lacks {name!r}"
    for name, ok in fields.items():
        if name in value and not ok(value[name]):
            return f"{where}.{name} has the wrong type or value ({str(value[name])[:40]!r})"
    return None


def _list_problem(value, fields: dict, where: str, required: tuple = ()) -> str | None:
    if not isinstance(value, list):
        return f"{where} must be a list, not {type(value).__name__}"
    for index, item in enumerate(value):
        problem = _record_problem(item, fields, f"{where}[{index}]", required)
        if problem:
            return problem
    return None


def metadata_problem(meta: dict) -> str | None:
    """What is wrong with the shape of a checkpoint's metadata, or None."""
    if not isinstance(meta.get("model"), dict):
        return "'model' must be an object"
    if "vocab" not in meta:
        return "lacks the vocabulary"
    norm = meta.get("normalization", {})
    if not isinstance(norm, dict) or not all(isinstance(v, bool) for v in norm.values()):
        return "'normalization' must be an object of true/false settings"
    if not isinstance(meta.get("seed_windows", []), list):
        return "'seed_windows' must be a list"
    training = meta.get("training", {})
    if not isinstance(training, dict):
        return "'training' must be an object"
    checks = [
        ("history", lambda v: _list_problem(v, _HISTORY_ROW, "training.history")),
        ("data", lambda v: _record_problem(v, _DATA, "training.data")),
        ("baselines", lambda v: _list_problem(v, _BASELINE, "training.baselines", tuple(_BASELINE))),
        ("config", lambda v: None if isinstance(v, dict) else "training.config must be an object"),
        ("best", lambda v: None if isinstance(v, dict) else "training.best must be an object"),
        ("keras", lambda v: None if isinstance(v, dict) else "training.keras must be an object"),
        ("init", lambda v: None if isinstance(v, dict) else "training.init must be an object"),
        ("epoch", lambda v: None if _is_int(v) else "training.epoch must be a whole number"),
        ("loss", lambda v: None if _is_optional_number(v) else "training.loss must be a number"),
        ("resume", _resume_problem),
    ]
    for name, check in checks:
        if training.get(name) is not None:  # a record may be absent or null
            problem = check(training[name])
            if problem:
                return problem
    return None


def _resume_problem(resume) -> str | None:
    if not isinstance(resume, dict):
        return "training.resume must be an object"
    problem = _record_problem(resume.get("position", {}), _POSITION, "training.resume.position")
    if problem:
        return problem
    for name in ("optimizer", "rng"):
        if not isinstance(resume.get(name, {}), dict):
            return f"training.resume.{name} must be an object"
    optimizer = resume.get("optimizer", {})
    groups = optimizer.get("param_groups", [])
    if not isinstance(groups, list) or not all(isinstance(g, dict) and isinstance(g.get("params", []), list)
                                               for g in groups):
        return "training.resume.optimizer.param_groups must be a list of objects"
    if not all(isinstance(resume.get(k) or "", str) for k in ("run_id", "fingerprint")):
        return "training.resume.run_id and fingerprint must be text"
    if not _is_int(resume.get("world_size", 1)) or not isinstance(resume.get("ranks", []), list) \
            or not all(isinstance(r, dict) for r in resume.get("ranks", [])):
        return "training.resume.world_size and ranks are malformed"
    return None


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
        if not torch.isfinite(tensor).all():
            raise CharLSTMError(f"{path}: weight {key} holds NaN or infinite values")
    return {k: v.to(expected[k].dtype) for k, v in weights.items()}
