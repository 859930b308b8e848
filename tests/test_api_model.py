"""The notebook API and the network itself."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import charlstm
from charlstm.corpus import Corpus
from charlstm.model import CharLSTM, LoopLSTM, ModelConfig


@pytest.fixture(scope="module")
def alice_start(pg11):
    return Corpus.from_files(pg11).text[:8000]


def test_five_line_notebook_use(tmp_path, alice_start):
    corpus = charlstm.Corpus.from_string(alice_start)
    model = charlstm.train(corpus, preset="default", epochs=2, units=32, layers=1, batch_size=8,
                           bptt=50, output_dir=str(tmp_path), progress=False, log=lambda _: None)
    text = charlstm.generate(model, length=200, seed=1, temperature=0.8)
    assert len(text) == 200 and set(text) <= set(model.vocab.chars)
    reloaded = charlstm.load(tmp_path / "best.safetensors")
    assert reloaded.training.epoch >= 1
    assert charlstm.generate(reloaded, length=50, prime="alice", seed=2) == \
        charlstm.generate(model, length=50, prime="alice", seed=2)


def test_training_lowers_validation_loss(tmp_path, alice_start):
    result = charlstm.fit(charlstm.Corpus.from_string(alice_start), preset="default", epochs=4, units=64,
                          layers=1, batch_size=8, bptt=50, lr=5e-3, output_dir=str(tmp_path),
                          progress=False, log=lambda _: None, seed=0)
    vals = [r.val_loss for r in result.history]
    assert vals[-1] < vals[0] < np.log(len(result.trained.vocab)) + 0.5
    assert result.best_path.name.startswith("weights-improvement-")


def test_same_seed_same_training(tmp_path, alice_start):
    def run(out):
        return [r.loss for r in charlstm.fit(charlstm.Corpus.from_string(alice_start), preset="tutorial-small",
                                             epochs=1, units=16, window=10, batch_size=64, output_dir=str(out),
                                             progress=False, log=lambda _: None, seed=5).history]
    assert run(tmp_path / "a") == run(tmp_path / "b")


@pytest.mark.parametrize("kind", ["scaled", "onehot", "embedding"])
def test_input_encodings_give_the_same_shapes(kind):
    model = CharLSTM(ModelConfig(vocab_size=30, input=kind, units=16, layers=2)).eval()
    ids = torch.randint(0, 30, (3, 7))
    logits, state = model(ids)
    assert logits.shape == (3, 7, 30) and len(state) == 2 and state[0][0].shape == (1, 3, 16)
    assert model(ids, last_only=True)[0].shape == (3, 30)


def test_scaled_input_is_id_over_vocab_size():
    model = CharLSTM(ModelConfig(vocab_size=47, input="scaled", layers=1, units=8))
    features = model.encode_inputs(torch.tensor([[0, 31, 46]]))
    assert torch.allclose(features[0, :, 0], torch.tensor([0.0, 31 / 47, 46 / 47]))


def test_loop_lstm_matches_torch_lstm_with_logistic_gates():
    torch.manual_seed(0)
    reference = torch.nn.LSTM(5, 12, batch_first=True)
    loop = LoopLSTM(5, 12, gate_activation=torch.sigmoid)
    loop.load_state_dict(reference.state_dict())
    x = torch.randn(2, 9, 5)
    state = (torch.randn(1, 2, 12), torch.randn(1, 2, 12))
    want, (wh, wc) = reference(x, state)
    got, (gh, gc) = loop(x, state)
    assert torch.allclose(want, got, atol=1e-6) and torch.allclose(wc, gc, atol=1e-6)


def test_step_equals_full_forward():
    model = CharLSTM(ModelConfig(vocab_size=20, units=16, layers=2)).eval()
    ids = torch.randint(0, 20, (2, 12))
    full, _ = model(ids)
    state = None
    for t in range(12):
        logits, state = model.step(ids[:, t], state)
        assert torch.allclose(logits, full[:, t], atol=1e-5)
