"""Generation: the lean step path against the full forward pass, sampling properties, stop
strings, streaming, batches, and the ``generate`` command."""

from __future__ import annotations

import io
import json
import os
import signal
import sys

import numpy as np
import pytest
import torch

from charlstm import CharLSTM, CharLSTMError, Generator, ModelConfig, SamplingConfig, TrainedModel, Vocab
from charlstm import checkpoint
from charlstm.cli import main
from charlstm import fast_step
from charlstm.fast_step import (BF16_TOLERANCE, RETIME_SLOWDOWN, SHARING_MARGIN, WATCH_EVERY, WATCH_WINDOW, LeanWeights, NativeStepper,
                                StepWatch, TorchStepper, choose_split, make_stepper, pick_way)
from charlstm.keras_import import ImportOptions, import_keras
from charlstm.native import (BF16_AVX512, BF16_PORTABLE, NATIVE_CACHE_ENV, NativeSampler, bf16_kernel, native_library,
                             plans_file)
from charlstm.generate import BatchSampler, StopMatcher, numpy_draw, stream_uniforms

LEAN_BACKENDS = ("native", "torch")
ALL_BACKENDS = ("native", "torch", "module")


@pytest.fixture(scope="module", autouse=True)
def _native_cache(tmp_path_factory):
    """The native kernel compiles once per test session, into a temporary folder."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(NATIVE_CACHE_ENV, str(tmp_path_factory.getbasetemp() / "native"))
        yield


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These models are tiny: with cores shared, PyTorch's thread handoffs cost more than they give."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def vocab(keras_text) -> Vocab:
    return Vocab.from_text(keras_text.read_text(encoding="utf-8").lower())


@pytest.fixture(scope="module")
def prime(keras_text) -> str:
    return keras_text.read_text(encoding="utf-8").lower()[2000:2100]


def sharp_model(vocab_size: int, seed: int = 0, **config) -> CharLSTM:
    """A random model with weights scaled up so that gates saturate and choices are clear."""
    torch.manual_seed(seed)
    model = CharLSTM(ModelConfig(vocab_size=vocab_size, **config)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    return model


def trained(vocab: Vocab, seed: int = 0, **config) -> TrainedModel:
    config = {"layers": 2, "units": 32, "embedding_dim": 16, **config}
    return TrainedModel(sharp_model(len(vocab), seed, **config), vocab)


# ----------------------------------------------------------------------------- lean step path


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("activation", ["sigmoid", "hard_sigmoid"])
@pytest.mark.parametrize("encoding", ["scaled", "onehot", "embedding"])
def test_steps_match_the_full_forward_pass(encoding, activation, backend):
    # 40 units: 160 gate rows, not a multiple of the native kernel's 64-wide panels
    model = sharp_model(37, input=encoding, recurrent_activation=activation, layers=2, units=40,
                        embedding_dim=12)
    ids = torch.randint(0, 37, (3, 50), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids)[0].softmax(-1).numpy()
    stepper = make_stepper(model, 3, backend)
    assert stepper.backend == backend
    got = np.stack([stepper.step(ids[:, t].numpy()).copy() for t in range(ids.shape[1])], axis=1)
    probs = torch.from_numpy(got).softmax(-1).numpy()
    np.testing.assert_allclose(probs, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", LEAN_BACKENDS)
def test_prime_then_steps_match_the_forward_pass_over_the_whole_text(backend):
    model = sharp_model(30, layers=3, units=16, input="onehot", target="last")
    ids = list(np.random.default_rng(2).integers(0, 30, 70))
    stepper = make_stepper(model, 1, backend)
    got = [stepper.prime(ids[:40]).copy()] + [stepper.step(np.array([i])).copy() for i in ids[40:]]
    with torch.no_grad():
        full = model(torch.tensor([ids]))[0][0, 39:].softmax(-1).numpy()
    np.testing.assert_allclose(torch.from_numpy(np.concatenate(got)).softmax(-1).numpy(), full, atol=1e-5)


def test_state_round_trips_between_the_model_and_the_stepper():
    model = sharp_model(20, layers=2, units=24)
    ids = torch.randint(0, 20, (1, 30), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        _, state = model(ids)
        both = [(h.repeat(1, 2, 1), c.repeat(1, 2, 1)) for h, c in state]
        next_logits, _ = model.step(torch.tensor([5, 6]), both)
    stepper = make_stepper(model, 2, "native")
    stepper.load_state(state)  # one stream's state, broadcast to both
    np.testing.assert_allclose(stepper.step(np.array([5, 6])), next_logits.numpy(), atol=1e-5)
    h = stepper.state()[0][0]
    assert h.shape == (1, 2, 24) and not torch.equal(h[0, 0], h[0, 1])


@pytest.mark.parametrize("batch, shards", [(40, 2), (50, 3)])
def test_threaded_shards_give_the_same_numbers_as_one_thread(batch, shards):
    # 40 streams on 3 threads: 2 shards (at least 16 streams each); 50: shards of 16, 17 and 17
    model = sharp_model(25, layers=2, units=32)
    weights = LeanWeights.from_model(model)
    one = NativeStepper(weights, batch, native_library(), threads=1)
    three = NativeStepper(weights, batch, native_library(), threads=3, split="rows")
    assert (len(one._nets), len(three._nets)) == (1, shards)
    assert [net.batch for net in three._nets] == [batch * (i + 1) // shards - batch * i // shards
                                                  for i in range(shards)]
    ids = np.random.default_rng(0).integers(0, 25, size=(10, batch))
    for row in ids:
        np.testing.assert_array_equal(one.step(row), three.step(row))
    three.close()


def step_through(stepper, ids: np.ndarray) -> np.ndarray:
    """Probabilities (B, T, V) after each column of ids (B, T)."""
    got = np.stack([stepper.step(ids[:, t]).copy() for t in range(ids.shape[1])], axis=1)
    return torch.from_numpy(got).softmax(-1).numpy()


@pytest.mark.parametrize("batch", [1, 3, 40, 41])
@pytest.mark.parametrize("activation", ["sigmoid", "hard_sigmoid"])
def test_every_way_of_sharing_a_step_between_threads_gives_the_models_numbers(activation, batch):
    # panels: each of 2 threads owns half of every layer's gates (32 units: 2 x 16 per group)
    model = sharp_model(37, recurrent_activation=activation, layers=2, units=32)
    ids = np.random.default_rng(4).integers(0, 37, size=(batch, 30))
    with torch.no_grad():
        expected = model(torch.from_numpy(ids))[0].softmax(-1).numpy()
    weights = LeanWeights.from_model(model)
    splits = ["single", "panels"] + (["rows"] if batch >= 32 else [])
    results = {}
    for split in splits:
        stepper = NativeStepper(weights, batch, native_library(), threads=2, split=split)
        results[split] = step_through(stepper, ids)
        stepper.close()
        np.testing.assert_allclose(results[split], expected, atol=1e-5, rtol=0)
    for split in splits[1:]:  # the same sums in the same order, whoever computes them
        np.testing.assert_array_equal(results[split], results["single"])


@pytest.mark.parametrize("split, batch", [("panels", 2), ("rows", 33)])
def test_a_forked_child_steps_with_threads_of_its_own(split, batch):
    model = sharp_model(23, layers=2, units=32)
    stepper = NativeStepper(LeanWeights.from_model(model), batch, native_library(), threads=2, split=split)
    assert stepper._team is not None  # the step is shared: a helper thread exists in the parent
    ids = np.arange(batch) % 23
    expected = NativeStepper(LeanWeights.from_model(model), batch, native_library(), threads=1).step(ids).copy()
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # the parent's helper thread does not exist here: a step must not wait for it
        signal.alarm(20)  # a step stuck waiting for it ends the child, and the check below fails
        os.write(write, stepper.step(ids).tobytes())
        os._exit(0)
    os.close(write)
    got = b"".join(iter(lambda: os.read(read, 1 << 16), b""))
    os.waitpid(child, 0)
    np.testing.assert_array_equal(np.frombuffer(got, dtype=np.float32).reshape(expected.shape), expected)
    np.testing.assert_array_equal(stepper.step(ids), expected)  # the parent's own team is untouched


def test_the_split_is_chosen_by_timing_once_and_kept_beside_the_kernel(tmp_path):
    library = native_library(tmp_path)
    weights = LeanWeights.from_model(sharp_model(30, layers=2, units=32))
    split = choose_split(weights, 40, library, 2, "fp32")
    plans = json.loads(plans_file(library).read_text())
    (key, plan), = plans.items()
    assert "batch=40 threads=2" in key and plan["split"] == split and plan["retimes"] == 0
    assert set(plan["seconds_per_step"]) == set(plan["rounds"]) == {"single", "panels", "rows"}
    assert all(len(times) == fast_step.TIMING_ROUNDS for times in plan["rounds"].values())
    assert split == pick_way(plan["rounds"], default="rows")  # a batch that can be cut: rows unless beaten
    plan["split"] = "rows" if split != "rows" else "single"  # what is kept is what is used
    plans_file(library).write_text(json.dumps({key: plan}))
    assert choose_split(weights, 40, library, 2, "fp32") == plan["split"]
    assert choose_split(weights, 1, library, 1, "fp32") == "single"  # one thread: nothing to time


def test_the_default_way_is_left_only_for_one_clearly_faster_in_most_rounds():
    # seconds per step, round by round; the machine's speed moves between rounds (x2.3 in round 3)
    host = np.array([1.0, 1.0, 2.3, 1.0, 1.1, 1.0, 1.0])
    rows, single = 1e-4 * host, 1.3e-4 * host
    single[[0, 4]] = 0.5e-4  # two rounds in which rows' second core was busy elsewhere
    assert pick_way({"rows": list(rows), "single": list(single)}, "rows") == "rows"
    assert pick_way({"rows": list(rows), "single": list(0.95 * rows)}, "rows") == "rows"  # within the margin
    assert pick_way({"rows": list(rows), "single": list(0.8 * rows)}, "rows") == "single"
    # rows 0.8x single in five rounds of seven, the host 2.3x slower in the first three: each way's
    # own median would take single (1.0e-4 against 1.84e-4), the per-round ratios keep rows
    slow_host = np.array([2.3, 2.3, 2.3, 1.0, 1.0, 1.0, 1.0])
    single = 1e-4 * slow_host
    rows = 0.8 * single
    rows[[3, 4]] = 3e-4
    assert np.median(single) * SHARING_MARGIN < np.median(rows)
    assert pick_way({"rows": list(rows), "single": list(single)}, "rows") == "rows"
    one = {"single": [2e-5] * 7, "panels": [1.7e-5] * 7}
    assert pick_way(one, "single") == "panels"
    assert pick_way({"single": one["single"], "panels": [1.9e-5] * 7}, "single") == "single"
    assert pick_way({"native": [1.0] * 7, "torch": [0.99] * 7}, "native", margin=1.0) == "torch"


def test_a_kept_way_is_doubted_only_when_clearly_slower_than_its_timing():
    watch = StepWatch(predicted=1e-3, window=4)
    assert not any(watch.slow(s) for s in [1e-3, 1.4e-3, 1.4e-3, 1.4e-3])  # slower, but within the allowance
    assert [watch.slow(s) for s in [9e-3, 1e-3, 2e-3, 2e-3]] == [False, False, False, True]  # the median is
    assert [watch.slow(s) for s in [9e-3, 1e-3, 1e-3, 1e-3]] == [False] * 4  # slow moments in a minority
    assert StepWatch.for_plan({"split": "single"}) is None  # nothing was timed: nothing to compare with
    batch = StepWatch.for_plan({"split": "rows", "seconds_per_step": {"rows": 2e-4}})
    assert (batch.predicted, batch.every, StepWatch(1e-5).every) == (2e-4, 1, WATCH_EVERY)  # long steps: all timed
    assert RETIME_SLOWDOWN * 1e-3 < 2e-3


def test_a_stepper_times_again_and_switches_when_its_kept_way_runs_slower_than_planned(tmp_path, monkeypatch):
    """A plan timed while the machine was briefly fast for one way (here: planted) is not kept
    for good: the stepper times the ways again, switches to the winner mid-stream, keeps the
    streams' state, and writes the new plan."""
    library = native_library(tmp_path)
    model = sharp_model(27, layers=2, units=32)
    weights = LeanWeights.from_model(model)
    key = "fp32 layers=2 units=32 vocab=27 batch=40 threads=2"
    planted = {"split": "panels", "seconds_per_step": {"panels": 1e-12, "rows": 1.0, "single": 1.0}}
    plans_file(library).write_text(json.dumps({key: planted}))
    fresh = {"rows": [1e-5] * 7, "single": [3e-5] * 7, "panels": [4e-5] * 7}  # the new timing, injected
    timed = []
    monkeypatch.setattr(fast_step, "time_splits", lambda *args: timed.append(args[-1]) or fresh)
    stepper = NativeStepper(weights, 40, library, threads=2)
    exact = NativeStepper(weights, 40, library, threads=1)
    assert stepper.split == "panels" and not timed
    ids = np.random.default_rng(7).integers(0, 27, size=(40, WATCH_EVERY * WATCH_WINDOW + 50))
    for t in range(ids.shape[1]):
        np.testing.assert_array_equal(stepper.step(ids[:, t]), exact.step(ids[:, t]))
    assert timed == [["rows", "single", "panels"]] and stepper.split == "rows"
    plan = json.loads(plans_file(library).read_text())[key]
    assert plan["split"] == "rows" and plan["retimes"] == 1 and plan["seconds_per_step"]["rows"] == 1e-5
    assert stepper._watch.window == 2 * WATCH_WINDOW  # watched again, for longer
    stepper.close()


