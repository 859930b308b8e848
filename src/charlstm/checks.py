"""Checks made before any work starts, in one place: option ranges, devices, memory, output paths.

Every function raises ``CharLSTMError`` with one line naming the option; the configs
(``TrainConfig``, ``SamplingConfig``, ...) and the CLI call them, so the Python API and the
command line refuse the same values. Output paths are proven writable (a file is created and
removed) and never name a device, FIFO or folder where a file is meant.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from .errors import CharLSTMError
from .fileio import NAME_MAX, writable_target

MAX_THREADS = 1024            # far above any CPU here; OpenMP crashes (exit 139) somewhere below 10^5
MAX_SEED = 2**64 - 1          # what torch.manual_seed and NumPy's generators accept
MIN_TEMPERATURE = 1e-300      # 1/T of anything smaller may overflow to inf (1e-320 did); 0 means greedy
MAX_TEMPERATURE = 100.0


def option(name: str) -> str:
    """``lr`` or ``--lr`` -> ``--lr``."""
    return name if name.startswith("-") else "--" + name.replace("_", "-")


def check_int(name: str, value, low: int | None = None, high: int | None = None) -> None:
    """A whole number (not a bool) within [low, high]."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise CharLSTMError(f"{option(name)} must be a whole number, not {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise CharLSTMError(f"{option(name)} must be in [{low}, {high}], not {value}")


def check_float(name: str, value, low: float | None = None, high: float | None = None,
                low_open: bool = False, high_open: bool = False) -> None:
    """A finite number within the bounds (NaN and infinities are refused: they train to NaN)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise CharLSTMError(f"{option(name)} must be a finite number, not {value!r}")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        left, right = "(" if low_open else "[", ")" if high_open else "]"
        raise CharLSTMError(f"{option(name)} must be in {left}{low}, {high}{right}, not {value}")


def check_threads(value: int | None, name: str = "threads", allow_zero: bool = True) -> None:
    if value is not None:
        check_int(name, value, 0 if allow_zero else 1, MAX_THREADS)


def check_seed(value: int | None, name: str = "seed") -> None:
    if value is not None:
        check_int(name, value, 0, MAX_SEED)


def check_temperature(value, name: str = "temperature") -> None:
    """0 (greedy) to 100; a positive value too small to divide by samples as greedy does."""
    check_float(name, value, 0.0, MAX_TEMPERATURE)


def inverse_temperature(value: float) -> float:
    """1/T without overflow: below ``MIN_TEMPERATURE`` every T gives the argmax anyway."""
    return 1.0 / max(value, MIN_TEMPERATURE)


def check_device(name: str):
    """A torch device that exists here: cpu, cuda[:N] (with that GPU present) or mps."""
    import torch

    if not isinstance(name, str) or not name.strip():
        raise CharLSTMError("--device must name a device: auto, cpu, cuda, cuda:N or mps")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise CharLSTMError(f"--device {name!r} is not a device name (auto, cpu, cuda, cuda:1, mps)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CharLSTMError(f"--device {name}: no CUDA GPU is available here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CharLSTMError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA GPUs")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise CharLSTMError(f"--device {name}: Apple MPS is not available here")
    elif device.type != "cpu":
        raise CharLSTMError(f"--device {name}: charlstm runs on cpu, cuda or mps, not {device.type}")
    return device


# --------------------------------------------------------------------------- memory


def available_memory() -> int | None:
    """Bytes the system can still give (MemAvailable on Linux), or None where unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_memory(needed: int, what: str) -> None:
    """Refuse work whose known allocations alone exceed the memory available."""
    available = available_memory()
    if available is not None and needed > available:
        raise CharLSTMError(f"{what} needs about {needed / 2**30:.1f} GiB of memory, "
                            f"{available / 2**30:.1f} GiB are available")


def training_bytes(parameters: int, batch: int, steps: int, units: int, layers: int, vocab: int) -> int:
    """Weights, gradients and two Adam moments (4 x 4 bytes per parameter), plus the activations
    one batch keeps for the backward pass (gates, states and logits per step)."""
    activations = batch * steps * (layers * units * 10 + vocab * 3) * 4
    return parameters * 16 + activations


# --------------------------------------------------------------------------- output paths


def check_name(name: str, what: str) -> None:
    """A file name (one path component) the file system will take."""
    if not name or name in (".", ".."):
        raise CharLSTMError(f"{what}: {name!r} is not a file name")
    if "/" in name or "\0" in name:
        raise CharLSTMError(f"{what}: {name!r} must be a plain file name (no '/' or NUL)")
    size = len(name.encode("utf-8", "surrogateescape"))
    if size > NAME_MAX:
        raise CharLSTMError(f"{what}: the file name is {size} bytes long; at most {NAME_MAX} are allowed")


def check_no_nul(path: str | os.PathLike, what: str) -> None:
    """File systems refuse NUL in a path (Python raises ValueError): one clear line instead."""
    if "\0" in os.fspath(path):
        raise CharLSTMError(f"{what}: {os.fspath(path)!r} contains a NUL character, which no path may hold")


def check_output_file(path: str | os.PathLike, what: str = "output") -> Path:
    """Refuse an output file that cannot be written or is not a file, before any work starts."""
    text = os.fspath(path)
    if not text:
        raise CharLSTMError(f"{what}: an empty path is not a file name")
    check_no_nul(text, what)
    path = Path(text)
    check_name(path.name, f"{what} {path}")
    target = writable_target(path)
    check_output_dir(target.parent, what=f"{what} {path}", create=False)
    return path


def check_output_dir(folder: str | os.PathLike, what: str = "-o", create: bool = True) -> Path:
    """A folder that exists (or is created) and takes a new file, proven by writing one."""
    text = os.fspath(folder)
    if not text:
        raise CharLSTMError(f"{what}: an empty path is not a folder")
    check_no_nul(text, what)
    folder = Path(text)
    for part in folder.parts:
        if len(part.encode("utf-8", "surrogateescape")) > NAME_MAX:
            raise CharLSTMError(f"{what}: a folder name in the path is longer than {NAME_MAX} bytes")
    try:
        if folder.exists() and not folder.is_dir():
            raise CharLSTMError(f"{what}: {folder} exists and is not a folder")
        if create:
            folder.mkdir(parents=True, exist_ok=True)
        elif not folder.is_dir():
            raise CharLSTMError(f"{what}: the folder {folder} does not exist")
        probe = folder / f".charlstm-probe.{os.getpid()}.tmp"
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise CharLSTMError(f"{what}: cannot write in {folder} ({err.strerror or err})") from None
    return folder
