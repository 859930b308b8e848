"""``charlstm prepare``: many files, folders or books -> memory-mapped ids, vocabulary, manifest.

Memory stays bounded whatever the corpus size: every source is read twice in fixed-size
chunks (pass 1 hashes, checks and counts characters for the vocabulary, pass 2 encodes and
writes the ids), and nothing but the per-code-point counts and one chunk is ever held. UTF-8
text is cleaned and encoded on its bytes (``CleanChunk``): a histogram of the bytes counts it
and one ``bytes.translate`` encodes it; only non-ASCII characters are decoded. The output folder holds

* ``train.npy`` / ``val.npy``: flat id arrays (uint8, uint16 or uint32 by vocabulary size)
  that training memory-maps; the last ``val_fraction`` of every document is validation text;
* ``vocab.json``: the symbols with their counts, and the unknown symbol if rare characters
  were folded into one (``min_count`` / ``max_vocab``);
* ``manifest.json``: normalisation, encoding, split and every source with size and SHA-256.

Cleaning is ``corpus.py``'s: the same normalisation as ``train --text``, Gutenberg header and
footer found per file (searched in the file's first and last bytes for big files). One known
difference: a Greek capital sigma on the edge of a 4 MB chunk is lowercased without the
context that decides between final and medial sigma.
"""

from __future__ import annotations

import codecs
import contextlib
import functools
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

import numpy as np

from .corpus import (Normalization, check_encoding, fetch_gutenberg, gutenberg_span,
                     refuse_binary, strip_punctuation, undecodable)
from .errors import CharLSTMError
from .fileio import atomic_write_bytes
from .vocab import UNKNOWN_CHAR, Vocab

FORMAT = "charlstm-prepared"
FORMAT_VERSION = 1
TRAIN_FILE, VAL_FILE, VOCAB_FILE, MANIFEST_FILE = "train.npy", "val.npy", "vocab.json", "manifest.json"
CHUNK_BYTES = 4 << 20
CODE_POINTS = 0x110000
STDIN = "-"


def _ignore(n: int) -> None:
    """Progress callback for worker processes: the parent moves the bar per document."""


@dataclass(frozen=True)
class PrepareConfig:
    """What ``charlstm prepare`` reads and how it cleans, splits and encodes it."""

    inputs: tuple[str, ...] = ()
    output_dir: Path = Path("data")
    gutenberg: tuple[int, ...] = ()
    glob: str = "*.txt"
    normalization: Normalization = field(default_factory=Normalization)
    encoding: str = "utf-8"
    val_fraction: float = 0.1
    min_count: int = 1
    max_vocab: int | None = None
    chunk_bytes: int = CHUNK_BYTES
    workers: int = 0                   # processes for big multi-file corpora, 0 = up to 2 (the cores)
    mirror: str | None = None
    cache_dir: Path | None = None
    offline: bool = False

    def validate(self) -> None:
        if not self.inputs and not self.gutenberg:
            raise CharLSTMError("nothing to prepare: give files, folders, - (stdin) or --gutenberg ID")
        if not 0.0 <= self.val_fraction < 1.0:
            raise CharLSTMError(f"--val-fraction must be in [0, 1), not {self.val_fraction}")
        if self.min_count < 1:
            raise CharLSTMError(f"--min-count must be at least 1, not {self.min_count}")
        if self.max_vocab is not None and self.max_vocab < 2:
            raise CharLSTMError(f"--max-vocab must be at least 2 (one symbol plus the unknown one), not {self.max_vocab}")
        if self.chunk_bytes < 1024:
            raise CharLSTMError(f"chunk size {self.chunk_bytes} is too small")
        check_encoding(self.encoding)
        if self.output_dir.exists() and not self.output_dir.is_dir():
            raise CharLSTMError(f"-o {self.output_dir}: exists and is not a folder")
        if sum(1 for i in self.inputs if i == STDIN) > 1:
            raise CharLSTMError("- (stdin) may be given only once")


@dataclass
class Source:
    """One document: a file, a Gutenberg book or stdin."""

    name: str
    path: Path
    bytes: int = 0
    sha256: str = ""
    characters: int = 0
    val_characters: int = 0
    body: tuple[int, int, bool] | None = None  # the book's byte range, found in pass 1

    def to_dict(self) -> dict:
        return {"name": self.name, "bytes": self.bytes, "sha256": self.sha256, "characters": self.characters,
                "train_characters": self.characters - self.val_characters, "val_characters": self.val_characters}


