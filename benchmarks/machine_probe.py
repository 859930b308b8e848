"""The machine's own limits, measured before a benchmark measures charlstm against them.

* the CPU model, its vector and matrix flags, its cache sizes;
* bytes/s streaming float arrays of 0.25-16 MB through the native kernel's probe loop, on one
  core and on all cores (each core streaming its share of the array): the L2 / L3 / DRAM
  steps of the roofline;
* fp32 and bf16 GEMM rates through PyTorch (MKL / oneDNN: AMX or AVX-512-BF16 where the CPU
  has them) at charlstm's shapes and a large square one, on one core and on all.

``Roofline.limit`` then says how many characters/s a step of a given size could reach at
best, and which limit binds: bytes (one stream reads every weight once per step) or FLOPs
(a large batch). Benchmarks print every row as characters/s and as that share.
"""

from __future__ import annotations

import math
import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

ARRAY_MB = (0.25, 0.5, 1, 2, 4, 8, 16)
FLAGS_OF_INTEREST = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8",
                     "asimd", "sve", "bf16")
GEMM_SHAPES = ((64, 512, 1024), (64, 256, 1024), (1024, 1024, 1024))  # charlstm's layer l > 0, layer 0, big


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                have = set(line.split(":", 1)[1].split())
                return [f for f in FLAGS_OF_INTEREST if f in have]
    except OSError:
        pass
    return []


def cache_sizes() -> list[str]:
    """e.g. ['L1d 48K', 'L2 2048K', 'L3 32768K'] for cpu0 (Linux sysfs)."""
    out = []
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            kind = (index / "type").read_text().strip()
            if kind == "Instruction":
                continue
            level, size = (index / "level").read_text().strip(), (index / "size").read_text().strip()
            shared = (index / "shared_cpu_list").read_text().strip()
            out.append(f"L{level}{'d' if kind == 'Data' else ''} {size} (cpus {shared})")
        except OSError:
            continue
    return out


def gemm_gflops(m: int, k: int, n: int, dtype: torch.dtype, seconds: float) -> float:
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    for _ in range(3):
        a @ b
    best, deadline = math.inf, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        for _ in range(5):
            a @ b
        best = min(best, (time.perf_counter() - start) / 5)
    return 2 * m * k * n / best / 1e9


def stream_bytes_per_s(library, megabytes: float, threads: int, seconds: float) -> float:
    """Bytes/s summing a ``megabytes`` float32 array, cut in ``threads`` equal shares that
    ``threads`` threads stream at once (ctypes releases the GIL); best of a few tries."""
    floats = int(megabytes * 2 ** 20 / 4)
    data = np.random.default_rng(0).random(floats, dtype=np.float32)
    share = floats // threads
    repeats = max(1, int(2e8 * seconds / max(1, floats * 4)))

    def stream(part: int) -> None:
        library.charlstm_stream_sum(data.ctypes.data + part * share * 4, share, repeats)

    best = math.inf
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(3):
            start = time.perf_counter()
            list(pool.map(stream, range(threads)))
            best = min(best, time.perf_counter() - start)
    return share * threads * 4 * repeats / best


@dataclass
class Roofline:
    cpu: str
    flags: list[str]
    caches: list[str]
    cores: int
    bandwidth: dict[tuple[int, float], float] = field(default_factory=dict)  # (cores, MB) -> bytes/s
    gemm: dict[tuple[str, int], float] = field(default_factory=dict)         # (precision, cores) -> FLOP/s
    gemm_at_shape: dict[tuple[str, int, tuple], float] = field(default_factory=dict)

    def bytes_per_s(self, nbytes: float, cores: int) -> float:
        """Streaming rate for a working set of ``nbytes``: the measured size at or above it."""
        sizes = sorted({mb for _, mb in self.bandwidth})
        fits = [mb for mb in sizes if mb * 2 ** 20 >= nbytes] or sizes[-1:]
        return max(rate for (c, mb), rate in self.bandwidth.items() if mb == fits[0] and c <= cores)

    def limit(self, weight_bytes: float, flops_per_char: float, streams: int, steps_per_char: int,
              precision: str, cores: int) -> tuple[float, str]:
        """Best characters/s for ``streams`` streams, each step reading ``weight_bytes`` once
        and computing ``flops_per_char`` per stream; and which limit binds ('bytes' or 'FLOPs')."""
        read = steps_per_char * weight_bytes / self.bytes_per_s(weight_bytes, cores)
        compute = steps_per_char * streams * flops_per_char / self.gemm[precision, cores]
        return streams / max(read, compute), ("bytes" if read >= compute else precision + " FLOPs")


