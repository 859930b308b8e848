"""charlstm prepare: bounded-memory corpus preparation into memory-mapped ids."""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from charlstm.cli import main
from charlstm.corpus import Corpus, Normalization
from charlstm.errors import CharLSTMError
from charlstm.prepare import PrepareConfig, PreparedData, build_vocab, prepare
from charlstm.vocab import UNKNOWN_CHAR
from conftest import REPO, SHARED, shared_file

GUTENBERG = SHARED / "corpora" / "gutenberg"
# Two real books with odd names, CRLF, and the marker variants: an indented START marker, and one
# file with no *** markers at all.
BOOKS = ("Twain, Mark/Personal Recollections of Joan of Arc — Volume 2.txt",
         "Kipling, Rudyard/The Day's Work - Part 01.txt")


@pytest.fixture(scope="module")
def library(tmp_path_factory, pg11, modern11):
    """A small folder tree of real books: nested folders, spaces, quotes and colons in names."""
    root = tmp_path_factory.mktemp("library")
    for name in BOOKS:
        target = root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(shared_file("corpora", "gutenberg", *name.split("/")), target)
    (root / "Carroll: Alice's \"Wonderland\"").mkdir()
    shutil.copy(pg11, root / "Carroll: Alice's \"Wonderland\"" / "pg11.txt")
    shutil.copy(modern11, root / "Carroll: Alice's \"Wonderland\"" / "11-0.txt")
    (root / "notes.md").write_text("not matched by the default --glob\n", encoding="utf-8")
    return root


def _expected_documents(paths, norm=Normalization()) -> list[str]:
    docs = []
    for path in paths:
        text = Corpus.from_files(path, norm).text
        docs.append(text if text.endswith("\n") else text + "\n")
    return docs


def test_folder_matches_corpus_cleaning_and_splits_every_document_end(library, tmp_path):
    out = tmp_path / "data"
    # A tiny chunk puts chunk boundaries inside CRLF pairs and multi-byte characters.
    result = prepare(PrepareConfig(inputs=(str(library),), output_dir=out, val_fraction=0.1, chunk_bytes=4099),
                     progress=False)
    files = sorted(p for p in library.rglob("*.txt"))
    assert [s.name for s in result.sources] == [str(p) for p in files]
    docs = _expected_documents(files)
    data = PreparedData.open(out)
    train, val = data.vocab.decode(data.train_ids), data.vocab.decode(data.val_ids)
    cuts = [len(d) - int(round(len(d) * 0.1)) for d in docs]
    assert train == "".join(d[:c] for d, c in zip(docs, cuts))
    assert val == "".join(d[c:] for d, c in zip(docs, cuts))
    for marker in ("start of this project gutenberg", "end of the project gutenberg", "full license"):
        assert marker not in train + val  # every header and footer variant cut
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    for entry, path in zip(manifest["sources"], files):
        assert entry["bytes"] == path.stat().st_size
        assert entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    vocab = json.loads((out / "vocab.json").read_text(encoding="utf-8"))
    assert sum(vocab["counts"]) == len(train) + len(val)
    assert vocab["counts"][vocab["chars"].index("e")] == (train + val).count("e")
    assert data.train_ids.dtype == np.uint8 and isinstance(data.train_ids, np.memmap)


def _mixed_line_ends_and_alphabets(modern11) -> bytes:
    """Alice (curly quotes, LF) with what the byte-level cleaner must get right: two BOMs, CRLF,
    old-Mac CR line ends, a CR at the very end, Greek capital sigma, dotted capital I, the Kelvin
    sign (lowercases to ASCII k) and 4-byte characters."""
    lines = modern11.read_text(encoding="utf-8")[:60000].split("\n")
    lines[5] += " ΟΔΟΣ ΣΑΣ. İstanbul 5 \u212a \U0001F600\U0001D11E"
    body = "\r\n".join(lines[:400]) + "\r" + "\r".join(lines[400:700]) + "\n" + "\n".join(lines[700:]) + "\r"
    return b"\xef\xbb\xbf\xef\xbb\xbf" + body.encode("utf-8")


@pytest.mark.parametrize("lowercase", [True, False])
def test_byte_level_cleaning_matches_corpus_on_every_chunk_edge(tmp_path, modern11, lowercase):
    """The UTF-8 cleaner works on bytes (see CleanChunk); with the smallest chunk, boundaries
    fall inside CRLF pairs, multi-byte characters and the BOMs' neighbourhood."""
    path = tmp_path / "mixed.txt"
    path.write_bytes(_mixed_line_ends_and_alphabets(modern11))
    norm = Normalization(lowercase=lowercase)
    prepare(PrepareConfig(inputs=(str(path),), output_dir=tmp_path / "out", val_fraction=0.0, chunk_bytes=1024,
                          normalization=norm), progress=False)
    data = PreparedData.open(tmp_path / "out")
    expected, = _expected_documents([path], norm)
    assert expected.endswith("\n") and "\r" not in expected and not expected.startswith("\ufeff")
    assert data.vocab.decode(data.train_ids) == expected
    assert ("k" if lowercase else "\u212a") in data.vocab.chars and "\U0001F600" in data.vocab.chars
    assert ("ς" in expected and "σ" in expected) if lowercase else "Σ" in expected
    counts = json.loads((tmp_path / "out" / "vocab.json").read_text(encoding="utf-8"))
    assert dict(zip(counts["chars"], counts["counts"])) == {c: expected.count(c) for c in set(expected)}


