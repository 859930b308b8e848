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

from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .adaptive import AdaptiveHead, adaptive_parameter_count, check_cutoffs, frequency_order
from .data import IGNORE_INDEX
from .errors import CharLSTMError
from .vocab import MAX_VOCAB

INPUTS = ("scaled", "onehot", "embedding")
TARGETS = ("last", "all")
HEADS = ("full", "adaptive")  # the output layer: a softmax over every symbol, or adaptive.py's
# Gate and cell activations an LSTM may use (the names Keras configs give them; Keras 3 redefined
# hard_sigmoid, so its version has a name of its own).
ACTIVATIONS = ("sigmoid", "hard_sigmoid", "hard_sigmoid_keras3", "tanh", "relu", "linear")
LIMITS = {"vocab_size": MAX_VOCAB, "layers": 64, "units": 16384, "embedding_dim": 16384, "window": 1_000_000}

State = list[tuple[torch.Tensor, torch.Tensor]]


# Settings that may change when a model is resumed or fine-tuned (no parameter changes).
REGULARISATION_FIELDS = ("dropout", "input_dropout", "weight_drop", "variational")


def knob(default, help: str):
    """A config field with its one-line description, which the command line shows as its help."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class ModelConfig:
    """What the network is: everything needed to rebuild it from a checkpoint's weights."""

    vocab_size: int  # characters it reads and predicts (the vocabulary's size)
    input: str = knob("embedding", "how a character enters the network: id / vocabulary size (the tutorial's "
                                   "scaled), a one-hot vector, or a learned embedding")
    embedding_dim: int = knob(64, "size of the learned character vectors (--input embedding)")
    layers: int = knob(2, "stacked LSTM layers")
    units: int = knob(256, "LSTM units (hidden and cell size) per layer")
    dropout: float = knob(0.2, "dropout after each LSTM layer")
    input_dropout: float = knob(0.0, "dropout on the input encoding")
    recurrent_activation: str = knob("sigmoid", "gate activation: sigmoid (PyTorch's fused LSTM) or a Keras "
                                                "one for imported models")
    target: str = knob("all", "predict the character after each window (the tutorial) or every next character")
    window: int = knob(100, "characters per window (the tutorial's seq_length); evaluation context")
    activation: str = knob("tanh", "cell and output activation (tanh unless imported)")
    weight_drop: float = knob(0.0, "DropConnect on the recurrent weights (AWD-LSTM)")
    variational: bool = knob(False, "one dropout mask per sequence for all time steps")
    head: str = knob("full", "output layer: a softmax over every symbol (full), or adaptive: a shortlist of the "
                             "frequent symbols and clusters of rarer ones, computed only when needed")
    head_cutoffs: tuple[int, ...] = knob((), "adaptive head: the frequency ranks where the shortlist and each "
                                             "cluster end (default: chosen from the symbol counts)")

    def __post_init__(self) -> None:
        if isinstance(self.head_cutoffs, list):  # from JSON
            object.__setattr__(self, "head_cutoffs", tuple(self.head_cutoffs))
        self.validate()

    def validate(self) -> None:
        for name, limit in LIMITS.items():
            value = getattr(self, name)
            if not isinstance(value, int) or not 1 <= value <= limit:
                raise CharLSTMError(f"model {name} must be an integer in [1, {limit}], not {value!r}")
        for name, allowed in (("input", INPUTS), ("target", TARGETS),
                              ("recurrent_activation", ACTIVATIONS), ("activation", ACTIVATIONS)):
            if getattr(self, name) not in allowed:
                raise CharLSTMError(f"model {name} must be one of {', '.join(allowed)}, not {getattr(self, name)!r}")
        if self.head not in HEADS:
            raise CharLSTMError(f"model head must be one of {', '.join(HEADS)}, not {self.head!r}")
        if not isinstance(self.head_cutoffs, tuple):
            raise CharLSTMError(f"model head_cutoffs must be a list of whole numbers, not {self.head_cutoffs!r}")
        if self.head == "adaptive":
            check_cutoffs(self.head_cutoffs, self.vocab_size)
        elif self.head_cutoffs:
            raise CharLSTMError("--head-cutoffs applies to the adaptive head (--head adaptive)")
        if not isinstance(self.variational, bool):
            raise CharLSTMError(f"model variational must be true or false, not {self.variational!r}")
        for name in ("dropout", "input_dropout", "weight_drop"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise CharLSTMError(f"--{name.replace('_', '-')} must be in [0, 1), not {value!r}")

    @property
    def input_size(self) -> int:
        return {"scaled": 1, "onehot": self.vocab_size, "embedding": self.embedding_dim}[self.input]

    def head_parameters(self) -> int:
        """Parameters of the output layer (with the adaptive head's order buffer)."""
        if self.head == "adaptive":
            return adaptive_parameter_count(self.units, self.vocab_size, self.head_cutoffs)
        return self.units * self.vocab_size + self.vocab_size

    def to_dict(self) -> dict:
        data = asdict(self)
        if self.head == "full":  # what older charlstm versions wrote and read
            del data["head"], data["head_cutoffs"]
        else:
            data["head_cutoffs"] = list(self.head_cutoffs)
        return data

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
    """Input encoding -> stacked LSTM layers (dropout after each) -> a linear head giving the
    next character's logits; ``forward`` reads whole sequences, ``step`` one character.

    With the adaptive head (``config.head``) the outputs are the full distribution's
    log-probabilities, which softmax and cross-entropy treat exactly as logits;
    ``symbol_counts`` (one count per id) then give the head its frequency order."""

    def __init__(self, config: ModelConfig, symbol_counts: np.ndarray | None = None) -> None:
        super().__init__()
        self.config = config
        if config.input == "embedding":
            self.embedding = nn.Embedding(config.vocab_size, config.embedding_dim)
        self.input_dropout = nn.Dropout(config.input_dropout)
        sizes = [config.input_size] + [config.units] * config.layers
        self.lstms = nn.ModuleList(self._make_layer(sizes[i], config.units) for i in range(config.layers))
        self.dropout = nn.Dropout(config.dropout)
        if config.head == "adaptive":
            self.head = AdaptiveHead(config.units, config.vocab_size, config.head_cutoffs)
            if symbol_counts is not None:
                self.head.set_order(frequency_order(symbol_counts))
        else:
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

    def forward(self, ids: torch.Tensor, state: State | None = None, last_only: bool = False,
                targets: torch.Tensor | None = None):
        """ids (B, T) -> logits (B, T, V) or (B, V) with ``last_only``, and the new state.

        With ``targets`` (the ids to predict, shaped like the logits less V; ``IGNORE_INDEX``
        where padded) the mean cross-entropy over the scored targets instead of the logits:
        the adaptive head then computes each cluster only where a target lies in it."""
        x, new_state = self.features(ids, state, last_only)
        if targets is None:
            return self.output(x), new_state
        if isinstance(self.head, AdaptiveHead):
            losses = self.head.nll(x.reshape(-1, x.shape[-1]), targets.reshape(-1), IGNORE_INDEX)
            return losses.sum() / (targets != IGNORE_INDEX).sum().clamp(min=1), new_state
        logits = self.head(x)
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                               ignore_index=IGNORE_INDEX), new_state

    def output(self, x: torch.Tensor) -> torch.Tensor:
        """Top-layer outputs -> logits (the full head) or log-probabilities (adaptive)."""
        return self.head.log_probs(x) if isinstance(self.head, AdaptiveHead) else self.head(x)

    def features(self, ids: torch.Tensor, state: State | None = None, last_only: bool = False):
        """ids (B, T) -> the top layer's outputs (B, T, H) or (B, H), and the new state."""
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
        return x, new_state

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