def gemm_rates_at_shapes(precision: str, threads: int, seconds: float) -> dict[tuple, float]:
    """FLOP/s of each of ``GEMM_SHAPES`` in ``precision`` on ``threads`` PyTorch threads."""
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        return {shape: gemm_gflops(*shape, dtype, seconds) * 1e9 for shape in GEMM_SHAPES}
    finally:
        torch.set_num_threads(before)


def gemm_rates_by_threads(precision: str, cores: int, seconds: float) -> dict[int, dict[tuple, float]]:
    """The rates ``probe`` measures for a ceiling with ``cores`` cores: every shape on 1 thread
    and on ``cores`` threads."""
    return {n: gemm_rates_at_shapes(precision, n, seconds) for n in sorted({1, cores})}


def ceiling_of(rates: dict[int, dict[tuple, float]], cores: int) -> tuple[float, str]:
    """The GEMM ceiling with ``cores`` cores as ``probe`` defines it: the best rate measured on
    ``cores`` threads or fewer (a program may leave cores idle); and which shape reached it."""
    best, where = 0.0, ""
    for n, by_shape in sorted(rates.items()):
        if n > cores:
            continue
        for shape, rate in by_shape.items():
            if rate > best:
                best, where = rate, f"{'×'.join(map(str, shape))} on {n} core{'s' if n > 1 else ''}"
    if not where:
        raise ValueError(f"no GEMM rate measured on {cores} cores or fewer")
    return best, where


def median_of_ratios(numerators: list[float], denominators: list[float]) -> tuple[float, list[float]]:
    """Each round's ratio (a row over the limit measured in the same round) and their median:
    a host whose speed drifts between rounds moves both sides of a round's ratio together."""
    if not numerators or len(numerators) != len(denominators):
        raise ValueError("need one denominator per numerator, at least one round")
    ratios = [n / d for n, d in zip(numerators, denominators)]
    return float(np.median(ratios)), ratios


def probe(quick: bool = False) -> Roofline:
    from charlstm.native import native_library

    library = native_library()
    cores = os.cpu_count() or 1
    roof = Roofline(cpu_name(), cpu_flags(), cache_sizes(), cores)
    seconds = 0.1 if quick else 0.3
    core_counts = sorted({1, cores})
    for n in core_counts:
        for mb in ARRAY_MB:
            roof.bandwidth[n, mb] = stream_bytes_per_s(library, mb, n, seconds)
    for n in core_counts:
        for precision in ("fp32", "bf16"):
            for shape, rate in gemm_rates_at_shapes(precision, n, seconds).items():
                roof.gemm_at_shape[precision, n, shape] = rate
    # the ceiling with n cores: the best measured with n or fewer (a program may leave cores idle)
    for (precision, n, _), rate in roof.gemm_at_shape.items():
        for m in core_counts:
            if m >= n:
                roof.gemm[precision, m] = max(roof.gemm.get((precision, m), 0.0), rate)
    return roof


def print_roofline(roof: Roofline) -> None:
    print(f"CPU: {roof.cpu}, {roof.cores} logical CPUs; flags: {' '.join(roof.flags) or '-'}")
    print(f"caches: {'; '.join(roof.caches) or 'unknown'}")
    counts = sorted({c for c, _ in roof.bandwidth})
    print("\n| streaming a float array (GB/s) | " + " | ".join(f"{mb:g} MB" for mb in ARRAY_MB) + " |")
    print("|---|" + "---:|" * len(ARRAY_MB))
    for n in counts:
        print(f"| {n} core{'s' if n > 1 else ''} | "
              + " | ".join(f"{roof.bandwidth[n, mb] / 1e9:.0f}" for mb in ARRAY_MB) + " |")
    print("\n| GEMM (GFLOP/s) | " + " | ".join(f"{m}×{k}×{n}" for m, k, n in GEMM_SHAPES) + " | ceiling |")
    print("|---|" + "---:|" * (len(GEMM_SHAPES) + 1))
    for precision in ("fp32", "bf16"):
        for n in counts:
            print(f"| {precision}, {n} core{'s' if n > 1 else ''} | "
                  + " | ".join(f"{roof.gemm_at_shape[precision, n, s] / 1e9:.0f}" for s in GEMM_SHAPES)
                  + f" | {roof.gemm[precision, n] / 1e9:.0f} |")
