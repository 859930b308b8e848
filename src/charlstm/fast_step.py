"""The lean step path: one new character per stream per call, and little else.

For one stream the arithmetic per character is two small matrix-vector products (2 x 256:
0.8 M multiply-adds, 3 MB of weights), so time goes to everything around it: PyTorch's
per-op dispatch (a dozen ops per layer through ``nn.LSTM`` one step at a time), fresh
tensors each step, and a BLAS gemv that streams these weights at about a third
of the cache bandwidth a plain loop reaches. The backends work on weights rearranged once
(``LeanWeights``) and buffers allocated once:

* ``native`` - ``lstm_step.c`` (toolchain and layout in ``native``): all layers and the head
  in one ctypes call, weights packed so that each 64-wide block of outputs streams through
  the cache once per step (CPU). With ``torch.get_num_threads()`` > 1 a step is shared by
  rows (big batches) or by panels (each core keeps its share of the weights in its own
  cache; any batch), whichever was clearly faster when timed on this machine (kept, and
  timed again when it runs clearly slower than that timing said);
* ``torch``  - the same rearranged weights with in-place PyTorch ops on preallocated
  buffers; any device, and the fallback where no C compiler is found;
* ``module`` - the model's own forward pass one step at a time: slow, but right for any
  layer the model may hold (the fallback for activations the lean backends lack).

``auto`` takes ``native`` where it can, then ``torch``. All reproduce the model's
full-sequence forward pass (tests compare probabilities to 1e-5) for sigmoid (nn.LSTM) and
hard-sigmoid (LoopLSTM) layers and every input encoding. ``precision="bf16"`` (native and
torch) keeps the matrices in bf16 and rounds their inputs to bf16, with fp32 sums and state:
half the bytes per step, and bf16 dot products (AVX-512-BF16; AMX through oneDNN) for
batches; probabilities stay within ``BF16_TOLERANCE`` of fp32's.
"""

from __future__ import annotations

import ctypes
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .adaptive import AdaptiveHead
from .errors import CharLSTMError
from .model import CharLSTM, State
from .native import (PRECISIONS, NativeAdaptiveCompletion, NativeLayout, NativeNet, bf16_kernel, native_library,
                     plans_file, splittable)

BACKENDS = ("auto", "native", "torch", "module")
LEAN_GATES = ("sigmoid", "hard_sigmoid")  # gate activations the lean backends implement (cell: tanh)
MAX_TABLE_FLOATS = 1 << 26       # 256 MB: above this layer 0's input is projected per step
MIN_SHARD_ROWS = 16              # streams per thread below which row shards cost more than they save
SPLITS = ("single", "panels", "rows")  # how threads share a native step (see NativeStepper)
SHARING_MARGIN = 1.1             # a way other than the default must be timed this much faster to be taken
TIMING_ROUNDS = 7                # rounds of the timed choice of how threads share a step
WATCH_EVERY, WATCH_WINDOW = 16, 64  # a timed-choice stepper times one step in 16, judges 64 at a time
WATCH_ALL_FROM = 50e-6           # ... every step when a step takes this long (the clock costs < 0.5 %)
RETIME_SLOWDOWN = 1.5            # ... and times the ways again when they ran this much slower than planned
BF16_TOLERANCE = 0.05            # documented: largest probability difference of bf16 steps from fp32
BF16_LIBRARY_MIN_BATCH = 16      # bf16 batches from here on may run faster on PyTorch's (oneDNN, AMX)


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
    head_weight: torch.Tensor        # (V, H); the adaptive head's shortlist layer (shortlist + clusters, H)
    head_bias: torch.Tensor          # (V,)
    encode: Callable[[torch.Tensor], torch.Tensor]  # the model's input encoding, ids -> features
    packed: dict = field(default_factory=dict)      # backend layouts made once, by backend name
    adaptive: "AdaptiveTails | None" = None         # the adaptive head's clusters, completed after each step

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
        head = model.head.shortlist if isinstance(model.head, AdaptiveHead) else model.head
        adaptive = AdaptiveTails.from_head(model.head) if isinstance(model.head, AdaptiveHead) else None
        return cls(units=cfg.units, hard_sigmoid=cfg.recurrent_activation == "hard_sigmoid", table=table,
                   input_weight=f32(layers[0].weight_ih_l0), input_bias=biases[0], recurrent=recurrent,
                   biases=biases, head_weight=f32(head.weight), head_bias=f32(head.bias),
                   encode=model.encode_inputs, adaptive=adaptive)


