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
from charlstm.dynamic_eval import DynamicConfig, _SwitchingMixture, adapted_to, dynamic_evaluate
from charlstm.generate import Generator
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
    dynamic = dynamic_evaluate(model, ids[300:], context=ids[200:300], config=DynamicConfig(step_sizes=(1e-30,)))
    assert dynamic.characters == 1200
    assert math.isclose(dynamic.nats_per_char, static, rel_tol=1e-5)
    assert math.isclose(dynamic_evaluate(model, ids[:400], config=DynamicConfig(step_sizes=(1e-30,), segment=7))
                        .nats_per_char, evaluate_ids(model, ids[:400]), rel_tol=1e-5)


def test_adapting_learns_a_repeated_passage_and_leaves_the_model_alone(tiny, alice):
    vocab, model = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    passage = vocab.encode(alice[:400])
    ids = np.concatenate([passage] * 4)
    static = evaluate_ids(model, ids)
    dynamic = dynamic_evaluate(model, ids, config=DynamicConfig(step_sizes=(3e-3,), segment=20))
    assert dynamic.nats_per_char < static - 0.3, (dynamic.nats_per_char, static)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training  # the caller's mode is untouched too


def test_a_character_is_scored_before_the_weights_see_it(tiny, alice):
    """A huge step after each segment would memorise it; scoring first means the first
    segment's loss is exactly the static one."""
    vocab, model = tiny
    ids = vocab.encode(alice[:200])
    huge = dynamic_evaluate(model, ids[:51], config=DynamicConfig(step_sizes=(1.0,), segment=50))
    assert math.isclose(huge.nats_per_char, evaluate_ids(model, ids[:51]), rel_tol=1e-5)


def test_bad_settings_and_window_models_are_refused(alice):
    vocab = Vocab.from_text(alice)
    window = CharLSTM(ModelConfig(vocab_size=len(vocab), input="scaled", target="last", units=8, layers=1))
    with pytest.raises(CharLSTMError, match="every position"):
        dynamic_evaluate(window, vocab.encode(alice[:300]))
    for bad in (dict(step_sizes=(0.0,)), dict(step_sizes=()), dict(step_sizes=(1e-3, float("nan"))),
                dict(segment=0), dict(decay=1.0), dict(context_chars=-1), dict(switch_rates=(1.0,))):
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
    assert "--dynamic-lr needs one or more positive step sizes" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:
        main(["evaluate", str(path), "--text", str(text), "--dynamic", "--dynamic-lr", "1e-3,x"])
    assert usage.value.code == 2 and "--dynamic-lr" in capsys.readouterr().err


