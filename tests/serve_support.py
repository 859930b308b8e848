"""Helpers for the server's tests: a seeded model and ``charlstm serve`` in a child process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch

from charlstm.checkpoint import TrainedModel
from charlstm.model import CharLSTM, ModelConfig
from charlstm.vocab import Vocab

REPO = Path(__file__).resolve().parents[1]


def make_model(text: str, units: int = 48, seed: int = 0) -> TrainedModel:
    """A seeded random initialisation over the vocabulary of ``text``."""
    torch.manual_seed(seed)
    vocab = Vocab.from_text(text)
    model = CharLSTM(ModelConfig(vocab_size=len(vocab), units=units, embedding_dim=16)).eval()
    history = [{"epoch": 1, "loss": 2.0, "val_loss": 1.5}]
    return TrainedModel(model, vocab, training={"history": history})


class LiveServer:
    """``charlstm serve`` in a child process on a free 127.0.0.1 port."""

    def __init__(self, checkpoint_file: Path, *args: str) -> None:
        env = dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "charlstm", "serve", str(checkpoint_file),
                                      "--port", "0", "--threads", "1", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        line = self.proc.stdout.readline()
        assert "http://127.0.0.1:" in line, line + self.proc.stderr.read()
        self.url = line.split()[2].rstrip("/")
        while True:
            line = self.proc.stdout.readline()
            assert line, self.proc.stderr.read()
            if line.strip() == "ready":
                break

    def stop(self, sig=signal.SIGINT) -> tuple[int, str, str]:
        self.proc.send_signal(sig)
        out, err = self.proc.communicate(timeout=20)
        return self.proc.returncode, out, err

    def active(self) -> int:
        return httpx.get(self.url + "/health").json()["active"]

    def wait_idle(self, seconds: float = 5.0) -> int:
        deadline = time.monotonic() + seconds
        while self.active() and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.active()
