"""Stage 6: text from a trained model.

Two modes:
* ``stateful`` - prime the network once with the seed, then one step per new character with
  the recurrent state carried (constant cost per character), on the lean step path of
  ``fast_step``;
* ``window``   - the tutorial's: re-run the last ``window`` characters through the full
  network for every new one.

``auto`` picks ``window`` for models trained on windows (as the tutorial's) and ``stateful``
for models trained on streams. A window-trained model never saw a state older than its
window, so for it the two modes give different text after the first character.

Sampling: greedy (temperature 0, the tutorial's argmax), temperature, top-k and top-p, each
set per stream, so that one batch can hold several temperatures. Random numbers are
counter-based: stream ``i`` draws ``uniform(seed_i, step)`` and nothing else, so a stream
gives the same text alone or in any batch.
"""

from __future__ import annotations

import ctypes
import random
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from .checkpoint import TrainedModel
from .checks import check_float, check_int, check_temperature, inverse_temperature
from .dynamic_eval import DynamicConfig, adapted_to
from .errors import CharLSTMError
from .fast_step import AdaptiveStepper, LeanWeights, Stepper, check_backend, lean_supported, make_stepper
from .native import NativeSampler, native_library

MODES = ("auto", "stateful", "window")
MAX_LENGTH = 10_000_000
MAX_STREAMS = 4096
MAX_TOP_K = 2**31               # any top-k at or above the vocabulary size (at most 65535) keeps all
UNIFORM_BLOCK = 256            # steps of random numbers drawn at once
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0   # 0 = greedy argmax, as the tutorial
    top_k: int = 0             # 0 = off
    top_p: float = 1.0         # 1 = off

    def validate(self) -> None:
        check_temperature(self.temperature)
        check_int("top_k", self.top_k, 0, None)  # above the vocabulary size it keeps everything
        check_float("top_p", self.top_p, 0.0, 1.0, low_open=True)


