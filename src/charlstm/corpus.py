"""Stage 1: getting text. Reads files or Project Gutenberg books and cleans them.

Cleaning follows the tutorial: drop the Gutenberg header (through the ``*** START OF ...``
line, in any of the variants Gutenberg has shipped), end the book at the footer (``*** END OF
...`` or the "End of the Project Gutenberg EBook" line before it) or, in a file without one,
at its last ``THE END`` line; lowercase by default.
"""

from __future__ import annotations

import os
import re
import stat
import time
import unicodedata
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import CharLSTMError
from .fileio import atomic_write_bytes

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
# ``***``, THIS/THE, EBOOK/E-BOOK/ETEXT; old etexts end their header with the "small print"
# line and their book with an "End of (the) Project Gutenberg Etext" line.
_START_RE = re.compile(
    r"^[ \t]*(\*\*\* ?START OF (THIS|THE) PROJECT GUTENBERG (E-?BOOK|ETEXT)"
    r"|\*END\*? ?THE SMALL PRINT).*$", re.M | re.I)
_END_RE = re.compile(
    r"^[ \t]*(\*\*\* ?END OF (THIS|THE) PROJECT GUTENBERG (E-?BOOK|ETEXT)"
    r"|END OF (THE |THIS )?PROJECT GUTENBERG(['’]S)?\b).*$", re.M | re.I)
_THE_END_RE = re.compile(r"^[ \t]*THE END[ \t.]*$", re.M)
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
    def from_files(cls, paths, normalization: Normalization | None = None) -> "Corpus":
        norm = normalization or Normalization()
        paths = [Path(p) for p in ([paths] if isinstance(paths, (str, os.PathLike)) else paths)]
        if not paths:
            raise CharLSTMError("no text given: pass --text FILE or --gutenberg ID")
        parts = [normalize(read_text_file(p), norm) for p in paths]
        return cls._checked("\n".join(parts), [str(p) for p in paths], norm)

    @classmethod
    def gutenberg(
        cls,
        book_id: int = DEFAULT_BOOK,
        normalization: Normalization | None = None,
        mirror: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        offline: bool = False,
    ) -> "Corpus":
        norm = normalization or Normalization()
        path = fetch_gutenberg(book_id, mirror=mirror, cache_dir=cache_dir, offline=offline)
        return cls._checked(normalize(read_text_file(path), norm), [f"gutenberg:{book_id}"], norm)

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


def read_text_file(path: Path) -> str:
    """Read a UTF-8 text file, refusing missing, empty, binary and undecodable files."""
    raw = read_text_bytes(path)
    nul = raw.find(b"\x00")
    if nul >= 0:
        raise CharLSTMError(f"{path}: looks like a binary file (a NUL byte at offset {nul:,}), not text")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise CharLSTMError(
            f"{path}: not valid UTF-8 (byte {err.start}); convert it, e.g. iconv -f latin1 -t utf-8"
        ) from None


def normalize(text: str, norm: Normalization) -> str:
    text = text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    if norm.strip_gutenberg:
        text = strip_gutenberg_boilerplate(text)
    if norm.lowercase:
        text = text.lower()
    if norm.strip_punctuation:
        text = strip_punctuation(text)
    return text


def strip_gutenberg_boilerplate(text: str) -> str:
    """Cut the licence header and footer; text without Gutenberg markers is returned whole."""
    start = _START_RE.search(text)
    if start:
        text = text[start.end():].lstrip("\n")
    end = _END_RE.search(text)
    if end:
        return text[: end.start()].rstrip() + "\n"
    # Without an end marker the book ends at its last "THE END" line (a collection has one
    # per story, and plays and sketches go on after one: the first would drop the rest).
    the_ends = list(_THE_END_RE.finditer(text))
    if the_ends:
        return text[: the_ends[-1].end()] + "\n"
    return text


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
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    import platformdirs

    return Path(platformdirs.user_cache_dir("charlstm")) / "gutenberg"


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