def test_a_kept_way_running_as_planned_is_not_timed_again(tmp_path, monkeypatch):
    library = native_library(tmp_path)
    weights = LeanWeights.from_model(sharp_model(27, layers=2, units=32))
    key = "fp32 layers=2 units=32 vocab=27 batch=40 threads=2"
    plans_file(library).write_text(json.dumps({key: {"split": "rows", "seconds_per_step": {"rows": 1.0}}}))
    monkeypatch.setattr(fast_step, "time_splits", lambda *args: pytest.fail("timed again"))
    stepper = NativeStepper(weights, 40, library, threads=2)
    ids = np.zeros(40, dtype=np.int64)
    for _ in range(2 * WATCH_EVERY * WATCH_WINDOW):
        stepper.step(ids)
    assert stepper.split == "rows"
    stepper.close()


def test_bf16_batches_take_the_faster_of_the_kernel_and_onednn_as_timed(tmp_path):
    library = native_library(tmp_path)
    model = sharp_model(30, layers=1, units=32)
    stepper = make_stepper(model, 16, "auto", library=library, precision="bf16")
    (key, plan), = json.loads(plans_file(library).read_text()).items()
    assert key.startswith("bf16-backend") and set(plan["seconds_per_step"]) == {"native", "torch"}
    assert stepper.backend == plan["backend"] == pick_way(plan["rounds"], default="native", margin=1.0)
    assert make_stepper(model, 16, "native", library=library, precision="bf16").backend == "native"