@dataclass
class AdaptiveTails:
    """The adaptive head past its shortlist layer, as float32 NumPy arrays: the lean steppers
    compute the shortlist layer (shortlist and cluster outputs) like a full head, and this
    completes each step's outputs to the full distribution's log-probabilities in id order."""

    shortlist: int
    bounds: list[tuple[int, int]]     # rank range of each cluster
    projections: list[np.ndarray]     # (H, d_i)
    clusters: list[np.ndarray]        # (d_i, n_i)
    cluster_biases: list[np.ndarray]  # (n_i,)
    ranks: np.ndarray                 # rank of each id
    order: np.ndarray                 # id of each rank

    @classmethod
    @torch.inference_mode()
    def from_head(cls, head: AdaptiveHead) -> "AdaptiveTails":
        f32 = lambda t: np.ascontiguousarray(t.detach().float().cpu().numpy())  # noqa: E731
        return cls(head.shortlist_size, list(head.bounds), [f32(p.weight.T) for p in head.projections],
                   [f32(c.weight.T) for c in head.clusters], [f32(c.bias) for c in head.clusters],
                   head.ranks().cpu().numpy(), head.order_ids().cpu().numpy())

    def native(self, library: ctypes.CDLL) -> NativeAdaptiveCompletion:
        return NativeAdaptiveCompletion(library, self.shortlist, self.bounds, self.projections, self.clusters,
                                        self.cluster_biases, self.order)

    def log_probs(self, first: np.ndarray, top: np.ndarray) -> np.ndarray:
        """(B, shortlist + clusters) first-layer outputs and the (B, H) top layer's output ->
        (B, V) log-probabilities in id order."""
        head = _log_softmax(first.astype(np.float32, copy=False))
        parts = [head[:, :self.shortlist]]
        for i, (projection, cluster, bias) in enumerate(zip(self.projections, self.clusters, self.cluster_biases)):
            inner = _log_softmax(np.matmul(top @ projection, cluster) + bias)
            inner += head[:, self.shortlist + i, None]
            parts.append(inner)
        return np.concatenate(parts, axis=1)[:, self.ranks]


