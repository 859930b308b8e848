"""Fine-tuning from a pretrained model (--init): vocabulary remapping, records, errors."""

from __future__ import annotations

import string

import numpy as np
import pytest
import torch

from charlstm import checkpoint, finetune
from charlstm.checkpoint import TrainedModel
from charlstm.cli import main
from charlstm.corpus import Corpus, Normalization
from charlstm.errors import CharLSTMError
from charlstm.evaluate import evaluate_ids
from charlstm.model import CharLSTM, ModelConfig
from charlstm.recipes import FINE_TUNING, FINE_TUNING_MODEL, FINE_TUNING_PASSES
from charlstm.train import fit
from charlstm.vocab import Vocab

QUIET = dict(progress=False, log=lambda _: None)
TINY = dict(units=48, layers=1, embedding_dim=16, batch_size=8, bptt=40, dropout=0.0, weight_drop=0.0,
            warmup_steps=5, patience=0)


@pytest.fixture(scope="module")
def alice_cased(pg11):
    return Corpus.from_files(pg11, Normalization(lowercase=False)).text


@pytest.fixture(scope="module")
def base_path(tmp_path_factory, alice_cased):
    """A tiny case-kept 'base' trained for a few seconds on Alice's first 20,000 characters."""
    out = tmp_path_factory.mktemp("base")
    result = fit(Corpus.from_string(alice_cased[:20_000], Normalization(lowercase=False)), output_dir=str(out),
                 epochs=4, lr=1e-2, seed=1, **TINY, **QUIET)
    return result.best_path


def test_remap_keeps_known_rows_and_starts_new_characters_rare():
    torch.manual_seed(0)
    old = Vocab(tuple("abcAB "))
    model = CharLSTM(ModelConfig(vocab_size=len(old), units=16, layers=1, embedding_dim=8))
    new = Vocab(tuple(" ab€"))  # c, A, B left out; € is new
    remapped = finetune.remap_vocab(model, old, new, dropout=0.3)
    assert remapped.config.vocab_size == 4 and remapped.config.dropout == 0.3
    for new_id, ch in enumerate(new.chars[:3]):
        old_id = old.chars.index(ch)
        assert torch.equal(remapped.embedding.weight[new_id], model.embedding.weight[old_id])
        assert torch.equal(remapped.head.weight[new_id], model.head.weight[old_id])
    assert torch.allclose(remapped.embedding.weight[3], model.embedding.weight.mean(0))
    assert remapped.head.bias[3] == model.head.bias.min()
    # the network itself is unchanged: known characters get the same logits as before
    model.eval(), remapped.eval()
    ids_old = torch.tensor([[old.chars.index(c) for c in "ab ab"]])
    ids_new = torch.tensor([[new.chars.index(c) for c in "ab ab"]])
    old_logits, _ = model(ids_old)
    new_logits, _ = remapped(ids_new)
    assert torch.allclose(new_logits[..., :3], old_logits[..., [old.chars.index(c) for c in " ab"]])


def test_fine_tuning_a_lowercased_text_beats_training_from_scratch(tmp_path, base_path, pg11):
    """The base saw cased text; the new text is lowercased, with a character it never saw."""
    text = Corpus.from_files(pg11).text[60_000:66_000] + " ~"
    corpus = Corpus.from_string(text)
    common = dict(epochs=2, seed=3, lr=5e-3, **TINY, **QUIET)
    tuned = fit(corpus, init=str(base_path), output_dir=str(tmp_path / "tuned"), **common)
    scratch = fit(corpus, output_dir=str(tmp_path / "scratch"), **common)
    tuned_loss = tuned.trained.training.best.val_loss
    scratch_loss = scratch.trained.training.best.val_loss
    assert tuned_loss < scratch_loss - 0.1, (tuned_loss, scratch_loss)
    saved = checkpoint.load(tuned.best_path)
    assert saved.vocab == Vocab.from_text(text) and saved.normalization.lowercase
    record = saved.training.init
    assert record["init"] == str(base_path) and record["new_characters"] == ["~"]
    assert record["sha256"] == finetune.file_sha256(base_path)
    assert saved.training.config["lr"] == 5e-3  # an explicit option wins over FINE_TUNING