@pytest.fixture(scope="module")
def keras_model(keras_checkpoint, keras_text) -> TrainedModel:
    return import_keras(keras_checkpoint, keras_text, ImportOptions(check_chars=0)).trained


def bf16_kernels() -> list[int]:
    return [BF16_PORTABLE] + ([BF16_AVX512] if bf16_kernel(native_library()) == BF16_AVX512 else [])


def test_bf16_steps_stay_within_the_documented_distance_of_fp32(keras_model, keras_text):
    """A trained model (the tutorial's checkpoint) on its own text: every bf16 path's
    probabilities within BF16_TOLERANCE of fp32's, and bits/char within 0.01."""
    ids = keras_model.vocab.encode(keras_text.read_text(encoding="utf-8").lower()[3000:3400])[None]
    weights = LeanWeights.from_model(keras_model.model)
    exact = step_through(NativeStepper(weights, 1, native_library()), ids[:, :-1])
    paths = [NativeStepper(weights, 1, native_library(), precision="bf16", kernel=k) for k in bf16_kernels()]
    paths.append(TorchStepper(weights, 1, torch.device("cpu"), "bf16"))
    bits = lambda p: -np.log2(p[0, np.arange(ids.shape[1] - 1), ids[0, 1:]]).mean()  # noqa: E731
    for stepper in paths:
        probs = step_through(stepper, ids[:, :-1])
        difference = np.abs(probs - exact).max()
        assert 1e-6 < difference <= BF16_TOLERANCE  # rounded, and not by more than documented
        assert abs(bits(probs) - bits(exact)) < 0.01


