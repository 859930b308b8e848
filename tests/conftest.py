"""Shared fixtures. The shared data lies beside the checkout (../shared); tests fail, never
skip, when it is missing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CHARLSTM_SHARED", REPO.parent / "shared"))


def shared_file(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    assert path.is_file(), f"test data missing: {path} (set CHARLSTM_SHARED to the shared/ folder)"
    return path


@pytest.fixture(scope="session")
def pg11() -> Path:
    return shared_file("corpora", "pg11.txt")


@pytest.fixture(scope="session")
def modern11() -> Path:
    return shared_file("corpora", "11-0.txt")


@pytest.fixture(scope="session")
def keras_checkpoint() -> Path:
    return shared_file("keras", "weights-improvement-19-1.9465.hdf5")


@pytest.fixture(scope="session")
def keras_text() -> Path:
    return shared_file("keras", "wonderland.txt")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """No test reads or writes the user's real download cache or mirror setting."""
    monkeypatch.setenv("CHARLSTM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("CHARLSTM_MIRROR", raising=False)


@pytest.fixture(scope="session")
def small_text(tmp_path_factory, pg11) -> Path:
    """The first 6,000 cleaned characters of Alice, as a file: big enough to train on in seconds."""
    from charlstm.corpus import Corpus

    path = tmp_path_factory.mktemp("text") / "alice-start.txt"
    path.write_text(Corpus.from_files(pg11).text[:6000], encoding="utf-8")
    return path
