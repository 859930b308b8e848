"""Dynamic evaluation (Krause et al., 2018): the model keeps learning from the text it reads.

The text is read left to right in segments with the recurrent state carried. Each segment is
scored first, with the weights as they are, and only then used for a gradient step, so no
character is ever predicted by weights that saw it: the result is a fair code length, the one
to set beside compressors, which adapt to the text too. The step is RMS-normalised
(RMSprop-style, bias-corrected) with an optional pull back towards the original weights.

No single step size suits every text, and the best one changes within a text, so several copies
adapt side by side, one per step size, beside the unadapted model; their predictions are mixed
character by character with weights earned on the characters already scored (Herbster and
Warmuth's fixed share, itself mixed over a few switching rates so that none needs choosing).
Text before the scored part (the context) is read and adapted to first, as a reader of the whole
text would. The caller's model is never changed: copies adapt.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .errors import CharLSTMError
from .evaluate import one_cpu_thread
from .model import CharLSTM, State, detach_state


@dataclass(frozen=True)
class DynamicConfig:
    # one adapting copy per step size (of the RMS-normalised update); chosen on texts other than
    # the README's Alice row, see "Dynamic evaluation" there
    step_sizes: tuple[float, ...] = (3e-4, 1e-3)
    segment: int = 100           # characters scored between updates
    with_static: bool = True     # the unadapted model is one more expert of the mixture
    context_chars: int = 60_000  # at most this much text before the scored part is read first
    decay: float = 0.0           # each update moves the weights this share back towards the original ones
    beta: float = 0.99           # running mean of squared gradients
    eps: float = 1e-8
    switch_rates: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3)

    def validate(self) -> None:
        if not self.step_sizes or not all(lr > 0 and math.isfinite(lr) for lr in self.step_sizes):
            raise CharLSTMError(f"--dynamic-lr needs one or more positive step sizes, not {list(self.step_sizes)}")
        if not isinstance(self.segment, int) or self.segment < 1:
            raise CharLSTMError(f"--dynamic-segment must be a positive integer, not {self.segment}")
        if not isinstance(self.context_chars, int) or self.context_chars < 0:
            raise CharLSTMError(f"--dynamic-context must be a whole number of characters, not {self.context_chars}")
        if not 0.0 <= self.decay < 1.0:
            raise CharLSTMError(f"--dynamic-decay must be in [0, 1), not {self.decay}")
        if not 0.0 <= self.beta < 1.0:
            raise CharLSTMError(f"dynamic beta must be in [0, 1), not {self.beta}")
        if not self.switch_rates or not all(0.0 <= r < 1.0 for r in self.switch_rates):
            raise CharLSTMError(f"dynamic switch rates must be in [0, 1), not {list(self.switch_rates)}")

    def describe(self) -> str:
        experts = ", ".join(f"{lr:g}" for lr in self.step_sizes) + (" and the static model" if self.with_static else "")
        return f"step sizes {experts}, segment {self.segment}, decay {self.decay:g}"


@dataclass
class DynamicResult:
    nats_per_char: float
    characters: int
    seconds: float
    context_read: int = 0  # characters before the scored text that the copies adapted to

    def what_was_read_first(self) -> str:
        return f"adapted first to the {self.context_read:,} characters before it" if self.context_read \
            else "the scored text only"


class _RMSUpdate:
    """theta -= lr * g / sqrt(mean g^2), then theta += decay * (theta_0 - theta)."""

    def __init__(self, params: list[torch.Tensor], lr: float, config: DynamicConfig) -> None:
        self.params, self.lr, self.config = params, lr, config
        self.origin = [p.detach().clone() for p in params] if config.decay else []
        self.mean_square = [torch.zeros_like(p) for p in params]
        self.steps = 0

    @torch.no_grad()
    def step(self) -> None:
        c = self.config
        self.steps += 1
        correction = 1.0 - c.beta ** self.steps
        for i, (p, ms) in enumerate(zip(self.params, self.mean_square)):
            if p.grad is None:
                continue
            ms.mul_(c.beta).addcmul_(p.grad, p.grad, value=1.0 - c.beta)
            p.addcdiv_(p.grad, (ms / correction).sqrt_().add_(c.eps), value=-self.lr)
            if c.decay:
                p.add_(self.origin[i] - p, alpha=c.decay)
            p.grad = None


class _Reader:
    """One copy of the model reading the text: it adapts after each segment with its own step
    size, or never (``lr`` None: the static expert)."""

    def __init__(self, model: CharLSTM, lr: float | None, config: DynamicConfig) -> None:
        self.model = copy.deepcopy(model).float().eval()  # eval: no dropout; gradients still flow
        self.model.requires_grad_(lr is not None)
        params = list(self.model.parameters())
        self.update = _RMSUpdate(params, lr, config) if lr is not None else None
        self.state: State | None = None

    def warm(self, x: torch.Tensor, chunk: int = 8192) -> None:
        """Carry the state over ``x`` without learning (in chunks: a long context stays small)."""
        with torch.no_grad():
            for i in range(0, len(x), chunk):
                _, self.state = self.model(x[None, i:i + chunk], self.state, last_only=True)

    def read(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Log-probabilities of ``y`` (each predicted from the input before it), then the step."""
        with torch.set_grad_enabled(self.update is not None):
            logits, state = self.model(x[None], self.state)
            log_probs = F.log_softmax(logits[0].float(), dim=-1).gather(1, y[:, None])[:, 0]
        if self.update is not None:
            (-log_probs.mean()).backward()
            self.update.step()
        self.state = detach_state(state)
        return log_probs.detach()


