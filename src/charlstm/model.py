"""Stage 4: the network. ``ModelConfig`` says what it is, ``CharLSTM`` computes it.

Input encodings:
* ``scaled``    - the tutorial's: one feature, ``id / vocab_size``;
* ``onehot``    - one feature per character;
* ``embedding`` - a learned vector per character (the modern default).

Targets: ``last`` (the tutorial: one prediction per window) or ``all`` (every position
predicts its next character). Layers are stacked single LSTMs, each followed by dropout as in
the tutorial's Keras models. ``recurrent_activation='hard_sigmoid'`` reproduces Keras 2's
LSTM (used by imported checkpoints); 'sigmoid' with ``activation='tanh'`` uses PyTorch's fused
LSTM (oneDNN on CPUs, in bf16 under autocast; cuDNN on CUDA), any other pair the step-by-step
``LoopLSTM``.

Regularisation beyond plain dropout (AWD-LSTM, Merity et al. 2017): ``variational`` dropout
uses one mask per sequence for every time step, and ``weight_drop`` drops hidden-to-hidden
weights (DropConnect), one mask per batch, handed to the fused LSTM in place of its weight so
the fast kernel still runs. Both are training-only and change no parameters.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from .errors import CharLSTMError

INPUTS = ("scaled", "onehot", "embedding")
TARGETS = ("last", "all")
# Gate and cell activations an LSTM may use (the names Keras configs give them; Keras 3 redefined
# hard_sigmoid, so its version has a name of its own).
ACTIVATIONS = ("sigmoid", "hard_sigmoid", "hard_sigmoid_keras3", "tanh", "relu", "linear")
RECURRENT_ACTIVATIONS = ACTIVATIONS
LIMITS = {"vocab_size": 65535, "layers": 64, "units": 16384, "embedding_dim": 16384, "window": 1_000_000}

State = list[tuple[torch.Tensor, torch.Tensor]]


# Settings that may change when a model is resumed or fine-tuned (no parameter changes).
REGULARISATION_FIELDS = ("dropout", "input_dropout", "weight_drop", "variational")


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    input: str = "embedding"
    embedding_dim: int = 64
    layers: int = 2
    units: int = 256
    dropout: float = 0.2
    input_dropout: float = 0.0
    recurrent_activation: str = "sigmoid"
    target: str = "all"
    window: int = 100
    activation: str = "tanh"
    weight_drop: float = 0.0
    variational: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for name, limit in LIMITS.items():
            value = getattr(self, name)
            if not isinstance(value, int) or not 1 <= value <= limit:
                raise CharLSTMError(f"model {name} must be an integer in [1, {limit}], not {value!r}")
        for name, allowed in (("input", INPUTS), ("target", TARGETS),
                              ("recurrent_activation", RECURRENT_ACTIVATIONS), ("activation", ACTIVATIONS)):
            if getattr(self, name) not in allowed:
                raise CharLSTMError(f"model {name} must be one of {', '.join(allowed)}, not {getattr(self, name)!r}")
        if not isinstance(self.variational, bool):
            raise CharLSTMError(f"model variational must be true or false, not {self.variational!r}")
        for name in ("dropout", "input_dropout", "weight_drop"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise CharLSTMError(f"--{name.replace('_', '-')} must be in [0, 1), not {value!r}")

    @property
    def input_size(self) -> int:
        return {"scaled": 1, "onehot": self.vocab_size, "embedding": self.embedding_dim}[self.input]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise CharLSTMError(f"unknown model settings in checkpoint: {', '.join(sorted(unknown))}")
        return cls(**data)


def hard_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """Keras 2's definition: clip(0.2 x + 0.5, 0, 1) (not PyTorch's x/6 + 1/2)."""
    return torch.clamp(0.2 * x + 0.5, 0.0, 1.0)


def hard_sigmoid_keras3(x: torch.Tensor) -> torch.Tensor:
    """Keras 3's definition: relu6(x + 3) / 6."""
    return F.hardsigmoid(x)


def identity(x: torch.Tensor) -> torch.Tensor:
    return x


def activation_function(name: str):
    """The function behind one of ``ACTIVATIONS``."""
    return {"sigmoid": torch.sigmoid, "hard_sigmoid": hard_sigmoid, "hard_sigmoid_keras3": hard_sigmoid_keras3,
            "tanh": torch.tanh, "relu": torch.relu, "linear": identity}[name]


