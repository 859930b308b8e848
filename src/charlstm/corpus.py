"""Stage 1: getting text. Reads files or Project Gutenberg books and cleans them.

Cleaning follows the tutorial: drop the Gutenberg header (through the ``*** START OF ...``
line, in any of the variants Gutenberg has shipped), end the book at the footer (``*** END OF
...`` or the "End of the Project Gutenberg EBook" line before it) or, in a file without one,
at its last ``THE END`` line; lowercase by default.
"""

from __future__ import annotations

import codecs
import os
import re
import stat
import time
import unicodedata
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from .checks import check_no_nul
from .errors import CharLSTMError
from .fileio import atomic_write_bytes, user_cache_dir

DEFAULT_BOOK = 11
MIRROR_ENV = "CHARLSTM_MIRROR"
CACHE_ENV = "CHARLSTM_CACHE_DIR"
USER_AGENT = "charlstm/0.1 (character-level LSTM toolkit; +https://pypi.org/project/charlstm/)"
GUTENBERG_URLS = (
    "https://www.gutenberg.org/cache/epub/{id}/pg{id}.txt",
    "https://www.gutenberg.org/files/{id}/{id}-0.txt",
    "https://www.gutenberg.org/files/{id}/{id}.txt",
)
# Names a book may have inside a mirror directory or under a mirror URL, in order of preference.
MIRROR_NAMES = ("pg{id}.txt", "{id}-0.txt", "{id}.txt", "{id}/pg{id}.txt", "{id}/{id}-0.txt")

# The marker variants Gutenberg has shipped: indented or not, with or without the space after
# ``***``, THIS/THE, EBOOK/E-BOOK/ETEXT, a title wrapped onto a second line; old etexts end their
# header with the "small print" line and their book with an "End of (the) Project Gutenberg
# Etext" line. Line ends may still be CRLF here (``prepare`` searches raw file windows).
_START_RE = re.compile(r"^[ \t]*\*\*\* ?START OF (THIS|THE) PROJECT GUTENBERG (E-?BOOK|ETEXT)"
                       r"(?:[^*\n]*\n(?=[^\n]*\*\*\*))?.*$", re.M | re.I)  # a title may wrap onto a 2nd line
_SMALL_PRINT_END_RE = re.compile(r"^[ \t]*\*END\*? ?THE SMALL PRINT.*$", re.M | re.I)
_END_RE = re.compile(r"^[ \t]*(\*\*\* ?END OF (THIS|THE) PROJECT GUTENBERG (E-?BOOK|ETEXT)"
                     r"|END OF (THE |THIS )?PROJECT GUTENBERG(\S{1,3}S)?\b).*$", re.M | re.I)  # 's, ’s (3 bytes in UTF-8)
_THE_END_RE = re.compile(r"^[ \t]*THE END[ \t.\r]*$", re.M)
MAX_TEXT_BYTES = 2 * 1024**3


@dataclass(frozen=True)
class Normalization:
    """How raw text becomes training text; stored in every checkpoint."""

    lowercase: bool = True
    strip_punctuation: bool = False
    strip_gutenberg: bool = True

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Normalization":
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