@dataclass
class PrepareResult:
    output_dir: Path
    vocab: Vocab
    counts: dict[str, int]
    sources: list[Source]
    train_characters: int
    val_characters: int
    unknown_characters: int
    seconds: float
    bytes_read: int

    def summary_lines(self, rarest: int = 10) -> list[str]:
        chars = self.train_characters + self.val_characters
        by_count = sorted(self.counts.items(), key=lambda item: (item[1], item[0]))
        rare = ", ".join(f"{c!r} {n:,}" for c, n in by_count[:rarest])
        mb = self.bytes_read / 1e6
        lines = [
            f"sources: {len(self.sources):,} documents, {mb:,.1f} MB prepared in {self.seconds:.1f} s "
            f"({mb / max(self.seconds, 1e-9):,.1f} MB/s, two passes)",
            f"characters: {chars:,} ({self.train_characters:,} training, {self.val_characters:,} validation)",
            f"symbols: {len(self.vocab):,} (ids stored as {self.vocab.dtype.name})",
            f"rarest: {rare}",
        ]
        if self.vocab.unknown_char is not None:
            lines.append(f"unknown symbol {self.vocab.unknown_char!r}: {self.unknown_characters:,} characters "
                         f"of rarer symbols folded into it")
        lines.append(f"wrote {self.output_dir}")
        return lines


def prepare(config: PrepareConfig, progress: bool = True, log: Callable[[str], None] = print) -> PrepareResult:
    """Read, clean, count, split and encode the sources into ``config.output_dir``."""
    config.validate()
    config.output_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".prepare-", dir=config.output_dir) as scratch:
        sources = resolve_sources(config, Path(scratch))
        started = time.perf_counter()
        total = sum(s.path.stat().st_size for s in sources)
        with _workers(config, sources, total) as pool:
            with _progress(total, "1/2 counting", progress) as bar:
                counts = np.zeros(CODE_POINTS, dtype=np.int64)
                tasks = [(source, config) for source in sources]
                for i, (counted, codes, hits) in enumerate(_run(pool, _count_source, tasks, bar)):
                    sources[i] = counted
                    counts[codes] += hits
            vocab, kept_counts, unknown = build_vocab(counts, config.min_count, config.max_vocab)
            for source in sources:
                source.val_characters = _val_share(source.characters, config.val_fraction)
            n_val = sum(s.val_characters for s in sources)
            n_train = sum(s.characters for s in sources) - n_val
            if n_train < 2:
                raise CharLSTMError("the sources hold no text after cleaning")
            with _progress(total, "2/2 encoding", progress) as bar:
                _write_ids(sources, config, vocab, n_train, n_val, Path(scratch), pool, bar)
        seconds = time.perf_counter() - started
    result = PrepareResult(config.output_dir, vocab, kept_counts, sources, n_train, n_val, unknown, seconds, total)
    _write_metadata(result, config)
    return result


# ----------------------------------------------------------------------- sources


def resolve_sources(config: PrepareConfig, scratch: Path) -> list[Source]:
    """Files as given, folders searched recursively for ``glob`` (sorted), books, stdin spooled."""
    sources: list[Source] = []
    for item in config.inputs:
        if item == STDIN:
            sources.append(Source("<stdin>", _spool_stdin(scratch / "stdin.txt")))
            continue
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob(config.glob) if p.is_file() and p.stat().st_size > 0)
            if not found:
                raise CharLSTMError(f"{path}: no non-empty files matching {config.glob!r} (see --glob)")
            sources.extend(Source(str(p), p) for p in found)
        else:
            read_text_bytes_check(path)
            sources.append(Source(str(path), path))
    for book in config.gutenberg:
        path = fetch_gutenberg(book, mirror=config.mirror, cache_dir=config.cache_dir, offline=config.offline)
        sources.append(Source(f"gutenberg:{book}", path))
    return sources


def read_text_bytes_check(path: Path) -> None:
    """The checks ``read_text_bytes`` makes (exists, not empty, not over 2 GiB), without reading."""
    if not path.is_file():
        raise CharLSTMError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise CharLSTMError(f"{path}: the file is empty")


def _spool_stdin(path: Path) -> Path:
    """Stdin can be read only once; both passes read this copy instead."""
    with open(path, "wb") as out:
        shutil.copyfileobj(sys.stdin.buffer, out, CHUNK_BYTES)
    if path.stat().st_size == 0:
        raise CharLSTMError("-: stdin is empty")
    return path


# ----------------------------------------------------------------------- cleaning in chunks


def _ascii_compatible(encoding: str) -> bool:
    probe = "\r\n *THE END START OF Project Gutenberg"
    try:
        return codecs.encode(probe, encoding) == probe.encode("ascii")
    except (UnicodeError, LookupError):
        return False


def body_byte_range(handle: BinaryIO, size: int, norm: Normalization, encoding: str) -> tuple[int, int, bool]:
    """The bytes of the book in a file: Gutenberg header and footer cut off by ``corpus.py``'s
    rules. The markers are ASCII, so they are searched in the raw bytes read as Latin-1 (one
    character per byte: positions are byte offsets); only the file's head and tail are read."""
    if not norm.strip_gutenberg or not _ascii_compatible(encoding):
        return 0, size, False

    def read(lo: int, hi: int) -> str:
        handle.seek(lo)
        return handle.read(hi - lo).decode("latin-1")

    return gutenberg_span(size, read)


