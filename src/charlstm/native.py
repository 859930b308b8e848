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

if TYPE_CHECKING:
    from .fast_step import LeanWeights

CHUNK = 64                       # outputs per packed panel; must match lstm_step.c
NATIVE_ABI = 3                   # must match charlstm_abi_version() in lstm_step.c
NATIVE_CACHE_ENV = "CHARLSTM_NATIVE_CACHE"
COMPILE_TIMEOUT_S = 120


class NativeNet(ctypes.Structure):
    """Mirror of ``Net`` in lstm_step.c."""

    _fields_ = [(name, ctypes.c_int32) for name in
                ("batch", "layers", "units", "gates_padded", "vocab_padded", "hard_sigmoid", "state_rows")] + [
        ("ids", ctypes.c_void_p), ("table", ctypes.c_void_p),
        ("weights", ctypes.POINTER(ctypes.c_void_p)), ("biases", ctypes.POINTER(ctypes.c_void_p)),
        ("head_weight", ctypes.c_void_p), ("head_bias", ctypes.c_void_p),
        ("h", ctypes.c_void_p), ("c", ctypes.c_void_p), ("gates", ctypes.c_void_p), ("logits", ctypes.c_void_p),
    ]


def _padded(n: int) -> int:
    return -(-n // CHUNK) * CHUNK


def pack_panels(matrix: torch.Tensor) -> torch.Tensor:
    """(N, K) weights -> (ceil(N/64), K, 64): panel p holds outputs p*64.. as contiguous rows."""
    n, k = matrix.shape
    padded = torch.zeros(_padded(n), k, dtype=torch.float32)
    padded[:n] = matrix
    return padded.T.reshape(k, -1, CHUNK).permute(1, 0, 2).contiguous()


def _pad_columns(matrix: torch.Tensor, width: int) -> torch.Tensor:
    out = torch.zeros(*matrix.shape[:-1], width, dtype=torch.float32)
    out[..., :matrix.shape[-1]] = matrix
    return out.contiguous()


@dataclass
class NativeLayout:
    """LeanWeights packed for lstm_step.c (CPU, float32, widths padded to CHUNK)."""

    gates_padded: int
    vocab_padded: int
    table: torch.Tensor
    panels: list[torch.Tensor]
    biases: list[torch.Tensor]
    head_panels: torch.Tensor
    head_bias: torch.Tensor

    @classmethod
    def from_weights(cls, w: "LeanWeights") -> "NativeLayout":
        cpu = lambda t: t.detach().to("cpu", torch.float32)  # noqa: E731
        n_gates, n_vocab = _padded(4 * w.units), _padded(w.vocab_size)
        return cls(n_gates, n_vocab, table=_pad_columns(cpu(w.table), n_gates),
                   panels=[pack_panels(cpu(m)) for m in w.recurrent],
                   biases=[_pad_columns(cpu(b), n_gates) for b in w.biases],
                   head_panels=pack_panels(cpu(w.head_weight)), head_bias=_pad_columns(cpu(w.head_bias), n_vocab))



def native_cache_dir() -> Path:
    if os.environ.get(NATIVE_CACHE_ENV):
        return Path(os.environ[NATIVE_CACHE_ENV])
    import platformdirs

    return Path(platformdirs.user_cache_dir("charlstm")) / "native"


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


def native_library(cache_dir: Path | None = None) -> ctypes.CDLL:
    """Compile (once per machine and source) and load the native kernel.

    Raises ``CharLSTMError`` saying why when there is no compiler or compiling fails; a
    failure is remembered beside the would-be library so later runs do not retry it.
    """
    if sys.platform == "win32":
        raise CharLSTMError("the native step is not built on Windows; use --backend torch")
    compiler = _find_compiler()
    if compiler is None:
        raise CharLSTMError("no C compiler found (cc, gcc or clang; or set CC) for the native step")
    source = resources.files("charlstm").joinpath("lstm_step.c").read_bytes()
    cache = Path(cache_dir) if cache_dir else native_cache_dir()
    key = hashlib.sha256(b"\0".join([source, compiler.encode(), _cpu_signature().encode(),
                                     platform.machine().encode()])).hexdigest()[:20]
    library = cache / f"lstm_step-{key}.so"
    failure = library.with_suffix(".failed")
    if failure.is_file():
        raise CharLSTMError(f"the native step failed to compile before ({failure}): "
                            f"{failure.read_text(errors='replace').strip()[:300]}")
    if not library.is_file():
        _compile(compiler, source, library, failure)
    lib = ctypes.CDLL(str(library))
    lib.charlstm_step.argtypes = [ctypes.c_void_p]
    lib.charlstm_step.restype = ctypes.c_int
    lib.charlstm_sample.argtypes = [ctypes.c_int32, ctypes.c_int32, ctypes.c_int64] + [ctypes.c_void_p] * 4
    lib.charlstm_sample.restype = None
    if lib.charlstm_abi_version() != NATIVE_ABI:
        raise CharLSTMError(f"{library} is not the expected native kernel; delete it and retry")
    return lib


def _compile(compiler: str, source: bytes, library: Path, failure: Path) -> None:
    library.parent.mkdir(parents=True, exist_ok=True)
    src = library.with_name(f".{library.stem}.{os.getpid()}.c")
    tmp = library.with_name(f".{library.stem}.{os.getpid()}.so")
    src.write_bytes(source)
    errors = []
    try:
        # -march=native for this CPU's widest vectors; plain -O3 where the compiler refuses it
        for arch in (["-march=native"], []):
            cmd = [compiler, "-O3", *arch, "-shared", "-fPIC", "-o", str(tmp), str(src), "-lm"]
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



class NativeSampler:
    """Temperature sampling (no top-k or top-p) in C: the per-step cost of the NumPy path is
    a dozen small array calls, as much as a small model's whole step."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self._sample = library.charlstm_sample
        self._addresses: dict[int, tuple[np.ndarray, int]] = {}

    def __call__(self, logits: np.ndarray, inverse_temperature: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
        """logits (B, V) float32 rows, 1/temperature (B,) and uniforms (B,) float64 -> ids (B,)."""
        if logits.dtype != np.float32 or logits.strides[1] != 4:
            logits = np.ascontiguousarray(logits, dtype=np.float32)
        inverse_temperature = np.ascontiguousarray(inverse_temperature, dtype=np.float64)
        uniforms = np.ascontiguousarray(uniforms, dtype=np.float64)
        out = np.empty(len(logits), dtype=np.int64)
        self._sample(len(logits), logits.shape[1], logits.strides[0] // 4, self._address(logits),
                     self._address(inverse_temperature), uniforms.ctypes.data, out.ctypes.data)
        return out

    def _address(self, array: np.ndarray) -> int:
        """``array.ctypes.data``, remembered for arrays passed again every step (a stepper's
        logits, a group's temperatures): asking NumPy costs a microsecond each time."""
        known = self._addresses.get(id(array))
        if known is not None and known[0] is array:
            return known[1]
        if len(self._addresses) >= 8:
            self._addresses.clear()
        self._addresses[id(array)] = (array, array.ctypes.data)
        return array.ctypes.data
