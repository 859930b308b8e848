"""Stage 1: reading, cleaning and downloading text."""

from __future__ import annotations

import http.server
import threading
from functools import partial
from pathlib import Path

import pytest

from charlstm.corpus import Corpus, Normalization, fetch_gutenberg, normalize, strip_gutenberg_boilerplate
from charlstm.errors import CharLSTMError


def test_pg11_cleaned_like_the_tutorial(pg11):
    text = Corpus.from_files(pg11).text
    assert text.startswith("alice's adventures in wonderland")
    assert text.rstrip().endswith("the end")
    assert 3300 <= text.count("\n") <= 3400
    assert 144_000 <= len(text) <= 148_000
    assert "\r" not in text and "\ufeff" not in text
    assert "gutenberg" not in text  # no licence text left
    assert text == text.lower()


def test_keep_case_and_modern_edition_curly_quotes(pg11, modern11):
    kept = Corpus.from_files(pg11, Normalization(lowercase=False)).text
    assert kept.startswith("ALICE'S ADVENTURES IN WONDERLAND")
    modern = Corpus.from_files(modern11).text
    assert {"’", "“", "”"} <= set(modern)
    assert modern.rstrip().endswith("the end")


def test_newer_header_form_and_end_marker_without_the_end():
    raw = ("junk\r\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\r\nBody line\r\n"
           "*** END OF THE PROJECT GUTENBERG EBOOK X ***\r\nlicence\r\n")
    assert normalize(raw, Normalization(lowercase=False)) == "Body line\n"


GUTENBERG = ("corpora", "gutenberg")


@pytest.mark.parametrize("author, book, first, last", [
    # indented "  *** START OF THIS PROJECT ..." markers
    ("Kipling, Rudyard", "The Light That Failed.txt", "THE LIGHT THAT FAILED", "with Dick’s body in his\narms."),
    # an old etext: the header ends at "*END*THE SMALL PRINT!...", the book at "End of The Project..."
    ("Kipling, Rudyard", "The Day's Work - Part 01.txt", "THE DAY'S WORK", "End of \"THE DAY'S WORK\" - PART I"),
    # a play ends with "THE END" mid-file: the rest of the book is kept up to the end marker
    ("Stevenson, Robert Louis", "The Plays of W. E. Henley and R. L. Stevenson.txt", None, None),
])
def test_gutenberg_marker_variants_of_the_shared_books(author, book, first, last):
    from conftest import shared_file

    raw = shared_file(*GUTENBERG, author, book).read_bytes().decode("utf-8")
    text = normalize(raw, Normalization(lowercase=False))
    assert "SMALL PRINT" not in text and "*** START" not in text and "*** END" not in text
    assert "Project Gutenberg" not in text[-2000:] and "Gutenberg License" not in text
    assert len(text) > 0.8 * len(raw) - 25_000  # only the licence (~20,000 characters) went
    if first:
        assert first in text[:500]
    if last:
        assert text.rstrip().endswith(last), text[-200:]


def test_text_without_markers_is_used_whole():
    assert strip_gutenberg_boilerplate("just text\nmore\n") == "just text\nmore\n"


def test_strip_punctuation_keeps_letters_digits_spaces_newlines():
    cleaned = normalize("“Well!” said Alice, 42 times.\n\tYes—no", Normalization(strip_punctuation=True))
    assert cleaned == "well said alice 42 times\n yesno"


def test_several_files_are_joined(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("First.\n"), b.write_text("Second.\n")
    assert Corpus.from_files([a, b]).text == "first.\n\nsecond.\n"


@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    (b"", "empty"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00", "binary"),
    (b"caf\xe9 au lait", "not valid UTF-8"),
    (b"   \n\n", "empty after cleaning"),
])
def test_bad_files_raise_one_clear_error(tmp_path, content, message):
    path = tmp_path / "book.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CharLSTMError, match=message):
        Corpus.from_files(path)


# --------------------------------------------------------------------------- downloader


class _BookServer:
    """A real HTTP server on 127.0.0.1 that serves one folder and counts requests."""

    def __init__(self, root: Path):
        self.requests: list[str] = []
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                server.requests.append(self.path)
                super().do_GET()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(root)))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def served_book(tmp_path, pg11):
    root = tmp_path / "www"
    root.mkdir()
    (root / "pg11.txt").write_bytes(pg11.read_bytes())
    with _BookServer(root) as server:
        yield server


def test_download_from_url_mirror_then_cache_hit(tmp_path, served_book, pg11):
    cache = tmp_path / "dl-cache"
    path = fetch_gutenberg(11, mirror=served_book.url, cache_dir=cache)
    assert path == cache / "pg11.txt"
    assert path.read_bytes() == pg11.read_bytes()
    assert len(served_book.requests) == 1
    again = fetch_gutenberg(11, mirror=served_book.url, cache_dir=cache)
    assert again == path and len(served_book.requests) == 1  # served from the cache


def test_download_tries_each_name_and_reports_404(tmp_path, served_book):
    corpus = Corpus.gutenberg(11, mirror=served_book.url + "/", cache_dir=tmp_path / "c")
    assert corpus.text.startswith("alice's adventures")
    assert served_book.requests[0].endswith("/pg11.txt")
    with pytest.raises(CharLSTMError, match="could not download Gutenberg book 12"):
        fetch_gutenberg(12, mirror=served_book.url, cache_dir=tmp_path / "c", retries=1)
    assert all("12" in r for r in served_book.requests[1:])  # tried each mirror name once
    assert len(served_book.requests) == 1 + 5


def test_user_agent_is_descriptive(tmp_path, pg11):
    agents = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            agents.append(self.headers.get("User-Agent"))
            body = pg11.read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        fetch_gutenberg(11, mirror=f"http://127.0.0.1:{httpd.server_address[1]}", cache_dir=tmp_path)
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert agents and agents[0].startswith("charlstm/")


def test_mirror_directory(tmp_path, pg11):
    path = fetch_gutenberg(11, mirror=str(pg11.parent), cache_dir=tmp_path / "unused")
    assert path == pg11


def test_mirror_from_environment(tmp_path, pg11, monkeypatch):
    monkeypatch.setenv("CHARLSTM_MIRROR", str(pg11.parent))
    assert Corpus.gutenberg(11).text.startswith("alice's adventures")


def test_missing_book_in_mirror_directory(tmp_path):
    with pytest.raises(CharLSTMError, match="book 99 not found"):
        fetch_gutenberg(99, mirror=str(tmp_path), cache_dir=tmp_path / "c")


def test_offline_without_mirror_names_the_fix(tmp_path):
    with pytest.raises(CharLSTMError, match="--mirror"):
        fetch_gutenberg(11, cache_dir=tmp_path / "c", offline=True)


def test_unreachable_server_names_the_fix(tmp_path):
    # a port that nothing listens on: connection refused at once
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(CharLSTMError, match="CHARLSTM_MIRROR"):
        fetch_gutenberg(11, mirror=f"http://127.0.0.1:{port}", cache_dir=tmp_path, retries=2)
