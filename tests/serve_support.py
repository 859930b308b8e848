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
from charlstm.evaluate import one_cpu_thread
from charlstm.model import CharLSTM, ModelConfig
from charlstm.records import BestEpoch, EpochRecord, TrainingRecord
from charlstm.vocab import Vocab

REPO = Path(__file__).resolve().parents[1]


def make_model(text: str, units: int = 48, seed: int = 0, train_steps: int = 0) -> TrainedModel:
    """A seeded random initialisation over the vocabulary of ``text``, optionally trained for
    a few steps (a second or two) so that its predictions are peaked, as a real model's are."""
    torch.manual_seed(seed)
    vocab = Vocab.from_text(text)
    model = CharLSTM(ModelConfig(vocab_size=len(vocab), units=units, embedding_dim=16, dropout=0.0))
    if train_steps:
        with one_cpu_thread(torch.device("cpu")):   # tiny batches: a second thread only waits
            _train_briefly(model, torch.from_numpy(vocab.encode(text).astype("int64")), train_steps)
    model.eval()
    history = [EpochRecord(epoch=1, loss=2.0, val_loss=1.5, chars_per_s=0.0, elapsed=0.0, lr=0.0)]
    return TrainedModel(model, vocab, training=TrainingRecord(history=history, epoch=1, best=BestEpoch.of(history)))


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


def _train_briefly(model: CharLSTM, ids: torch.Tensor, steps: int) -> None:
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - 65, (32,))
        batch = torch.stack([ids[s:s + 65] for s in starts.tolist()])
        logits, _ = model(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