def iter_clean_chunks(source: Source, config: PrepareConfig, on_bytes: Callable[[int], None],
                      hasher=None) -> Iterator["CleanChunk"]:
    """The source's cleaned text in chunks: exactly ``normalize()`` of the whole file, plus a
    final newline so that documents never run into each other. Reads the whole file (for the
    hash, the NUL check and the progress bar) but decodes only the book's byte range, which
    pass 1 finds and stores in ``source.body``."""
    norm, encoding = config.normalization, config.encoding
    size = source.path.stat().st_size
    with open(source.path, "rb") as handle:
        if source.body is None:
            source.body = body_byte_range(handle, size, norm, encoding)
            handle.seek(0)
        start, end, add_newline = source.body
        cleaner = _chunk_cleaner(source.path, encoding, norm, skip_bom=start == 0, first_offset=start)
        offset = 0
        while chunk := handle.read(config.chunk_bytes):
            if hasher is not None:  # pass 1 reads every byte once: hash it and look for NULs
                hasher.update(chunk)
                refuse_binary(source.path, chunk, encoding, offset)
            lo, hi = max(start, offset) - offset, min(end, offset + len(chunk)) - offset
            offset += len(chunk)
            if lo < hi:
                clean = cleaner.feed(chunk[lo:hi])
                if len(clean):
                    yield clean
            on_bytes(len(chunk))
    clean = cleaner.finish()
    if add_newline:
        clean = clean.with_newline()
    last = clean.last_code() if len(clean) else cleaner.last_code
    if last not in (-1, 10):
        clean = clean.with_newline()  # documents never run into each other
    if len(clean):
        yield clean


EMPTY_POSITIONS = np.zeros(0, dtype=np.int64)
EMPTY_CODES = np.zeros(0, dtype=np.uint32)
IDENTITY_BYTES = np.arange(256, dtype=np.uint8)
LOWER_BYTES = np.frombuffer(bytes(range(256)).lower(), dtype=np.uint8)  # A-Z -> a-z, nothing else
CONTINUATION_BYTES = bytes(range(0x80, 0xC0))
WIDE_PLACEHOLDER = 0xFF  # never in UTF-8; stands for a character that needs more than a byte


@dataclass(frozen=True)
class CleanChunk:
    """A piece of cleaned text kept as the bytes it was read from, since English text is mostly
    ASCII: the text is ``raw`` with every ASCII byte mapped through ``byte_map`` (lowercasing),
    the bytes at ``drop`` (the CRs of CRLF) and the continuation bytes of wider characters left
    out, and each wider character's first byte (at ``lead``) standing for its code point in
    ``wide``. Counting works on a byte histogram and encoding is one ``bytes.translate``; only
    the few wide characters take 32 bits. (The general cleaner hands over code points, with
    WIDE_PLACEHOLDER bytes where the wide ones stand.)"""

    raw: bytes
    byte_map: np.ndarray = field(default_factory=lambda: IDENTITY_BYTES)
    drop: np.ndarray = field(default_factory=lambda: EMPTY_POSITIONS)
    wide: np.ndarray = field(default_factory=lambda: EMPTY_CODES)
    lead: np.ndarray = field(default_factory=lambda: EMPTY_POSITIONS)
    cont: np.ndarray = field(default_factory=lambda: EMPTY_POSITIONS)

    @classmethod
    def from_codes(cls, codes: np.ndarray) -> "CleanChunk":
        if codes.dtype == np.uint8:
            return cls(codes.tobytes())
        lead = np.flatnonzero(codes >= 128)
        data = codes.astype(np.uint8)
        data[lead] = WIDE_PLACEHOLDER
        return cls(data.tobytes(), wide=codes[lead].astype(np.uint32), lead=lead)

    def __len__(self) -> int:
        return len(self.raw) - len(self.drop) - len(self.cont)

    def _deleted(self) -> bytes:
        return CONTINUATION_BYTES + (b"\r" if len(self.drop) else b"")

    def _wide_positions(self) -> np.ndarray:
        """Where the wide characters stand in the cleaned text."""
        return self.lead - np.searchsorted(self.drop, self.lead) - np.searchsorted(self.cont, self.lead)

    def counts(self) -> np.ndarray:
        """How often each code point occurs (an array up to the largest one)."""
        raw_counts = byte_histogram(np.frombuffer(self.raw, dtype=np.uint8))
        counts = np.zeros(max(128, int(self.wide.max()) + 1 if len(self.wide) else 0), dtype=np.int64)
        np.add.at(counts, self.byte_map[:128], raw_counts[:128])
        counts[13] -= len(self.drop)
        if len(self.wide):
            counts += np.bincount(self.wide, minlength=len(counts))
        return counts

    def ids(self, table: np.ndarray) -> np.ndarray:
        """Ids through the vocabulary's code-point table: for uint8 ids, the whole chunk in one
        ``bytes.translate`` (3x faster than numpy's indexing); then the wide characters."""
        if table.dtype == np.uint8:
            ids = np.frombuffer(self.raw.translate(table[self.byte_map].tobytes(), self._deleted()), dtype=np.uint8)
            if not len(self.wide):
                return ids
            ids = ids.copy()
        else:
            ids = table[np.frombuffer(self.raw.translate(self.byte_map.tobytes(), self._deleted()), dtype=np.uint8)]
        ids[self._wide_positions()] = table[self.wide]
        return ids

    def last_code(self) -> int:
        last = self.raw[-1]  # never a dropped CR: a CR at a chunk's end is held or alone
        return int(self.wide[-1]) if last >= 0x80 else int(self.byte_map[last])

    def with_newline(self) -> "CleanChunk":
        return CleanChunk(self.raw + b"\n", self.byte_map, self.drop, self.wide, self.lead, self.cont)