class LoopLSTM(nn.Module):
    """One LSTM layer computed step by step, with a chosen gate activation.

    Parameters are named and shaped like a one-layer ``nn.LSTM`` (gate order i, f, g, o),
    so checkpoints do not depend on which implementation runs. ``cell_activation`` is used
    for the candidate and the output (Keras' ``activation``, tanh by default).
    """

    def __init__(self, input_size: int, hidden_size: int, gate_activation=hard_sigmoid,
                 cell_activation=torch.tanh) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.gate_activation = gate_activation
        self.cell_activation = cell_activation
        self.weight_ih_l0 = nn.Parameter(torch.empty(4 * hidden_size, input_size))
        self.weight_hh_l0 = nn.Parameter(torch.empty(4 * hidden_size, hidden_size))
        self.bias_ih_l0 = nn.Parameter(torch.zeros(4 * hidden_size))
        self.bias_hh_l0 = nn.Parameter(torch.zeros(4 * hidden_size))
        bound = hidden_size ** -0.5
        for w in (self.weight_ih_l0, self.weight_hh_l0):
            nn.init.uniform_(w, -bound, bound)

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]):
        h, c = state[0][0], state[1][0]
        projected = F.linear(x, self.weight_ih_l0, self.bias_ih_l0 + self.bias_hh_l0)
        outputs = []
        for t in range(x.shape[1]):
            gates = projected[:, t] + h @ self.weight_hh_l0.T
            i, f, g, o = gates.chunk(4, dim=-1)
            i, f, o = self.gate_activation(i), self.gate_activation(f), self.gate_activation(o)
            c = f * c + i * self.cell_activation(g)
            h = o * self.cell_activation(c)
            outputs.append(h)
        return torch.stack(outputs, dim=1), (h[None], c[None])


class CharLSTM(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        if config.input == "embedding":
            self.embedding = nn.Embedding(config.vocab_size, config.embedding_dim)
        self.input_dropout = nn.Dropout(config.input_dropout)
        sizes = [config.input_size] + [config.units] * config.layers
        self.lstms = nn.ModuleList(self._make_layer(sizes[i], config.units) for i in range(config.layers))
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.units, config.vocab_size)
        if config.weight_drop and not all(isinstance(lstm, nn.LSTM) for lstm in self.lstms):
            raise CharLSTMError("weight drop needs the standard LSTM cell (sigmoid gates, tanh)")

    def _make_layer(self, input_size: int, units: int) -> nn.Module:
        cfg = self.config
        if cfg.recurrent_activation == "sigmoid" and cfg.activation == "tanh":
            return nn.LSTM(input_size, units, batch_first=True)
        return LoopLSTM(input_size, units, activation_function(cfg.recurrent_activation),
                        activation_function(cfg.activation))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def initial_state(self, batch_size: int, device=None, dtype=torch.float32) -> State:
        device = device or self.head.weight.device
        zeros = lambda: torch.zeros(1, batch_size, self.config.units, device=device, dtype=dtype)  # noqa: E731
        return [(zeros(), zeros()) for _ in range(self.config.layers)]

    def encode_inputs(self, ids: torch.Tensor) -> torch.Tensor:
        kind = self.config.input
        if kind == "embedding":
            x = self.embedding(ids)
        elif kind == "onehot":
            x = F.one_hot(ids, self.config.vocab_size).to(self.head.weight.dtype)
        else:
            x = (ids.to(self.head.weight.dtype) / self.config.vocab_size).unsqueeze(-1)
        return self._dropout(x, self.config.input_dropout)

    def _dropout(self, x: torch.Tensor, p: float) -> torch.Tensor:
        """Plain dropout, or with ``variational`` one mask per sequence shared by all steps."""
        if not self.training or p == 0.0:
            return x
        if not self.config.variational:
            return F.dropout(x, p, training=True)
        shape = (x.shape[0], 1, *x.shape[2:])  # (B, 1, features)
        return x * _keep_mask(x.new_empty(shape), p)

    def _run_layer(self, lstm: nn.Module, x: torch.Tensor, state):
        if self.training and self.config.weight_drop:
            # DropConnect: the fused kernel runs with a dropped copy of W_hh in its place
            dropped = lstm.weight_hh_l0 * _keep_mask(lstm.weight_hh_l0, self.config.weight_drop)
            return torch.func.functional_call(lstm, {"weight_hh_l0": dropped}, (x, state))
        return lstm(x, state)

    def forward(self, ids: torch.Tensor, state: State | None = None, last_only: bool = False):
        """ids (B, T) -> logits (B, T, V) or (B, V) with ``last_only``, and the new state."""
        if state is None:
            state = self.initial_state(ids.shape[0], device=ids.device)
        x = self.encode_inputs(ids)
        new_state: State = []
        for lstm, layer_state in zip(self.lstms, state):
            x, layer_state = self._run_layer(lstm, x, layer_state)
            x = self._dropout(x, self.config.dropout)
            new_state.append(layer_state)
        if last_only:
            x = x[:, -1]
        return self.head(x), new_state

    @torch.no_grad()
    def step(self, ids: torch.Tensor, state: State | None = None):
        """One character per stream: ids (B,) -> logits (B, V), new state."""
        logits, state = self.forward(ids[:, None], state)
        return logits[:, 0], state


def _keep_mask(like: torch.Tensor, p: float) -> torch.Tensor:
    """1/(1-p) with probability 1-p, else 0 (uniform draws: faster than bernoulli_ on CPUs)."""
    keep = 1.0 - p
    return (torch.rand(like.shape, device=like.device) < keep).to(like.dtype).div_(keep)


def detach_state(state: State) -> State:
    return [(h.detach(), c.detach()) for h, c in state]
