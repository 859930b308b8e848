"""The adaptive softmax head: an exact model over thousands of symbols, on real Chinese text.

The Chinese translation of the tutorial (641 distinct characters, most of them CJK) is
prepared, trained on for a few steps, saved, loaded, scored, generated from and served.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from charlstm import checkpoint
from charlstm.adaptive import AdaptiveHead, choose_cutoffs, frequency_order
from charlstm.checkpoint import TrainedModel
from charlstm.cli import main
from charlstm.corpus import Normalization
from charlstm.dynamic_eval import DynamicConfig, dynamic_evaluate
from charlstm.errors import CharLSTMError
from charlstm.evaluate import evaluate_ids
from charlstm.fast_step import BF16_TOLERANCE, make_stepper
from charlstm.finetune import load_init
from charlstm.generate import Generator, SamplingConfig
from charlstm.model import CharLSTM, ModelConfig
from charlstm.prepare import PrepareConfig, PreparedData, prepare
from charlstm.recipes import ADAPTIVE_HEAD_MIN_VOCAB, preset_configs
from charlstm.serve import ServeConfig, create_app
from charlstm.train import fit
from conftest import shared_file

warnings.filterwarnings("ignore", message=".*httpx.*", category=Warning)
from starlette.testclient import TestClient  # noqa: E402

SMALL = dict(units=32, embedding_dim=16, layers=2, dropout=0.0, weight_drop=0.0)


@pytest.fixture(scope="module")
def chinese(tmp_path_factory) -> PreparedData:
    book = shared_file("seed", "tutorial.zh.md")
    out = tmp_path_factory.mktemp("zh") / "data"
    norm = Normalization(lowercase=False, strip_gutenberg=False)  # it quotes Gutenberg's markers
    prepare(PrepareConfig(inputs=(str(book),), output_dir=out, val_fraction=0.1, normalization=norm), progress=False)
    return PreparedData.open(out)


@pytest.fixture(scope="module")
def trained(chinese, tmp_path_factory) -> TrainedModel:
    out = tmp_path_factory.mktemp("zh-run")
    result = fit(data=chinese, head="adaptive", max_steps=25, batch_size=8, bptt=40, threads=1, eval_every=25,
                 output_dir=str(out), progress=False, log=lambda _: None, **SMALL)
    return checkpoint.load(out / "last.safetensors")


def test_head_is_a_normalised_distribution_and_its_loss_the_full_ones():
    torch.manual_seed(0)
    counts = np.random.default_rng(0).zipf(1.4, 300)
    model = CharLSTM(ModelConfig(vocab_size=300, head="adaptive", head_cutoffs=(40, 120), **SMALL),
                     symbol_counts=counts)
    assert torch.equal(model.head.order_ids(), torch.from_numpy(frequency_order(counts)))
    x, y = torch.randint(0, 300, (4, 9)), torch.randint(0, 300, (4, 9))
    y[1, 3] = -100  # padding is no target
    log_probs, _ = model(x)
    torch.testing.assert_close(log_probs.exp().sum(-1), torch.ones(4, 9))
    loss, _ = model(x, targets=y)
    full = F.cross_entropy(log_probs.reshape(-1, 300), y.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(loss, full)
    # the cheap loss has the full one's gradients
    grads = torch.autograd.grad(loss, list(model.parameters()))
    full_grads = torch.autograd.grad(F.cross_entropy(model(x)[0].reshape(-1, 300), y.reshape(-1)), list(
        model.parameters()))
    for g, f in zip(grads, full_grads):
        torch.testing.assert_close(g, f, atol=1e-6, rtol=1e-4)
    # a batch without targets in the clusters still gives every parameter a gradient (zero): DDP needs it
    model.zero_grad()
    model(x, targets=model.head.order_ids()[y % 40])[0].backward()  # shortlist symbols only
    assert all(p.grad is not None for p in model.parameters())
    assert model.head.clusters[1].weight.grad.abs().sum() == 0


def test_cutoffs_follow_the_counts():
    zipf = 1.0 / np.arange(1, 5001)  # a Chinese-like vocabulary: few frequent symbols, a long tail
    cutoffs = choose_cutoffs(np.random.default_rng(1).permutation(zipf * 1e7).astype(np.int64), 256)
    assert 0 < cutoffs[0] < cutoffs[-1] < 5000 and list(cutoffs) == sorted(cutoffs)
    assert cutoffs[0] < 2500  # the shortlist holds the frequent symbols, not half the vocabulary
    flat = choose_cutoffs(np.ones(5000, dtype=np.int64), 256)
    assert flat != cutoffs  # a different distribution of counts, different clusters


def test_auto_head_by_vocabulary_size_and_old_configs_stay_full():
    small, _ = preset_configs("default", ADAPTIVE_HEAD_MIN_VOCAB - 1)
    large, _ = preset_configs("default", ADAPTIVE_HEAD_MIN_VOCAB, symbol_counts=np.arange(ADAPTIVE_HEAD_MIN_VOCAB))
    forced, _ = preset_configs("default", ADAPTIVE_HEAD_MIN_VOCAB, head="full")
    assert (small.head, large.head, forced.head) == ("full", "adaptive", "full")
    assert large.head_cutoffs and "head" not in small.to_dict()  # full-head checkpoints read as before
    assert ModelConfig.from_dict({"vocab_size": 60}).head == "full"
    assert ModelConfig.from_dict(large.to_dict()) == large
    with pytest.raises(CharLSTMError, match="head-cutoffs"):
        ModelConfig(vocab_size=100, head="adaptive", head_cutoffs=(50, 40))


def test_trains_saves_and_loads_with_its_order(trained, chinese, tmp_path):
    config = trained.model.config
    assert config.head == "adaptive" and len(trained.vocab) == len(chinese.vocab) > 600
    counts = chinese.symbol_counts()
    assert torch.equal(trained.model.head.order_ids(), torch.from_numpy(frequency_order(counts)))
    history = trained.training.history
    assert history and math.isfinite(history[-1].loss) and history[-1].loss < math.log(len(trained.vocab))
    # a tampered order (not a permutation) is refused on loading
    broken = CharLSTM(config)
    broken.load_state_dict(trained.model.state_dict())
    with torch.no_grad():
        broken.head.order[0] = broken.head.order[1]
    path = tmp_path / "broken.safetensors"
    checkpoint.save(path, TrainedModel(broken, trained.vocab))
    with pytest.raises(CharLSTMError, match="not a permutation"):
        checkpoint.load(path)


def test_evaluate_and_dynamic_evaluation_score_the_full_distribution(trained, chinese):
    ids = np.asarray(chinese.val_ids[:300]).astype(np.int64)
    model = trained.model
    with torch.no_grad():
        log_probs, _ = model(torch.from_numpy(ids[:-1])[None])
    expected = -log_probs[0].gather(1, torch.from_numpy(ids[1:])[:, None]).mean().item()
    assert evaluate_ids(model, ids) == pytest.approx(expected, rel=1e-5)
    dynamic = dynamic_evaluate(model, ids, config=DynamicConfig(step_sizes=(1e-12,)))  # ~no adaptation: the static score
    assert dynamic.nats_per_char == pytest.approx(expected, rel=1e-5)
    assert dynamic_evaluate(model, ids, config=DynamicConfig()).nats_per_char != pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_lean_steps_give_the_models_distribution(trained, chinese, backend):
    model = trained.model
    ids = np.asarray(chinese.val_ids[:80]).astype(np.int64).reshape(2, 40)  # two streams, different text
    with torch.no_grad():
        expected = model(torch.from_numpy(ids))[0].exp().numpy()
    for precision, tolerance in (("fp32", 1e-5), ("bf16", BF16_TOLERANCE)):
        stepper = make_stepper(model, 2, backend, precision=precision)
        got = np.stack([stepper.step(ids[:, t]).copy() for t in range(40)], axis=1)
        assert got.shape == expected.shape
        np.testing.assert_allclose(np.exp(got), expected, atol=tolerance)


def test_generation_greedy_is_the_full_argmax_and_sampling_reproduces(trained):
    gen = Generator(trained)
    prime = "长短期记忆"
    greedy = gen.generate(prime, 60, mode="stateful")
    ids = gen.prepare_prime(prime)
    model = trained.model
    with torch.no_grad():
        text = list(ids)
        for _ in range(60):
            text.append(int(model(torch.tensor([text]), last_only=True)[0].argmax()))
    assert greedy == trained.vocab.decode(np.array(text[len(ids):]))
    sampling = SamplingConfig(0.8)
    sampled = gen.generate(prime, 200, sampling=sampling, seed=3)
    assert sampled == Generator(trained, backend="module").generate(prime, 200, sampling=sampling, seed=3)
    assert gen.generate_batch(prime, 200, [SamplingConfig(1.0), sampling], seeds=[9, 3])[1] == sampled
    assert len(set(sampled)) > 20  # draws from the whole alphabet, tail clusters included
    assert Generator(trained, precision="bf16").generate(prime, 50, sampling=SamplingConfig(1.0, 40, 0.9), seed=1)


def test_server_and_command_line(trained, chinese, tmp_path, capsys):
    with TestClient(create_app(ServeConfig(), {"zh": trained})) as client:
        r = client.post("/v1/completions", json={"prompt": "模型", "max_tokens": 50, "temperature": 0.8,
                                                 "seed": 4, "logprobs": 2})
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
    assert choice["text"] == Generator(trained).generate("模型", 50, sampling=SamplingConfig(0.8), seed=4)
    assert all(v <= 0 for v in choice["logprobs"]["token_logprobs"])
    path = tmp_path / "zh.safetensors"
    checkpoint.save(path, trained)
    assert main(["generate", str(path), "--prime", "模型", "--length", "30", "--seed", "1", "--temperature", "1"]) == 0
    assert "模型" in capsys.readouterr().out
    # fine-tuning onto other characters needs a full head
    with pytest.raises(CharLSTMError, match="full softmax head"):
        load_init(path, chinese.vocab)


def test_head_options_a_text_cannot_take_are_one_line_errors(small_text, tmp_path, capsys):
    base = ["train", "--text", str(small_text), "-o", str(tmp_path), "--max-steps", "1", "--no-progress"]
    symbols = len(set(small_text.read_text(encoding="utf-8")))
    assert main([*base, "--head", "adaptive", "--head-cutoffs", str(symbols)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--head-cutoffs must be increasing" in err
    assert main([*base, "--head", "adaptive"]) == 2
    assert f"an adaptive head needs more than 64 symbols, not {symbols}" in capsys.readouterr().err
    assert main([*base, "--head", "full", "--head-cutoffs", "10"]) == 2
    assert "applies to the adaptive head" in capsys.readouterr().err


@pytest.mark.parametrize("cluster_boost", [0.0, 6.0])
def test_greedy_step_computes_only_what_the_argmax_needs_and_agrees(trained, chinese, cluster_boost):
    # boosted: the clusters' own outputs raised so that rare symbols often win, and must be found
    model = CharLSTM(trained.model.config)
    model.load_state_dict(trained.model.state_dict())
    with torch.no_grad():
        model.head.shortlist.bias[model.head.shortlist_size:] += cluster_boost
    ids = np.asarray(chinese.val_ids[:120]).astype(np.int64).reshape(3, 40)
    for precision in ("fp32", "bf16"):
        full, greedy = (make_stepper(model.eval(), 3, "native", precision=precision) for _ in range(2))
        picks = np.stack([greedy.step_argmax(ids[:, t]) for t in range(40)], axis=1)
        argmax = np.stack([full.step(ids[:, t]).argmax(axis=1) for t in range(40)], axis=1)
        np.testing.assert_array_equal(picks, argmax)
        if cluster_boost:  # the clusters' members were in the running, and won some steps
            assert (model.head.ranks().numpy()[picks] >= model.head.shortlist_size).any()
