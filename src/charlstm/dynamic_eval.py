"""Dynamic evaluation (Krause et al., 2018): the model keeps learning from the text it scores.

The text is read left to right in segments with the recurrent state carried. Each segment is
scored first, with the weights as they are, and only then used for one gradient step, so no
character is ever predicted by weights that saw it: the result is a fair code length, the one
to set beside compressors, which adapt to the text too. The step is RMS-normalised
(RMSprop-style, bias-corrected) with an optional pull back towards the original weights.
The caller's model is never changed: a copy adapts.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .errors import CharLSTMError
from .evaluate import one_cpu_thread
from .model import CharLSTM, detach_state


@dataclass(frozen=True)
class DynamicConfig:
    lr: float = 1e-4        # step size of the RMS-normalised update
    segment: int = 50       # characters scored between updates
    decay: float = 0.0      # each update moves the weights this share back towards the original ones
    beta: float = 0.99      # running mean of squared gradients
    eps: float = 1e-8

    def validate(self) -> None:
        if not self.lr > 0:
            raise CharLSTMError(f"--dynamic-lr must be positive, not {self.lr}")
        if not isinstance(self.segment, int) or self.segment < 1:
            raise CharLSTMError(f"--dynamic-segment must be a positive integer, not {self.segment}")
        if not 0.0 <= self.decay < 1.0:
            raise CharLSTMError(f"--dynamic-decay must be in [0, 1), not {self.decay}")
        if not 0.0 <= self.beta < 1.0:
            raise CharLSTMError(f"dynamic beta must be in [0, 1), not {self.beta}")


@dataclass
class DynamicResult:
    nats_per_char: float
    characters: int
    seconds: float


class _RMSUpdate:
    """theta -= lr * g / sqrt(mean g^2), then theta += decay * (theta_0 - theta)."""

    def __init__(self, params: list[torch.Tensor], config: DynamicConfig) -> None:
        self.params, self.config = params, config
        self.origin = [p.detach().clone() for p in params]
        self.mean_square = [torch.zeros_like(p) for p in params]
        self.steps = 0

    @torch.no_grad()
    def step(self) -> None:
        c = self.config
        self.steps += 1
        correction = 1.0 - c.beta ** self.steps
        for p, origin, ms in zip(self.params, self.origin, self.mean_square):
            if p.grad is None:
                continue
            ms.mul_(c.beta).addcmul_(p.grad, p.grad, value=1.0 - c.beta)
            p.addcdiv_(p.grad, (ms / correction).sqrt_().add_(c.eps), value=-c.lr)
            if c.decay:
                p.add_(origin - p, alpha=c.decay)
            p.grad = None


def dynamic_evaluate(model: CharLSTM, ids: np.ndarray, context: np.ndarray | None = None,
                     config: DynamicConfig | None = None) -> DynamicResult:
    """Nats/char of ``ids`` (after ``context``, which only warms the state) with the weights
    adapted by a gradient step after every scored segment."""
    config = config or DynamicConfig()
    config.validate()
    if model.config.target != "all":
        raise CharLSTMError("dynamic evaluation needs a model that predicts every position (not a window model)")
    start = time.perf_counter()
    adapting = copy.deepcopy(model).float().eval()  # eval: no dropout; gradients still flow
    device = adapting.head.weight.device
    context = np.zeros(0, dtype=np.int64) if context is None else np.asarray(context)
    full = torch.from_numpy(np.concatenate([context, np.asarray(ids)]).astype(np.int64)).to(device)
    first = max(len(context), 1)  # the first scored position; each is predicted from the one before
    params = [p for p in adapting.parameters() if p.requires_grad]
    update = _RMSUpdate(params, config)
    total, state = 0.0, None
    with one_cpu_thread(device):
        if first > 1:
            with torch.no_grad():
                _, state = adapting(full[None, :first - 1], None)
        for pos in range(first, len(full), config.segment):
            x = full[pos - 1:min(pos - 1 + config.segment, len(full) - 1)][None]
            y = full[pos:pos + x.shape[1]]
            logits, state = adapting(x, state)
            loss = F.cross_entropy(logits[0].float(), y, reduction="sum")
            total += loss.item()
            (loss / len(y)).backward()
            update.step()
            state = detach_state(state)
    scored = len(full) - first
    return DynamicResult(total / max(scored, 1), scored, time.perf_counter() - start)
