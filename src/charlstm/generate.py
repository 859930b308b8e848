"""Stage 6: text from a trained model.

Two modes:
* ``stateful`` - prime the network once with the seed, then one step per new character with
  the recurrent state carried (constant cost per character);
* ``window``   - the tutorial's: re-run the last ``window`` characters for every new one.

``auto`` picks ``window`` for models trained on windows (as the tutorial's) and ``stateful``
for models trained on streams.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterator

import torch

from .checkpoint import TrainedModel
from .errors import CharLSTMError

MODES = ("auto", "stateful", "window")
MAX_LENGTH = 10_000_000


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0   # 0 = greedy argmax, as the tutorial
    top_k: int = 0             # 0 = off
    top_p: float = 1.0         # 1 = off

    def validate(self) -> None:
        if not 0.0 <= self.temperature <= 100.0:
            raise CharLSTMError(f"--temperature must be in [0, 100], not {self.temperature}")
        if self.top_k < 0:
            raise CharLSTMError(f"--top-k must not be negative, not {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise CharLSTMError(f"--top-p must be in (0, 1], not {self.top_p}")


def pick_next(logits: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator) -> torch.Tensor:
    """logits (B, V) -> ids (B,), by argmax or by sampling the filtered distribution."""
    if sampling.temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float() / sampling.temperature
    if sampling.top_k:
        kth = torch.topk(logits, min(sampling.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens before it already reach top_p
        drop = probs.cumsum(dim=-1) - probs >= sampling.top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


class Generator:
    def __init__(self, trained: TrainedModel, device: str | torch.device = "cpu") -> None:
        self.trained = trained
        self.model = trained.model.to(device).eval()
        self.device = torch.device(device)
        self.vocab = trained.vocab

    def random_seed_text(self, seed: int | None = None) -> str:
        """A random training-text window stored in the checkpoint (the tutorial's seed)."""
        if not self.trained.seed_windows:
            raise CharLSTMError("this checkpoint stores no seed text: pass --prime TEXT")
        return random.Random(seed).choice(self.trained.seed_windows)

    def resolve_mode(self, mode: str) -> str:
        if mode not in MODES:
            raise CharLSTMError(f"--mode must be one of {', '.join(MODES)}, not {mode!r}")
        if mode == "auto":
            return "window" if self.model.config.target == "last" else "stateful"
        return mode

    def prepare_prime(self, prime: str, unknown: str = "error") -> list[int]:
        if self.trained.normalization.lowercase:
            prime = prime.lower()
        ids = self.vocab.encode(prime, unknown=unknown).tolist()
        if not ids:
            raise CharLSTMError("the prime text is empty (after dropping unknown characters)")
        return ids

    @torch.inference_mode()
    def stream(
        self,
        prime: str,
        length: int = 1000,
        sampling: SamplingConfig = SamplingConfig(),
        mode: str = "auto",
        seed: int | None = None,
        prime_unknown: str = "error",
    ) -> Iterator[str]:
        """Yield ``length`` generated characters one at a time."""
        if not 0 <= length <= MAX_LENGTH:
            raise CharLSTMError(f"--length must be in [0, {MAX_LENGTH}], not {length}")
        sampling.validate()
        mode = self.resolve_mode(mode)
        ids = self.prepare_prime(prime, prime_unknown)
        rng = torch.Generator(device="cpu").manual_seed(seed if seed is not None else random.randrange(2**63))
        next_logits = self._window_steps(ids) if mode == "window" else self._stateful_steps(ids)
        logits = next(next_logits)
        for _ in range(length):
            chosen = pick_next(logits.cpu(), sampling, rng)
            yield self.vocab.chars[int(chosen[0])]
            logits = next_logits.send(chosen.to(self.device))

    def generate(self, prime: str, length: int = 1000, **kwargs) -> str:
        return "".join(self.stream(prime, length, **kwargs))

    def _stateful_steps(self, ids: list[int]):
        logits, state = self.model(torch.tensor([ids], device=self.device), last_only=True)
        while True:
            chosen = yield logits
            logits, state = self.model.step(chosen, state)

    def _window_steps(self, ids: list[int]):
        window = list(ids[-self.model.config.window:])
        while True:
            logits, _ = self.model(torch.tensor([window], device=self.device), last_only=True)
            chosen = yield logits
            window = window[1:] + [int(chosen[0])] if len(window) >= self.model.config.window \
                else window + [int(chosen[0])]


def generate(trained: TrainedModel, length: int = 1000, prime: str | None = None,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             mode: str = "auto", seed: int | None = None) -> str:
    """Notebook helper: ``length`` characters after ``prime`` (or a random seed window)."""
    gen = Generator(trained, device=trained.model.head.weight.device)
    prime = prime if prime is not None else gen.random_seed_text(seed)
    return gen.generate(prime, length, sampling=SamplingConfig(temperature, top_k, top_p),
                        mode=mode, seed=seed)
