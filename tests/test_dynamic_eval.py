"""Dynamic evaluation: scored before adapting, equal to static without steps, helps on repeats."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from charlstm import checkpoint
from charlstm.checkpoint import TrainedModel
from charlstm.cli import main
from charlstm.corpus import Corpus
from charlstm.dynamic_eval import DynamicConfig, dynamic_evaluate
from charlstm.errors import CharLSTMError
from charlstm.model import CharLSTM, ModelConfig
from charlstm.evaluate import evaluate_ids
from charlstm.vocab import Vocab


@pytest.fixture(scope="module")
def alice(pg11):
    return Corpus.from_files(pg11).text


@pytest.fixture(scope="module")
def tiny(alice):
    torch.manual_seed(0)
    vocab = Vocab.from_text(alice)
    return vocab, CharLSTM(ModelConfig(vocab_size=len(vocab), units=32, layers=1, embedding_dim=8, dropout=0.3))


def test_without_adaptation_it_is_the_static_score(tiny, alice):
    vocab, model = tiny
    ids = vocab.encode(alice[:1500])
    static = evaluate_ids(model, ids[300:], context=ids[200:300])
    dynamic = dynamic_evaluate(model, ids[300:], context=ids[200:300], config=DynamicConfig(lr=1e-30))
    assert dynamic.characters == 1200
    assert math.isclose(dynamic.nats_per_char, static, rel_tol=1e-5)
    assert math.isclose(dynamic_evaluate(model, ids[:400], config=DynamicConfig(lr=1e-30, segment=7))
                        .nats_per_char, evaluate_ids(model, ids[:400]), rel_tol=1e-5)


def test_adapting_learns_a_repeated_passage_and_leaves_the_model_alone(tiny, alice):
    vocab, model = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    passage = vocab.encode(alice[:400])
    ids = np.concatenate([passage] * 4)
    static = evaluate_ids(model, ids)
    dynamic = dynamic_evaluate(model, ids, config=DynamicConfig(lr=3e-3, segment=20))
    assert dynamic.nats_per_char < static - 0.3, (dynamic.nats_per_char, static)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training  # the caller's mode is untouched too


def test_a_character_is_scored_before_the_weights_see_it(tiny, alice):
    """A huge step after each segment would memorise it; scoring first means the first
    segment's loss is exactly the static one."""
    vocab, model = tiny
    ids = vocab.encode(alice[:200])
    huge = dynamic_evaluate(model, ids[:51], config=DynamicConfig(lr=1.0, segment=50))
    assert math.isclose(huge.nats_per_char, evaluate_ids(model, ids[:51]), rel_tol=1e-5)


def test_bad_settings_and_window_models_are_refused(alice):
    vocab = Vocab.from_text(alice)
    window = CharLSTM(ModelConfig(vocab_size=len(vocab), input="scaled", target="last", units=8, layers=1))
    with pytest.raises(CharLSTMError, match="every position"):
        dynamic_evaluate(window, vocab.encode(alice[:300]))
    for bad in (dict(lr=0.0), dict(segment=0), dict(decay=1.0)):
        with pytest.raises(CharLSTMError):
            DynamicConfig(**bad).validate()


def test_cli_reports_static_and_dynamic_with_their_times(tmp_path, tiny, alice, capsys):
    vocab, model = tiny
    path = checkpoint.save(tmp_path / "m.safetensors", TrainedModel(model=model, vocab=vocab))
    text = tmp_path / "t.txt"
    text.write_text(alice[:3000])
    code = main(["evaluate", str(path), "--text", str(text), "--val-fraction", "0.2", "--dynamic",
                 "--dynamic-lr", "1e-3", "--dynamic-segment", "25"])
    out = capsys.readouterr().out
    assert code == 0
    static_line = next(line for line in out.splitlines() if line.startswith("static:"))
    dynamic_line = next(line for line in out.splitlines() if line.startswith("dynamic:"))
    assert "nats/char" in static_line and " s" in static_line
    assert "x the static time" in dynamic_line and "fewer nats/char than static" in dynamic_line
    assert main(["evaluate", str(path), "--text", str(text), "--dynamic", "--dynamic-lr", "-1"]) == 2
    assert "--dynamic-lr must be positive" in capsys.readouterr().err