def byte_histogram(data: np.ndarray) -> np.ndarray:
    """How often each byte value occurs in a uint8 array. ``np.bincount`` first widens every
    element to 64 bits; over byte pairs (uint16) it widens half as many, then the 65,536 pair
    counts fold into 256."""
    if len(data) < 1 << 18:
        return np.bincount(data, minlength=256)
    even = len(data) & ~1
    pairs = np.bincount(data[:even].view(np.uint16), minlength=1 << 16).reshape(256, 256)
    counts = pairs.sum(axis=0) + pairs.sum(axis=1)
    if even < len(data):
        counts[data[-1]] += 1
    return counts


def _chunk_cleaner(path: Path, encoding: str, norm: Normalization, skip_bom: bool, first_offset: int):
    """The UTF-8 cleaner on bytes where it applies (UTF-8, punctuation kept), else the general one."""
    if codecs.lookup(encoding).name == "utf-8" and not norm.strip_punctuation:
        return _Utf8Cleaner(path, norm, skip_bom, first_offset)
    return _ChunkCleaner(path, encoding, norm, skip_bom, first_offset)


class _Utf8Cleaner:
    """Incremental ``normalize()`` (without the Gutenberg step and punctuation stripping) of
    UTF-8 bytes, on the bytes themselves (see ``CleanChunk``): only the runs of non-ASCII bytes
    are decoded (an ASCII byte never belongs to a multi-byte character, so the text is valid
    UTF-8 exactly when every such run is). A CR or an unfinished character at the end of a
    chunk is held back for the next one."""

    def __init__(self, path: Path, norm: Normalization, skip_bom: bool, first_offset: int):
        self.path, self.norm = path, norm
        self.byte_map = LOWER_BYTES if norm.lowercase else IDENTITY_BYTES
        self.skip_bom, self.fed, self.held, self.last_code = skip_bom, first_offset, b"", -1

    def feed(self, raw: bytes, final: bool = False) -> CleanChunk:
        data, at = self.held + raw, self.fed - len(self.held)  # ``at``: the file offset of data[0]
        self.fed += len(raw)
        self.held = b""
        if self.skip_bom:
            while data.startswith(codecs.BOM_UTF8):
                data, at = data[3:], at + 3
            self.skip_bom = not data
        if not final and (hold := _unfinished_tail(data)):
            data, self.held = data[:-hold], data[-hold:]
        checked, codes, drop = data, np.frombuffer(data, dtype=np.uint8), EMPTY_POSITIONS
        if b"\r" in data:
            drop = np.flatnonzero(codes == 13)
            if drop[-1] == len(codes) - 1 or np.any(codes[drop + 1] != 10):  # old Mac line ends: CR alone
                data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
                codes, drop = np.frombuffer(data, dtype=np.uint8), EMPTY_POSITIONS
        clean = CleanChunk(data, self.byte_map, drop)
        if not data.isascii():
            clean = self._with_wide(clean, codes, checked, at)
        if len(clean):
            self.last_code = clean.last_code()
        return clean

    def finish(self) -> CleanChunk:
        return self.feed(b"", final=True)

    def _with_wide(self, clean: CleanChunk, codes: np.ndarray, checked: bytes, at: int) -> CleanChunk:
        high = np.flatnonzero(codes >= 0x80)
        runs = np.flatnonzero(np.diff(high) != 1) + 1
        # the runs of non-ASCII bytes with an ASCII newline between them: each must decode alone
        joined = np.insert(codes[high], runs, np.uint8(10)).tobytes()
        try:
            text = joined.decode("utf-8")
        except UnicodeDecodeError:
            raise undecodable(self.path, "utf-8", at + _utf8_error_at(checked)) from None
        wide = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        wide = wide[wide != 10]
        if self.norm.lowercase:
            if np.any((wide == 0x130) | (wide == 0x3A3)):
                # the two context- or length-changing lowercasings: str.lower does them
                text = clean.raw.decode("utf-8").replace("\r\n", "\n").lower()
                return CleanChunk.from_codes(text_codes(text))
            wide = lower_table(_table_size(wide))[wide]
        is_cont = (codes[high] & 0xC0) == 0x80
        return CleanChunk(clean.raw, clean.byte_map, clean.drop, wide, high[~is_cont], high[is_cont])


