"""The native kernel's toolchain: find a C compiler, compile ``lstm_step.c`` once per machine
and source into a cached library, load it through ctypes, and lay weights out the way it
reads them. Also the C temperature sampler. The step backend that drives the kernel,
``NativeStepper``, lives with the other backends in ``fast_step``.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from .errors import CharLSTMError
from .fileio import user_cache_dir

if TYPE_CHECKING:
    from .fast_step import LeanWeights

CHUNK = 64                       # outputs per packed panel; must match lstm_step.c
NATIVE_ABI = 5                   # must match charlstm_abi_version() in lstm_step.c
NATIVE_CACHE_ENV = "CHARLSTM_NATIVE_CACHE"
COMPILE_TIMEOUT_S = 120
PRECISIONS = ("fp32", "bf16")
BF16_PORTABLE, BF16_AVX512 = 0, 1  # lstm_step.c's bf16 product kernels


class NativeNet(ctypes.Structure):
    """Mirror of ``Net`` in lstm_step.c."""

    _fields_ = [(name, ctypes.c_int32) for name in
                ("batch", "layers", "units", "gates_padded", "vocab_padded", "hard_sigmoid", "state_rows",
                 "parts", "bf16", "kernel")] + [
        ("ids", ctypes.c_void_p), ("table", ctypes.c_void_p),
        ("weights", ctypes.POINTER(ctypes.c_void_p)), ("biases", ctypes.POINTER(ctypes.c_void_p)),
        ("head_weight", ctypes.c_void_p), ("head_bias", ctypes.c_void_p),
        ("h", ctypes.c_void_p), ("c", ctypes.c_void_p), ("gates", ctypes.c_void_p), ("logits", ctypes.c_void_p),
        ("inputs_bf16", ctypes.c_void_p), ("h_next", ctypes.c_void_p), ("team", ctypes.c_void_p),
    ]


def _padded(n: int) -> int:
    return -(-n // CHUNK) * CHUNK


def pack_panels(matrix: torch.Tensor) -> torch.Tensor:
    """(N, K) weights -> (ceil(N/64), K, 64): panel p holds outputs p*64.. as contiguous rows."""
    n, k = matrix.shape
    padded = torch.zeros(_padded(n), k, dtype=torch.float32)
    padded[:n] = matrix
    return padded.T.reshape(k, -1, CHUNK).permute(1, 0, 2).contiguous()


def bf16_pairs(panels: torch.Tensor) -> torch.Tensor:
    """(P, K, 64) float panels -> (P, K/2, 64, 2) bf16: rows k and k+1 side by side in one
    32-bit word per output, AVX-512-BF16's dot-product layout (rounded to nearest even)."""
    n, k, width = panels.shape
    return panels.to(torch.bfloat16).reshape(n, k // 2, 2, width).permute(0, 1, 3, 2).contiguous()


def _pad_columns(matrix: torch.Tensor, width: int) -> torch.Tensor:
    out = torch.zeros(*matrix.shape[:-1], width, dtype=torch.float32)
    out[..., :matrix.shape[-1]] = matrix
    return out.contiguous()


def gate_groups(units: int, parts: int) -> torch.Tensor:
    """Gate order for ``parts`` groups: group s holds (i, f, g, o) of units s*H/parts.. in
    turn, so that the thread owning it can update those units' cells on its own."""
    n = units // parts
    return torch.cat([torch.arange(gate * units + s * n, gate * units + (s + 1) * n)
                      for s in range(parts) for gate in range(4)])


def splittable(units: int, parts: int) -> bool:
    """Whether the gates split into ``parts`` groups of whole 64-wide panels."""
    return parts == 1 or units % (16 * parts) == 0


@dataclass
class NativeLayout:
    """LeanWeights packed for lstm_step.c (CPU; fp32 or bf16 matrices; widths padded to
    CHUNK; gates in ``parts`` groups)."""

    gates_padded: int
    vocab_padded: int
    parts: int
    bf16: bool
    table: torch.Tensor
    panels: list[torch.Tensor]
    biases: list[torch.Tensor]
    head_panels: torch.Tensor
    head_bias: torch.Tensor

    @classmethod
    def from_weights(cls, w: "LeanWeights", parts: int = 1, precision: str = "fp32") -> "NativeLayout":
        if not splittable(w.units, parts):
            raise ValueError(f"{w.units} units do not split into {parts} groups of whole panels")
        if precision == "bf16" and w.units % 2:
            raise CharLSTMError(f"--precision bf16 needs an even number of units, not {w.units}")
        cpu = lambda t: t.detach().to("cpu", torch.float32)  # noqa: E731
        order = gate_groups(w.units, parts)
        bf16 = precision == "bf16"
        matrix = (lambda m: bf16_pairs(pack_panels(m))) if bf16 else pack_panels
        n_gates, n_vocab = _padded(4 * w.units), _padded(w.vocab_size)
        return cls(n_gates, n_vocab, parts, bf16, table=_pad_columns(cpu(w.table)[:, order], n_gates),
                   panels=[matrix(cpu(m)[order]) for m in w.recurrent],
                   biases=[_pad_columns(cpu(b)[order], n_gates) for b in w.biases],
                   head_panels=matrix(cpu(w.head_weight)), head_bias=_pad_columns(cpu(w.head_bias), n_vocab))


def native_cache_dir() -> Path:
    return user_cache_dir("native", NATIVE_CACHE_ENV)


def _cpu_signature() -> str:
    """What -march=native compiled for: a library built on another CPU may not run here."""
    try:
        info = Path("/proc/cpuinfo").read_text(errors="replace")
        wanted = [line for line in info.splitlines()[:60] if line.startswith(("model name", "flags", "Features"))]
        return "\n".join(wanted)
    except OSError:
        return platform.processor()


def _find_compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def native_library(cache_dir: Path | None = None, arch: str = "native") -> ctypes.CDLL:
    """Compile (once per machine and source) and load the native kernel.

    ``arch`` is the compiler's ``-march`` (``native``: this CPU's widest vectors; e.g.
    ``x86-64-v2`` builds the portable code a CPU without AVX-512 runs). Raises
    ``CharLSTMError`` saying why when there is no compiler or compiling fails; a failure is
    remembered beside the would-be library so later runs do not retry it.
    """
    if sys.platform == "win32":
        raise CharLSTMError("the native step is not built on Windows; use --backend torch")
    compiler = _find_compiler()
    if compiler is None:
        raise CharLSTMError("no C compiler found (cc, gcc or clang; or set CC) for the native step")
    source = resources.files("charlstm").joinpath("lstm_step.c").read_bytes()
    cache = Path(cache_dir) if cache_dir else native_cache_dir()
    key = hashlib.sha256(b"\0".join([source, compiler.encode(), _cpu_signature().encode(),
                                     platform.machine().encode(), arch.encode()])).hexdigest()[:20]
    library = cache / f"lstm_step-{key}.so"
    failure = library.with_suffix(".failed")
    if failure.is_file():
        raise CharLSTMError(f"the native step failed to compile before ({failure}): "
                            f"{failure.read_text(errors='replace').strip()[:300]}")
    if not library.is_file():
        _compile(compiler, source, library, failure, arch)
    lib = ctypes.CDLL(str(library))
    if lib.charlstm_abi_version() != NATIVE_ABI:
        raise CharLSTMError(f"{library} is not the expected native kernel; delete it and retry")
    lib.charlstm_step.argtypes = [ctypes.c_void_p]
    lib.charlstm_step.restype = ctypes.c_int
    lib.charlstm_step_rows.argtypes = [ctypes.c_void_p, ctypes.c_int32, ctypes.c_void_p]
    lib.charlstm_step_rows.restype = ctypes.c_int
    lib.charlstm_sample.argtypes = [ctypes.c_int32, ctypes.c_int32, ctypes.c_int64] + [ctypes.c_void_p] * 4
    lib.charlstm_sample.restype = None
    lib.charlstm_adaptive_complete.argtypes = [ctypes.c_int32, ctypes.c_int32, ctypes.c_void_p, ctypes.c_void_p,
                                               ctypes.c_int64, ctypes.c_int32] + [ctypes.c_void_p] * 9 + [
                                               ctypes.c_int64, ctypes.c_void_p]
    lib.charlstm_adaptive_complete.restype = None
    lib.charlstm_team_new.argtypes = [ctypes.c_int32]
    lib.charlstm_team_new.restype = ctypes.c_void_p
    lib.charlstm_team_free.argtypes = [ctypes.c_void_p]
    lib.charlstm_team_free.restype = None
    lib.charlstm_stream_sum.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32]
    lib.charlstm_stream_sum.restype = ctypes.c_float
    return lib