def test_bf16_kernels_threads_and_batches_agree():
    """Whatever product code the CPU runs and however the step is shared, a bf16 stream gets
    the same numbers (AVX-512-BF16 against the portable C: a last-bit difference at most)."""
    model = sharp_model(29, layers=2, units=32)
    weights = LeanWeights.from_model(model)
    ids = np.random.default_rng(5).integers(0, 29, size=(40, 20))
    runs = {(kernel, split): step_through(NativeStepper(weights, 40, native_library(), 2, "bf16", split, kernel), ids)
            for kernel in bf16_kernels() for split in ("single", "panels", "rows")}
    first = runs[BF16_PORTABLE, "single"]
    for run in runs.values():
        np.testing.assert_allclose(run, first, atol=1e-6, rtol=0)
    for kernel in bf16_kernels():
        for split in ("panels", "rows"):
            np.testing.assert_array_equal(runs[kernel, split], runs[kernel, "single"])
    alone = step_through(NativeStepper(weights, 1, native_library(), 1, "bf16"), ids[:1])
    np.testing.assert_array_equal(alone, runs[bf16_kernel(native_library()), "single"][:1])


def test_kernel_built_without_avx512_runs_every_path(tmp_path):
    """The portable build (generic x86-64 with SSE4.2 where the machine is x86; this CPU's
    own flags elsewhere) steps fp32 exactly and bf16 through its plain C products."""
    import platform

    arch = "x86-64-v2" if platform.machine() in ("x86_64", "AMD64") else "native"
    library = native_library(tmp_path, arch=arch)
    model = sharp_model(31, layers=2, units=32, recurrent_activation="hard_sigmoid")
    ids = np.random.default_rng(6).integers(0, 31, size=(3, 25))
    with torch.no_grad():
        expected = model(torch.from_numpy(ids))[0].softmax(-1).numpy()
    weights = LeanWeights.from_model(model)
    for split in ("single", "panels"):
        got = step_through(NativeStepper(weights, 3, library, 2, split=split), ids)
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    plain = step_through(NativeStepper(weights, 3, library, 1, "bf16", kernel=BF16_PORTABLE), ids)
    np.testing.assert_allclose(plain, expected, atol=BF16_TOLERANCE, rtol=0)


