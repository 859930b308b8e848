"""Training: validation, bits/char, checkpoint selection, exact resume, fused LSTM, logs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import charlstm
from charlstm import checkpoint
from charlstm.cli import main
from charlstm.corpus import Corpus
from charlstm.data import StreamBatches, load_ids, save_ids, split_train_val
from charlstm.errors import CharLSTMError
from charlstm.metrics import plot_run, read_metrics
from charlstm.model import CharLSTM, ModelConfig
from charlstm.evaluate import LN2
from charlstm.recipes import preset_configs
from charlstm.records import EpochRecord
from charlstm.train import Trainer
from charlstm.train_state import pack_optimizer, pack_rng, restore_rng, unpack_optimizer
from charlstm.vocab import Vocab

QUIET = dict(progress=False, log=lambda _: None)
SMALL = dict(units=32, layers=2, embedding_dim=16, batch_size=8, bptt=40, lr=5e-3, warmup_steps=5)


@pytest.fixture(scope="module")
def alice_start(pg11):
    return Corpus.from_files(pg11).text[:6000]


@pytest.fixture(scope="module")
def small_corpus(alice_start):
    return Corpus.from_string(alice_start)


# ----------------------------------------------------------------------- validation and bits/char


def test_no_validation_text_monitors_training_loss():
    _, config = preset_configs("default", 40, val_fraction=0.0)
    assert config.monitor == "loss"
    assert preset_configs("tutorial-small", 40)[1].monitor == "loss"  # as the tutorial did
    assert preset_configs("default", 40)[1].monitor == "val_loss"


def test_bits_per_char_is_nats_over_ln2():
    record = EpochRecord(epoch=1, loss=1.2, val_loss=1.3862943611198906, chars_per_s=1.0, elapsed=1.0, lr=1e-3)
    assert math.isclose(record.val_bpc, 2.0)
    row = record.to_row()
    assert math.isclose(row["val_bpc"], 2.0) and math.isclose(row["bpc"], 1.2 / LN2)


# ----------------------------------------------------------------------- checkpoint selection


def test_checkpoints_are_selected_and_named_by_validation_loss(tmp_path, small_corpus, monkeypatch):
    scripted = iter([2.0, 1.5, 1.7, 1.4])
    monkeypatch.setattr(Trainer, "evaluate", lambda self: next(scripted))
    result = charlstm.fit(small_corpus, epochs=4, output_dir=str(tmp_path), **SMALL, **QUIET)
    names = sorted(p.name for p in tmp_path.glob("weights-improvement-*"))
    assert names == ["weights-improvement-01-2.0000.safetensors", "weights-improvement-02-1.5000.safetensors",
                     "weights-improvement-04-1.4000.safetensors"]
    assert result.best_path.name == names[-1]
    best = checkpoint.load(tmp_path / "best.safetensors")
    assert best.training.best.val_loss == 1.4 and best.training.epoch == 4


def test_patience_stops_early(tmp_path, small_corpus, monkeypatch):
    scripted = iter([2.0, 2.1, 2.2, 1.0, 1.0])
    monkeypatch.setattr(Trainer, "evaluate", lambda self: next(scripted))
    result = charlstm.fit(small_corpus, epochs=5, patience=2, output_dir=str(tmp_path), **SMALL, **QUIET)
    assert len(result.history) == 3


# ----------------------------------------------------------------------- exact resume


def _stop_after(monkeypatch, steps: int) -> None:
    """Make the run stop (as on Ctrl-C) after ``steps`` optimiser steps."""
    original = Trainer.train_step

    def counting(self, *args):
        out = original(self, *args)
        if self.position.step == steps:
            self.request_stop()
        return out

    monkeypatch.setattr(Trainer, "train_step", counting)


def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path, small_corpus, monkeypatch):
    settings = dict(epochs=3, seed=3, random_offset=True, dropout=0.3, weight_drop=0.2, variational=True,
                    **SMALL, **QUIET)
    whole = charlstm.fit(small_corpus, output_dir=str(tmp_path / "whole"), **settings)
    per_epoch = len(StreamBatches(split_train_val(Vocab.from_text(small_corpus.text).encode(small_corpus.text),
                                                  0.1)[0], 8, 40, random_offset=True))

    with monkeypatch.context() as patch:
        _stop_after(patch, per_epoch + 3)  # in the middle of epoch 2, state carried
        first = charlstm.fit(small_corpus, output_dir=str(tmp_path / "parts"), **settings)
    assert first.interrupted and len(first.history) == 1
    resumed = charlstm.fit(small_corpus, resume=first.resume_path, output_dir=str(tmp_path / "parts"), **QUIET)

    assert [r.val_loss for r in resumed.history] == [r.val_loss for r in whole.history]
    assert [r.loss for r in resumed.history] == [r.loss for r in whole.history]
    for a, b in zip(whole.trained.model.parameters(), resumed.trained.model.parameters()):
        assert torch.equal(a, b)


def test_resuming_a_checkpoint_without_optimiser_state_fine_tunes(tmp_path, small_corpus):
    charlstm.fit(small_corpus, epochs=1, output_dir=str(tmp_path / "a"), **SMALL, **QUIET)
    lines = []
    result = charlstm.fit(small_corpus, resume=tmp_path / "a" / "best.safetensors", epochs=1,
                          output_dir=str(tmp_path / "b"), progress=False, log=lines.append)
    assert any(line.startswith("fine-tuning") for line in lines)
    assert [r.epoch for r in result.history] == [1]
    assert result.trained.config.units == 32  # the model comes from the checkpoint


def test_fine_tuning_a_window_model_uses_windows(tmp_path, small_corpus):
    charlstm.fit(small_corpus, preset="tutorial-small", epochs=1, units=16, window=10, batch_size=256,
                 output_dir=str(tmp_path / "a"), **QUIET)
    result = charlstm.fit(small_corpus, resume=tmp_path / "a" / "best.safetensors", epochs=1, batch_size=256,
                          output_dir=str(tmp_path / "b"), **QUIET)
    assert result.trained.config.target == "last" and result.trained.training.config["batching"] == "windows"


def test_resume_refuses_to_change_the_architecture(tmp_path, small_corpus):
    charlstm.fit(small_corpus, epochs=1, output_dir=str(tmp_path), **SMALL, **QUIET)
    with pytest.raises(CharLSTMError, match="units"):
        charlstm.fit(small_corpus, resume=tmp_path / "last.safetensors", units=64, **QUIET)


def test_optimiser_state_round_trip_and_checks():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    tensors, meta = pack_optimizer(opt)
    json.dumps(meta)  # scalars only
    fresh = torch.optim.AdamW(model.parameters(), lr=0.1)
    unpack_optimizer(fresh, tensors, meta)
    for p in model.parameters():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(fresh.state[p][key], opt.state[p][key])
    bad = {k: (torch.zeros(5) if k.endswith("exp_avg") else v) for k, v in tensors.items()}
    with pytest.raises(CharLSTMError, match="shape"):
        unpack_optimizer(torch.optim.AdamW(model.parameters()), bad, meta)
    with pytest.raises(CharLSTMError, match="optimiser"):
        unpack_optimizer(torch.optim.Adam(model.parameters()), tensors, meta)


def test_random_generator_states_round_trip():
    tensors, meta = pack_rng()
    assert tensors["rng.torch"].dtype == torch.uint8
    expected = (torch.rand(3), np.random.rand(), __import__("random").random())
    restore_rng(tensors, json.loads(json.dumps(meta)))
    again = (torch.rand(3), np.random.rand(), __import__("random").random())
    assert torch.equal(expected[0], again[0]) and expected[1:] == again[1:]


# ----------------------------------------------------------------------- schedule and data


def test_time_budget_schedule_ends_on_the_final_rate(small_corpus):
    vocab = Vocab.from_text(small_corpus.text)
    model_config, config = preset_configs("default", len(vocab), time_budget=100.0, warmup_steps=10,
                                          lr=1e-3, final_lr_fraction=0.1, **{k: v for k, v in SMALL.items()
                                                                             if k not in ("lr", "warmup_steps")})
    trainer = Trainer(CharLSTM(model_config), vocab, vocab.encode(small_corpus.text), config, **QUIET)
    trainer.eval_seconds = 0.0
    budget_end = 100.0 - trainer.reserve_seconds()
    assert math.isclose(trainer.lr_at(0, 0.0), 1e-4)  # warm-up
    assert math.isclose(trainer.lr_at(50, 0.0), 1e-3)
    assert math.isclose(trainer.lr_at(50, budget_end / 2), 1e-3 * (0.1 + 0.9 * 0.5))
    assert math.isclose(trainer.lr_at(50, budget_end), 1e-4)
    assert config.epochs > 1000  # the budget, not the epoch count, ends the run


def test_with_epochs_and_a_budget_the_schedule_ends_with_whichever_comes_first(small_corpus):
    vocab = Vocab.from_text(small_corpus.text)
    model_config, config = preset_configs("default", len(vocab), time_budget=100.0, epochs=2, warmup_steps=0,
                                          lr=1e-3, final_lr_fraction=0.1, **{k: v for k, v in SMALL.items()
                                                                             if k not in ("lr", "warmup_steps")})
    trainer = Trainer(CharLSTM(model_config), vocab, vocab.encode(small_corpus.text), config, **QUIET)
    trainer.eval_seconds = 0.0
    last_step = 2 * len(trainer.batches)
    assert math.isclose(trainer.lr_at(last_step // 2, 1.0), 1e-3 * (0.1 + 0.9 * 0.5))  # the epochs end first
    assert math.isclose(trainer.lr_at(last_step, 1.0), 1e-4)
    assert math.isclose(trainer.lr_at(1, 100.0 - trainer.reserve_seconds()), 1e-4)  # the budget ends first


def test_streams_continue_each_other_and_move_between_epochs(tmp_path):
    ids = (np.arange(5000) % 251).astype(np.uint8)
    save_ids(tmp_path / "ids.npy", ids)
    mapped = load_ids(tmp_path / "ids.npy")
    assert isinstance(mapped, np.memmap)
    batches = StreamBatches(mapped, batch_size=4, bptt=30, random_offset=True, seed=1)
    first, second = list(batches.epoch(1)), list(batches.epoch(2))
    assert len(first) == len(second) == len(batches)
    (x0, y0), (x1, _) = first[0], first[1]
    assert torch.equal(y0[:, :-1], x0[:, 1:]) and torch.equal(x1[:, 0], y0[:, -1])  # continues
    offsets = [batches.offset(epoch) for epoch in range(1, 11)]
    assert len(set(offsets)) > 1 and all(0 <= o < 30 for o in offsets)  # they move, within one piece
    for epoch, batches_of_epoch in ((1, first), (2, second)):  # each epoch's streams start at its offset
        assert batches_of_epoch[0][0][0, 0].item() == ids[batches.offset(epoch)]
    again = list(StreamBatches(ids, batch_size=4, bptt=30, random_offset=True, seed=1).epoch(1))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again))  # same seed and epoch, same batches
    assert x0.dtype == torch.int64


def test_training_reads_memory_mapped_ids(tmp_path, small_corpus):
    vocab = Vocab.from_text(small_corpus.text)
    save_ids(tmp_path / "ids.npy", vocab.encode(small_corpus.text))
    ids = load_ids(tmp_path / "ids.npy")
    assert ids.dtype == np.uint8 and isinstance(ids, np.memmap)
    assert vocab.decode(ids) == small_corpus.text
    model_config, config = preset_configs("default", len(vocab), epochs=1, output_dir=str(tmp_path / "run"),
                                          **SMALL)
    result = Trainer(CharLSTM(model_config), vocab, ids, config, **QUIET).fit()
    assert result.history[0].val_loss < math.log(len(vocab))


# ----------------------------------------------------------------------- regularisation


def test_weight_drop_trains_the_recurrent_weight_through_its_mask():
    torch.manual_seed(0)
    model = CharLSTM(ModelConfig(vocab_size=20, units=16, layers=1, dropout=0.0, weight_drop=0.5)).train()
    ids = torch.randint(0, 20, (2, 7))
    torch.manual_seed(5)
    logits, _ = model(ids)
    logits.sum().backward()
    grad = model.lstms[0].weight_hh_l0.grad.clone()
    # the same computation by hand: a plain LSTM whose W_hh is the dropped copy
    torch.manual_seed(5)
    mask = (torch.rand(model.lstms[0].weight_hh_l0.shape) < 0.5).float() * 2
    plain = CharLSTM(ModelConfig(vocab_size=20, units=16, layers=1, dropout=0.0))
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        plain.lstms[0].weight_hh_l0.mul_(mask)
    expected, _ = plain.train()(ids)
    expected.sum().backward()
    assert torch.allclose(logits, expected, atol=1e-6)
    assert torch.allclose(grad, plain.lstms[0].weight_hh_l0.grad * mask, atol=1e-6)
    assert (grad[mask == 0] == 0).all()


def test_weight_drop_only_in_training():
    config = ModelConfig(vocab_size=20, units=16, layers=1, dropout=0.0, weight_drop=0.5)
    model = CharLSTM(config)
    plain = CharLSTM(ModelConfig(vocab_size=20, units=16, layers=1, dropout=0.0))
    plain.load_state_dict(model.state_dict())
    ids = torch.randint(0, 20, (2, 7))
    model.eval(), plain.eval()
    assert torch.equal(model(ids)[0], plain(ids)[0])
    model.train()
    assert not torch.allclose(model(ids)[0], model(ids)[0])


def test_variational_dropout_shares_the_mask_over_time():
    model = CharLSTM(ModelConfig(vocab_size=10, embedding_dim=32, units=8, layers=1, input_dropout=0.5,
                                 variational=True)).train()
    ids = torch.full((2, 6), 3)
    x = model.encode_inputs(ids)
    dropped = x == 0
    assert dropped.any() and torch.equal(dropped, dropped[:, :1].expand_as(dropped))


# ----------------------------------------------------------------------- logs, plot, CLI


def test_metrics_log_plot_and_info(tmp_path, small_corpus, capsys):
    charlstm.fit(small_corpus, epochs=2, output_dir=str(tmp_path), **SMALL, **QUIET)
    rows = read_metrics(tmp_path)
    assert [r["epoch"] for r in rows] == [1, 2]
    assert math.isclose(rows[0]["val_bpc"], rows[0]["val_loss"] / LN2)
    csv_lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert csv_lines[0].startswith("epoch,") and len(csv_lines) == 3
    png = plot_run(tmp_path)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["plot", str(tmp_path), "-o", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").stat().st_size > 1000
    assert main(["info", str(tmp_path / "last.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "best val_loss" in out and "bits/char" in out and "compressors on the validation text" in out
    assert "resumable: epoch 3, batch 0" in out and "parameters:" in out


def test_plot_without_a_log_is_one_clear_error(tmp_path, capsys):
    assert main(["plot", str(tmp_path)]) == 2
    assert "no metrics log" in capsys.readouterr().err


def test_cli_samples_and_resume(tmp_path, alice_start, capsys):
    text = tmp_path / "alice.txt"
    text.write_text(alice_start)
    common = ["--text", str(text), "--no-progress", "--units", "32", "--batch-size", "8", "--bptt", "40",
              "-o", str(tmp_path / "run"), "--seed", "1"]
    assert main(["train", *common, "--epochs", "1", "--sample-every", "1", "--sample-temperatures", "0.5,1",
                 "--sample-length", "30"]) == 0
    out = capsys.readouterr().out
    assert "temperature 0.5" in out and "temperature 1.0" in out and "Compressor baselines" in out
    assert main(["train", *common, "--epochs", "2", "--resume", str(tmp_path / "run" / "last.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "resuming" in out and "Epoch 02" in out and "Epoch 01 " not in out
