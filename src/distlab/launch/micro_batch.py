"""``--micro-batch auto``: the largest micro-batch that fits the device, found once and cached.

How it is found. The candidates are the micro-batch sizes the strategy accepts
for this config (divisors of the per-rank batch; a pipeline also needs at least
as many microbatches as stages). A probe trains ``PROBE_STEPS`` real steps of
the very run asked for (same strategy, ranks, model, precision, flags) at one
candidate, in a throw-away run dir with the local launcher, and reads every
rank's peak memory from its summary (``torch.cuda.max_memory_allocated`` on a
GPU, the process's peak RSS on a CPU). Two steps, because AdamW allocates its
state in the first optimizer step, so only the second forward/backward runs
with everything a long run holds. A candidate fits when the probe finishes
and every rank's peak is under the budget (``--memory-budget``, default 90% of
the GPU's memory: the caching allocator needs some slack; on a CPU the
available RAM shared by the ranks). An out-of-memory failure counts as "does
not fit"; any other failure is reported as it is.

Memory grows with the micro-batch (activations scale with it), so a binary
search over the sorted candidates needs about log2(number of candidates)
probes: three or four for a per-rank batch of 64.

The answer is cached in ``<cache dir>/micro_batch.json`` under a key of
everything that changes the memory of a step (strategy, ranks, model,
sequence length, precision, every strategy option, device name and memory,
budget, torch version), so the next run with the same key starts at once.
Delete the file, or the entry, to search again.

Default: ``auto`` on a GPU; on a CPU the whole per-rank batch unless ``auto``
is asked for (RAM is rarely what limits the lab's models on a CPU, and every
probe costs two steps).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from distlab.atomic_file import write_text_atomically
from distlab.config import AUTO, Config, cache_dir
from distlab.config_checks import parse_bytes
from distlab.distributed import resolve_device
from distlab.errors import DistlabError
from distlab.strategies import registry
from distlab.strategies.resolve import validate

PROBE_STEPS = 2
GPU_BUDGET_FRACTION = 0.9
CACHE_FILE = "micro_batch.json"
NOT_MEMORY_FIELDS = frozenset(
    {
        "steps", "lr", "min_lr_ratio", "warmup_steps", "weight_decay", "grad_clip", "seed",
        "data", "launcher", "ray_address", "timeout_s", "max_failures", "inject_fault",
        "resume", "quiet", "log_every", "checkpoint_every", "keep_checkpoints",
        "final_checkpoint", "run_dir", "runs_root", "save_final_weights", "pictures",
        "wandb", "wandb_project", "wandb_group", "wandb_name", "micro_batch", "memory_budget",
    }
)  # fmt: skip
"""Config fields that do not change what a step holds in memory (left out of the cache key)."""

PeakProbe = Callable[[Config], int | None]
"""Train ``PROBE_STEPS`` steps of a config; the largest peak bytes over its ranks, or None
if a rank ran out of memory."""


def wants_auto(config: Config) -> bool:
    """Whether the run's micro-batch is to be found: ``auto``, or unset on a GPU."""
    if config.micro_batch == AUTO:
        return True
    return config.micro_batch is None and resolve_device(config) == "cuda"


def candidates(config: Config) -> list[int]:
    """The micro-batch sizes this config's strategy accepts, smallest first."""
    dp = registry.get(config.strategy).data_parallel_size(config)
    local = config.global_batch // dp
    accepted = []
    for size in range(1, local + 1):
        if local % size:
            continue
        try:
            validate(dataclasses.replace(config, micro_batch=size))
        except DistlabError:
            continue
        accepted.append(size)
    return accepted


def largest_fitting(sizes: list[int], fits: Callable[[int], bool]) -> int | None:
    """The largest of ``sizes`` (ascending) for which ``fits`` holds, assuming it holds for
    every size below one that fits; None if even the smallest does not fit."""
    low, high, best = 0, len(sizes) - 1, None
    while low <= high:
        middle = (low + high + 1) // 2
        if fits(sizes[middle]):
            best, low = sizes[middle], middle + 1
        else:
            high = middle - 1
    return best