def _unfinished_tail(data: bytes) -> int:
    """How many bytes at the end of ``data`` must wait for the next chunk: a CR (its LF may
    follow) or the start of a UTF-8 character whose other bytes are still to come."""
    if data.endswith(b"\r"):
        return 1
    for back in range(1, min(len(data), 3) + 1):
        byte = data[-back]
        if byte < 0x80:
            return 0
        if byte >= 0xC0:
            needed = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return back if needed > back else 0
    return 0


def _utf8_error_at(data: bytes) -> int:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        return err.start
    return len(data)


class _ChunkCleaner:
    """Incremental ``normalize()`` without the Gutenberg step, on code-point arrays: BOM, CRLF/CR,
    lowercase and punctuation through lookup tables (``str.lower`` is 20x slower on non-ASCII
    text). A CR at the end of a chunk is held back, since the next chunk may start with its LF.
    """

    def __init__(self, path: Path, encoding: str, norm: Normalization, skip_bom: bool, first_offset: int):
        self.path, self.encoding, self.norm = path, encoding, norm
        self.decoder = codecs.getincrementaldecoder(encoding)(errors="strict")
        self.skip_bom, self.fed, self.held_cr, self.last_code = skip_bom, first_offset, False, -1
        # CR and LF bytes never occur inside a character of an ASCII-compatible encoding, so
        # line ends are fixed on the bytes, before decoding (bytes.replace is the fastest way)
        self.byte_newlines = _ascii_compatible(encoding)
        self.byte_lower = norm.lowercase and codecs.lookup(encoding).name == "utf-8"

    def feed(self, raw: bytes, final: bool = False) -> "CleanChunk":
        return CleanChunk.from_codes(self._feed_codes(raw, final))

    def _feed_codes(self, raw: bytes, final: bool) -> np.ndarray:
        pending = self._pending_bytes()
        original = raw
        if self.byte_newlines:
            raw = self._byte_newlines(raw, final)
        if self.byte_lower:
            raw = raw.lower()  # A-Z only: in UTF-8 every byte of a non-ASCII character is >= 0x80
        try:
            text = self.decoder.decode(raw, final=final)
        except UnicodeDecodeError:
            raise undecodable(self.path, self.encoding, self._error_offset(pending, original, final)) from None
        self.fed += len(original)
        if self.skip_bom and text:
            text, self.skip_bom = text.lstrip("\ufeff"), False
        if self.norm.lowercase and ("\u0130" in text or "\u03a3" in text):
            text = text.lower()  # the two context- or length-changing lowercasings: str does them
        codes = text_codes(text)
        if not self.byte_newlines:
            codes = self._newlines(codes, final)
        if self.norm.lowercase or self.norm.strip_punctuation:
            tables = char_tables(_table_size(codes))
            if codes.dtype == np.uint8:  # ASCII stays ASCII under both
                tables = tables.ascii
            if self.norm.lowercase:
                codes = self._lower(codes, tables)
            if self.norm.strip_punctuation:
                codes = tables.punctuation_map[codes][tables.kept[codes]]
        if len(codes):
            self.last_code = int(codes[-1])
        return codes

    def finish(self) -> "CleanChunk":
        return self.feed(b"", final=True)

    def _lower(self, codes: np.ndarray, tables: "CharTables") -> np.ndarray:
        """Lowercase through the table; after ``bytes.lower`` only the non-ASCII characters
        (few, in most texts) still need it."""
        if not self.byte_lower:
            return tables.lower[codes]
        if codes.dtype == np.uint8:
            return codes
        high = np.flatnonzero(codes >= 128)
        if len(high) == 0:
            return codes
        lowered = codes.copy()
        lowered[high] = tables.lower[codes[high]]
        return lowered

    def _byte_newlines(self, raw: bytes, final: bool) -> bytes:
        if self.held_cr:
            raw = b"\r" + raw
        self.held_cr = raw.endswith(b"\r") and not final
        if self.held_cr:
            raw = raw[:-1]
        raw = raw.replace(b"\r\n", b"\n")
        return raw.replace(b"\r", b"\n") if b"\r" in raw else raw

    def _error_offset(self, pending: bytes, original: bytes, final: bool) -> int:
        """The file offset of the first undecodable byte (the bytes decoded had CRs removed)."""
        try:
            codecs.getincrementaldecoder(self.encoding)(errors="strict").decode(pending + original, final=final)
        except UnicodeDecodeError as err:
            return self.fed - len(pending) + err.start
        return self.fed

    def _newlines(self, codes: np.ndarray, final: bool) -> np.ndarray:
        """CRLF -> LF, lone CR -> LF, across chunk boundaries."""
        if self.held_cr:
            codes = np.concatenate([np.array([13], dtype=codes.dtype), codes])
        self.held_cr = bool(len(codes)) and codes[-1] == 13 and not final
        if self.held_cr:
            codes = codes[:-1]
        cr = np.flatnonzero(codes == 13)
        if len(cr) == 0:
            return codes
        before_lf = cr[cr + 1 < len(codes)]
        before_lf = before_lf[codes[before_lf + 1] == 10]
        codes = codes.copy()
        codes[cr] = 10
        return np.delete(codes, before_lf)

    def _pending_bytes(self) -> bytes:
        state = self.decoder.getstate()
        return state[0] if isinstance(state, tuple) and isinstance(state[0], bytes) else b""


