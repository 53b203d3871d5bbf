"""Model FLOPs utilisation: the model's FLOPs per second over what the hardware could do.

    MFU = flops_per_token x tokens/s / (peak FLOP/s per rank x ranks)

``flops_per_token`` is the model's training FLOPs (``distlab.model``: 6 N plus
attention, the PaLM definition: recomputation and communication do not count).
The peak comes from a table of GPU datasheet figures (dense, no sparsity) for
the precision the matmuls run in, or, on a CPU, from a short matmul probe run
once (a second or two) and cached in ``$DISTLAB_CACHE`` (default
``~/.cache/distlab``), keyed by CPU model, thread count, dtype and torch version.

A CPU "device" is the cores a rank may use (``threads_per_rank``). Ranks
beyond the machine's cores share them, so the run's peak is the per-rank peak
times min(ranks, cores / threads_per_rank): oversubscribing does not add FLOPs.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from distlab.atomic_file import write_text_atomically
from distlab.config import cache_dir

# Dense datasheet peaks in FLOP/s: (bf16/fp16 tensor core, tf32 tensor core, fp32 CUDA core).
# Matched against torch.cuda.get_device_name() in order (first substring match wins).
GPU_PEAKS: list[tuple[str, tuple[float, float, float]]] = [
    ("H200", (989e12, 494e12, 67e12)),
    ("H100 PCIe", (756e12, 378e12, 51e12)),
    ("H100 NVL", (835e12, 418e12, 60e12)),
    ("H100", (989e12, 494e12, 67e12)),
    ("GH200", (989e12, 494e12, 67e12)),
    ("B200", (2250e12, 1100e12, 75e12)),
    ("A100", (312e12, 156e12, 19.5e12)),
    ("A800", (312e12, 156e12, 19.5e12)),
    ("L40S", (362e12, 183e12, 91.6e12)),
    ("L40", (181e12, 90.5e12, 90.5e12)),
    ("L4", (121e12, 60e12, 30.3e12)),
    ("A10G", (70e12, 35e12, 31.2e12)),
    ("A10", (125e12, 62.5e12, 31.2e12)),
    ("RTX 4090", (165e12, 82.6e12, 82.6e12)),
    ("RTX 3090", (71e12, 35.6e12, 35.6e12)),
    ("V100", (125e12, 15.7e12, 15.7e12)),
    ("T4", (65e12, 8.1e12, 8.1e12)),
]

PROBE_SIZE = 1024
"""Largest side of the square matmul the CPU probe times (2 n^3 FLOPs, about 60 ms on one
core in fp32)."""
MIN_PROBE_SIZE = 128
PROBE_MATMUL_S = 0.25
"""The probe picks the largest size whose one matmul should take at most this long: a CPU
without bf16 arithmetic multiplies bf16 at about 1 GFLOP/s (a 1024^2 matmul: 2-3 s, the
whole probe a minute), where a 256^2 one still keeps the matmul unit busy."""
PROBE_S = 1.5
"""Timed matmuls stop after about this long (at least 3 of them)."""


@dataclass(frozen=True)
class PeakFlops:
    """Peak FLOP/s of one rank's device and where the number comes from."""

    flops: float
    source: str
    """``table: <GPU>`` or ``probe: <matmul> (cached in <file>)``."""


def gpu_peak(name: str, precision: str, tf32: bool) -> float | None:
    """Datasheet peak of the GPU called ``name`` for ``precision``; None if not in the table."""
    for key, (half, tf32_peak, fp32) in GPU_PEAKS:
        if key in name:
            if precision == "bf16":
                return half
            return tf32_peak if tf32 else fp32
    return None


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo when there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def probe_size(seconds_at: Callable[[int], float], largest: int = PROBE_SIZE) -> tuple[int, float]:
    """The largest power of two from ``MIN_PROBE_SIZE`` up to ``largest`` whose matmul takes at
    most ``PROBE_MATMUL_S`` (judged from the size below, times 8), and its ``seconds_at``."""
    size, seconds = MIN_PROBE_SIZE, seconds_at(MIN_PROBE_SIZE)
    while size < largest and seconds * 8 <= PROBE_MATMUL_S:
        size *= 2
        seconds = seconds_at(size)
    return size, seconds


def probe_matmul_flops(
    threads: int, dtype: torch.dtype = torch.float32, size: int = PROBE_SIZE, repeats: int = 20
) -> float:
    """FLOP/s of the best of ``repeats`` square matmuls on ``threads`` CPU threads (fewer where
    they would take over ``PROBE_S``), of side ``size`` or less where that would be slow."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(0)

    def best_seconds(n: int, times: int) -> float:
        a, b = (torch.randn(n, n, generator=generator).to(dtype) for _ in range(2))
        torch.mm(a, b)  # warm-up: thread pool, packing buffers
        best = float("inf")
        for _ in range(times):
            tic = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - tic)
        return best

    try:
        size, seconds = probe_size(lambda n: best_seconds(n, 1), size)
        times = max(3, min(repeats, int(PROBE_S / max(seconds, 1e-9))))
        return 2.0 * size**3 / min(seconds, best_seconds(size, times))
    finally:
        torch.set_num_threads(previous)


def cpu_peak(threads: int, precision: str = "fp32") -> PeakFlops:
    """The CPU peak for ``threads`` threads, probed once and then read from the cache."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    dtype_name = str(dtype).removeprefix("torch.")
    key = f"{cpu_model()}|threads={threads}|{dtype_name}|torch={torch.__version__}"
    file = cache_dir() / "peak_flops.json"
    try:
        cache = json.loads(file.read_text())
    except (OSError, ValueError):
        cache = {}
    if key not in cache:
        cache[key] = probe_matmul_flops(threads, dtype)
        try:
            write_text_atomically(file, json.dumps(cache, indent=1) + "\n")
        except OSError:
            pass  # an unwritable cache only means probing again next time
    return PeakFlops(
        cache[key],
        f"probe: square {dtype} matmul (up to {PROBE_SIZE}^2) on {threads} thread(s), "
        f"cached in {file}",
    )


def peak_flops(device: torch.device, precision: str = "fp32", threads: int = 1) -> PeakFlops:
    """Peak FLOP/s of one rank's device: GPU table (None-safe) or the cached CPU probe."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        tf32 = torch.backends.cuda.matmul.allow_tf32
        value = gpu_peak(name, precision, tf32)
        if value is not None:
            return PeakFlops(value, f"table: {name} ({precision}{', tf32' if tf32 else ''})")
        return PeakFlops(float("nan"), f"unknown GPU {name}: add it to measure.mfu.GPU_PEAKS")
    return cpu_peak(threads, precision)


def effective_ranks(device_type: str, world_size: int, threads_per_rank: int = 1) -> int:
    """Ranks that can compute at once: all of them on GPUs, at most cores / threads on a CPU."""
    if device_type != "cpu":
        return world_size
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(world_size, (cores or 1) // max(1, threads_per_rank)))


def mfu(flops_per_token: float, tokens_per_s: float, peak_per_rank: float, ranks: int) -> float:
    """Model FLOPs utilisation of the whole run (0..1)."""
    return flops_per_token * tokens_per_s / (peak_per_rank * ranks)