@dataclass
class Corpus:
    """Cleaned text ready for the vocabulary stage, plus where it came from."""

    text: str
    sources: list[str] = field(default_factory=list)
    normalization: Normalization = field(default_factory=Normalization)

    @classmethod
    def from_files(cls, paths, normalization: Normalization | None = None, encoding: str = "utf-8") -> "Corpus":
        norm = normalization or Normalization()
        paths = [Path(p) for p in ([paths] if isinstance(paths, (str, os.PathLike)) else paths)]
        if not paths:
            raise CharLSTMError("no text given: pass --text FILE or --gutenberg ID")
        check_encoding(encoding)
        parts = [normalize(read_text_file(p, encoding), norm) for p in paths]
        return cls._checked("\n".join(parts), [str(p) for p in paths], norm)

    @classmethod
    def gutenberg(
        cls,
        book_id: int = DEFAULT_BOOK,
        normalization: Normalization | None = None,
        mirror: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        offline: bool = False,
        encoding: str = "utf-8",
    ) -> "Corpus":
        norm = normalization or Normalization()
        check_encoding(encoding)
        path = fetch_gutenberg(book_id, mirror=mirror, cache_dir=cache_dir, offline=offline)
        return cls._checked(normalize(read_text_file(path, encoding), norm), [f"gutenberg:{book_id}"], norm)

    @classmethod
    def from_string(cls, text: str, normalization: Normalization | None = None) -> "Corpus":
        norm = normalization or Normalization()
        return cls._checked(normalize(text, norm), ["<string>"], norm)

    @classmethod
    def _checked(cls, text: str, sources: list[str], norm: Normalization) -> "Corpus":
        if not text.strip():
            raise CharLSTMError(f"{', '.join(sources)}: the text is empty after cleaning")
        return cls(text=text, sources=sources, normalization=norm)

    def __len__(self) -> int:
        return len(self.text)


def check_input_file(path: Path, what: str = "file") -> os.stat_result:
    """A regular file that exists and can be opened; one clear line for everything else (a
    folder, a FIFO that would block, a symlink loop, no permission, an over-long name)."""
    check_no_nul(path, "file")
    try:
        info = path.stat()
    except FileNotFoundError:
        raise CharLSTMError(f"{path}: no such file") from None
    except OSError as err:
        raise CharLSTMError(f"{path}: cannot read this {what} ({err.strerror or err})") from None
    if stat.S_ISDIR(info.st_mode):
        raise CharLSTMError(f"{path}: is a folder, not a {what}")
    if not stat.S_ISREG(info.st_mode):
        raise CharLSTMError(f"{path}: not a regular file (a FIFO, device or socket); give a {what}")
    if not os.access(path, os.R_OK, effective_ids=os.access in os.supports_effective_ids):
        raise CharLSTMError(f"{path}: no permission to read this {what}")
    return info


def read_text_bytes(path: Path) -> bytes:
    """The bytes of a text file, refusing missing, empty and oversized files (also one that
    grows past the limit or vanishes while it is read)."""
    path = Path(path)
    info = check_input_file(path, "file")
    if info.st_size > MAX_TEXT_BYTES:
        raise CharLSTMError(f"{path}: {info.st_size} bytes is more than the 2 GiB a text may have")
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_TEXT_BYTES + 1)
    except OSError as err:
        raise CharLSTMError(f"{path}: cannot read this text file ({err.strerror or err})") from None
    if len(raw) > MAX_TEXT_BYTES:
        raise CharLSTMError(f"{path}: more than the 2 GiB a text may have (it grew while being read)")
    if not raw:
        raise CharLSTMError(f"{path}: the file is empty")
    return raw


def check_encoding(encoding: str) -> str:
    """The codec's canonical name, or one clear error for a name Python does not know."""
    try:
        return codecs.lookup(encoding).name
    except LookupError:
        raise CharLSTMError(f"--encoding {encoding}: unknown encoding (try utf-8, cp1252, latin-1, utf-16)") from None


def refuse_binary(path: Path | str, data: bytes, encoding: str = "utf-8", offset: int = 0) -> None:
    """NUL bytes anywhere in ``data`` (the file's bytes from ``offset`` on) mean a binary file
    (except in UTF-16/32, where they are normal): a NUL after the first 64 KiB would otherwise
    be trained on as text."""
    nul = data.find(b"\x00")
    if nul >= 0 and not codecs.lookup(encoding).name.startswith(("utf-16", "utf-32")):
        raise CharLSTMError(f"{path}: looks like a binary file (a NUL byte at offset {offset + nul:,}), not text")


def undecodable(path: Path | str, encoding: str, offset: int) -> CharLSTMError:
    """The one-line error for bytes that are not valid in ``encoding``, naming file and byte."""
    name = codecs.lookup(encoding).name
    if name == "utf-8":
        return CharLSTMError(f"{path}: not valid UTF-8 (byte {offset}); convert it, e.g. iconv -f latin1 -t utf-8, "
                             "or pass --encoding (e.g. cp1252)")
    return CharLSTMError(f"{path}: not valid {name} (byte {offset}); pass the file's real --encoding")


