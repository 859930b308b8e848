"""Scoring a text: every character after its context, stream or windows, beside the compressors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from charlstm.evaluate import LN2, evaluate_ids, score_after, score_text
from charlstm.model import CharLSTM, ModelConfig
from charlstm.vocab import Vocab


@pytest.fixture(scope="module")
def alice(small_text) -> tuple[Vocab, np.ndarray]:
    text = small_text.read_text(encoding="utf-8")
    vocab = Vocab.from_text(text)
    return vocab, vocab.encode(text)


@pytest.mark.parametrize("target", ["all", "last"])
def test_a_model_that_knows_nothing_scores_log_vocab(target):
    model = CharLSTM(ModelConfig(vocab_size=32, units=16, layers=1, target=target, window=10))
    torch.nn.init.zeros_(model.head.weight)
    torch.nn.init.zeros_(model.head.bias)
    ids = np.random.default_rng(0).integers(0, 32, 700).astype(np.uint8)
    nats = evaluate_ids(model, ids, context=ids[:50])
    assert math.isclose(nats, math.log(32), rel_tol=1e-5)
    assert math.isclose(nats / LN2, 5.0, rel_tol=1e-5)


def test_evaluation_scores_every_character_left_to_right(alice):
    vocab, ids = alice
    model = CharLSTM(ModelConfig(vocab_size=len(vocab), units=24, layers=1)).eval()
    whole = evaluate_ids(model, ids[:1200], chunk=1000)
    with torch.no_grad():  # the same thing by hand: one pass, state carried, mean over 1199 targets
        logits, _ = model(torch.from_numpy(ids[:1200].astype(np.int64))[None])
        by_hand = F.cross_entropy(logits[0, :-1], torch.from_numpy(ids[1:1200].astype(np.int64))).item()
    assert math.isclose(whole, by_hand, rel_tol=1e-5)
    assert math.isclose(evaluate_ids(model, ids[:1200], chunk=97), whole, rel_tol=1e-5)


def test_window_models_score_each_character_from_the_window_before_it(alice):
    vocab, ids = alice
    model = CharLSTM(ModelConfig(vocab_size=len(vocab), units=16, layers=1, target="last", input="scaled",
                                 window=12)).eval()
    text = torch.from_numpy(ids[:200].astype(np.int64))
    with torch.no_grad():  # the tutorial's way by hand: window i..i+12 predicts character i+12
        losses = [F.cross_entropy(model(text[i - 12:i][None], last_only=True)[0], text[i:i + 1]).item()
                  for i in range(12, 200)]
    assert math.isclose(evaluate_ids(model, ids[12:200], context=ids[:12], chunk=50), np.mean(losses), rel_tol=1e-5)


def test_only_the_last_window_of_the_context_counts_and_compressors_score_the_same_text(alice):
    vocab, ids = alice
    model = CharLSTM(ModelConfig(vocab_size=len(vocab), units=16, layers=1, window=30)).eval()
    context, scored = ids[:4000], ids[4000:4600]
    assert score_after(model, context, scored) == score_after(model, context[-30:], scored)
    assert score_after(model, context, scored) != score_after(model, context[-29:], scored)
    score = score_text(model, vocab, context, scored)
    assert score.characters == 600 and score.nats == score_after(model, context, scored)
    assert sorted(b.name for b in score.baselines) == ["bz2", "gzip", "lzma"]
    assert score.lines()[0].startswith(f"model: {score.nats:.4f} nats/char = {score.nats / LN2:.4f} bits/char")


def test_stream_evaluation_runs_on_one_thread_and_restores_the_count(monkeypatch):
    model = CharLSTM(ModelConfig(vocab_size=10, units=8, layers=1))
    seen = []
    original = model.forward
    monkeypatch.setattr(model, "forward", lambda *a, **k: (seen.append(torch.get_num_threads()), original(*a, **k))[1])
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        evaluate_ids(model, np.arange(30, dtype=np.uint8) % 10, chunk=8)
        assert seen and set(seen) == {1} and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
