"""Stage 3: encoded ids to training batches.

Two ways of cutting text into examples:

* ``WindowBatches`` - the tutorial's: every 100-character window predicts the character after
  it (one target per window), windows shuffled.
* ``StreamBatches`` - the modern way: the text is laid out as ``batch_size`` contiguous
  streams, every position predicts its next character, and consecutive batches continue each
  other so the recurrent state can be carried across them (truncated BPTT).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import CharLSTMError


def split_train_val(ids: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """The last ``val_fraction`` of the text is held out; 0 means no validation text."""
    if not 0.0 <= val_fraction < 1.0:
        raise CharLSTMError(f"--val-fraction must be in [0, 1), not {val_fraction}")
    n_val = int(round(len(ids) * val_fraction))
    return ids[: len(ids) - n_val], ids[len(ids) - n_val:]


def save_ids(path: str | Path, ids: np.ndarray) -> None:
    np.save(Path(path), ids, allow_pickle=False)


def load_ids(path: str | Path, mmap: bool = True) -> np.ndarray:
    """Load encoded text saved by ``save_ids``, memory-mapped so big corpora need no RAM."""
    return np.load(Path(path), mmap_mode="r" if mmap else None, allow_pickle=False)


@dataclass
class WindowBatches:
    """The tutorial's patterns: ``x = ids[i:i+window]``, ``y = ids[i+window]``."""

    ids: np.ndarray
    window: int
    batch_size: int
    shuffle: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if len(self.ids) <= self.window:
            raise CharLSTMError(
                f"the text has {len(self.ids)} characters, fewer than the window of {self.window} + 1"
            )
        self._windows = np.lib.stride_tricks.sliding_window_view(self.ids, self.window + 1)

    @property
    def num_patterns(self) -> int:
        return len(self.ids) - self.window

    def __len__(self) -> int:
        return math.ceil(self.num_patterns / self.batch_size)

    def batch_order(self, epoch: int) -> np.ndarray:
        order = np.arange(self.num_patterns)
        if self.shuffle:
            np.random.default_rng((self.seed, epoch)).shuffle(order)
        return order

    def epoch(self, epoch: int = 0, start_batch: int = 0):
        """Yield ``(x, y)``: x (B, window) int64 ids, y (B,) int64 targets."""
        order = self.batch_order(epoch)
        for b in range(start_batch, len(self)):
            rows = np.asarray(self._windows[order[b * self.batch_size:(b + 1) * self.batch_size]])
            block = torch.from_numpy(rows.astype(np.int64))
            yield block[:, :-1], block[:, -1]


@dataclass
class StreamBatches:
    """``batch_size`` contiguous streams cut into ``bptt``-long pieces; y is x shifted by one."""

    ids: np.ndarray
    batch_size: int
    bptt: int

    def __post_init__(self) -> None:
        self.stream_len = (len(self.ids) - 1) // self.batch_size
        if self.stream_len < 2:
            raise CharLSTMError(
                f"the text ({len(self.ids)} characters) is too short for {self.batch_size} streams"
            )
        n = self.stream_len * self.batch_size
        self._x = np.asarray(self.ids[:n]).reshape(self.batch_size, self.stream_len)
        self._y = np.asarray(self.ids[1:n + 1]).reshape(self.batch_size, self.stream_len)

    @property
    def num_targets(self) -> int:
        return self.stream_len * self.batch_size

    def __len__(self) -> int:
        return math.ceil(self.stream_len / self.bptt)

    def epoch(self, epoch: int = 0, start_batch: int = 0):
        """Yield ``(x, y)``: both (B, T) int64, T = bptt except maybe the last piece."""
        for b in range(start_batch, len(self)):
            sl = slice(b * self.bptt, (b + 1) * self.bptt)
            yield (torch.from_numpy(self._x[:, sl].astype(np.int64)),
                   torch.from_numpy(self._y[:, sl].astype(np.int64)))


def random_windows(ids: np.ndarray, window: int, count: int, seed: int) -> np.ndarray:
    """``count`` random windows of the text (the seeds a checkpoint carries for generation)."""
    if len(ids) <= window:
        return np.asarray(ids)[None, :]
    starts = np.random.default_rng(seed).integers(0, len(ids) - window, size=count)
    return np.stack([np.asarray(ids[s:s + window]) for s in starts])