def test_the_mixture_codes_almost_as_well_as_its_best_expert_and_only_looks_back():
    """Bayes over switching rates, with the rate 0 among them, costs at most log(rates) +
    log(experts) nats over the best expert in hindsight; the first character is coded with
    even weights, whatever comes after it."""
    rng = np.random.default_rng(0)
    good = np.log(rng.uniform(0.3, 0.9, 2000))
    bad = np.log(rng.uniform(0.01, 0.2, 2000))
    rates = (0.0, 0.01, 0.1)
    total = _SwitchingMixture(2, rates).code_length(np.stack([bad, good]))
    assert -good.sum() <= total <= -good.sum() + math.log(3) + math.log(2)
    first = _SwitchingMixture(2, rates).code_length(np.stack([bad[:1], good[:1]]))
    assert math.isclose(first, -math.log((math.exp(bad[0]) + math.exp(good[0])) / 2))
    # experts that take turns: switching beats every single expert by far
    turns = np.where(np.arange(2000) // 100 % 2 == 0, 1, 0)
    a, b = np.where(turns, good, bad), np.where(turns, bad, good)
    switching = _SwitchingMixture(2, rates).code_length(np.stack([a, b]))
    assert switching < min(-a.sum(), -b.sum()) - 500


def test_several_step_sizes_and_the_static_model_mixed(tiny, alice):
    vocab, model = tiny
    passage = vocab.encode(alice[:300])
    ids = np.concatenate([passage] * 3)
    alone = [dynamic_evaluate(model, ids, config=DynamicConfig(step_sizes=(lr,), with_static=False, segment=20))
             .nats_per_char for lr in (3e-4, 3e-3)]
    config = DynamicConfig(step_sizes=(3e-4, 3e-3), segment=20, switch_rates=(0.0, 0.1))
    mixed = dynamic_evaluate(model, ids, config=config).nats_per_char
    assert mixed < max(alone)  # within log(3 experts) + log(2 rates) nats in all of the best one
    assert mixed <= min(alone) + (math.log(3) + math.log(2)) / (len(ids) - 1) + 1e-9


def test_the_context_before_the_scored_text_is_read_and_adapted_to(tiny, alice):
    vocab, model = tiny
    passage = vocab.encode(alice[:300])
    context, scored = np.concatenate([passage] * 3), passage
    config = DynamicConfig(step_sizes=(3e-3,), segment=20, with_static=False)
    cold = dynamic_evaluate(model, scored, context=context, config=DynamicConfig(**{**config.__dict__, "context_chars": 0}))
    warm = dynamic_evaluate(model, scored, context=context, config=config)
    assert (cold.context_read, warm.context_read) == (0, len(context) - 1)
    assert warm.characters == cold.characters == len(scored)
    assert warm.nats_per_char < cold.nats_per_char - 0.3  # it had read the passage three times
    part = dynamic_evaluate(model, scored, context=context, config=DynamicConfig(**{**config.__dict__, "context_chars": 100}))
    assert part.context_read == 100


def test_adapting_to_a_prime_learns_it_and_leaves_the_model_alone(tiny, alice):
    vocab, model = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    passage = vocab.encode(alice[:400])
    adaptation = adapted_to(model, np.concatenate([passage] * 3), step_size=3e-3, segment=20)
    assert adaptation.characters == 3 * len(passage) - 1
    assert evaluate_ids(adaptation.model, passage) < evaluate_ids(model, passage) - 0.3
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(CharLSTMError, match="at least two"):
        adapted_to(model, passage[:1])
    window = CharLSTM(ModelConfig(vocab_size=len(vocab), input="scaled", target="last", units=8, layers=1))
    with pytest.raises(CharLSTMError, match="every position"):
        adapted_to(window, passage)


def test_a_generator_adapted_to_its_prime_generates_from_the_new_weights(tiny, alice):
    """The native kernel copies the weights once: adapting must replace that copy too."""
    vocab, model = tiny
    trained = TrainedModel(model=model, vocab=vocab)
    gen = Generator(trained, backend="auto")
    prime = alice[:600]
    gen.generate(prime[-50:], 40)  # builds the kernel's copy of the original weights
    read_at = gen.adapt(prime, step_size=3e-3)
    assert read_at > 0 and gen.model is not model
    again = gen.generate(prime[-50:], 40)
    reference = Generator(TrainedModel(model=gen.model, vocab=vocab), backend="module").generate(prime[-50:], 40)
    assert again == reference


def test_cli_generates_after_adapting_to_a_prime_file(tmp_path, tiny, alice, capsys):
    vocab, model = tiny
    path = checkpoint.save(tmp_path / "m.safetensors", TrainedModel(model=model, vocab=vocab))
    prime = tmp_path / "chapter.txt"
    prime.write_text(alice[:2000])
    assert main(["generate", str(path), "--prime-file", str(prime), "--adapt-to-prime", "--length", "30"]) == 0
    captured = capsys.readouterr()
    assert "adapted to the prime's 2,000 characters" in captured.err
    assert captured.out.startswith('Seed:\n"...') and alice[1500:2000] in captured.out
    assert main(["generate", str(path), "--prime", "x", "--prime-file", str(prime)]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["generate", str(path), "--adapt-to-prime"]) == 2
    assert "--adapt-to-prime needs a prime" in capsys.readouterr().err