def test_bf16_precision_is_checked_at_the_boundary(vocab, prime):
    model = trained(vocab)
    with pytest.raises(CharLSTMError, match="--precision"):
        Generator(model, precision="fp16")
    with pytest.raises(CharLSTMError, match="--precision bf16"):
        Generator(model, backend="module", precision="bf16")
    with pytest.raises(CharLSTMError, match="stateful"):
        Generator(model, precision="bf16").generate(prime, 5, mode="window")
    text = Generator(model, precision="bf16").generate(prime, 40)
    assert len(text) == 40


def test_native_backend_reports_a_missing_compiler_and_auto_falls_back(monkeypatch, tmp_path):
    monkeypatch.setenv(NATIVE_CACHE_ENV, str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    model = sharp_model(20, layers=1, units=16)
    with pytest.raises(CharLSTMError, match="did not compile"):
        native_library()
    with pytest.raises(CharLSTMError, match="failed to compile before"):
        make_stepper(model, 1, "native")
    assert make_stepper(model, 1, "auto").backend == "torch"


def test_unknown_backend_is_a_user_error():
    with pytest.raises(CharLSTMError, match="--backend"):
        make_stepper(sharp_model(10, layers=1, units=8), 1, "fastest")


# ----------------------------------------------------------------------------- sampling


def test_uniforms_depend_only_on_seed_and_step():
    block = stream_uniforms([7, 8, 9], 0, 300)
    alone = stream_uniforms([8], 100, 50)
    np.testing.assert_array_equal(alone[:, 0], block[100:150, 1])
    assert ((block >= 0) & (block < 1)).all()
    assert abs(block.mean() - 0.5) < 0.03 and len(np.unique(block)) == block.size


def many_streams(sampling: SamplingConfig, n: int) -> BatchSampler:
    return BatchSampler([sampling] * n, list(range(n)))


def test_top_k_never_samples_outside_the_k_best():
    logits = np.random.default_rng(0).normal(size=(1, 40)).astype(np.float32)
    best = set(np.argsort(-logits[0])[:5].tolist())
    sampler = many_streams(SamplingConfig(temperature=2.0, top_k=5), 4000)
    picks = sampler.pick(np.repeat(logits, 4000, axis=0), step=0)
    assert set(picks.tolist()) == best  # every one of the k best is reachable, nothing else
    probs = BatchSampler([SamplingConfig(temperature=2.0, top_k=5)], [0]).probabilities(logits)[0]
    assert set(np.flatnonzero(probs).tolist()) == best


@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.5, 0.9, 0.999])
def test_top_p_keeps_the_smallest_set_with_at_least_that_mass(top_p):
    logits = np.random.default_rng(1).normal(scale=2.0, size=(1, 50)).astype(np.float32)
    full = torch.from_numpy(logits[0].astype(np.float64) / 0.8).softmax(-1).numpy()
    kept = BatchSampler([SamplingConfig(0.8, top_p=top_p)], [0]).probabilities(logits)[0] > 0
    mass = np.sort(full)[::-1].cumsum()
    n = int(kept.sum())
    assert mass[n - 1] >= top_p - 1e-12 and (n == 1 or mass[n - 2] < top_p)
    assert full[kept].min() >= full[~kept].max(initial=0.0)  # the kept ones are the likeliest


