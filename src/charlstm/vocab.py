"""Stage 2: the character vocabulary (sorted, as the tutorial builds it) and id encoding."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from .errors import CharLSTMError

MAX_VOCAB = 1 << 20  # ids are stored as uint8, uint16 or (beyond 65,536 symbols) uint32
UNKNOWN_CHAR = "\ufffd"  # stands for every character a --min-count/--max-vocab vocabulary leaves out


@dataclass(frozen=True)
class Vocab:
    """Characters in sorted order; a character's id is its index."""

    chars: tuple[str, ...]
    unknown_char: str | None = None  # when set, characters outside the vocabulary encode as it

    def __post_init__(self) -> None:
        if not self.chars:
            raise CharLSTMError("the vocabulary is empty")
        if len(self.chars) > MAX_VOCAB:
            raise CharLSTMError(f"{len(self.chars)} distinct characters: at most {MAX_VOCAB} are supported")
        if any(len(c) != 1 for c in self.chars) or len(set(self.chars)) != len(self.chars):
            raise CharLSTMError("a vocabulary must hold distinct single characters")
        if self.unknown_char is not None and self.unknown_char not in self.chars:
            raise CharLSTMError(f"the unknown symbol {self.unknown_char!r} is not in the vocabulary")
        object.__setattr__(self, "_index", {c: i for i, c in enumerate(self.chars)})
        object.__setattr__(self, "_table", None)

    @classmethod
    def from_text(cls, text: str) -> "Vocab":
        return cls(tuple(sorted(set(text))))

    def __len__(self) -> int:
        return len(self.chars)

    def __getstate__(self) -> dict:
        """Pickled (to a worker process) without the 1.1 M-entry code table, rebuilt on use."""
        return {**self.__dict__, "_table": None}

    @property
    def dtype(self) -> np.dtype:
        return id_dtype(len(self.chars))

    def unknown(self, text: str) -> list[str]:
        """Characters of ``text`` the vocabulary cannot encode (none when it has an unknown symbol)."""
        if self.unknown_char is not None:
            return []
        return sorted(set(text) - self._index.keys())

    def code_table(self) -> np.ndarray:
        """Code point -> id over all of Unicode (built once); unmapped code points get the
        unknown symbol's id, or 0 when there is none (``encode`` checks for them first)."""
        if self._table is None:
            fill = self._index[self.unknown_char] if self.unknown_char is not None else 0
            table = np.full(0x110000, fill, dtype=self.dtype)
            table[[ord(c) for c in self.chars]] = np.arange(len(self.chars), dtype=self.dtype)
            object.__setattr__(self, "_table", table)
        return self._table

    def encode_codes(self, codes: np.ndarray) -> np.ndarray:
        """UTF-32 code points (uint32) to ids, without a Python loop."""
        return self.code_table()[codes]

    def encode(self, text: str, unknown: str = "error") -> np.ndarray:
        """Text to a compact integer array. ``unknown``: 'error' (name them) or 'skip'."""
        missing = self.unknown(text)
        if missing:
            if unknown != "skip":
                shown = " ".join(repr(c) for c in missing[:20])
                raise CharLSTMError(f"characters not in the model's vocabulary: {shown}")
            text = "".join(c for c in text if c in self._index)
        # A lookup table over code points is much faster than a Python loop per character.
        return self.encode_codes(np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32))

    def decode(self, ids) -> str:
        """Ids to text without a Python loop: a code-point table, then one UTF-32 decode."""
        table = np.array([ord(c) for c in self.chars], dtype="<u4")
        return table[np.asarray(ids, dtype=np.int64)].tobytes().decode("utf-32-le")

    def to_jsonable(self) -> list | dict:
        """A plain list of characters, or with an unknown symbol ``{"chars": [...], "unknown": c}``."""
        if self.unknown_char is None:
            return list(self.chars)
        return {"chars": list(self.chars), "unknown": self.unknown_char}

    def to_json(self) -> str:
        return json.dumps(self.to_jsonable(), ensure_ascii=False)

    @classmethod
    def from_json(cls, data: str | list | dict) -> "Vocab":
        try:
            data = json.loads(data) if isinstance(data, str) else data
        except (json.JSONDecodeError, RecursionError):
            raise CharLSTMError("the stored vocabulary is not valid JSON") from None
        unknown = None
        if isinstance(data, dict):
            data, unknown = data.get("chars"), data.get("unknown")
            if unknown is not None and not isinstance(unknown, str):
                raise CharLSTMError("the stored vocabulary's unknown symbol is not a character")
        if not isinstance(data, list) or not all(isinstance(c, str) for c in data):
            raise CharLSTMError("the stored vocabulary is not a list of characters")
        return cls(tuple(data), unknown)


def id_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned type that holds every id: uint8, uint16, else uint32."""
    if vocab_size <= 1 << 8:
        return np.dtype(np.uint8)
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)
