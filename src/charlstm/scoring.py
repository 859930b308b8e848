"""How surprising a text is to a model, character by character.

For every character after the first: the probability the model gave it, its surprise
(-log2 p, in bits) and the likeliest alternatives, read left to right with the state carried
(models trained on windows: each character from the ``window`` characters before it). The
total is the mean surprise in bits/char, beside what the compressors need for the same text
on its own: the data behind the page's heat map (the pictures of Karpathy's "Unreasonable
Effectiveness of Recurrent Neural Networks", for the user's own model and text).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .baselines import Baseline, compressor_baselines
from .checkpoint import TrainedModel
from .errors import CharLSTMError
from .evaluate import one_cpu_thread, stream_logits

CHUNK = 512


@dataclass
class CharacterSurprise:
    text: str                          # the text as the model read it (normalised)
    logprobs: list[float | None]       # natural log p of each character; None for the first
    top: list[list[tuple[str, float]]]  # the likeliest alternatives at each position (empty for the first)
    baselines: list[Baseline]

    @property
    def bits_per_char(self) -> float:
        scored = [lp for lp in self.logprobs if lp is not None]
        return -sum(scored) / len(scored) / math.log(2)

    def to_dict(self) -> dict:
        bits = [None if lp is None else -lp / math.log(2) for lp in self.logprobs]
        return {
            "text": self.text,
            "characters": len(self.text),
            "chars": list(self.text),
            "probs": [None if lp is None else math.exp(lp) for lp in self.logprobs],
            "bits": bits,
            "top": [[{"char": c, "prob": math.exp(lp)} for c, lp in alts] for alts in self.top],
            "bits_per_char": self.bits_per_char,
            "scored_characters": len(self.text) - 1,
            "compressors": [{"name": b.name, "bits_per_char": b.bits_per_char} for b in self.baselines],
        }


def surprise_per_character(trained: TrainedModel, text: str, unknown: str = "error",
                           top: int = 5) -> CharacterSurprise:
    """Score ``text`` under ``trained``; at least two characters (after dropping unknown ones)."""
    if trained.normalization.lowercase:
        text = text.lower()
    ids = trained.vocab.encode(text, unknown=unknown)
    if len(ids) < 2:
        raise CharLSTMError("the text must hold at least two characters the model knows")
    read = trained.vocab.decode(ids)
    logprobs = _next_char_logprobs(trained, torch.from_numpy(ids.astype(np.int64)))   # (N-1, V)
    actual = logprobs[np.arange(len(ids) - 1), ids[1:]]
    best = np.argsort(-logprobs, axis=1, kind="stable")[:, :top]
    chars = trained.vocab.chars
    alternatives = [[(chars[j], float(row[j])) for j in b] for row, b in zip(logprobs, best.tolist())]
    return CharacterSurprise(read, [None] + actual.tolist(), [[]] + alternatives,
                             compressor_baselines("", read))


@torch.inference_mode()
def _next_char_logprobs(trained: TrainedModel, ids: torch.Tensor) -> np.ndarray:
    """(N-1, V) log-probabilities of the character after each of ids[:-1]."""
    model = trained.model
    device = model.head.weight.device
    with one_cpu_thread(device):   # reading a text is latency-bound: a second thread only waits
        parts = _logits_after_each(model, ids.to(device))
    logits = torch.cat(parts).float()
    return torch.log_softmax(logits, dim=-1).cpu().numpy().astype(np.float64)


def _logits_after_each(model, ids: torch.Tensor) -> list[torch.Tensor]:
    parts = []
    if model.config.target == "all":
        parts = [logits for _, logits in stream_logits(model, ids, CHUNK)]
    else:
        window = model.config.window
        for end in range(1, min(window, len(ids))):        # the first windows are shorter
            parts.append(model(ids[:end][None], last_only=True)[0])
        if len(ids) > window:
            windows = ids.unfold(0, window, 1)[:len(ids) - window]
            for start in range(0, len(windows), CHUNK):
                parts.append(model(windows[start:start + CHUNK], last_only=True)[0])
    return parts