# ----------------------------------------------------------------------------- sampling


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a bijective scramble of 64-bit integers (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def stream_uniforms(seeds: Sequence[int], first_step: int, steps: int) -> np.ndarray:
    """(steps, streams) multiples of 2**-52 in [0, 1): entry [t, i] depends only on seeds[i] and t."""
    keys = _mix64(np.array([s % 2**64 for s in seeds], dtype=np.uint64) + _GOLDEN)
    counters = np.arange(first_step + 1, first_step + steps + 1, dtype=np.uint64)[:, None] * _GOLDEN
    bits = _mix64(keys[None, :] + counters)
    return (bits >> np.uint64(12)).astype(np.float64) * 2.0 ** -52


Draw = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def tempered_logits(logits: np.ndarray, inverse_temperature: np.ndarray) -> np.ndarray:
    """(logits - max) / temperature per row, in float64; the max is taken first so that a
    tiny temperature gives 0 and -inf, never inf - inf."""
    z = np.subtract(logits, logits.max(axis=1, keepdims=True), dtype=np.float64)
    z *= inverse_temperature[:, None]
    return z


def tempered_weights(logits: np.ndarray, inverse_temperature: np.ndarray) -> np.ndarray:
    """exp((logits - max) / temperature) per row: unnormalised probabilities."""
    z = tempered_logits(logits, inverse_temperature)
    return np.exp(z, out=z)


def inverse_cdf(weights: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """Per row, the first id whose running weight exceeds u * total; u < 1 - 2**-52 keeps
    u * total below total, so an id of weight 0 is never drawn."""
    cdf = np.cumsum(weights, axis=1)
    return (cdf <= (uniforms * cdf[:, -1])[:, None]).sum(axis=1)


def numpy_draw(logits: np.ndarray, inverse_temperature: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    return inverse_cdf(tempered_weights(logits, inverse_temperature), uniforms)


@dataclass
class _Group:
    """The streams of a batch that are sampled the same way, with their settings."""

    rows: np.ndarray
    everyone: bool                    # the group is the whole batch (no row selection needed)
    inverse_temperature: np.ndarray
    top_k: np.ndarray
    top_p: np.ndarray

    @classmethod
    def of(cls, samplings: Sequence[SamplingConfig], rows: list[int]) -> "_Group":
        return cls(np.array(rows, dtype=np.int64), len(rows) == len(samplings),
                   np.array([inverse_temperature(samplings[i].temperature) for i in rows], dtype=np.float64),
                   np.array([min(samplings[i].top_k, MAX_TOP_K) for i in rows], dtype=np.int64),
                   np.array([samplings[i].top_p for i in rows], dtype=np.float64))


class BatchSampler:
    """Picks the next id of every stream from its logits, each stream with its own settings.

    Each stream goes by its own settings alone into one of three groups, so that it is
    treated the same in any batch: greedy (argmax), plain temperature (``plain_draw``: the C
    sampler where the native kernel is loaded, else NumPy) and filtered (top-k / top-p).
    """

    def __init__(self, samplings: Sequence[SamplingConfig], seeds: Sequence[int],
                 plain_draw: Draw | None = None) -> None:
        if len(samplings) != len(seeds):
            raise ValueError("one seed per stream")
        for sampling in samplings:
            sampling.validate()
        kinds = ["greedy" if s.temperature == 0 else "filtered" if s.top_k or s.top_p < 1 else "plain"
                 for s in samplings]
        self.size = len(samplings)
        self.any_greedy = "greedy" in kinds
        self.all_greedy = set(kinds) == {"greedy"}
        self.plain = _Group.of(samplings, [i for i, k in enumerate(kinds) if k == "plain"])
        self.filtered = _Group.of(samplings, [i for i, k in enumerate(kinds) if k == "filtered"])
        self.plain_draw = plain_draw or numpy_draw
        self.seeds = list(seeds)
        self._block_start, self._block = -UNIFORM_BLOCK, np.empty((0, 0))

    def pick(self, logits: np.ndarray, step: int) -> np.ndarray:
        """logits (B, V) -> ids (B,), using random number ``step`` of each sampled stream."""
        return self.pick_with(logits, self._uniform(step))

    def pick_with(self, logits: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
        """logits (B, V) -> ids (B,), each stream drawing with its given random number in [0, 1)
        (for streams that are at different steps, as in a server's continuous batch)."""
        chosen = logits.argmax(axis=1) if self.any_greedy else np.empty(self.size, dtype=np.int64)
        for group, draw in ((self.plain, self.plain_draw), (self.filtered, self._filtered_draw)):
            if group.everyone:
                return draw(logits, group.inverse_temperature, uniforms)
            if len(group.rows):
                rows = group.rows
                chosen[rows] = draw(logits[rows], group.inverse_temperature, uniforms[rows])
        return chosen

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """The distribution each stream draws from (greedy streams: all mass on the argmax)."""
        probs = np.zeros(logits.shape, dtype=np.float64)
        probs[np.arange(len(logits)), logits.argmax(axis=1)] = 1.0
        for group in (self.plain, self.filtered):
            if len(group.rows):
                weights = self._filtered_weights(logits[group.rows], group)
                probs[group.rows] = weights / weights.sum(axis=1, keepdims=True)
        return probs

    def _filtered_draw(self, logits: np.ndarray, _: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
        return inverse_cdf(self._filtered_weights(logits, self.filtered), uniforms)

    @staticmethod
    def _filtered_weights(logits: np.ndarray, group: _Group) -> np.ndarray:
        z = tempered_logits(logits, group.inverse_temperature)
        z[z < _threshold(z, group.top_k, group.top_p)[:, None]] = -np.inf
        return np.exp(z, out=z)

    def _uniform(self, step: int) -> np.ndarray:
        """Random number ``step`` of every stream."""
        if not self._block_start <= step < self._block_start + UNIFORM_BLOCK:
            self._block_start = step - step % UNIFORM_BLOCK
            self._block = stream_uniforms(self.seeds, self._block_start, UNIFORM_BLOCK)
        return self._block[step - self._block_start]


def _threshold(z: np.ndarray, top_k: np.ndarray, top_p: np.ndarray) -> np.ndarray:
    """Per row, the smallest scaled logit that top-k and then top-p keep (ties all kept)."""
    rows, vocab = z.shape
    desc = -np.sort(-z, axis=1)
    keep = np.where((top_k > 0) & (top_k < vocab), top_k, vocab)
    nucleus = top_p < 1.0
    if nucleus.any():
        within_k = np.where(np.arange(vocab) < keep[:, None], desc, -np.inf)
        weights = np.exp(within_k - within_k[:, :1])
        cdf = np.cumsum(weights, axis=1)
        # the smallest prefix whose mass reaches top_p: every id with less mass before it
        needed = (cdf - weights < top_p[:, None] * cdf[:, -1:]).sum(axis=1)
        keep = np.where(nucleus, np.minimum(needed, keep), keep)
    return desc[np.arange(rows), keep - 1]


# ----------------------------------------------------------------------------- stop strings


class StopMatcher:
    """Ends a stream at the first stop string; the stop string itself is not output.

    Text that could still be the start of a stop string is held back until it is clear,
    so streamed output never has to be taken back.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stops)
        self.pending = ""
        self.stopped = False

    def feed(self, ch: str) -> str:
        """Take one generated character; return the text that is now safe to output."""
        if self.stopped:
            return ""
        if not self.stops:
            return ch
        text = self.pending + ch
        starts = [len(text) - len(s) for s in self.stops if text.endswith(s)]
        if starts:
            self.stopped, self.pending = True, ""
            return text[:min(starts)]
        held = self._held_back(text)
        self.pending = text[len(text) - held:]
        return text[:len(text) - held]

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out

    def _held_back(self, text: str) -> int:
        """Length of the longest end of ``text`` that begins some stop string."""
        for size in range(min(len(text), max(map(len, self.stops)) - 1), 0, -1):
            tail = text[-size:]
            if any(s.startswith(tail) for s in self.stops):
                return size
        return 0


# ----------------------------------------------------------------------------- generator


class Generator:
    """Generates text from a trained model: one stream, or many as one batch.

    ``backend`` chooses the stateful step path (see ``fast_step``): ``auto`` (native kernel
    where it compiles, else lean PyTorch), ``native``, ``torch`` or ``module``. ``precision``
    ``bf16`` (stateful mode, lean backends) steps with bf16 weights and products, fp32 sums
    and state: faster, and within the README's stated distance of the exact ``fp32``.
    """

    def __init__(self, trained: TrainedModel, device: str | torch.device = "cpu", backend: str = "auto",
                 precision: str = "fp32") -> None:
        check_backend(backend, precision)
        self.precision = precision
        self.trained = trained
        self.model = trained.model.to(device).eval()
        self.device = torch.device(device)
        self.vocab = trained.vocab
        self.backend = backend
        self._lean: LeanWeights | None = None
        self._library: ctypes.CDLL | None = None

    def random_seed_text(self, seed: int | None = None) -> str:
        """A random training-text window stored in the checkpoint (the tutorial's seed)."""
        if not self.trained.seed_windows:
            raise CharLSTMError("this checkpoint stores no seed text: pass --prime TEXT")
        return random.Random(seed).choice(self.trained.seed_windows)

    def resolve_mode(self, mode: str) -> str:
        if mode not in MODES:
            raise CharLSTMError(f"--mode must be one of {', '.join(MODES)}, not {mode!r}")
        if mode == "window" and self.precision == "bf16":
            raise CharLSTMError("--precision bf16 applies to stateful generation; use --mode stateful")
        if mode == "auto":  # bf16 exists for the stateful step only
            return "window" if self.model.config.target == "last" and self.precision == "fp32" else "stateful"
        return mode

    def prepare_prime(self, prime: str, unknown: str = "error") -> list[int]:
        if unknown not in ("error", "skip"):
            raise CharLSTMError(f"--prime-unknown must be error or skip, not {unknown!r}")
        if self.trained.normalization.lowercase:
            prime = prime.lower()
        ids = self.vocab.encode(prime, unknown=unknown).tolist()
        if not ids:
            raise CharLSTMError("the prime text is empty (after dropping unknown characters)")
        return ids

    def adapt(self, text: str, step_size: float = DynamicConfig.step_sizes[0], unknown: str = "error") -> float:
        """Read ``text`` (a long prime: a chapter, a few letters) with dynamic evaluation's weight
        updates, so that what is generated next leans to its names and manner; returns the
        nats/char the model scored on it while reading. The checkpoint's model is not changed."""
        adaptation = adapted_to(self.model, np.asarray(self.prepare_prime(text, unknown)), step_size)
        self.model = adaptation.model
        self._lean = None  # the lean weights were copied from the old model
        return adaptation.nats_per_char

    def stream(self, prime: str, length: int = 1000, sampling: SamplingConfig = SamplingConfig(),
               mode: str = "auto", seed: int | None = None, prime_unknown: str = "error",
               stop: Sequence[str] = ()) -> Iterator[str]:
        """Yield the generated text one character at a time, as it is produced."""
        for pieces in self.stream_batch(prime, length, [sampling], [seed] if seed is not None else None,
                                        mode=mode, prime_unknown=prime_unknown, stop=stop):
            yield from pieces[0]

    def generate(self, prime: str, length: int = 1000, **kwargs) -> str:
        return "".join(self.stream(prime, length, **kwargs))

    def generate_batch(self, prime: str, length: int, samplings: Sequence[SamplingConfig],
                       seeds: Sequence[int] | None = None, **kwargs) -> list[str]:
        texts = [[] for _ in samplings]
        for pieces in self.stream_batch(prime, length, samplings, seeds, **kwargs):
            for text, piece in zip(texts, pieces):
                text.append(piece)
        return ["".join(t) for t in texts]

    def stream_batch(self, prime: str, length: int, samplings: Sequence[SamplingConfig],
                     seeds: Sequence[int] | None = None, mode: str = "auto", prime_unknown: str = "error",
                     stop: Sequence[str] = ()) -> Iterator[list[str]]:
        """Generate one stream per entry of ``samplings``, all from ``prime``, as one batch.

        Yields, once per step, each stream's new text ('' while held back by a stop string
        or after its stop). ``seeds[i]`` drives stream i; by default ``seed0 + i`` for a
        random ``seed0``. A stream's text does not depend on the other streams in the batch.
        """
        if not 0 <= length <= MAX_LENGTH:
            raise CharLSTMError(f"--length must be in [0, {MAX_LENGTH}], not {length}")
        if not 1 <= len(samplings) <= MAX_STREAMS:
            raise CharLSTMError(f"a batch holds 1 to {MAX_STREAMS} streams, not {len(samplings)}")
        if seeds is None:
            base = random.SystemRandom().randrange(2**63)
            seeds = [base + i for i in range(len(samplings))]
        if any(not s for s in stop):
            raise CharLSTMError("a stop string must not be empty")
        sampler = self.sampler(samplings, seeds)
        mode = self.resolve_mode(mode)
        ids = self.prepare_prime(prime, prime_unknown)
        yield from self._run(ids, length, sampler, mode, [StopMatcher(stop) for _ in samplings])

    def _run(self, ids: list[int], length: int, sampler: BatchSampler, mode: str,
             matchers: list[StopMatcher]) -> Iterator[list[str]]:
        streams = len(matchers)
        steps = (self._window_steps(ids, streams) if mode == "window"
                 else self._stateful_steps(ids, streams, sampler.all_greedy))
        chars = self.vocab.chars
        watch = any(m.stops for m in matchers)  # without stop strings every character goes out as it is
        logits = next(steps)
        for t in range(length):
            chosen = sampler.pick(logits, t)
            if not watch:
                yield [chars[i] for i in chosen.tolist()]
            else:
                yield [m.feed(chars[i]) for m, i in zip(matchers, chosen.tolist())]
                if all(m.stopped for m in matchers):
                    return
            if t + 1 < length:
                logits = steps.send(chosen)
        rest = [m.flush() for m in matchers]
        if any(rest):
            yield rest

    def sampler(self, samplings: Sequence[SamplingConfig], seeds: Sequence[int]) -> BatchSampler:
        """A sampler for these streams, with the C temperature sampler where it is loaded."""
        return BatchSampler(samplings, seeds, self._plain_draw())

    def stepper(self, batch_size: int) -> Stepper:
        """A stepper for this model on the chosen backend (weights rearranged once, kept)."""
        if self._lean is None and self.backend != "module" and lean_supported(self.model):
            self._lean = LeanWeights.from_model(self.model)
        return make_stepper(self.model, batch_size, self.backend, self._lean, self._native_library(),
                            precision=self.precision)

    def _native_library(self) -> ctypes.CDLL | None:
        """The native kernel where it is wanted (CPU, backend auto or native) and loads."""
        if self._library is None and self.backend in ("auto", "native") and self.device.type == "cpu":
            try:
                self._library = native_library()
            except CharLSTMError:
                pass  # NumPy and PyTorch take over; a native stepper, if asked for, says why
        return self._library

    def _plain_draw(self) -> Draw | None:
        """The C temperature sampler where the native kernel is loaded."""
        library = self._native_library()
        return NativeSampler(library) if library is not None else None

    def _stateful_steps(self, ids: list[int], streams: int, greedy: bool = False):
        # prime one stream, then give its state to every stream of the batch
        primer = self.stepper(1)
        first = np.repeat(primer.prime(ids), streams, axis=0)
        stepper = primer if streams == 1 else self.stepper(streams)
        if stepper is not primer:
            stepper.load_state(primer.state())
        chosen = yield first
        if greedy and isinstance(stepper, AdaptiveStepper):
            # every stream greedy: an adaptive head's argmax needs only the clusters that can hold it
            while True:
                chosen = yield _Chosen(stepper.step_argmax(chosen))
        while True:
            chosen = yield stepper.step(chosen)

    def _window_steps(self, ids: list[int], streams: int):
        size = self.model.config.window
        window = torch.tensor([ids[-size:]], device=self.device).repeat(streams, 1)
        while True:
            with torch.inference_mode():
                logits, _ = self.model(window, last_only=True)
            chosen = yield logits.float().cpu().numpy()
            kept = window[:, 1:] if window.shape[1] >= size else window
            window = torch.cat([kept, torch.from_numpy(chosen).to(self.device, torch.long)[:, None]], dim=1)


class _Chosen:
    """A step's outputs when every stream is greedy and the stepper has already taken each
    row's argmax: what ``BatchSampler.pick`` asks of such a batch, and nothing else."""

    def __init__(self, ids: np.ndarray) -> None:
        self.ids = ids

    def argmax(self, axis: int) -> np.ndarray:
        return self.ids


def generate(trained: TrainedModel, length: int = 1000, prime: str | None = None,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             mode: str = "auto", seed: int | None = None, stop: Sequence[str] = ()) -> str:
    """Notebook helper: ``length`` characters after ``prime`` (or a random seed window)."""
    gen = Generator(trained, device=trained.model.head.weight.device)
    prime = prime if prime is not None else gen.random_seed_text(seed)
    return gen.generate(prime, length, sampling=SamplingConfig(temperature, top_k, top_p),
                        mode=mode, seed=seed, stop=stop)