def text_codes(text: str) -> np.ndarray:
    """Code points of ``text``: one byte each for ASCII (the common case, 4x less work)."""
    if text.isascii():
        return np.frombuffer(text.encode("ascii"), dtype=np.uint8)
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)


@dataclass
class CharTables:
    """Per-code-point ``str.lower`` and ``corpus.strip_punctuation``, for code points below a limit."""

    lower: np.ndarray            # code point -> lowercase code point
    kept: np.ndarray             # strip_punctuation keeps it
    punctuation_map: np.ndarray  # what it becomes (other whitespace -> space)

    @functools.cached_property
    def ascii(self) -> "CharTables":
        """The first 128 entries as uint8, for ASCII chunks."""
        return CharTables(self.lower[:128].astype(np.uint8), self.kept[:128],
                          self.punctuation_map[:128].astype(np.uint8))


def _table_size(codes: np.ndarray) -> int:
    """Tables grow in powers of two up to the largest code point seen (ASCII: 256 entries)."""
    if codes.dtype == np.uint8 or len(codes) == 0:
        return 256
    return min(1 << int(codes.max()).bit_length(), CODE_POINTS)


@functools.lru_cache(maxsize=8)
def lower_table(size: int) -> np.ndarray:
    """Code point -> ``str.lower`` of it, where that is one character (all but U+0130)."""
    chars = (chr(c) for c in range(size))
    return np.array([ord(low) if len(low := ch.lower()) == 1 else ord(ch) for ch in chars], dtype=np.uint32)


@functools.lru_cache(maxsize=8)
def char_tables(size: int) -> CharTables:
    chars = [chr(c) for c in range(size)]
    lower = lower_table(size)
    cleaned = [strip_punctuation(ch) for ch in chars]
    kept = np.array([len(c) == 1 for c in cleaned], dtype=bool)
    mapped = np.array([ord(c) if len(c) == 1 else 0 for c in cleaned], dtype=np.uint32)
    return CharTables(lower, kept, mapped)


# ----------------------------------------------------------------------- pass 1: counting


def _count_source(source: Source, config: PrepareConfig, on_bytes=_ignore) -> tuple[Source, np.ndarray, np.ndarray]:
    """Pass 1 for one document: its size, hash, book range, length and character counts (as
    the code points seen and how often: small to send back from a worker process)."""
    hasher, counts = hashlib.sha256(), np.zeros(256, dtype=np.int64)
    for clean in iter_clean_chunks(source, config, on_bytes, hasher):
        source.characters += len(clean)
        hist = clean.counts()
        if len(hist) > len(counts):
            hist[:len(counts)] += counts
            counts = hist
        else:
            counts[:len(hist)] += hist
    source.bytes, source.sha256 = source.path.stat().st_size, hasher.hexdigest()
    seen = np.flatnonzero(counts)
    return source, seen, counts[seen]


