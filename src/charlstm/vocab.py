"""Stage 2: the character vocabulary (sorted, as the tutorial builds it) and id encoding."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from .errors import CharLSTMError

MAX_VOCAB = 65535


@dataclass(frozen=True)
class Vocab:
    """Characters in sorted order; a character's id is its index."""

    chars: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.chars:
            raise CharLSTMError("the vocabulary is empty")
        if len(self.chars) > MAX_VOCAB:
            raise CharLSTMError(f"{len(self.chars)} distinct characters: at most {MAX_VOCAB} are supported")
        if any(len(c) != 1 for c in self.chars) or len(set(self.chars)) != len(self.chars):
            raise CharLSTMError("a vocabulary must hold distinct single characters")
        object.__setattr__(self, "_index", {c: i for i, c in enumerate(self.chars)})

    @classmethod
    def from_text(cls, text: str) -> "Vocab":
        return cls(tuple(sorted(set(text))))

    def __len__(self) -> int:
        return len(self.chars)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.uint8 if len(self.chars) <= 256 else np.uint16)

    def unknown(self, text: str) -> list[str]:
        return sorted(set(text) - self._index.keys())

    def encode(self, text: str, unknown: str = "error") -> np.ndarray:
        """Text to a compact integer array. ``unknown``: 'error' (name them) or 'skip'."""
        missing = self.unknown(text)
        if missing:
            if unknown != "skip":
                shown = " ".join(repr(c) for c in missing[:20])
                raise CharLSTMError(f"characters not in the model's vocabulary: {shown}")
            text = "".join(c for c in text if c in self._index)
        # A lookup table over code points is much faster than a Python loop per character.
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        table = np.zeros(max(map(ord, self.chars)) + 1, dtype=self.dtype)
        table[[ord(c) for c in self.chars]] = np.arange(len(self.chars), dtype=self.dtype)
        return table[codes]

    def decode(self, ids) -> str:
        """Ids to text without a Python loop: a code-point table, then one UTF-32 decode."""
        table = np.array([ord(c) for c in self.chars], dtype="<u4")
        return table[np.asarray(ids, dtype=np.int64)].tobytes().decode("utf-32-le")

    def to_json(self) -> str:
        return json.dumps(list(self.chars), ensure_ascii=False)

    @classmethod
    def from_json(cls, data: str | list) -> "Vocab":
        try:
            chars = json.loads(data) if isinstance(data, str) else data
        except (json.JSONDecodeError, RecursionError):
            raise CharLSTMError("the stored vocabulary is not valid JSON") from None
        if not isinstance(chars, list) or not all(isinstance(c, str) for c in chars):
            raise CharLSTMError("the stored vocabulary is not a list of characters")
        return cls(tuple(chars))