def _log_softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(axis=1, keepdims=True)
    z -= np.log(np.exp(z).sum(axis=1, keepdims=True))
    return z


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

    def close(self) -> None:
        """Stop any helper threads now (they also stop when the stepper is collected)."""

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

    def __init__(self, weights: LeanWeights, batch_size: int, device: torch.device, precision: str = "fp32") -> None:
        super().__init__(weights, batch_size)
        if precision not in PRECISIONS:
            raise CharLSTMError(f"--precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
        w, B, H = weights, batch_size, weights.units
        self.precision = precision
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
        if precision == "bf16":  # bf16 products (AMX or AVX-512-BF16 through oneDNN where present)
            half = lambda t: t.to(torch.bfloat16)  # noqa: E731
            self.stacked_t = [half(self.recurrent_t[0])] + [
                half(torch.cat([b, r])) for b, r in zip(self.below_t[1:], self.recurrent_t[1:])]
            self.head_weight_bf16 = half(self.head_weight_t)

    @torch.inference_mode()
    def step(self, ids: np.ndarray) -> np.ndarray:
        self.ids.copy_(torch.from_numpy(np.asarray(ids, dtype=np.int64)))
        H, gates = self.weights.units, self.gates
        for layer in range(self.weights.layers):
            h, c = self.h[layer], self.c[layer]
            if self.precision == "bf16":
                self._bf16_gates(layer, gates)
            elif layer == 0:
                self._layer0_input(gates)
            else:
                torch.addmm(self.biases[layer], self.h[layer - 1], self.below_t[layer], out=gates)
            if self.precision == "fp32":
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
        if self.precision == "bf16":
            torch.add(self.head_bias, torch.mm(self.h[-1].to(torch.bfloat16), self.head_weight_bf16), out=self.logits)
        else:
            torch.addmm(self.head_bias, self.h[-1], self.head_weight_t, out=self.logits)
        return self.logits.numpy() if self.device.type == "cpu" else self.logits.cpu().numpy()

    def _bf16_gates(self, layer: int, gates: torch.Tensor) -> None:
        """gates = bias + [below | h] @ W with bf16 inputs and weights (sums in fp32, result
        rounded to bf16 by the library)."""
        h = self.h[layer]
        if layer == 0:
            self._layer0_input(gates)
            inputs = h
        else:
            gates.copy_(self.biases[layer])
            inputs = torch.cat([self.h[layer - 1], h], dim=1)
        gates.add_(torch.mm(inputs.to(torch.bfloat16), self.stacked_t[layer]))

    def _layer0_input(self, gates: torch.Tensor) -> None:
        if self.table is not None:
            torch.index_select(self.table, 0, self.ids, out=gates)
        else:  # vocabulary too large for a table: project the encoded input each step
            torch.addmm(self.input_bias, self.weights.encode(self.ids).float(), self.input_weight_t, out=gates)


class AdaptiveStepper(Stepper):
    """A lean stepper of an adaptive-head model: its own head is the shortlist layer, whose
    outputs ``AdaptiveTails`` completes to the full distribution after each step. The state
    tensors are the inner stepper's own. ``library``: the native kernel, which then does the
    completion (on the CPU), else NumPy does."""

    def __init__(self, inner: Stepper, library: ctypes.CDLL | None = None) -> None:
        super().__init__(inner.weights, inner.batch_size)
        self.inner, self.backend = inner, inner.backend
        self.h, self.c = inner.h, inner.c
        cpu = inner.h.device.type == "cpu"
        self._top = inner.h[-1].numpy() if cpu else None
        tails = inner.weights.adaptive
        self._complete_with = tails.native(library) if library is not None and cpu else tails.log_probs

    def step(self, ids: np.ndarray) -> np.ndarray:
        return self._complete(self.inner.step(ids))

    def prime(self, ids: Sequence[int]) -> np.ndarray:
        return self._complete(self.inner.prime(ids))

    def step_argmax(self, ids: np.ndarray) -> np.ndarray:
        """A step that returns each stream's most probable next id (the argmax of ``step``'s
        rows): in C only the clusters that can hold it are computed."""
        first = self.inner.step(ids)
        if isinstance(self._complete_with, NativeAdaptiveCompletion):
            return self._complete_with.argmax(first, self._top)
        return self._complete(first).argmax(axis=1)

    def _complete(self, first: np.ndarray) -> np.ndarray:
        top = self._top if self._top is not None else self.inner.h[-1].cpu().numpy()
        return self._complete_with(first, top)

    def close(self) -> None:
        self.inner.close()


# ----------------------------------------------------------------------------- native


class NativeStepper(Stepper):
    """lstm_step.c over all layers and the head in one call per step.

    ``split`` says how ``threads`` threads share a step: ``rows`` - the batch is cut into
    shards of at least ``MIN_SHARD_ROWS`` streams, each stepped by one thread of a C thread
    team at the same time; ``panels`` - every thread of the team takes its share of each
    layer's gates for all streams (a spin barrier per layer), so each core reads only its
    share of the weights and keeps it in its own cache; ``single`` - one thread. All give the
    same numbers. ``auto`` takes the plan timed on this machine (``split_plan``) and times
    again, switching if another way wins, when the kept way runs clearly slower than its
    timing said (``StepWatch``). ``precision`` ``bf16`` keeps the matrices in bf16 and rounds
    their inputs to bf16, with fp32 sums and state; ``kernel`` picks its product code
    (default: the CPU's best).
    """

    backend = "native"

    def __init__(self, weights: LeanWeights, batch_size: int, library: ctypes.CDLL, threads: int = 1,
                 precision: str = "fp32", split: str = "auto", kernel: int | None = None) -> None:
        super().__init__(weights, batch_size)
        if weights.table is None:
            raise CharLSTMError("the native step needs the input table; this vocabulary is too large for it")
        if precision not in PRECISIONS:
            raise CharLSTMError(f"--precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
        w, B, H = weights, batch_size, weights.units
        self.precision, self._threads, self._library = precision, threads, library
        self._kernel = bf16_kernel(library) if kernel is None else kernel
        self._watch: StepWatch | None = None
        if split == "auto":
            plan = split_plan(weights, batch_size, library, threads, precision)
            split = plan["split"]
            self._watch = StepWatch.for_plan(plan)
        self.h, self.c = torch.zeros(w.layers, B, H), torch.zeros(w.layers, B, H)
        self.ids = np.zeros(B, dtype=np.int32)
        self._team, self._steps = None, 0
        self._use_split(split)
        self._logits_view = self.logits.numpy()[:, :w.vocab_size]
        self._step_one, self._step_rows = library.charlstm_step, library.charlstm_step_rows

    def _use_split(self, split: str) -> None:
        """(Re)build what depends on how threads share the step; the state (h, c) stays."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
        w, B, H, threads = self.weights, self.batch_size, self.weights.units, self._threads
        self.split = split
        shards = max(1, min(threads, B // MIN_SHARD_ROWS)) if split == "rows" else 1
        parts = threads if split == "panels" and threads > 1 and splittable(H, threads) else 1
        key = f"native-{self.precision}-{parts}"
        if key not in w.packed:
            w.packed[key] = NativeLayout.from_weights(w, parts=parts, precision=self.precision)
        self._layout = layout = w.packed[key]
        if not hasattr(self, "logits"):  # the same widths for every split: made once, so views stay valid
            self.gates, self.logits = torch.zeros(B, layout.gates_padded), torch.zeros(B, layout.vocab_padded)
        self._weight_ptrs = (ctypes.c_void_p * w.layers)(*[p.data_ptr() for p in layout.panels])
        self._bias_ptrs = (ctypes.c_void_p * w.layers)(*[b.data_ptr() for b in layout.biases])
        self._inputs_bf16 = np.zeros((parts, B, 2 * H), dtype=np.uint16) if layout.bf16 else None
        self._h_next = torch.zeros(w.layers, B, H) if parts > 1 else None
        self._team_size = max(parts, shards)
        self._team = self._start_team()
        bounds = [B * i // shards for i in range(shards + 1)]
        # one array of Nets, shard i's at index i, for charlstm_step_rows (panels: its only Net has the team)
        self._nets = (NativeNet * shards)(*[self._shard(start, stop) for start, stop in zip(bounds, bounds[1:])])
        self._nets_ref, self._shards = ctypes.byref(self._nets), shards

    def _shard(self, start: int, stop: int) -> NativeNet:
        """The Net for rows start..stop: pointers into the shared buffers at that row."""
        w, layout, f32 = self.weights, self._layout, 4
        scratch = self._inputs_bf16
        return NativeNet(stop - start, w.layers, w.units, layout.gates_padded, layout.vocab_padded,
                         int(w.hard_sigmoid), self.batch_size, layout.parts, int(layout.bf16), self._kernel,
                         self.ids.ctypes.data + start * 4, layout.table.data_ptr(), self._weight_ptrs,
                         self._bias_ptrs, layout.head_panels.data_ptr(), layout.head_bias.data_ptr(),
                         self.h.data_ptr() + start * w.units * f32, self.c.data_ptr() + start * w.units * f32,
                         self.gates.data_ptr() + start * layout.gates_padded * f32,
                         self.logits.data_ptr() + start * layout.vocab_padded * f32,
                         None if scratch is None else scratch.ctypes.data + start * 2 * w.units * 2,
                         None if self._h_next is None else self._h_next.data_ptr(),
                         self._team if layout.parts > 1 else None)

    def _start_team(self) -> int | None:
        """The C helper threads of a split step (None without one)."""
        self._team_pid = os.getpid()
        if self._team_size == 1:
            return None
        team = self._library.charlstm_team_new(self._team_size)
        if not team:
            raise CharLSTMError(f"could not start {self._team_size - 1} native step threads")
        return team

    def step(self, ids: np.ndarray) -> np.ndarray:
        self.ids[:] = ids
        if self._team is not None and os.getpid() != self._team_pid:
            # a forked child has none of its parent's threads: start its own (the parent's
            # team record is left alone, its threads live in the parent)
            self._team = self._start_team()
            if self._layout.parts > 1:
                self._nets[0].team = self._team
        self._steps += 1
        if self._watch is None or self._steps % self._watch.every:
            failed = self._run()
        else:  # some steps timed: is the kept way as fast as its timing said?
            start = time.perf_counter()
            failed = self._run()
            if self._watch.slow(time.perf_counter() - start):
                self._retime()
        if failed:
            raise RuntimeError("charlstm native step rejected its layout")  # a bug, not a user error
        return self._logits_view

    def _run(self) -> int:
        if self._shards == 1:
            return self._step_one(self._nets_ref)
        return self._step_rows(self._nets_ref, self._shards, self._team)

    def _retime(self) -> None:
        """Time every way again (this stepper's helper threads stopped meanwhile), keep the
        winner in the plans file and switch to it, state kept; watch again, twice as long."""
        self.close()
        plan = split_plan(self.weights, self.batch_size, self._library, self._threads, self.precision,
                          retime=True)
        self._use_split(plan["split"])
        self._watch = StepWatch.for_plan(plan, window=2 * self._watch.window)

    def close(self) -> None:
        if getattr(self, "_team", None) and os.getpid() == self._team_pid:
            self._library.charlstm_team_free(self._team)
        self._team = None

    def __del__(self) -> None:
        self.close()


@dataclass
class StepWatch:
    """Whether a kept way of sharing a step runs clearly slower than its plan predicted: the
    median of ``window`` timed steps above ``RETIME_SLOWDOWN`` times the plan's seconds per
    step. A timing taken while the machine was briefly busy would otherwise be kept for good.
    Steps of big batches are all timed, so that even a short run is judged."""

    predicted: float
    window: int = WATCH_WINDOW
    samples: list[float] = field(default_factory=list)

    @property
    def every(self) -> int:
        """A step in ``every`` is timed."""
        return 1 if self.predicted >= WATCH_ALL_FROM else WATCH_EVERY

    @classmethod
    def for_plan(cls, plan: dict, window: int = WATCH_WINDOW) -> "StepWatch | None":
        predicted = plan.get("seconds_per_step", {}).get(plan["split"])
        return cls(float(predicted), window) if predicted else None  # nothing timed, nothing to doubt

    def slow(self, seconds: float) -> bool:
        self.samples.append(seconds)
        if len(self.samples) < self.window:
            return False
        observed = float(np.median(self.samples))
        self.samples.clear()
        return observed > RETIME_SLOWDOWN * self.predicted


def split_candidates(weights: LeanWeights, batch_size: int, threads: int) -> list[str]:
    """The ways ``threads`` threads can share a step of this batch; the first is the default."""
    candidates = ["rows"] if min(threads, batch_size // MIN_SHARD_ROWS) > 1 else []
    candidates.append("single")
    if threads > 1 and splittable(weights.units, threads):
        candidates.append("panels")
    return candidates


def choose_split(weights: LeanWeights, batch_size: int, library: ctypes.CDLL, threads: int,
                 precision: str) -> str:
    """How to share a step among ``threads`` threads (see ``split_plan``)."""
    return split_plan(weights, batch_size, library, threads, precision)["split"]


def split_plan(weights: LeanWeights, batch_size: int, library: ctypes.CDLL, threads: int, precision: str,
               retime: bool = False) -> dict:
    """How to share a step among ``threads`` threads, by timing each way on this machine
    (kept beside the compiled kernel; ``retime`` times again), not by guessing from the CPU's
    name: {"split", "seconds_per_step" (median of each way), "rounds" (each way's timings,
    round by round), "retimes"}. The default way - rows for a batch that can be cut, else one
    thread, as before ways were timed - is left only for one timed clearly faster."""
    candidates = split_candidates(weights, batch_size, threads)
    if len(candidates) == 1:
        return {"split": candidates[0]}
    key = (f"{precision} layers={weights.layers} units={weights.units} vocab={weights.vocab_size} "
           f"batch={batch_size} threads={threads}")
    path = plans_file(library)
    plans = _read_plans(path)
    kept = plans.get(key, {})
    if not retime and kept.get("split") in candidates:
        return kept
    rounds = time_splits(weights, batch_size, library, threads, precision, candidates)
    plan = {"split": pick_way(rounds, default=candidates[0]), "rounds": rounds,
            "seconds_per_step": medians(rounds), "retimes": kept.get("retimes", 0) + 1 if kept else 0}
    plans[key] = plan
    _write_plans(path, plans)
    return plan


def medians(rounds: dict[str, list[float]]) -> dict[str, float]:
    """Each way's median seconds per step."""
    return {name: float(np.median(times)) for name, times in rounds.items()}


def pick_way(rounds: dict[str, list[float]], default: str, margin: float = SHARING_MARGIN) -> str:
    """The way to take from timings made round by round (round i of every way back to back):
    the one whose median per-round ratio to ``default`` is lowest, if that is at most
    1/``margin``; else ``default``. Ratios within a round cancel the machine's speed of the
    moment, which on a shared virtual machine moves more than the ways differ."""
    base = np.asarray(rounds[default])
    ratios = {name: float(np.median(np.asarray(times) / base)) for name, times in rounds.items()}
    best = min(ratios, key=ratios.get)
    return best if ratios[best] * margin <= 1.0 else default


def time_splits(weights: LeanWeights, batch_size: int, library: ctypes.CDLL, threads: int, precision: str,
                candidates: Sequence[str]) -> dict[str, list[float]]:
    """Seconds per step of each way of sharing a step, one timing per round."""
    return _timed_rounds(
        {name: (lambda name=name: NativeStepper(weights, batch_size, library, threads, precision, split=name))
         for name in candidates}, batch_size, _timing_steps(weights, batch_size))


def _timing_steps(weights: LeanWeights, batch_size: int) -> int:
    """Steps per timing: about 20 ms of work at 50 GFLOP/s, 20 to 500."""
    flops = 16 * batch_size * weights.layers * weights.units ** 2
    return int(min(500, max(20, 2e-2 * 50e9 / flops)))


def _timed_rounds(makers: dict[str, Callable[[], Stepper]], batch_size: int, steps: int,
                  rounds: int = TIMING_ROUNDS) -> dict[str, list[float]]:
    """Each way's seconds per step, ``rounds`` times, the ways taking turns (their order
    rotating) so that a busy moment of the machine hits each alike. Every stepper is made
    once and run as long untimed first: a fresh helper thread's first steps wait for its
    core to wake up (milliseconds on a virtual machine); each round also starts with a few
    untimed steps, which wake helper threads that slept while the other ways ran."""
    ids = np.zeros(batch_size, dtype=np.int64)
    steppers = {name: make() for name, make in makers.items()}
    samples: dict[str, list[float]] = {name: [] for name in makers}
    try:
        for stepper in steppers.values():
            for _ in range(steps):
                stepper.step(ids)
        names = list(steppers)
        for round_ in range(rounds):
            for name in names[round_ % len(names):] + names[:round_ % len(names)]:
                stepper = steppers[name]
                for _ in range(max(2, steps // 4)):
                    stepper.step(ids)
                start = time.perf_counter()
                for _ in range(steps):
                    stepper.step(ids)
                samples[name].append((time.perf_counter() - start) / steps)
    finally:
        for stepper in steppers.values():
            stepper.close()
    return samples


def _read_plans(path: Path) -> dict:
    try:
        plans = json.loads(path.read_text())
        return plans if isinstance(plans, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_plans(path: Path, plans: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        tmp.write_text(json.dumps(plans, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)  # a read-only cache folder: measure again next time


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
    return cfg.recurrent_activation in LEAN_GATES and cfg.activation == "tanh"


def check_backend(backend: str, precision: str = "fp32") -> None:
    """The step options, checked before any work."""
    if backend not in BACKENDS:
        raise CharLSTMError(f"--backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    if precision not in PRECISIONS:
        raise CharLSTMError(f"--precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision == "bf16" and backend == "module":
        raise CharLSTMError("--precision bf16 runs on the native and torch backends, not module")


def make_stepper(model: CharLSTM, batch_size: int, backend: str = "auto",
                 weights: LeanWeights | None = None, library: ctypes.CDLL | None = None,
                 precision: str = "fp32") -> Stepper:
    """A stepper for ``model``; ``auto`` = native on CPU where it compiles, torch otherwise,
    module for layers the lean backends do not implement. ``precision`` ``bf16`` (lean
    backends only): bf16 weights and products, fp32 sums and state. An adaptive head's
    clusters are completed after each lean step (``AdaptiveStepper``)."""
    stepper = _make_stepper(model, batch_size, backend, weights, library, precision)
    if stepper.weights is not None and stepper.weights.adaptive is not None:
        return AdaptiveStepper(stepper, stepper._library if isinstance(stepper, NativeStepper) else library)
    return stepper


def _make_stepper(model: CharLSTM, batch_size: int, backend: str, weights: LeanWeights | None,
                  library: ctypes.CDLL | None, precision: str) -> Stepper:
    check_backend(backend, precision)
    if precision == "bf16" and not lean_supported(model):
        raise CharLSTMError("--precision bf16 runs on the native and torch backends, with sigmoid or "
                            "hard_sigmoid gates and tanh cells")
    if backend == "module" or (backend == "auto" and not lean_supported(model)):
        return ModuleStepper(model, batch_size)
    if not lean_supported(model):
        raise CharLSTMError(f"--backend {backend} implements sigmoid and hard_sigmoid gates with tanh cells; "
                            "this model has other activations: use --backend module")
    weights = weights or LeanWeights.from_model(model)
    device = model.head.weight.device
    if backend == "torch":
        return TorchStepper(weights, batch_size, device, precision)
    native_ok = device.type == "cpu" and weights.table is not None
    if backend == "native" and not native_ok:
        raise CharLSTMError("the native step runs on the CPU with vocabularies up to "
                            f"{MAX_TABLE_FLOATS // (4 * weights.units)} characters; use --backend torch")
    if native_ok:
        try:
            library = library or native_library()
            threads = torch.get_num_threads()
            if backend == "auto" and precision == "bf16" and batch_size >= BF16_LIBRARY_MIN_BATCH:
                if choose_bf16_backend(weights, batch_size, library, threads) == "torch":
                    return TorchStepper(weights, batch_size, device, precision)
            return NativeStepper(weights, batch_size, library, threads=threads, precision=precision)
        except CharLSTMError:
            if backend == "native":
                raise
    return TorchStepper(weights, batch_size, device, precision)


def choose_bf16_backend(weights: LeanWeights, batch_size: int, library: ctypes.CDLL, threads: int) -> str:
    """For bf16 batches: the native kernel or PyTorch's bf16 products (oneDNN, which uses
    AMX where the CPU has it), whichever was faster here, timed once and kept."""
    key = (f"bf16-backend layers={weights.layers} units={weights.units} vocab={weights.vocab_size} "
           f"batch={batch_size} threads={threads}")
    path = plans_file(library)
    plans = _read_plans(path)
    if plans.get(key, {}).get("backend") in ("native", "torch"):
        return plans[key]["backend"]
    makers = {"native": lambda: NativeStepper(weights, batch_size, library, threads, "bf16"),
              "torch": lambda: TorchStepper(weights, batch_size, torch.device("cpu"), "bf16")}
    rounds = _timed_rounds(makers, batch_size, _timing_steps(weights, batch_size))
    best = pick_way(rounds, default="native", margin=1.0)
    plans[key] = {"backend": best, "rounds": rounds, "seconds_per_step": medians(rounds)}
    _write_plans(path, plans)
    return best