class _SwitchingMixture:
    """Character-by-character mixture of the readers' predictions. For each switching rate a
    fixed-share mixture (weights times each expert's probability, renormalised, then a share
    spread evenly so a lagging expert can come back); the rates themselves mixed by Bayes. Every
    weight depends on characters already scored only."""

    def __init__(self, experts: int, rates: tuple[float, ...]) -> None:
        self.rates = np.asarray(rates, dtype=np.float64)[:, None]
        self.weights = np.full((len(rates), experts), 1.0 / experts)
        self.rate_weights = np.full(len(rates), 1.0 / len(rates))
        self.experts = experts

    def code_length(self, log_probs: np.ndarray) -> float:
        """Nats to code the characters whose per-expert log-probabilities are the columns of
        ``log_probs`` (experts x characters); the weights move on after each one."""
        if self.experts == 1:
            return float(-log_probs.sum())
        shift = log_probs.max(axis=0)
        probs = np.exp(log_probs - shift)  # a common scale per character cancels in the weights
        total = -float(shift.sum())
        for p in probs.T:
            per_rate = self.weights @ p
            mixed = float(self.rate_weights @ per_rate)
            total -= math.log(mixed)
            self.rate_weights *= per_rate / mixed
            self.weights *= p / per_rate[:, None]
            self.weights *= 1.0 - self.rates
            self.weights += self.rates / self.experts
        return total


def _segments(start: int, end: int, length: int):
    """(first, stop) of each segment predicting positions first..stop-1."""
    for first in range(start, end, length):
        yield first, min(first + length, end)


def dynamic_evaluate(model: CharLSTM, ids: np.ndarray, context: np.ndarray | None = None,
                     config: DynamicConfig | None = None) -> DynamicResult:
    """Nats/char of ``ids`` with the weights adapted by gradient steps on what was read before
    (the last ``config.context_chars`` of ``context``, then the scored text itself)."""
    config = config or DynamicConfig()
    config.validate()
    if model.config.target != "all":
        raise CharLSTMError("dynamic evaluation needs a model that predicts every position (not a window model)")
    start = time.perf_counter()
    context = np.zeros(0, dtype=np.int64) if context is None else np.asarray(context)
    window = model.config.window  # the state is carried over this much before what is read or scored
    context = context[-(config.context_chars + window):]  # window >= 1, so never [-0:]
    device = next(model.parameters()).device
    full = torch.from_numpy(np.concatenate([context, np.asarray(ids)]).astype(np.int64)).to(device)
    first = max(len(context), 1)  # the first scored position; each is predicted from the one before
    adapt_from = max(first - config.context_chars, 1)  # the first context position adapted to
    readers = ([_Reader(model, None, config)] if config.with_static else []) + \
              [_Reader(model, lr, config) for lr in config.step_sizes]
    mixture = _SwitchingMixture(len(readers), config.switch_rates)
    total = 0.0
    with one_cpu_thread(device):
        for reader in readers:  # the state first (as static evaluation does); the adapting copies then learn
            warm_until = first if reader.update is None else adapt_from
            if warm_until > 1:
                reader.warm(full[max(warm_until - 1 - window, 0):warm_until - 1])
        for begin, stop in _segments(adapt_from, first, config.segment):  # adapt, score nothing
            for reader in readers:
                if reader.update is not None:
                    reader.read(full[begin - 1:stop - 1], full[begin:stop])
        for begin, stop in _segments(first, len(full), config.segment):
            log_probs = [reader.read(full[begin - 1:stop - 1], full[begin:stop]) for reader in readers]
            total += mixture.code_length(torch.stack(log_probs).double().cpu().numpy())
    scored = len(full) - first
    return DynamicResult(total / max(scored, 1), scored, time.perf_counter() - start, first - adapt_from)


@dataclass
class Adaptation:
    model: CharLSTM       # the adapted copy (float32, eval mode)
    nats_per_char: float  # how well the text was predicted while it was read
    characters: int


def adapted_to(model: CharLSTM, ids: np.ndarray, step_size: float = DynamicConfig.step_sizes[0],
               segment: int = DynamicConfig.segment) -> Adaptation:
    """A copy of ``model`` that has read ``ids`` with dynamic evaluation's updates: generating from
    it after a long prime leans to the prime's names and manner. The model itself is unchanged."""
    config = DynamicConfig(step_sizes=(step_size,), segment=segment, with_static=False)
    config.validate()
    if model.config.target != "all":
        raise CharLSTMError("adapting to a prime needs a model that predicts every position (not a window model)")
    ids = np.asarray(ids, dtype=np.int64)
    if len(ids) < 2:
        raise CharLSTMError("adapting to a prime needs a prime of at least two characters")
    device = next(model.parameters()).device
    full = torch.from_numpy(ids).to(device)
    reader = _Reader(model, step_size, config)
    total = 0.0
    with one_cpu_thread(device):
        for begin, stop in _segments(1, len(full), segment):
            total -= float(reader.read(full[begin - 1:stop - 1], full[begin:stop]).sum())
    reader.model.zero_grad(set_to_none=True)
    return Adaptation(reader.model, total / (len(full) - 1), len(full) - 1)