def bf16_kernel(library: ctypes.CDLL) -> int:
    """The bf16 product kernel this CPU runs: AVX-512-BF16 dot products where present."""
    return BF16_AVX512 if library.charlstm_bf16_kernels() & 2 else BF16_PORTABLE


def plans_file(library: ctypes.CDLL) -> Path:
    """Where measured choices of step paths are kept: beside the compiled kernel."""
    return Path(library._name).with_suffix(".plans.json")


def _compile(compiler: str, source: bytes, library: Path, failure: Path, arch: str) -> None:
    library.parent.mkdir(parents=True, exist_ok=True)
    src = library.with_name(f".{library.stem}.{os.getpid()}.c")
    tmp = library.with_name(f".{library.stem}.{os.getpid()}.so")
    src.write_bytes(source)
    errors = []
    try:
        # -march=native for this CPU's widest vectors; plain -O3 where the compiler refuses it
        for flags in ([f"-march={arch}"], []):
            cmd = [compiler, "-O3", *flags, "-Wno-psabi", "-pthread", "-shared", "-fPIC", "-o", str(tmp), str(src),
                   "-lm"]
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
            except (OSError, subprocess.TimeoutExpired) as err:
                errors.append(str(err))
                continue
            if done.returncode == 0:
                os.replace(tmp, library)
                return
            message = done.stderr.strip()
            errors.append(message.splitlines()[-1] if message else f"exit status {done.returncode}")
    finally:
        for path in (src, tmp):
            path.unlink(missing_ok=True)
    failure.write_text(f"{compiler}: {'; '.join(errors)}\n")
    raise CharLSTMError(f"the native step did not compile with {compiler}: {errors[-1]}")