def decode_bytes(raw: bytes, path: Path | str, encoding: str = "utf-8") -> str:
    """Decode a whole file's bytes, refusing binary and undecodable text with one clear line."""
    refuse_binary(path, raw, encoding)
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as err:
        raise undecodable(path, encoding, err.start) from None


def read_text_file(path: Path, encoding: str = "utf-8") -> str:
    """Read a text file (UTF-8 unless told), refusing missing, empty, binary and undecodable files."""
    return decode_bytes(read_text_bytes(path), path, encoding)


def normalize(text: str, norm: Normalization) -> str:
    text = text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    if norm.strip_gutenberg:
        text = strip_gutenberg_boilerplate(text)
    if norm.lowercase:
        text = text.lower()
    if norm.strip_punctuation:
        text = strip_punctuation(text)
    return text


GUTENBERG_HEAD = 64 * 1024  # the START marker is looked for this far into a file ...
GUTENBERG_TAIL = 64 * 1024  # ... the footer and THE END this far from its end (licences are ~20 KB)


def strip_gutenberg_boilerplate(text: str) -> str:
    """Cut the licence header and footer; text without Gutenberg markers is returned whole."""
    start, end, add_newline = gutenberg_span(len(text), lambda lo, hi: text[lo:hi])
    return text[start:end] + ("\n" if add_newline else "")


def gutenberg_span(size: int, read: Callable[[int, int], str]) -> tuple[int, int, bool]:
    """Where the book lies in a text of ``size`` characters that ``read(lo, hi)`` returns
    pieces of; only its head and tail are read, so a huge file need not be in memory. The flag
    says a newline must follow the cut."""
    start = gutenberg_body_start(read(0, min(size, GUTENBERG_HEAD)))
    tail_from = max(start, size - GUTENBERG_TAIL)
    end, add_newline = gutenberg_body_end(read(tail_from, size))
    return start, tail_from + end, add_newline


def gutenberg_body_start(head: str) -> int:
    """Where the book starts in ``head`` (a file's beginning): after the START marker line and
    the blank lines below it, or after the old "*END*THE SMALL PRINT" line; 0 without either."""
    marker = _search_lines(_START_RE, head, b"TART OF") or _search_lines(_SMALL_PRINT_END_RE, head, b"MALL PRINT")
    if not marker:
        return 0
    end = marker.end()
    return end + len(head[end:]) - len(head[end:].lstrip("\r\n"))


def gutenberg_body_end(tail: str) -> tuple[int, bool]:
    """Where the book ends in ``tail`` (a file's end, after the start): before the footer's first
    line (trailing blanks dropped); without a footer, just after the last ``THE END`` line (a
    collection has one per story, and plays go on after one). The flag says a newline must
    follow the cut; text without markers is kept whole."""
    footer = _search_lines(_END_RE, tail, b"END OF")
    if footer:  # ASCII whitespace only: prepare searches bytes read as Latin-1
        return len(tail[:footer.start()].rstrip(" \t\r\n\f\v")), True
    first = tail.find("THE END")
    the_ends = list(_THE_END_RE.finditer(tail, tail.rfind("\n", 0, first) + 1)) if first >= 0 else []
    if the_ends:
        end = the_ends[-1].end()
        return end - (tail[end - 1:end] == "\r"), True
    return len(tail), False


def _search_lines(pattern: re.Pattern, text: str, literal: bytes) -> re.Match | None:
    """``pattern.search(text)`` for a line pattern (``^`` in MULTILINE mode) whose matches all
    hold ``literal`` (upper-case ASCII letters without I, K or S, which IGNORECASE also matches
    to non-ASCII letters) on their first line: the regex starts at the first line that holds
    it. (sre tries a ``^`` pattern at every position: 0.3 ms per 64 KB window, per file.)"""
    folded = text.encode("ascii", "replace").upper()  # one byte per character
    at = folded.find(literal)
    while at >= 0:
        line = text.rfind("\n", 0, at) + 1
        if match := pattern.match(text, line):
            return match
        at = folded.find(literal, text.find("\n", at) + 1 or len(text))
    return None