def test_top_k_and_top_p_combine():
    logits = np.array([[4.0, 3.9, 3.8, 0.0, -1.0]], dtype=np.float32)
    probs = BatchSampler([SamplingConfig(1.0, top_k=2, top_p=0.99)], [0]).probabilities(logits)[0]
    assert np.count_nonzero(probs) == 2 and probs.sum() == pytest.approx(1.0)


@pytest.mark.parametrize("draw", ["numpy", "native"])
def test_sampling_follows_the_tempered_distribution(draw):
    logits = np.array([[2.0, 1.0, 0.5, 0.0, -3.0]], dtype=np.float32)
    expected = torch.softmax(torch.tensor(logits[0], dtype=torch.float64) / 0.7, -1).numpy()
    plain_draw = NativeSampler(native_library()) if draw == "native" else None
    sampler = BatchSampler([SamplingConfig(0.7)] * 20000, list(range(20000)), plain_draw)
    picks = sampler.pick(np.repeat(logits, 20000, axis=0), step=3)
    observed = np.bincount(picks, minlength=5) / 20000
    np.testing.assert_allclose(observed, expected, atol=0.015)


@pytest.mark.parametrize("rows, vocab", [(3000, 60), (400, 4999)])
def test_native_and_numpy_temperature_draws_agree(rows, vocab):
    # 4999: the C sampler's blocks of 64 ids, a partial last one, and whole blocks of zero weight
    rng = np.random.default_rng(5)
    logits = rng.normal(scale=3.0, size=(rows, vocab)).astype(np.float32)
    live = vocab * 5 // 6
    logits[:, live:] = -200.0  # weights that underflow to zero are never drawn
    logits[1, 0] = logits[1].max() + 720.0  # the others' weights subnormal or zero: libm's values kept
    inverse_t = 1.0 / rng.uniform(0.05, 3.0, size=rows)
    inverse_t[1] = 1.0
    uniforms = stream_uniforms([1], 0, rows)[:, 0]
    uniforms[:4] = [0.0, 1.0 - 2.0 ** -52, 0.5, 1.0 - 2.0 ** -52]
    native = NativeSampler(native_library())(logits, inverse_t, uniforms)
    np.testing.assert_array_equal(native, numpy_draw(logits, inverse_t, uniforms))
    assert native.max() < live


@pytest.mark.parametrize("temperature", [1e-4, 1e-300])
def test_temperature_near_zero_equals_greedy(vocab, prime, temperature):
    logits = np.random.default_rng(4).normal(size=(500, 60)).astype(np.float32)
    for draw in (None, NativeSampler(native_library())):
        tiny = BatchSampler([SamplingConfig(temperature)] * 500, list(range(500)), draw).pick(logits, step=0)
        np.testing.assert_array_equal(tiny, logits.argmax(axis=1))
    gen = Generator(trained(vocab))
    greedy = gen.generate(prime, 200, mode="stateful")
    assert gen.generate(prime, 200, mode="stateful", sampling=SamplingConfig(1e-4), seed=9) == greedy


def test_fixed_seed_reproduces_and_another_seed_differs(vocab, prime):
    gen = Generator(trained(vocab, units=16))
    sampling = SamplingConfig(1.0, top_k=20, top_p=0.95)
    first = gen.generate(prime, 300, sampling=sampling, seed=11, mode="stateful")
    assert gen.generate(prime, 300, sampling=sampling, seed=11, mode="stateful") == first
    assert gen.generate(prime, 300, sampling=sampling, seed=12, mode="stateful") != first


@pytest.mark.parametrize("bad, message", [(SamplingConfig(-1.0), "--temperature"),
                                          (SamplingConfig(1.0, top_k=-2), "--top-k"),
                                          (SamplingConfig(1.0, top_p=0.0), "--top-p")])
def test_bad_sampling_settings_are_user_errors(vocab, prime, bad, message):
    with pytest.raises(CharLSTMError, match=message):
        Generator(trained(vocab, units=8)).generate(prime, 10, sampling=bad)


# ----------------------------------------------------------------------------- stop strings


def feed_all(matcher: StopMatcher, text: str) -> str:
    return "".join(matcher.feed(ch) for ch in text) + ("" if matcher.stopped else matcher.flush())


