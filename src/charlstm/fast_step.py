"""The lean step path: one new character per stream per call, and little else.

For one stream the arithmetic per character is two small matrix-vector products (2 x 256:
0.8 M multiply-adds, 3 MB of weights), so time goes to everything around it: PyTorch's
per-op dispatch (a dozen ops per layer, ~1,900 chars/s through ``nn.LSTM`` one step at a
time), fresh tensors each step, and a BLAS gemv that streams these weights at about a third
of the cache bandwidth a plain loop reaches. The backends work on weights rearranged once
(``LeanWeights``) and buffers allocated once:

* ``native`` - ``lstm_step.c``, compiled on first use with the system C compiler and
  cached: all layers and the head in one ctypes call, weights packed so that each 64-wide
  block of outputs streams through the cache once per step (CPU, float32). Batches of 16+
  streams per thread are split across ``torch.get_num_threads()`` threads;
* ``torch``  - the same rearranged weights with in-place PyTorch ops on preallocated
  buffers; any device, and the fallback where no C compiler is found;
* ``module`` - the model's own forward pass one step at a time: slow, but right for any
  layer the model may hold (the fallback for activations the lean backends lack).

``auto`` takes ``native`` where it can, then ``torch``. All reproduce the model's
full-sequence forward pass (tests compare probabilities to 1e-5) for sigmoid (nn.LSTM) and
hard-sigmoid (LoopLSTM) layers and every input encoding.
"""

from __future__ import annotations

import ctypes
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .errors import CharLSTMError
from .model import CharLSTM, State
from .native import NativeLayout, NativeNet, native_library

BACKENDS = ("auto", "native", "torch", "module")
LEAN_GATES = ("sigmoid", "hard_sigmoid")  # gate activations the lean backends implement (cell: tanh)
MAX_TABLE_FLOATS = 1 << 26       # 256 MB: above this layer 0's input is projected per step
MIN_SHARD_ROWS = 16              # streams per thread below which threads cost more than they save


@dataclass
class LeanWeights:
    """A model's weights rearranged for single steps (float32, gate order i, f, g, o).

    ``table[v]`` is layer 0's input projection of character ``v`` plus both its biases, so
    layer 0 needs only its recurrent product; ``None`` when it would be too large.
    Layers above layer 0 have their input and recurrent matrices side by side (4H, 2H).
    """

    units: int
    hard_sigmoid: bool
    table: torch.Tensor | None
    input_weight: torch.Tensor       # layer 0's W_ih, used only without a table
    input_bias: torch.Tensor         # layer 0's b_ih + b_hh
    recurrent: list[torch.Tensor]    # layer 0: W_hh (4H, H); layer l: [W_ih | W_hh] (4H, 2H)
    biases: list[torch.Tensor]       # b_ih + b_hh per layer
    head_weight: torch.Tensor        # (V, H)
    head_bias: torch.Tensor          # (V,)
    encode: Callable[[torch.Tensor], torch.Tensor]  # the model's input encoding, ids -> features
    packed: dict = field(default_factory=dict)      # backend layouts made once, by backend name

    @property
    def layers(self) -> int:
        return len(self.recurrent)

    @property
    def vocab_size(self) -> int:
        return self.head_bias.shape[0]

    @classmethod
    @torch.inference_mode()
    def from_model(cls, model: CharLSTM) -> "LeanWeights":
        cfg = model.config
        f32 = lambda t: t.detach().float().contiguous()  # noqa: E731
        layers = list(model.lstms)
        biases = [f32(m.bias_ih_l0 + m.bias_hh_l0) for m in layers]
        recurrent = [f32(layers[0].weight_hh_l0)] + [
            f32(torch.cat([m.weight_ih_l0, m.weight_hh_l0], dim=1)) for m in layers[1:]]
        table = None
        if cfg.vocab_size * 4 * cfg.units <= MAX_TABLE_FLOATS:
            table = f32(_input_projection(model, torch.arange(cfg.vocab_size, device=model.head.weight.device)))
        return cls(units=cfg.units, hard_sigmoid=cfg.recurrent_activation == "hard_sigmoid", table=table,
                   input_weight=f32(layers[0].weight_ih_l0), input_bias=biases[0], recurrent=recurrent,
                   biases=biases, head_weight=f32(model.head.weight), head_bias=f32(model.head.bias),
                   encode=model.encode_inputs)