def build_vocab(counts: np.ndarray, min_count: int = 1, max_vocab: int | None = None) -> tuple[Vocab, dict[str, int], int]:
    """Symbols seen at least ``min_count`` times, at most ``max_vocab`` of them (the most
    frequent); anything left out becomes one unknown symbol, itself part of the vocabulary.
    Returns the vocabulary, each symbol's count and how many characters were folded into it."""
    seen = np.flatnonzero(counts)
    if len(seen) == 0:
        raise CharLSTMError("the sources hold no text after cleaning")
    keep = seen[counts[seen] >= min_count]
    if max_vocab is None or len(keep) <= max_vocab and len(keep) == len(seen):
        if len(keep) == len(seen):
            chars = tuple(chr(c) for c in keep)
            return Vocab(chars), {chr(c): int(counts[c]) for c in keep}, 0
    unknown_code = ord(UNKNOWN_CHAR)
    keep = keep[keep != unknown_code]  # a real U+FFFD in the text joins the unknown symbol
    limit = len(keep) if max_vocab is None else max_vocab - 1
    if len(keep) > limit:
        order = np.lexsort((keep, -counts[keep]))  # most frequent first, ties by code point
        keep = np.sort(keep[order[:limit]])
    dropped = np.setdiff1d(seen, keep)
    kept_counts = {chr(c): int(counts[c]) for c in keep}
    kept_counts[UNKNOWN_CHAR] = int(counts[dropped].sum())
    folded = kept_counts[UNKNOWN_CHAR] - int(counts[unknown_code])
    chars = tuple(sorted(kept_counts))
    return Vocab(chars, UNKNOWN_CHAR), {c: kept_counts[c] for c in chars}, folded


def _val_share(characters: int, val_fraction: float) -> int:
    """The validation part of one document: its last ``val_fraction`` (never all of it)."""
    return min(int(round(characters * val_fraction)), max(characters - 1, 0))


# ----------------------------------------------------------------------- pass 2: encoding


def _write_ids(sources: list[Source], config: PrepareConfig, vocab: Vocab, n_train: int, n_val: int,
               scratch: Path, pool, bar) -> None:
    """Encode every document; its first part goes to train.npy, its last to val.npy. Each
    document's place in both files is known from pass 1, so workers write side by side."""
    files = {name: scratch / name for name in (TRAIN_FILE, VAL_FILE)}
    starts = {}
    for name, length in ((TRAIN_FILE, n_train), (VAL_FILE, n_val)):
        with open(files[name], "wb") as handle:
            _write_npy_header(handle, vocab.dtype, length)
            starts[name] = handle.tell()
            handle.truncate(starts[name] + length * vocab.dtype.itemsize)
    tasks, at = [], dict(starts)
    for source in sources:
        n_val_doc = source.val_characters
        tasks.append((source, config, vocab, str(files[TRAIN_FILE]), at[TRAIN_FILE], str(files[VAL_FILE]), at[VAL_FILE]))
        at[TRAIN_FILE] += (source.characters - n_val_doc) * vocab.dtype.itemsize
        at[VAL_FILE] += n_val_doc * vocab.dtype.itemsize
    for source, written in zip(sources, _run(pool, _encode_source, tasks, bar)):
        if written != source.characters:  # the file changed between the two passes
            raise CharLSTMError(f"{source.name}: changed while being prepared ({source.characters:,} "
                                f"characters, then {written:,}); run prepare again")
    for name, path in files.items():
        os.replace(path, config.output_dir / name)


def _encode_source(source: Source, config: PrepareConfig, vocab: Vocab, train_path: str, train_at: int,
                   val_path: str, val_at: int, on_bytes=_ignore) -> int:
    """Pass 2 for one document: its ids written at its places in train.npy and val.npy."""
    table, to_train, written = vocab.code_table(), source.characters - source.val_characters, 0
    with open(train_path, "r+b") as train_out, open(val_path, "r+b") as val_out:
        train_out.seek(train_at)
        val_out.seek(val_at)
        for clean in iter_clean_chunks(source, config, on_bytes):
            ids = clean.ids(table)
            cut = min(max(to_train - written, 0), len(ids))
            train_out.write(memoryview(ids[:cut]))
            val_out.write(memoryview(ids[cut:]))
            written += len(ids)
    return written


# ----------------------------------------------------------------------- worker processes


WORKER_MIN_BYTES = 16 << 20  # below this, starting processes costs more than it saves


@contextlib.contextmanager
def _workers(config: PrepareConfig, sources: list[Source], total: int):
    """A pool of forked worker processes, one document per task, or None to work in-process
    (one document, small corpora, one core, or no fork on this platform)."""
    wanted = config.workers or min(2, os.cpu_count() or 1)
    if wanted < 2 or len(sources) < 2 or total < WORKER_MIN_BYTES or "fork" not in mp.get_all_start_methods():
        yield None
        return
    with mp.get_context("fork").Pool(min(wanted, len(sources)), initializer=_quiet_worker) as pool:
        yield pool


