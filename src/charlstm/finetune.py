"""Starting a model from a pretrained one (``--init english|PATH``).

The new model keeps the pretrained network and takes the corpus's own vocabulary: a character
both know keeps its embedding and output rows; a character the pretrained model lacks gets the
mean embedding row and the mean output row with the lowest output bias, so it starts rare
instead of wrecking the first predictions; characters only the pretrained model knew are left
out, so they can never be predicted. The shipped English base lives in ``pretrained/``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from . import checkpoint
from .checkpoint import TrainedModel
from .errors import CharLSTMError
from .model import REGULARISATION_FIELDS, CharLSTM
from .vocab import Vocab

PRETRAINED_DIR = Path(__file__).resolve().parent / "pretrained"
PRETRAINED = {"english": PRETRAINED_DIR / "english.safetensors"}


@dataclass
class InitModel:
    """A model ready to fine-tune and the record of where it came from."""

    model: CharLSTM
    source: TrainedModel
    record: dict


def resolve_init(init: str | Path) -> Path:
    """A shipped model's name (``english``) or a checkpoint path, as an existing file."""
    name = str(init)
    if name in PRETRAINED:
        path = PRETRAINED[name]
        if not path.is_file():
            raise CharLSTMError(f"--init {name}: the pretrained model is not installed ({path} is missing); "
                                f"reinstall charlstm or pass --init PATH to a checkpoint")
        return path
    path = Path(init)
    if not path.is_file():
        known = ", ".join(PRETRAINED)
        raise CharLSTMError(f"--init {name}: no such checkpoint file (or a shipped model: {known})")
    return path


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_init(init: str | Path, vocab: Vocab, model_overrides: dict | None = None) -> InitModel:
    """The pretrained network remapped onto ``vocab``, with new regularisation settings."""
    path = resolve_init(init)
    source = checkpoint.load(path)
    if source.config.input != "embedding" or source.config.target != "all":
        raise CharLSTMError(f"--init {init}: fine-tuning needs a model with embedding input that predicts "
                            f"every position (this one has input {source.config.input}, "
                            f"target {source.config.target})")
    if source.config.head != "full":
        raise CharLSTMError(f"--init {init}: remapping onto new characters needs a model with a full softmax head "
                            f"(this one's is {source.config.head})")
    overrides = dict(model_overrides or {})
    fixed = sorted(k for k, v in overrides.items()
                   if k not in REGULARISATION_FIELDS and k != "vocab_size" and v != getattr(source.config, k))
    if fixed:
        raise CharLSTMError(f"--{fixed[0].replace('_', '-')} cannot differ from the --init model's "
                            f"({getattr(source.config, fixed[0])}); only {', '.join(REGULARISATION_FIELDS)} can")
    regularisation = {k: v for k, v in overrides.items() if k in REGULARISATION_FIELDS}
    model = remap_vocab(source.model, source.vocab, vocab, **regularisation)
    shared = sum(c in source.vocab.chars for c in vocab.chars)
    record = {
        "init": str(init) if str(init) in PRETRAINED else str(path),
        "sha256": file_sha256(path),
        "model": source.config.to_dict(),
        "val_loss": source.training.best.val_loss if source.training.best else None,
        "characters_shared": shared,
        "characters_new": len(vocab) - shared,
        "new_characters": [c for c in vocab.chars if c not in source.vocab.chars],
    }
    return InitModel(model=model, source=source, record=record)


@torch.no_grad()
def remap_vocab(model: CharLSTM, old: Vocab, new: Vocab, **config_changes) -> CharLSTM:
    """A copy of ``model`` whose embedding and output rows follow ``new``'s characters."""
    config = replace(model.config, vocab_size=len(new), **config_changes)
    remapped = CharLSTM(config)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(("embedding.", "head."))}
    remapped.load_state_dict(state, strict=False)
    old_index = {c: i for i, c in enumerate(old.chars)}
    rows = [old_index.get(c, -1) for c in new.chars]
    known = torch.tensor([r >= 0 for r in rows])
    source_rows = torch.tensor([max(r, 0) for r in rows])
    for new_param, old_param, fill in (
        (remapped.embedding.weight, model.embedding.weight, model.embedding.weight.mean(0)),
        (remapped.head.weight, model.head.weight, model.head.weight.mean(0)),
        (remapped.head.bias, model.head.bias, model.head.bias.min()),
    ):
        new_param.copy_(torch.where(known.view(-1, *([1] * (old_param.dim() - 1))),
                                    old_param[source_rows], fill.expand_as(new_param)))
    return remapped