def test_nul_and_bad_utf8_anywhere_in_the_file_are_refused(tmp_path, modern11, capsys):
    text = modern11.read_bytes()
    assert len(text) > 150_000
    binary, broken = tmp_path / "binary.txt", tmp_path / "broken.txt"
    binary.write_bytes(text[:150_000] + b"\x00" + text[150_000:])  # far beyond the first 64 KiB
    broken.write_bytes(text[:150_001] + b"\xff" + text[150_001:])
    assert main(["prepare", str(binary), "-o", str(tmp_path / "o1"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{binary}: looks like a binary file (a NUL byte at offset 150,000)" in err
    assert main(["prepare", str(broken), "-o", str(tmp_path / "o2"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{broken}: not valid UTF-8 (byte 150001)" in err


def test_large_alphabet_min_count_unknown_symbol_and_uint16(tmp_path):
    book = shared_file("seed", "tutorial.zh.md")
    norm = Normalization(lowercase=False, strip_gutenberg=False)  # it quotes Gutenberg's markers
    text = Corpus.from_files(book, norm).text
    result = prepare(PrepareConfig(inputs=(str(book),), output_dir=tmp_path / "zh", min_count=2, val_fraction=0.0,
                                   normalization=norm), progress=False)
    rare = {c for c in set(text) if text.count(c) < 2}
    assert len(set(text)) > 256 and rare
    data = PreparedData.open(tmp_path / "zh")
    assert data.vocab.unknown_char == UNKNOWN_CHAR and len(data.vocab) == len(set(text)) - len(rare) + 1
    assert data.train_ids.dtype == np.uint16
    expected = "".join(UNKNOWN_CHAR if c in rare else c for c in text)
    assert data.vocab.decode(data.train_ids) == expected + ("" if text.endswith("\n") else "\n")
    assert result.unknown_characters == len(rare)
    # The vocabulary encodes any text: characters it has never seen become the unknown symbol.
    assert data.vocab.decode(data.vocab.encode("学习\u00e9")) == "学习" + UNKNOWN_CHAR


def test_max_vocab_keeps_the_most_frequent():
    counts = np.zeros(0x110000, dtype=np.int64)
    for ch, n in {"a": 50, "b": 40, "c": 3, "d": 2, "\u4e00": 1}.items():
        counts[ord(ch)] = n
    vocab, kept, folded = build_vocab(counts, max_vocab=3)
    assert vocab.chars == tuple(sorted(("a", "b", UNKNOWN_CHAR))) and kept[UNKNOWN_CHAR] == 6 and folded == 6
    assert build_vocab(counts)[0].unknown_char is None


def test_encoding_cp1252_and_the_one_line_utf8_error(tmp_path, modern11, capsys):
    text = modern11.read_text(encoding="utf-8")[:20000]
    windows = tmp_path / "windows.txt"
    windows.write_bytes(text.replace("\n", "\r\n").encode("cp1252"))
    assert main(["prepare", str(windows), "-o", str(tmp_path / "bad"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    first_bad = next(i for i, b in enumerate(windows.read_bytes()) if b >= 0x80)
    assert err.count("\n") == 0 and f"{windows}: not valid UTF-8 (byte {first_bad})" in err and "--encoding" in err
    assert main(["prepare", str(windows), "-o", str(tmp_path / "ok"), "--encoding", "cp1252",
                 "--val-fraction", "0", "--no-progress"]) == 0
    data = PreparedData.open(tmp_path / "ok")
    assert data.vocab.decode(data.train_ids) == Corpus.from_string(text).text + "\n"  # documents end with one
    assert "’" in data.vocab.chars
    assert main(["prepare", str(windows), "-o", str(tmp_path / "x"), "--encoding", "klingon"]) == 2
    assert "unknown encoding" in capsys.readouterr().err


def test_stdin_and_cli_summary(tmp_path, small_text):
    out = tmp_path / "piped"
    run = subprocess.run([sys.executable, "-m", "charlstm", "prepare", "-", "-o", str(out), "--no-progress"],
                         input=small_text.read_bytes(), capture_output=True, cwd=REPO,
                         env={"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert run.returncode == 0, run.stderr.decode()
    assert b"symbols:" in run.stdout and b"rarest:" in run.stdout and b"MB/s" in run.stdout
    data = PreparedData.open(out)
    assert data.sources == ["<stdin>"]
    assert not list(out.glob(".prepare-*"))  # the spooled copy is gone
    assert len(data.train_ids) + len(data.val_ids) == len(Corpus.from_files(small_text).text) + 1  # + the closing newline


def test_refusals_are_one_line(tmp_path, capsys):
    assert main(["prepare", str(tmp_path / "missing.txt"), "-o", str(tmp_path / "o")]) == 2
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["prepare", str(tmp_path / "empty"), "-o", str(tmp_path / "o")]) == 2
    assert "no non-empty files" in capsys.readouterr().err
    with pytest.raises(CharLSTMError, match="run charlstm prepare first"):
        PreparedData.open(tmp_path / "empty")


def test_chinese_text_end_to_end(tmp_path, capsys):
    """prepare -> train --data -> generate -> evaluate -> info, on a real Chinese text with rare
    characters folded into the unknown symbol."""
    book = shared_file("seed", "tutorial.zh.md")
    data, run = tmp_path / "zh", tmp_path / "run"
    assert main(["prepare", str(book), "-o", str(data), "--min-count", "2", "--keep-case",
                 "--keep-gutenberg-boilerplate", "--no-progress"]) == 0
    assert main(["train", "--data", str(data), "--layers", "1", "--units", "32", "--embedding-dim", "16",
                 "--batch-size", "8", "--bptt", "20", "--max-steps", "6", "--eval-every", "3", "--threads", "1",
                 "--no-progress", "-o", str(run)]) == 0
    capsys.readouterr()
    assert main(["generate", str(run / "best.safetensors"), "--prime", "循环神经网络", "--length", "30",
                 "--temperature", "1", "--seed", "1"]) == 0
    generated = capsys.readouterr().out
    assert '"循环神经网络"' in generated and len(generated.split('"循环神经网络"')[1].strip()) >= 20
    assert main(["evaluate", str(run / "best.safetensors"), "--text", str(book)]) == 0
    assert "bits/char" in capsys.readouterr().out
    assert main(["info", str(run / "best.safetensors")]) == 0
    info = capsys.readouterr().out
    assert "unknown symbol '\ufffd'" in info and "more" in info  # a large alphabet is shown shortened


def test_worker_processes_write_the_same_files(library, tmp_path, monkeypatch):
    prepare_module = importlib.import_module("charlstm.prepare")  # the package's `prepare` is the function
    monkeypatch.setattr(prepare_module, "WORKER_MIN_BYTES", 0)  # the library is small: force the pool
    pooled, real_workers = [], prepare_module._workers

    @contextlib.contextmanager
    def spy(*args):
        with real_workers(*args) as pool:
            pooled.append(pool is not None)
            yield pool

    monkeypatch.setattr(prepare_module, "_workers", spy)
    outputs = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        prepare(PrepareConfig(inputs=(str(library),), output_dir=out, workers=workers, min_count=3), progress=False)
        outputs.append(PreparedData.open(out))
    one, two = outputs
    assert np.array_equal(one.train_ids, two.train_ids) and np.array_equal(one.val_ids, two.val_ids)
    assert one.vocab == two.vocab and one.vocab.unknown_char == UNKNOWN_CHAR
    assert one.manifest["sources"] == two.manifest["sources"]
    assert pooled == [False, True]  # in-process, then 2 worker processes


PREPARE_WITHOUT_TORCH = """
import importlib, sys, tomllib
from pathlib import Path
script = tomllib.loads(Path("pyproject.toml").read_text())["project"]["scripts"]["charlstm"]
module, function = script.split(":")
code = getattr(importlib.import_module(module), function)(["prepare", sys.argv[1], "-o", sys.argv[2], "--no-progress"])
print("torch loaded:", "torch" in sys.modules)
import charlstm
from charlstm import Corpus, generate, prepare, train
print("names:", train.__module__, generate.__module__, prepare.__module__, Corpus.__module__, charlstm.train is train)
print("missing from dir:", sorted(set(charlstm.__all__) - set(dir(charlstm))))
sys.exit(code)
"""


def test_prepare_starts_without_torch(tmp_path, small_text):
    """The console script's function and python -m charlstm run prepare without importing PyTorch
    (1.5 s of start-up); the package's public names still import, lazily."""
    env = {"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin"}
    run = subprocess.run([sys.executable, "-c", PREPARE_WITHOUT_TORCH, str(small_text), str(tmp_path / "a")],
                         capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "torch loaded: False" in run.stdout and "symbols:" in run.stdout
    assert "names: charlstm.train charlstm.generate charlstm.prepare charlstm.corpus True" in run.stdout
    assert "missing from dir: []" in run.stdout
    run = subprocess.run([sys.executable, "-X", "importtime", "-m", "charlstm", "prepare", str(small_text),
                          "-o", str(tmp_path / "b"), "--no-progress"], capture_output=True, text=True, cwd=REPO,
                         env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    imported = [line.rsplit("|", 1)[-1].strip() for line in run.stderr.splitlines() if line.startswith("import time:")]
    assert "charlstm.prepare" in imported and "torch" not in imported
    assert PreparedData.open(tmp_path / "b").vocab.chars == PreparedData.open(tmp_path / "a").vocab.chars