def test_fine_tuning_schedule_and_regularisation_defaults(tmp_path, base_path, pg11):
    corpus = Corpus.from_string(Corpus.from_files(pg11).text[:5000])
    result = fit(corpus, init=str(base_path), output_dir=str(tmp_path), epochs=1, batch_size=8, bptt=40, **QUIET)
    config = result.trained.training.config
    assert config["lr"] == FINE_TUNING["lr"]
    assert config["warmup_steps"] == FINE_TUNING["warmup_steps"]
    model = result.trained.config
    assert (model.units, model.layers) == (48, 1)  # the base's network
    assert model.weight_drop == FINE_TUNING_MODEL["weight_drop"] and model.variational


def test_fine_tuning_stops_after_its_passes_even_with_time_left(tmp_path, base_path, pg11, capsys):
    corpus = Corpus.from_string(Corpus.from_files(pg11).text[:3000])
    result = fit(corpus, init=str(base_path), output_dir=str(tmp_path), time_budget=600.0, batch_size=8, bptt=40,
                 **QUIET)
    config = result.trained.training.config
    assert config["epochs"] == FINE_TUNING_PASSES and len(result.history) == FINE_TUNING_PASSES
    assert result.history[-1].lr < 0.1 * FINE_TUNING["lr"]  # the cosine ended with the passes, not the budget


def test_init_errors_are_one_line(tmp_path, base_path, small_text, capsys, monkeypatch):
    monkeypatch.setitem(finetune.PRETRAINED, "english", tmp_path / "missing.safetensors")
    for extra, message in (
        (["--init", "english"], "the pretrained model is not installed"),
        (["--init", str(tmp_path / "nope.safetensors")], "no such checkpoint file"),
        (["--init", str(base_path), "--units", "64"], "--units cannot differ from the --init model's (48)"),
        (["--init", str(base_path), "--resume", str(base_path)], "pass only one of them"),
    ):
        code = main(["train", "--text", str(small_text), "-o", str(tmp_path / "out"), "--no-progress", *extra])
        err = capsys.readouterr().err
        assert code == 2 and message in err and "Traceback" not in err, err
        assert len(err.strip().splitlines()) == 1


def test_cli_init_and_info_show_the_start(tmp_path, base_path, small_text, capsys):
    out = tmp_path / "out"
    code = main(["train", "--text", str(small_text), "--init", str(base_path), "-o", str(out), "--epochs", "1",
                 "--batch-size", "8", "--bptt", "40", "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 0 and f"starting from {base_path}" in printed
    assert main(["info", str(out / "best.safetensors")]) == 0
    assert f"fine-tuned from: {base_path}" in capsys.readouterr().out
    trained = checkpoint.load(out / "best.safetensors")
    ids = trained.vocab.encode(small_text.read_text()[:2000])
    assert np.isfinite(evaluate_ids(trained.model, ids))


def test_init_refuses_window_models(tmp_path, small_text):
    vocab = Vocab.from_text(small_text.read_text())
    window = CharLSTM(ModelConfig(vocab_size=len(vocab), input="scaled", target="last", units=8, layers=1))
    path = checkpoint.save(tmp_path / "w.safetensors", TrainedModel(model=window, vocab=vocab))
    with pytest.raises(CharLSTMError, match="embedding input that predicts every position"):
        finetune.load_init(path, vocab)


def test_the_shipped_english_base_knows_english_and_fine_tunes(tmp_path, pg11):
    path = finetune.resolve_init("english")
    assert path.stat().st_size < 5_000_000  # small enough for a pip install
    base = checkpoint.load(path)
    chars = set(base.vocab.chars)
    assert set(string.ascii_letters + string.digits + " \n.,;:!?'\"()-") <= chars
    assert set("‘’“”–—") <= chars and not base.normalization.lowercase
    alice = Corpus.from_files(pg11, Normalization(lowercase=False)).text
    ids = base.vocab.encode(alice[20_000:23_000])
    assert evaluate_ids(base.model, ids) < 2.0  # an untrained model scores log(121) = 4.8 nats/char
    result = fit(Corpus.from_string(Corpus.from_files(pg11).text[:6000]), init="english", epochs=1, batch_size=8,
                 bptt=50, output_dir=str(tmp_path), **QUIET)
    assert result.trained.training.init["init"] == "english"
    assert result.trained.training.best.val_loss < 2.0


def test_run_fine_tunes_the_english_base_by_default(tmp_path, small_text, capsys):
    code = main(["run", "--text", str(small_text), "-o", str(tmp_path), "--time-budget", "8", "--batch-size", "8",
                 "--no-progress", "--seed", "1", "--length", "40", "--prime", "alice"])
    out = capsys.readouterr().out
    assert code == 0 and "starting from english" in out
    assert checkpoint.load(tmp_path / "best.safetensors").training.init["init"] == "english"