class _Addresses:
    """``array.ctypes.data``, remembered for arrays passed again every step (a stepper's
    outputs, a group's temperatures): asking NumPy costs a microsecond each time."""

    def __init__(self) -> None:
        self._known: dict[int, tuple[np.ndarray, int]] = {}

    def __call__(self, array: np.ndarray) -> int:
        known = self._known.get(id(array))
        if known is not None and known[0] is array:
            return known[1]
        if len(self._known) >= 8:
            self._known.clear()
        self._known[id(array)] = (array, array.ctypes.data)
        return array.ctypes.data


def _float32_rows(array: np.ndarray) -> np.ndarray:
    """``array`` as float32 rows of contiguous values (itself when it already is)."""
    if array.dtype != np.float32 or array.strides[1] != 4:
        return np.ascontiguousarray(array, dtype=np.float32)
    return array


class NativeSampler:
    """Temperature sampling (no top-k or top-p) in C: the per-step cost of the NumPy path is
    a dozen small array calls, as much as a small model's whole step."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self._sample = library.charlstm_sample
        self._address = _Addresses()

    def __call__(self, logits: np.ndarray, inverse_temperature: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
        """logits (B, V) float32 rows, 1/temperature (B,) and uniforms (B,) float64 -> ids (B,)."""
        logits = _float32_rows(logits)
        inverse_temperature = np.ascontiguousarray(inverse_temperature, dtype=np.float64)
        uniforms = np.ascontiguousarray(uniforms, dtype=np.float64)
        out = np.empty(len(logits), dtype=np.int64)
        self._sample(len(logits), logits.shape[1], logits.strides[0] // 4, self._address(logits),
                     self._address(inverse_temperature), uniforms.ctypes.data, out.ctypes.data)
        return out


class NativeAdaptiveCompletion:
    """The adaptive head past its shortlist layer in C (``charlstm_adaptive_complete``): the
    clusters' small products, the log-normalisers and the scatter into id order in one call,
    where NumPy takes a dozen calls over the whole vocabulary per step."""

    def __init__(self, library: ctypes.CDLL, shortlist: int, bounds: list[tuple[int, int]],
                 projections: list[np.ndarray], clusters: list[np.ndarray], cluster_biases: list[np.ndarray],
                 order: np.ndarray) -> None:
        self._call = library.charlstm_adaptive_complete
        f32 = lambda a: np.ascontiguousarray(a, dtype=np.float32)  # noqa: E731
        self._keep = [f32(a) for a in (*projections, *clusters, *cluster_biases)]
        k = len(bounds)
        pointers = lambda arrays: (ctypes.c_void_p * k)(*[a.ctypes.data for a in arrays])  # noqa: E731
        self._projections = pointers(self._keep[:k])
        self._weights = pointers(self._keep[k:2 * k])
        self._biases = pointers(self._keep[2 * k:])
        self._bounds = np.array([shortlist] + [stop for _, stop in bounds], dtype=np.int32)
        self._dims = np.array([p.shape[1] for p in projections], dtype=np.int32)
        self._order = np.ascontiguousarray(order, dtype=np.int32)
        self._ranks = np.argsort(self._order).astype(np.int32)
        self._units, self._clusters = projections[0].shape[0], k
        self._scratch = np.empty(int(self._dims.max()) + len(self._order), np.float32)
        # the addresses of arrays that stay put, asked once (NumPy takes a microsecond each time)
        self._fixed = (self._clusters, self._bounds.ctypes.data, self._dims.ctypes.data, self._projections,
                       self._weights, self._biases, self._order.ctypes.data, self._ranks.ctypes.data,
                       self._scratch.ctypes.data)
        self._out: np.ndarray | None = None
        self._address = _Addresses()

    def __call__(self, first: np.ndarray, top: np.ndarray) -> np.ndarray:
        """(B, shortlist + clusters) and (B, H) float32 -> (B, V) log-probabilities in id order
        (a buffer reused by the next call)."""
        rows = len(first)
        if self._out is None or len(self._out) != rows:
            self._out = np.empty((rows, len(self._order)), dtype=np.float32)
        self._call(rows, self._units, *self._inputs(first, top), *self._fixed, self._address(self._out),
                   len(self._order), None)
        return self._out

    def argmax(self, first: np.ndarray, top: np.ndarray) -> np.ndarray:
        """The most probable id of each row (the argmax of ``__call__``'s rows), computing only
        the clusters that can hold it."""
        chosen = np.empty(len(first), dtype=np.int64)
        self._call(len(first), self._units, *self._inputs(first, top), *self._fixed, None, 0,
                   chosen.ctypes.data)
        return chosen

    def _inputs(self, first: np.ndarray, top: np.ndarray) -> tuple[int, int, int]:
        """top's and first's addresses and first's row stride, for float32 rows."""
        first = _float32_rows(first)
        if top.dtype != np.float32 or not top.flags.c_contiguous:
            top = np.ascontiguousarray(top, dtype=np.float32)
        return self._address(top), self._address(first), first.strides[0] // 4
