"""Scoring a text with a model: nats/char and bits/char of every character after a context,
beside what general-purpose compressors need for the same text (``baselines``)."""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .baselines import Baseline, compressor_baselines, format_baselines, versus_best
from .model import CharLSTM
from .vocab import Vocab

LN2 = math.log(2.0)
BASELINE_CONTEXT = 8_000_000  # context characters the compressors see before the scored text
BASELINE_SCORED = 2_000_000   # scored characters they compress (all of it for books)

WINDOW_EVAL_FLOATS = 1 << 26  # bound on one evaluation chunk's activations


@dataclass
class TextScore:
    """A model's score on a text, beside the compressors' on the same text."""

    nats: float
    characters: int
    baselines: list[Baseline] = field(default_factory=list)
    seconds: float = 0.0  # the model's scoring time (not the compressors')

    @property
    def bits(self) -> float:
        return self.nats / LN2

    def lines(self) -> list[str]:
        versus = versus_best(self.bits, self.baselines)
        return [f"model: {self.nats:.4f} nats/char = {self.bits:.4f} bits/char" + (f" ({versus})" if versus else ""),
                f"compressors: {format_baselines(self.baselines)} bits/char"]


def score_text(model: CharLSTM, vocab: Vocab, context: np.ndarray, scored: np.ndarray,
               amp_dtype: torch.dtype | None = None) -> TextScore:
    """Score ``scored`` read after ``context`` (only its last window counts), and the compressors."""
    started = time.perf_counter()
    nats = score_after(model, context, scored, amp_dtype)
    seconds = time.perf_counter() - started
    return TextScore(nats, len(scored), compressor_baselines_for(vocab, context, scored), seconds)


def score_after(model: CharLSTM, context: np.ndarray, scored: np.ndarray,
                amp_dtype: torch.dtype | None = None) -> float:
    """Nats/char of ``scored`` after the last ``window`` characters of ``context`` (all a window model sees)."""
    return evaluate_ids(model, scored, context=context[-model.config.window:], amp_dtype=amp_dtype)


def compressor_baselines_for(vocab: Vocab, context: np.ndarray, scored: np.ndarray) -> list[Baseline]:
    """Compressor bits/char of ``scored`` after ``context``; both bounded, as compressors only look
    back so far and big corpora would take minutes."""
    return compressor_baselines(vocab.decode(context[-BASELINE_CONTEXT:]), vocab.decode(scored[:BASELINE_SCORED]))


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
            with one_cpu_thread(device):
                total, n_scored = _stream_losses(model, full, len(context), chunk)
        else:
            total, n_scored = _window_losses(model, full, len(context), chunk)
    model.train(was_training)
    return total / max(n_scored, 1)


def stream_logits(model: CharLSTM, ids: torch.Tensor, chunk: int):
    """Read ``ids`` left to right once with the state carried, ``chunk`` at a time: yields
    ``(start, logits)`` with the logits of ids[start + 1:start + 1 + len(logits)]."""
    state = None
    for start in range(0, len(ids) - 1, chunk):
        logits, state = model(ids[start:min(start + chunk, len(ids) - 1)][None], state)
        yield start, logits[0]


@torch.no_grad()
def _stream_losses(model: CharLSTM, full: torch.Tensor, first: int, chunk: int) -> tuple[float, int]:
    """Sum of losses of full[max(first, 1):], reading ``full`` once with the state carried."""
    total = 0.0
    for start, logits in stream_logits(model, full, chunk):
        y = full[start + 1:start + 1 + len(logits)]
        losses = F.cross_entropy(logits.float(), y, reduction="none")
        scored = torch.arange(start + 1, start + 1 + len(y), device=full.device) >= max(first, 1)
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
def one_cpu_thread(device: torch.device):
    """Reading one stream step by step is latency-bound: a second CPU thread only adds
    synchronisation, which costs most on a busy machine."""
    threads = torch.get_num_threads()
    if device.type == "cpu" and threads > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