def budget_bytes(config: Config, device_type: str) -> int:
    """Bytes one rank may use: --memory-budget, else 90% of the GPU, else RAM / nproc."""
    if config.memory_budget is not None:
        return parse_bytes(config.memory_budget)
    if device_type == "cuda":
        return int(GPU_BUDGET_FRACTION * torch.cuda.get_device_properties(0).total_memory)
    return available_ram_bytes() // config.nproc


def available_ram_bytes() -> int:
    """``MemAvailable`` of /proc/meminfo (what can be allocated without swapping)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def device_name(device_type: str) -> str:
    """What the cache key calls this device: the GPU's name and memory, or the CPU."""
    if device_type == "cuda":
        props = torch.cuda.get_device_properties(0)
        return f"{props.name} ({props.total_memory} bytes)"
    return f"cpu ({os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')} bytes)"


def cache_key(config: Config, device: str) -> str:
    """Everything the largest fitting micro-batch depends on, as one string.

    The budget enters as given (``--memory-budget``, or the default's name), not as
    bytes: the default on a CPU, available RAM, moves a little from run to run.
    """
    fields = {k: v for k, v in config.to_dict().items() if k not in NOT_MEMORY_FIELDS}
    fields.update(device=device, budget=config.memory_budget or "default", torch=torch.__version__)
    return json.dumps(fields, sort_keys=True)


def read_cache(file: Path) -> dict[str, Any]:
    """The cache's entries; an unreadable cache is treated as empty (it is only a cache)."""
    try:
        entries = json.loads(file.read_text())
    except (OSError, ValueError):
        return {}
    return entries if isinstance(entries, dict) else {}


def write_cache(file: Path, key: str, entry: dict[str, Any]) -> None:
    """Add one entry (atomically: a concurrent reader sees the old or the new file)."""
    entries = read_cache(file)
    entries[key] = entry
    write_text_atomically(file, json.dumps(entries, indent=1, sort_keys=True))


def resolve_micro_batch(
    config: Config, probe: PeakProbe, say: Callable[[str], None] = print
) -> Config:
    """``config`` with ``micro_batch`` a number: auto (or unset on a GPU) found or read back."""
    if not wants_auto(config):
        return config
    device_type = resolve_device(config)
    budget = budget_bytes(config, device_type)
    device = device_name(device_type)
    file = cache_dir() / CACHE_FILE
    key = cache_key(config, device)
    cached = read_cache(file).get(key)
    if isinstance(cached, dict) and isinstance(cached.get("micro_batch"), int):
        size = cached["micro_batch"]
        say(f"micro-batch auto: {size} (cached for {device}; {file})")
        return dataclasses.replace(config, micro_batch=size)
    sizes = candidates(config)
    if not sizes:
        raise DistlabError(
            "--micro-batch auto found no micro-batch size this strategy accepts; "
            "check --global-batch and --microbatches"
        )
    peaks: dict[int, int | None] = {}

    def fits(size: int) -> bool:
        say(f"micro-batch auto: probing {size} ({PROBE_STEPS} steps)...")
        peak = probe(dataclasses.replace(config, micro_batch=size))
        peaks[size] = peak
        verdict = "out of memory" if peak is None else f"peak {gib(peak)} of {gib(budget)}"
        say(f"micro-batch auto: {size}: {verdict}")
        return peak is not None and peak <= budget

    size = largest_fitting(sizes, fits)
    if size is None:
        measured = peaks.get(sizes[0])
        raise DistlabError(
            f"micro-batch {sizes[0]} does not fit in {gib(budget)} per rank "
            f"({'out of memory' if measured is None else 'peak ' + gib(measured)}); "
            "use more ranks, a sharded strategy (fsdp, zero3), a shorter --seq-len, "
            "or a larger --memory-budget"
        )
    write_cache(
        file,
        key,
        {"micro_batch": size, "peak_bytes": peaks.get(size), "budget_bytes": budget,
         "probed": {str(k): v for k, v in sorted(peaks.items())}, "found": time.time()},
    )  # fmt: skip
    say(f"micro-batch auto: {size} (cached in {file})")
    return dataclasses.replace(config, micro_batch=size)


def gib(value: int) -> str:
    """Bytes as ``12.30 GiB``, or ``950.0 MiB`` under a GiB."""
    if value < 2**30:
        return f"{value / 2**20:.1f} MiB"
    return f"{value / 2**30:.2f} GiB"