def _input_projection(model: CharLSTM, ids: torch.Tensor) -> torch.Tensor:
    """Layer 0's W_ih x + b_ih + b_hh for each id, with the model's own input encoding."""
    first = model.lstms[0]
    was_training = model.training
    model.eval()
    x = model.encode_inputs(ids).float()
    model.train(was_training)
    return F.linear(x, first.weight_ih_l0.float(), (first.bias_ih_l0 + first.bias_hh_l0).float())


class Stepper:
    """Carries B streams' recurrent state; ``step(ids)`` feeds one id per stream and returns
    the next-character logits as a (B, V) float32 NumPy array (valid until the next step).

    The lean steppers keep the state in ``h`` and ``c``, each (layers, B, H).
    """

    backend = "none"
    h: torch.Tensor
    c: torch.Tensor

    def __init__(self, weights: LeanWeights | None, batch_size: int) -> None:
        if batch_size < 1:
            raise CharLSTMError(f"the batch must hold at least one stream, not {batch_size}")
        self.weights = weights
        self.batch_size = batch_size

    def step(self, ids: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def load_state(self, state: State) -> None:
        """Take the model's state ([(h, c)] per layer, each (1, B or 1, H)); 1 is broadcast."""
        for layer, (h, c) in enumerate(state):
            self.h[layer].copy_(h[0])
            self.c[layer].copy_(c[0])

    def state(self) -> State:
        return [(self.h[i][None].clone(), self.c[i][None].clone()) for i in range(len(self.h))]

    def prime(self, ids: Sequence[int]) -> np.ndarray:
        """Start every stream from the zero state, feed it ``ids``; the last step's logits."""
        self.h.zero_()
        self.c.zero_()
        feed = np.empty(self.batch_size, dtype=np.int64)
        logits = None
        for i in ids:
            feed[:] = i
            logits = self.step(feed)
        if logits is None:
            raise CharLSTMError("the prime text is empty")
        return logits


class TorchStepper(Stepper):
    """The lean layout in PyTorch: in-place ops on buffers made once, no autograd."""

    backend = "torch"

    def __init__(self, weights: LeanWeights, batch_size: int, device: torch.device) -> None:
        super().__init__(weights, batch_size)
        w, B, H = weights, batch_size, weights.units
        move = lambda t: t.to(device)  # noqa: E731
        # gate order (i, f, o, g): one activation call covers the three sigmoid gates
        order = torch.cat([torch.arange(0, 2 * H), torch.arange(3 * H, 4 * H),
                           torch.arange(2 * H, 3 * H)]).to(w.head_bias.device)
        self.table = None if w.table is None else move(w.table[:, order])
        self.input_weight_t = move(w.input_weight[order].T.contiguous())
        self.input_bias = move(w.input_bias[order])
        # per layer: the part applied to the layer below's output (None for layer 0), then to h
        self.below_t = [None] + [move(m[order, :H].T.contiguous()) for m in w.recurrent[1:]]
        self.recurrent_t = [move(m[order, -H:].T.contiguous()) for m in w.recurrent]
        self.biases = [move(b[order]) for b in w.biases]
        self.head_weight_t = move(w.head_weight.T.contiguous())
        self.head_bias = move(w.head_bias)
        zeros = lambda *shape: torch.zeros(*shape, device=device)  # noqa: E731
        self.h, self.c = zeros(w.layers, B, H), zeros(w.layers, B, H)
        self.gates, self.tanh_c, self.logits = zeros(B, 4 * H), zeros(B, H), zeros(B, w.vocab_size)
        self.ids = torch.zeros(B, dtype=torch.long, device=device)
        self.device = device

    @torch.inference_mode()
    def step(self, ids: np.ndarray) -> np.ndarray:
        self.ids.copy_(torch.from_numpy(np.asarray(ids, dtype=np.int64)))
        H, gates = self.weights.units, self.gates
        for layer in range(self.weights.layers):
            h, c = self.h[layer], self.c[layer]
            if layer == 0:
                self._layer0_input(gates)
            else:
                torch.addmm(self.biases[layer], self.h[layer - 1], self.below_t[layer], out=gates)
            gates.addmm_(h, self.recurrent_t[layer])
            sig, g = gates[:, :3 * H], gates[:, 3 * H:]
            if self.weights.hard_sigmoid:
                sig.mul_(0.2).add_(0.5).clamp_(0.0, 1.0)
            else:
                sig.sigmoid_()
            g.tanh_()
            c.mul_(gates[:, H:2 * H]).addcmul_(gates[:, :H], g)
            torch.tanh(c, out=self.tanh_c)
            torch.mul(gates[:, 2 * H:3 * H], self.tanh_c, out=h)
        torch.addmm(self.head_bias, self.h[-1], self.head_weight_t, out=self.logits)
        return self.logits.numpy() if self.device.type == "cpu" else self.logits.cpu().numpy()

    def _layer0_input(self, gates: torch.Tensor) -> None:
        if self.table is not None:
            torch.index_select(self.table, 0, self.ids, out=gates)
        else:  # vocabulary too large for a table: project the encoded input each step
            torch.addmm(self.input_bias, self.weights.encode(self.ids).float(), self.input_weight_t, out=gates)


# ----------------------------------------------------------------------------- native


class NativeStepper(Stepper):
    """lstm_step.c over all layers and the head in one call per step.

    Batches of at least ``MIN_SHARD_ROWS`` streams per thread are split into ``threads``
    shards of rows, stepped at the same time (ctypes releases the GIL during the call).
    """

    backend = "native"

    def __init__(self, weights: LeanWeights, batch_size: int, library: ctypes.CDLL, threads: int = 1) -> None:
        super().__init__(weights, batch_size)
        if weights.table is None:
            raise CharLSTMError("the native step needs the input table; this vocabulary is too large for it")
        w, B, H = weights, batch_size, weights.units
        if "native" not in w.packed:
            w.packed["native"] = NativeLayout.from_weights(w)
        self._layout = layout = w.packed["native"]
        self.h, self.c = torch.zeros(w.layers, B, H), torch.zeros(w.layers, B, H)
        self.gates, self.logits = torch.zeros(B, layout.gates_padded), torch.zeros(B, layout.vocab_padded)
        self.ids = np.zeros(B, dtype=np.int32)
        self._logits_view = self.logits.numpy()[:, :w.vocab_size]
        self._weight_ptrs = (ctypes.c_void_p * w.layers)(*[p.data_ptr() for p in layout.panels])
        self._bias_ptrs = (ctypes.c_void_p * w.layers)(*[b.data_ptr() for b in layout.biases])
        shards = max(1, min(threads, B // MIN_SHARD_ROWS))
        bounds = [B * i // shards for i in range(shards + 1)]
        self._nets = [self._shard(start, stop) for start, stop in zip(bounds, bounds[1:])]
        self._refs = [ctypes.byref(net) for net in self._nets]
        self._step = library.charlstm_step
        self._pool = ThreadPoolExecutor(shards - 1, thread_name_prefix="charlstm-step") if shards > 1 else None

    def _shard(self, start: int, stop: int) -> NativeNet:
        """The Net for rows start..stop: pointers into the shared buffers at that row."""
        w, layout, f32 = self.weights, self._layout, 4
        return NativeNet(stop - start, w.layers, w.units, layout.gates_padded, layout.vocab_padded, int(w.hard_sigmoid),
                    self.batch_size, self.ids.ctypes.data + start * 4, layout.table.data_ptr(), self._weight_ptrs,
                    self._bias_ptrs, layout.head_panels.data_ptr(), layout.head_bias.data_ptr(),
                    self.h.data_ptr() + start * w.units * f32, self.c.data_ptr() + start * w.units * f32,
                    self.gates.data_ptr() + start * layout.gates_padded * f32,
                    self.logits.data_ptr() + start * layout.vocab_padded * f32)

    def step(self, ids: np.ndarray) -> np.ndarray:
        self.ids[:] = ids
        others = [self._pool.submit(self._step, ref) for ref in self._refs[1:]] if self._pool else []
        failed = self._step(self._refs[0]) != 0
        if any(f.result() != 0 for f in others) or failed:
            raise RuntimeError("charlstm native step rejected its layout")  # a bug, not a user error
        return self._logits_view

    def __del__(self) -> None:
        if getattr(self, "_pool", None) is not None:
            self._pool.shutdown(wait=False)


class ModuleStepper(Stepper):
    """The model's own forward pass, one character at a time, with the state carried."""

    backend = "module"

    def __init__(self, model: CharLSTM, batch_size: int) -> None:
        super().__init__(None, batch_size)
        self.model = model
        self.device = model.head.weight.device
        self._state = model.initial_state(batch_size)

    def load_state(self, state: State) -> None:
        B = self.batch_size
        self._state = [(h.expand(1, B, -1).contiguous(), c.expand(1, B, -1).contiguous()) for h, c in state]

    def state(self) -> State:
        return [(h.clone(), c.clone()) for h, c in self._state]

    @torch.no_grad()
    def prime(self, ids: Sequence[int]) -> np.ndarray:
        feed = torch.tensor([list(ids)], device=self.device).expand(self.batch_size, -1)
        logits, self._state = self.model(feed, last_only=True)
        return logits.float().cpu().numpy()

    @torch.no_grad()
    def step(self, ids: np.ndarray) -> np.ndarray:
        ids_t = torch.from_numpy(np.asarray(ids, dtype=np.int64)).to(self.device)
        logits, self._state = self.model.step(ids_t, self._state)
        return logits.float().cpu().numpy()


def lean_supported(model: CharLSTM) -> bool:
    """Whether the lean backends implement this model's layers (gate and cell activations)."""
    cfg = model.config
    return cfg.recurrent_activation in LEAN_GATES and getattr(cfg, "activation", "tanh") == "tanh"



def make_stepper(model: CharLSTM, batch_size: int, backend: str = "auto",
                 weights: LeanWeights | None = None, library: ctypes.CDLL | None = None) -> Stepper:
    """A stepper for ``model``; ``auto`` = native on CPU where it compiles, torch otherwise,
    module for layers the lean backends do not implement."""
    if backend not in BACKENDS:
        raise CharLSTMError(f"--backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    if backend == "module" or (backend == "auto" and not lean_supported(model)):
        return ModuleStepper(model, batch_size)
    if not lean_supported(model):
        raise CharLSTMError(f"--backend {backend} implements sigmoid and hard_sigmoid gates with tanh cells; "
                            "this model has other activations: use --backend module")
    weights = weights or LeanWeights.from_model(model)
    device = model.head.weight.device
    if backend == "torch":
        return TorchStepper(weights, batch_size, device)
    native_ok = device.type == "cpu" and weights.table is not None
    if backend == "native" and not native_ok:
        raise CharLSTMError("the native step runs on the CPU with vocabularies up to "
                            f"{MAX_TABLE_FLOATS // (4 * weights.units)} characters; use --backend torch")
    if native_ok:
        try:
            return NativeStepper(weights, batch_size, library or native_library(), threads=torch.get_num_threads())
        except CharLSTMError:
            if backend == "native":
                raise
    return TorchStepper(weights, batch_size, device)
