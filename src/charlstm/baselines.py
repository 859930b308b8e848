"""Compressor baselines: how many bits/char general-purpose compressors need for the validation
text once they have seen the training text.

For each compressor the cost of the validation text is the extra compressed size it adds,
``size(C(train + val)) - size(C(train))``, in bits per validation character. A language model
that scores below a compressor's number predicts the held-out text better than that compressor
does (gzip only looks back 32 KiB; bzip2 works in 900 kB blocks; lzma has a long window).
"""

from __future__ import annotations

import bz2
import gzip
import lzma
from dataclasses import dataclass
from typing import Callable

COMPRESSORS: dict[str, Callable[[bytes], bytes]] = {
    "gzip": lambda data: gzip.compress(data, compresslevel=9, mtime=0),
    "bz2": lambda data: bz2.compress(data, compresslevel=9),
    "lzma": lambda data: lzma.compress(data, preset=9 | lzma.PRESET_EXTREME),
}


@dataclass(frozen=True)
class Baseline:
    name: str
    bits_per_char: float


def extra_compressed_bits(compress: Callable[[bytes], bytes], train: bytes, val: bytes) -> int:
    """Bits the compressed form grows by when ``val`` is appended to ``train``."""
    return 8 * (len(compress(train + val)) - len(compress(train)))


def compressor_baselines(train_text: str, val_text: str) -> list[Baseline]:
    """Bits/char of ``val_text`` given ``train_text`` for gzip, bz2 and lzma, best first."""
    if not val_text:
        return []
    train, val = train_text.encode("utf-8"), val_text.encode("utf-8")
    found = [Baseline(name, extra_compressed_bits(fn, train, val) / len(val_text))
             for name, fn in COMPRESSORS.items()]
    return sorted(found, key=lambda b: b.bits_per_char)


def format_baselines(baselines: list[Baseline]) -> str:
    return ", ".join(f"{b.name} {b.bits_per_char:.3f}" for b in baselines)


def versus_best(bits_per_char: float, baselines: list[Baseline]) -> str:
    """'beats bz2 by 23.1%' (or 'behind ... by') for the best compressor."""
    if not baselines:
        return ""
    best = baselines[0]
    if best.bits_per_char <= 0:  # a text of one repeated character: no percentage to give
        return f"{best.name} needs {best.bits_per_char:.3f} bits/char"
    change = (best.bits_per_char - bits_per_char) / best.bits_per_char * 100
    verb = "beats" if change >= 0 else "behind"
    return f"{verb} {best.name} by {abs(change):.1f}%"