def strip_punctuation(text: str) -> str:
    """Keep letters, digits, combining marks, spaces and newlines; other whitespace becomes a space.

    Everything else (Unicode categories P*, S*, C* but newline) is removed.
    """
    kept = []
    for ch in text:
        if ch == "\n" or ch == " ":
            kept.append(ch)
        elif ch.isspace():
            kept.append(" ")
        elif unicodedata.category(ch)[0] in "LNM":
            kept.append(ch)
    return "".join(kept)


# --------------------------------------------------------------------------- download


def default_cache_dir() -> Path:
    return user_cache_dir("gutenberg", CACHE_ENV)


def fetch_gutenberg(
    book_id: int,
    mirror: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    offline: bool = False,
    retries: int = 3,
    timeout: float = 30.0,
) -> Path:
    """Return a local path to Gutenberg book ``book_id``: cache, then mirror, then download."""
    if not isinstance(book_id, int) or book_id <= 0:
        raise CharLSTMError(f"--gutenberg: {book_id!r} is not a book number (e.g. 11 for Alice)")
    mirror = mirror or os.environ.get(MIRROR_ENV) or None
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    cached = cache / f"pg{book_id}.txt"
    if cached.is_file() and cached.stat().st_size > 0:
        return cached
    if mirror and not _is_url(mirror):
        return _find_in_mirror_dir(Path(mirror), book_id)
    if mirror:
        urls = [mirror.rstrip("/") + "/" + name.format(id=book_id) for name in MIRROR_NAMES]
    elif offline:
        raise CharLSTMError(
            f"book {book_id} is not in the cache ({cache}) and --offline forbids downloading; "
            f"pass --mirror DIR|URL or set {MIRROR_ENV}"
        )
    else:
        urls = [u.format(id=book_id) for u in GUTENBERG_URLS]
    data = _download_first(urls, retries=retries, timeout=timeout, book_id=book_id)
    atomic_write_bytes(cached, data)
    return cached


def _is_url(s: str) -> bool:
    return s.startswith(("http://", "https://"))


def _find_in_mirror_dir(mirror: Path, book_id: int) -> Path:
    if not mirror.is_dir():
        raise CharLSTMError(f"--mirror {mirror}: no such directory")
    for name in MIRROR_NAMES:
        candidate = mirror / name.format(id=book_id)
        if candidate.is_file():
            return candidate
    names = ", ".join(n.format(id=book_id) for n in MIRROR_NAMES[:3])
    raise CharLSTMError(f"--mirror {mirror}: book {book_id} not found (looked for {names})")


def _download_first(urls: list[str], retries: int, timeout: float, book_id: int) -> bytes:
    last_error = "no URL tried"
    for url in urls:
        for attempt in range(retries):
            try:
                return _http_get(url, timeout)
            except urllib.error.HTTPError as err:
                last_error = f"{url}: HTTP {err.code}"
                if err.code == 404:
                    break  # try the next name, retrying cannot help
            except (urllib.error.URLError, TimeoutError, OSError) as err:
                reason = getattr(err, "reason", err)
                last_error = f"{url}: {reason}"
            if attempt + 1 < retries:
                time.sleep(min(0.5 * 2**attempt, 4.0))
    raise CharLSTMError(
        f"could not download Gutenberg book {book_id} ({last_error}); if you are offline, "
        f"pass --mirror DIR|URL or set {MIRROR_ENV} to a folder holding pg{book_id}.txt"
    )


def _http_get(url: str, timeout: float) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        data = response.read(MAX_TEXT_BYTES + 1)
    if not data:
        raise urllib.error.URLError("empty response")
    if len(data) > MAX_TEXT_BYTES:
        raise urllib.error.URLError("response larger than 2 GiB")
    return data