def test_stop_string_ends_the_text_and_is_not_output():
    assert feed_all(StopMatcher(["\n\n"]), "one\ntwo\n\nthree") == "one\ntwo"
    assert feed_all(StopMatcher(["xyz"]), "abxyxyzab") == "abxy"
    assert feed_all(StopMatcher(["bc", "abcd"]), "zabcd") == "za"   # the earliest match wins
    assert feed_all(StopMatcher(["zz"]), "no stop here") == "no stop here"


def test_stop_matcher_holds_back_only_a_possible_stop_prefix():
    matcher = StopMatcher(["abc"])
    assert [matcher.feed(ch) for ch in "xab"] == ["x", "", ""]
    assert matcher.feed("x") == "abx"  # not a stop after all: released at once


def test_generation_stops_at_the_first_stop_string(vocab, prime):
    gen = Generator(trained(vocab, units=24, seed=5))
    free = gen.generate(prime, 400, sampling=SamplingConfig(1.2), seed=3, mode="stateful")
    stop = free[150:152]
    stopped = gen.generate(prime, 400, sampling=SamplingConfig(1.2), seed=3, mode="stateful", stop=[stop])
    assert stopped == free[:free.index(stop)]


def test_empty_stop_string_is_a_user_error(vocab, prime):
    with pytest.raises(CharLSTMError, match="stop string"):
        Generator(trained(vocab, units=8)).generate(prime, 10, stop=[""])


# ----------------------------------------------------------------------------- streaming


def test_stream_yields_single_characters_lazily(vocab, prime):
    tm = trained(vocab)
    gen = Generator(tm, backend="module")  # every step is one call of the model
    calls = []
    forward = tm.model.forward
    tm.model.forward = lambda *args, **kwargs: (calls.append(1), forward(*args, **kwargs))[1]
    chars = gen.stream(prime, 50, mode="stateful")
    assert not calls  # nothing is computed before the first character is asked for
    first = next(chars)
    assert len(calls) == 1  # the prime, read in one call; its last output gives the first character
    second = next(chars)
    assert len(calls) == 2  # one step per further character
    rest = list(chars)
    assert len(first) == 1 and all(len(c) == 1 for c in rest) and len(rest) == 48
    del tm.model.forward
    assert first + second + "".join(rest) == gen.generate(prime, 50, mode="stateful")


# ----------------------------------------------------------------------------- batches and modes


@pytest.mark.parametrize("mode, backend", [("stateful", b) for b in ALL_BACKENDS] + [("window", "auto")])
def test_a_batch_equals_single_runs_with_the_same_seeds(vocab, prime, mode, backend):
    gen = Generator(trained(vocab, units=24, window=20), backend=backend)
    samplings = [SamplingConfig(0.0), SamplingConfig(0.5), SamplingConfig(1.0, top_k=8),
                 SamplingConfig(1.5, top_p=0.9), SamplingConfig(1.0)]
    seeds = [40, 41, 42, 43, 44]
    length = 60 if mode == "window" else 150
    batch = gen.generate_batch(prime, length, samplings, seeds, mode=mode, stop=["e t"])
    singles = [gen.generate(prime, length, sampling=s, seed=seed, mode=mode, stop=["e t"])
               for s, seed in zip(samplings, seeds)]
    assert batch == singles
    assert len(set(batch)) > 1


def test_backends_generate_the_same_text(vocab, prime):
    model = trained(vocab, units=24, recurrent_activation="hard_sigmoid", input="scaled")
    texts = {b: Generator(model, backend=b).generate(prime, 200, mode="stateful", sampling=SamplingConfig(0.8),
                                                      seed=1) for b in ALL_BACKENDS}
    assert len(set(texts.values())) == 1


def test_window_mode_re_runs_the_last_window_as_the_tutorial(vocab, prime):
    tm = trained(vocab, units=16, window=12, target="last")
    gen = Generator(tm)
    assert gen.resolve_mode("auto") == "window"
    ids = gen.prepare_prime(prime)
    expected = []
    with torch.no_grad():
        for _ in range(40):
            pattern = torch.tensor([ids[-12:]])
            ids.append(int(tm.model(pattern, last_only=True)[0].argmax()))
            expected.append(vocab.chars[ids[-1]])
    assert gen.generate(prime, 40) == "".join(expected)


def test_stateful_mode_carries_the_state_over_the_whole_text(vocab, prime):
    tm = trained(vocab, units=16, window=12)
    ids = Generator(tm).prepare_prime(prime)
    text = Generator(tm).generate(prime, 30, mode="stateful")
    full = ids + [vocab.chars.index(c) for c in text]
    with torch.no_grad():
        logits = tm.model(torch.tensor([full]))[0][0]
    assert "".join(vocab.chars[i] for i in logits[len(ids) - 1:-1].argmax(-1).tolist()) == text