def _quiet_worker() -> None:
    """Workers end silently when the pool ends them (SIGTERM) and leave Ctrl-C to the parent:
    the CLI's handlers, inherited by the fork, would print a traceback per worker."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _run(pool, function, tasks: list[tuple], bar):
    """``function(*task)`` for every task, results in order; in-process the progress bar moves
    chunk by chunk, with workers document by document."""
    if pool is None:
        for task in tasks:
            yield function(*task, on_bytes=bar.update)
        return
    for task, result in zip(tasks, pool.imap(_call, [(function, task) for task in tasks])):
        bar.update(task[0].path.stat().st_size)
        yield result


def _call(job):
    function, task = job
    return function(*task)


def _write_npy_header(handle: BinaryIO, dtype: np.dtype, length: int) -> None:
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (length,)}
    np.lib.format.write_array_header_1_0(handle, header)


def _write_metadata(result: PrepareResult, config: PrepareConfig) -> None:
    vocab = {"chars": list(result.vocab.chars), "counts": [result.counts[c] for c in result.vocab.chars],
             "unknown": result.vocab.unknown_char}
    atomic_write_bytes(config.output_dir / VOCAB_FILE, json.dumps(vocab, ensure_ascii=False).encode())
    manifest = {
        "format": FORMAT, "version": FORMAT_VERSION,
        "normalization": config.normalization.to_dict(),
        "encoding": codecs.lookup(config.encoding).name,
        "val_fraction": config.val_fraction, "min_count": config.min_count, "max_vocab": config.max_vocab,
        "dtype": result.vocab.dtype.name, "vocab_size": len(result.vocab),
        "train_characters": result.train_characters, "val_characters": result.val_characters,
        "unknown_characters": result.unknown_characters,
        "sources": [s.to_dict() for s in result.sources],
    }
    # Written last: a folder with a manifest is a complete one.
    atomic_write_bytes(config.output_dir / MANIFEST_FILE, json.dumps(manifest, ensure_ascii=False, indent=1).encode())


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1000, dynamic_ncols=True,
                file=sys.stderr)


# ----------------------------------------------------------------------- reading it back


@dataclass
class PreparedData:
    """A prepared folder opened for training: the id arrays are memory maps, never read whole."""

    directory: Path
    vocab: Vocab
    normalization: Normalization
    train_ids: np.ndarray
    val_ids: np.ndarray
    manifest: dict

    @classmethod
    def open(cls, directory: str | os.PathLike) -> "PreparedData":
        directory = Path(directory)
        manifest = _read_json(directory / MANIFEST_FILE, "run charlstm prepare first")
        if manifest.get("format") != FORMAT:
            raise CharLSTMError(f"{directory / MANIFEST_FILE}: not a charlstm prepare manifest")
        if manifest.get("version", 0) > FORMAT_VERSION:
            raise CharLSTMError(f"{directory}: prepared by a newer charlstm (format {manifest.get('version')})")
        stored = _read_json(directory / VOCAB_FILE, "the folder is incomplete; run charlstm prepare again")
        vocab = Vocab.from_json({"chars": stored.get("chars"), "unknown": stored.get("unknown")})
        train = _open_ids(directory / TRAIN_FILE, vocab, manifest.get("train_characters"))
        val = _open_ids(directory / VAL_FILE, vocab, manifest.get("val_characters"))
        norm = Normalization.from_dict(manifest.get("normalization", {}))
        return cls(directory, vocab, norm, train, val, manifest)

    @property
    def sources(self) -> list[str]:
        return [s.get("name", "?") for s in self.manifest.get("sources", [])]

    def symbol_counts(self) -> np.ndarray | None:
        """Each symbol's count in the prepared text (vocab.json), or None where it lacks them."""
        try:
            counts = json.loads((self.directory / VOCAB_FILE).read_text(encoding="utf-8")).get("counts")
            counts = np.asarray(counts, dtype=np.int64)
        except (OSError, ValueError, TypeError, AttributeError):
            return None
        return counts if counts.shape == (len(self.vocab),) and (counts >= 0).all() else None

    @property
    def fingerprint(self) -> str:
        """Names the data without reading it: the manifest (sources' SHA-256, cleaning, split)."""
        return hashlib.sha256(json.dumps(self.manifest, sort_keys=True).encode()).hexdigest()[:16]


def _read_json(path: Path, hint: str) -> dict:
    if not path.is_file():
        raise CharLSTMError(f"{path}: missing; {hint}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CharLSTMError(f"{path}: corrupted ({err})") from None
    if not isinstance(data, dict):
        raise CharLSTMError(f"{path}: corrupted (not a JSON object)")
    return data


def _open_ids(path: Path, vocab: Vocab, expected) -> np.ndarray:
    """Memory-map an id file, checking its type and length against the manifest."""
    if not path.is_file():
        raise CharLSTMError(f"{path}: missing; run charlstm prepare again")
    try:
        ids = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as err:
        raise CharLSTMError(f"{path}: corrupted id file ({err})") from None
    if ids.ndim != 1 or ids.dtype != vocab.dtype or (expected is not None and len(ids) != expected):
        raise CharLSTMError(f"{path}: {ids.dtype}[{len(ids) if ids.ndim == 1 else ids.shape}] does not match the "
                            f"manifest ({vocab.dtype.name}[{expected}]); run charlstm prepare again")
    return ids
