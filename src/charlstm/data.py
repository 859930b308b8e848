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
import mmap
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol

import numpy as np
import torch

from .errors import CharLSTMError


class Batches(Protocol):
    """What the trainer asks of a batcher: the batches of an epoch, from any batch on."""

    @property
    def num_targets(self) -> int:
        """Characters predicted per epoch (the tutorial's "Total Patterns" for windows)."""

    def __len__(self) -> int:
        """Batches per epoch."""

    def epoch(self, epoch: int = 0, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(x, y)`` int64 batches; ``y`` is ``IGNORE_INDEX`` where there is nothing to predict."""


def check_val_fraction(val_fraction: float) -> None:
    if not 0.0 <= val_fraction < 1.0:
        raise CharLSTMError(f"--val-fraction must be in [0, 1), not {val_fraction}")


def split_train_val(ids: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """The last ``val_fraction`` of the text is held out; 0 means no validation text."""
    check_val_fraction(val_fraction)
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

    @property
    def num_targets(self) -> int:
        return self.num_patterns  # one target per window

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
    """``batch_size`` contiguous streams cut into ``bptt``-long pieces; y is x shifted by one.

    The text, after the epoch's offset, is cut into B equal streams, one per row; batch k is
    columns k*bptt .. (k+1)*bptt of every row, so row i of batch k+1 continues row i of batch k
    (B = 3, bptt = 3, one letter per character; y is the same one character later)::

        text:  a b c d e f g h i j k l m n o p q r s
        x:     a b c d e f      batch 0   batch 1
               g h i j k l  ->  a b c     d e f
               m n o p q r      g h i     j k l
                                m n o     p q r

    With ``random_offset`` every epoch starts the streams at a different offset in
    ``[0, bptt)`` (drawn from ``seed`` and the epoch number), so the piece boundaries move from
    epoch to epoch instead of always cutting the text at the same places. The streams are
    views of ``ids`` (a memory map stays a memory map); only each batch is copied.
    """

    ids: np.ndarray
    batch_size: int
    bptt: int
    random_offset: bool = False
    seed: int = 0
    shard: tuple[int, int] = (0, 1)  # (rank, world size): a rank yields its own block of the streams

    def __post_init__(self) -> None:
        rank, world = self.shard
        if self.batch_size % world:
            raise CharLSTMError(f"--batch-size {self.batch_size} must be a multiple of the {world} processes")
        share = self.batch_size // world
        self.rows = slice(rank * share, (rank + 1) * share)
        spare = self.bptt - 1 if self.random_offset else 0
        self.stream_len = (len(self.ids) - 1 - spare) // self.batch_size
        if self.stream_len < 2:
            raise CharLSTMError(
                f"the text ({len(self.ids)} characters) is too short for {self.batch_size} streams"
            )

    @property
    def num_targets(self) -> int:
        return self.stream_len * self.batch_size

    def __len__(self) -> int:
        return math.ceil(self.stream_len / self.bptt)

    def offset(self, epoch: int) -> int:
        if not self.random_offset:
            return 0
        return int(np.random.default_rng((self.seed, epoch, 7)).integers(0, self.bptt))

    def streams(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """The (B, stream_len) inputs and targets of ``epoch``, as views of ``ids``."""
        start, n = self.offset(epoch), self.stream_len * self.batch_size
        x = self.ids[start:start + n].reshape(self.batch_size, self.stream_len)
        y = self.ids[start + 1:start + n + 1].reshape(self.batch_size, self.stream_len)
        return x, y

    def epoch(self, epoch: int = 0, start_batch: int = 0):
        """Yield ``(x, y)``: both (B, T) int64, T = bptt except maybe the last piece (B = this
        rank's share of the streams)."""
        xs, ys = self.streams(epoch)
        xs, ys = xs[self.rows], ys[self.rows]
        for b in range(start_batch, len(self)):
            sl = slice(b * self.bptt, (b + 1) * self.bptt)
            yield (torch.from_numpy(xs[:, sl].astype(np.int64)),
                   torch.from_numpy(ys[:, sl].astype(np.int64)))
            if b % RELEASE_EVERY == RELEASE_EVERY - 1:
                release_pages(self.ids)


RELEASE_EVERY = 256  # batches between releases of a memory map's pages


def release_pages(ids: np.ndarray) -> None:
    """Unmap the pages of a memory-mapped id file this process has read. They stay in the page
    cache (the next read is a cheap minor fault), but no longer count as this process's memory,
    so training on a file larger than RAM keeps a flat resident size."""
    base = ids
    while base is not None and not isinstance(base, np.memmap):
        base = base.base
    handle = getattr(base, "_mmap", None)
    if handle is not None and hasattr(handle, "madvise"):
        handle.madvise(mmap.MADV_DONTNEED)


def fixed_sample(ids: np.ndarray, n: int, pieces: int = 64) -> np.ndarray:
    """A bounded, fixed validation text: ``pieces`` contiguous stretches spread evenly over
    ``ids``, ``n`` ids in all (all of ``ids`` when it is no longer)."""
    if n <= 0 or len(ids) <= n:
        return ids
    pieces = max(1, min(pieces, n // 1000 or 1))
    size = n // pieces
    starts = np.linspace(0, len(ids) - size, pieces).astype(np.int64)
    return np.concatenate([np.asarray(ids[s:s + size]) for s in starts])


IGNORE_INDEX = -100  # targets at padded positions; the loss skips them


@dataclass
class StatefulWindowBatches:
    """The tutorial's one-target windows, laid out for Keras-style ``stateful=True`` training.

    The text is cut into ``batch_size`` contiguous streams; batch ``k`` holds window ``k`` of
    every stream, so row ``i`` of batch ``k + 1`` continues row ``i`` of batch ``k`` and the
    recurrent state can be carried between them. Windows do not overlap; the target of a
    window is the character right after it.
    """

    ids: np.ndarray
    window: int
    batch_size: int

    def __post_init__(self) -> None:
        self.stream_len = len(self.ids) // self.batch_size
        if self.stream_len <= self.window:
            raise CharLSTMError(
                f"the text ({len(self.ids)} characters) is too short for {self.batch_size} stateful "
                f"streams of at least one window of {self.window}"
            )
        n = self.stream_len * self.batch_size
        self._streams = np.asarray(self.ids[:n]).reshape(self.batch_size, self.stream_len)

    def __len__(self) -> int:
        return (self.stream_len - 1) // self.window

    @property
    def num_patterns(self) -> int:
        return len(self) * self.batch_size

    @property
    def num_targets(self) -> int:
        return self.num_patterns  # one target per window

    def epoch(self, epoch: int = 0, start_batch: int = 0):
        for b in range(start_batch, len(self)):
            block = self._streams[:, b * self.window:(b + 1) * self.window + 1].astype(np.int64)
            yield torch.from_numpy(block[:, :-1]), torch.from_numpy(block[:, -1])


@dataclass
class SentenceBatches:
    """Padded sentences: every position predicts the next character, padding is never scored.

    ``spans`` are (start, end) offsets of sentences in ``ids`` (see ``sentences.py``). A
    sentence longer than ``max_len`` + 1 characters is cut into consecutive pieces of that
    size (nothing is dropped); ``long_sentences`` counts them. Padding goes on the right, so
    it cannot change what the network computes for the real characters before it.
    """

    ids: np.ndarray
    spans: list[tuple[int, int]]
    batch_size: int
    max_len: int
    shuffle: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        pieces, self.long_sentences = [], 0
        for start, end in self.spans:
            if end - start > self.max_len + 1:
                self.long_sentences += 1
            for piece_start in range(start, end - 1, self.max_len):
                pieces.append((piece_start, min(end, piece_start + self.max_len + 1)))
        if not pieces:
            raise CharLSTMError("no sentence of two or more characters to train on")
        self.pieces = np.array(pieces, dtype=np.int64)

    @property
    def num_targets(self) -> int:
        return int((self.pieces[:, 1] - self.pieces[:, 0] - 1).sum())

    def __len__(self) -> int:
        return math.ceil(len(self.pieces) / self.batch_size)

    def epoch(self, epoch: int = 0, start_batch: int = 0):
        """Yield ``(x, y)``: (B, T) int64, T = the longest piece in the batch minus one."""
        order = np.arange(len(self.pieces))
        if self.shuffle:
            np.random.default_rng((self.seed, epoch)).shuffle(order)
        for b in range(start_batch, len(self)):
            chosen = self.pieces[order[b * self.batch_size:(b + 1) * self.batch_size]]
            width = int((chosen[:, 1] - chosen[:, 0]).max()) - 1
            x = np.zeros((len(chosen), width), dtype=np.int64)
            y = np.full((len(chosen), width), IGNORE_INDEX, dtype=np.int64)
            for row, (start, end) in enumerate(chosen):
                piece = np.asarray(self.ids[start:end], dtype=np.int64)
                x[row, :len(piece) - 1] = piece[:-1]
                y[row, :len(piece) - 1] = piece[1:]
            yield torch.from_numpy(x), torch.from_numpy(y)