def test_length_zero_and_bad_lengths(vocab, prime):
    gen = Generator(trained(vocab, units=8))
    assert gen.generate(prime, 0) == ""
    with pytest.raises(CharLSTMError, match="--length"):
        gen.generate(prime, -1)


def test_unknown_prime_characters_are_named_or_skipped(vocab):
    gen = Generator(trained(vocab, units=8))
    with pytest.raises(CharLSTMError, match="'€'"):
        gen.generate("the €uro", 5)
    assert len(gen.generate("the €uro", 5, prime_unknown="skip")) == 5


# ----------------------------------------------------------------------------- command line


@pytest.fixture(scope="module")
def checkpoint_file(tmp_path_factory, vocab, prime) -> str:
    path = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
    tm = trained(vocab, units=24)
    tm.seed_windows = [prime]
    checkpoint.save(path, tm)
    return str(path)


class FlushCounter(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.flushes = 0

    def flush(self) -> None:
        self.flushes += 1
        super().flush()


def test_cli_streams_and_flushes_as_characters_come(checkpoint_file, monkeypatch):
    out = FlushCounter()
    monkeypatch.setattr(sys, "stdout", out)
    assert main(["generate", checkpoint_file, "--length", "80", "--seed", "1", "--temperature", "0.9"]) == 0
    text = out.getvalue()
    assert text.startswith("Seed:\n") and text.rstrip().endswith("Done.")
    assert out.flushes >= 80


def test_cli_diversity_report_prints_each_temperature_and_sample(checkpoint_file, capsys):
    argv = ["generate", checkpoint_file, "--length", "40", "--seed", "5", "--temperature", "0.2,0.5,1.0",
            "--num-samples", "2"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    for t in ("0.2", "0.5", "1"):
        assert f"----- temperature: {t}, sample 1 (--seed 5)" in out
        assert f"----- temperature: {t}, sample 2 (--seed 6)" in out
    # a sample of the report is reproduced alone by its temperature and seed
    assert main(["generate", checkpoint_file, "--length", "40", "--seed", "6", "--temperature", "0.5"]) == 0
    alone = capsys.readouterr().out.split('"\n', 2)[-1].rsplit("\nDone.", 1)[0]
    assert "----- temperature: 0.5, sample 2 (--seed 6)\n" + alone + "\n" in out


def test_cli_generates_in_bf16_and_rejects_it_for_window_mode(checkpoint_file, capsys):
    assert main(["generate", str(checkpoint_file), "--length", "30", "--precision", "bf16", "--mode", "stateful",
                 "--prime", "alice"]) == 0
    assert len(capsys.readouterr().out) >= 30
    assert main(["generate", str(checkpoint_file), "--precision", "bf16", "--mode", "window"]) == 2
    err = capsys.readouterr().err.strip()
    assert "stateful" in err and len(err.splitlines()) == 1


def test_cli_stop_option_understands_escapes(checkpoint_file, capsys, vocab, prime):
    full = Generator(checkpoint.load(checkpoint_file)).generate(prime, 200, sampling=SamplingConfig(1.0), seed=2)
    stop = full[60:62]
    assert main(["generate", checkpoint_file, "--length", "200", "--seed", "2", "--temperature", "1",
                 "--stop", stop.replace("\\", "\\\\").replace("\n", "\\n")]) == 0
    assert capsys.readouterr().out.endswith('"\n' + full[:full.index(stop)] + "\nDone.\n")


def test_cli_names_unknown_prime_characters(checkpoint_file, capsys):
    assert main(["generate", checkpoint_file, "--prime", "price: 5€ or 6¥"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'¥'" in err and "'€'" in err
    assert main(["generate", checkpoint_file, "--prime", "price: 5€", "--prime-unknown", "skip",
                 "--length", "5"]) == 0


@pytest.mark.parametrize("option", [["--temperature", "0.5,hot"], ["--temperature", "-1"], ["--top-p", "0"],
                                    ["--num-samples", "0"], ["--backend", "gpu"]])
def test_cli_rejects_bad_generation_options_in_one_line(checkpoint_file, capsys, option):
    with pytest.raises(SystemExit) as exit_info:
        code = main(["generate", checkpoint_file, "--length", "5", *option])
        raise SystemExit(code)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1
