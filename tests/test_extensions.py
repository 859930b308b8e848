"""The tutorial's ten extension ideas, each an option of its own."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from charlstm import checkpoint
from charlstm.cli import main
from charlstm.corpus import Corpus
from charlstm.data import IGNORE_INDEX
from charlstm.model import CharLSTM, ModelConfig
from charlstm.recipes import TrainConfig
from charlstm.train import Trainer

TINY = ["--units", "24", "--window", "20", "--no-progress", "--seed", "1", "--precision", "fp32"]


def _train(tmp_path, small_text, *args) -> tuple[int, list[dict]]:
    code = main(["train", "--text", str(small_text), "-o", str(tmp_path), *TINY, *args])
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] if code == 0 else []
    return code, rows


def test_sentence_batching_trains_and_reports_long_sentences(tmp_path, small_text, capsys):
    code, rows = _train(tmp_path, small_text, "--preset", "tutorial-small", "--batching", "sentences",
                        "--target", "all", "--epochs", "2", "--batch-size", "16")
    assert code == 0 and len(rows) == 2
    out = capsys.readouterr().out
    assert "Sentences: " in out and "longer than the window" in out
    assert rows[1]["val_loss"] < rows[0]["val_loss"] < np.log(60)


def test_padding_never_counts_in_the_loss():
    """The trainer's loss on a padded batch equals the loss over the real characters alone."""
    torch.manual_seed(0)
    model = CharLSTM(ModelConfig(vocab_size=12, units=8, layers=1, dropout=0.0))
    x = torch.tensor([[1, 2, 3, 4], [5, 6, 0, 0]])
    y = torch.tensor([[2, 3, 4, 5], [6, 7, IGNORE_INDEX, IGNORE_INDEX]])
    logits, _ = model(x)
    masked = F.cross_entropy(logits.reshape(-1, 12), y.reshape(-1), ignore_index=IGNORE_INDEX)
    real = torch.cat([F.cross_entropy(logits[0], y[0], reduction="none"),
                      F.cross_entropy(logits[1, :2], y[1, :2], reduction="none")]).mean()
    assert torch.allclose(masked, real)
    # and padding values in x cannot change the real positions' outputs (padding is on the right)
    other, _ = model(torch.tensor([[1, 2, 3, 4], [5, 6, 9, 11]]))
    assert torch.allclose(other[1, :2], logits[1, :2])


def test_sentence_epoch_counts_only_real_targets(tmp_path, pg11):
    text = Corpus.from_files(pg11).text[:3000]
    vocab_chars = sorted(set(text))
    ids = np.array([vocab_chars.index(c) for c in text], dtype=np.uint8)
    from charlstm.vocab import Vocab

    model = CharLSTM(ModelConfig(vocab_size=len(vocab_chars), units=8, layers=1, window=30))
    trainer = Trainer(model, Vocab(tuple(vocab_chars)), ids,
                      TrainConfig(epochs=1, batch_size=8, batching="sentences", val_fraction=0.0,
                                  monitor="loss", output_dir=str(tmp_path), precision="fp32"),
                      log=lambda _: None, progress=False)
    trainer.train_epoch()
    assert trainer.position.targets == trainer.batches.num_targets < len(ids)


def test_stateful_windows_carry_the_state_between_batches(tmp_path, small_text, monkeypatch):
    seen = []
    original = CharLSTM.forward

    def recording_forward(self, ids, state=None, last_only=False, **kwargs):
        if self.training:
            seen.append(state is not None)
        return original(self, ids, state, last_only, **kwargs)

    monkeypatch.setattr(CharLSTM, "forward", recording_forward)
    code, rows = _train(tmp_path, small_text, "--preset", "tutorial-small", "--stateful", "--epochs", "1",
                        "--batch-size", "8")
    assert code == 0 and rows
    assert seen[0] is False and all(seen[1:]) and len(seen) > 3  # fresh at the epoch start, then carried


def test_stateful_needs_windows(tmp_path, small_text, capsys):
    assert main(["train", "--text", str(small_text), "-o", str(tmp_path), "--stateful", *TINY]) == 2
    assert "--stateful" in capsys.readouterr().err


@pytest.mark.parametrize("preset", ["tutorial-small", "default"])
def test_batch_size_one_trains(tmp_path, small_text, preset):
    text = small_text.read_text()[:1500]
    short = tmp_path / "short.txt"
    short.write_text(text)
    code, rows = _train(tmp_path / "out", short, "--preset", preset, "--batch-size", "1", "--epochs", "1",
                        "--window", "10", "--bptt", "20")
    assert code == 0 and np.isfinite(rows[0]["loss"])
    best = checkpoint.load(tmp_path / "out" / "best.safetensors")
    assert best.training.config["batch_size"] == 1


def test_strip_punctuation_removes_it_from_the_vocabulary(tmp_path, small_text):
    code, _ = _train(tmp_path, small_text, "--preset", "tutorial-small", "--strip-punctuation", "--epochs", "1")
    assert code == 0
    trained = checkpoint.load(tmp_path / "best.safetensors")
    assert trained.normalization.strip_punctuation
    assert set(trained.vocab.chars) <= set("abcdefghijklmnopqrstuvwxyz0123456789 \n")


@pytest.mark.parametrize("kind", ["onehot", "embedding", "scaled"])
def test_input_encodings_train_from_the_cli(tmp_path, small_text, kind):
    code, rows = _train(tmp_path, small_text, "--preset", "tutorial-small", "--input", kind, "--epochs", "1",
                        "--input-dropout", "0.1", "--dropout", "0.3", "--layers", "2")
    assert code == 0 and rows
    config = checkpoint.load(tmp_path / "best.safetensors").config
    assert (config.input, config.input_dropout, config.dropout, config.layers) == (kind, 0.1, 0.3, 2)


def test_evaluate_prints_bits_and_compressor_baselines(tmp_path, small_text, capsys):
    assert _train(tmp_path, small_text, "--preset", "default", "--epochs", "1", "--batch-size", "8")[0] == 0
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "best.safetensors"), "--text", str(small_text),
                 "--val-fraction", "0.1"]) == 0
    out = capsys.readouterr().out
    assert "scored: 600 characters" in out
    model_line = next(line for line in out.splitlines() if line.startswith("model:"))
    nats, bits = float(model_line.split()[1]), float(model_line.split()[4])
    assert bits == pytest.approx(nats / np.log(2), abs=1e-3)
    assert "gzip" in out and "bz2" in out and "lzma" in out
