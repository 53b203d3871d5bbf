"""One training step of distlab against its peers, on whatever device this machine has.

    PYTHONPATH=src python benchmarks/gpu_step.py --out gpu_step.json     # every row
    PYTHONPATH=src python benchmarks/gpu_step.py --only 'hand/*' '*/compile/max'
    PYTHONPATH=src python benchmarks/gpu_step.py --list                  # the row keys

Each row trains the same model shape on the same global batches (same
optimizer, precision and global batch, reached by gradient accumulation) and
times the optimizer steps after ``--warmup`` warm-up steps (compiles happen
there); its tokens/s come from the median step time. Rows, keyed RUN/MODE/SIZE:

- ``single``, ``ddp``, ``fsdp``: ``distlab.launch.runner.run`` with that strategy on one
  rank (local launcher, no W&B); step times from the run's ``metrics.jsonl``.
  MODE ``compile`` sets the config field ``compile``.
- ``hf``: Hugging Face ``transformers.GPT2LMHeadModel`` of distlab's GPT shape
  (``distlab.hf.gpt2.hf_gpt2_config``), in a hand-written loop; eager only.
- ``hand``: the same hand-written loop over distlab's GPT (``build_model``);
  MODE ``compile`` wraps it in ``torch.compile``.

SIZE ``8`` is ``--micro-batch`` (default 8); ``max`` is the largest micro-batch
that fits. distlab finds its own: ``--micro-batch auto`` (probe runs, largest
divisor of the batch whose peak stays under 90% of the GPU; cached in the
distlab cache dir, so a rerun skips the probes). For the peers, powers of two
dividing the global batch are tried from the batch downward, and a size is
skipped when a step raises ``torch.OutOfMemoryError``. The peers run in a process
of their own per row, forked like distlab's ranks (``distlab.launch.spawn``), so
each row's peak memory is its own: ``torch.cuda.max_memory_allocated`` on a GPU,
the process's peak RSS on a CPU
(``distlab.measure.memory.peak_memory_bytes`` for both). MFU is distlab's
(``distlab.model.flops_per_token`` over ``distlab.measure.mfu.peak_flops``).

Defaults: on a GPU, ``configs/gpt2-gpu.yaml`` (the gpt2 preset, 64 x 1024 tokens
per step, bf16 autocast); without one, a CPU smoke run of ``configs/tiny.yaml``
at global batch 16 (fp32, one thread per process). Progress goes to stdout as
rows start and finish; ``--out`` gets the JSON after every row, so a run cut short keeps
what it measured. Nothing here imports ray, deepspeed or wandb.
"""

from __future__ import annotations

import argparse
import fnmatch
import gc
import json
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from distlab.cli import run_cli
from distlab.config import AUTO, Config, resolved_seq_len
from distlab.config_reading import read_yaml_mapping
from distlab.data import global_batch, load_tokens, prepare_tokens
from distlab.distributed import resolve_device
from distlab.errors import DistlabError, first_line
from distlab.hf.gpt2 import hf_gpt2_config
from distlab.launch.runner import run
from distlab.launch.spawn import rank_context
from distlab.measure.compile_time import compile_seconds
from distlab.measure.memory import peak_memory_bytes
from distlab.measure.mfu import cpu_model, mfu, peak_flops
from distlab.model import PRESETS, build_model, count_parameters, flops_per_token
from distlab.optim import block_groups, build_optimizer, build_scheduler
from distlab.run.files import CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, read_jsonl
from distlab.strategies.resolve import load_config

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class DeviceDefaults:
    """What a run on one kind of device does unless flags say otherwise."""

    config: str
    """Base config file (relative to the project root)."""
    warmup: int
    """Untimed steps first (compiles happen there)."""
    steps: int
    """Timed steps after the warm-up."""
    global_batch: int | None = None
    """Sequences per step, if not the config file's."""


DEVICE_DEFAULTS = {
    "cuda": DeviceDefaults("configs/gpt2-gpu.yaml", warmup=3, steps=8),
    "cpu": DeviceDefaults("configs/tiny.yaml", warmup=2, steps=5, global_batch=16),
}

RUNS: dict[str, tuple[str, tuple[str, ...]]] = {
    "single": ("distlab single", ("eager", "compile")),
    "ddp": ("distlab ddp x1", ("eager", "compile")),
    "fsdp": ("distlab fsdp x1", ("eager", "compile")),
    "hf": ("HF GPT2LMHeadModel", ("eager",)),
    "hand": ("hand loop, distlab GPT", ("eager", "compile")),
}
"""Row runs: label and modes. single/ddp/fsdp are distlab strategies, the others peers."""
DISTLAB_RUNS = ("single", "ddp", "fsdp")


@dataclass(frozen=True)
class Row:
    """One table row: a run, eager or compiled, at the fixed or the largest micro-batch."""

    run: str
    mode: str
    size: str
    """``--micro-batch``'s value, or ``max``."""

    @property
    def key(self) -> str:
        """``RUN/MODE/SIZE``, what ``--only`` matches."""
        return f"{self.run}/{self.mode}/{self.size}"

    @property
    def label(self) -> str:
        """The table's name of the run."""
        return RUNS[self.run][0] + (" + compile" if self.mode == "compile" else "")


def all_rows(micro_batch: int) -> list[Row]:
    """Every row, eager before compiled and the fixed micro-batch before ``max``."""
    return [
        Row(run, mode, size)
        for mode in ("eager", "compile")
        for size in (str(micro_batch), "max")
        for run, (_, modes) in RUNS.items()
        if mode in modes
    ]


# --- The hand-written loop (HF's GPT-2 and distlab's GPT), in a fresh process per row -----


def build_peer(run_name: str, config: Config, compiled: bool) -> tuple[torch.nn.Module, Any]:
    """The peer's model (fp32 parameters) and its ``tokens -> logits`` function."""
    if run_name == "hf":
        from transformers import GPT2LMHeadModel

        torch.manual_seed(config.seed)
        model = GPT2LMHeadModel(hf_gpt2_config(PRESETS[config.model]))
        return model, lambda tokens: model(input_ids=tokens).logits
    model = build_model(config.model, config.seed)
    return model, (torch.compile(model, dynamic=False) if compiled else model)


def peer_steps(
    run_name: str,
    compiled: bool,
    config: Config,
    tokens: torch.Tensor,
    micro_batch: int,
    device: torch.device,
) -> dict[str, Any]:
    """Train ``config.steps`` optimizer steps; every step's time and the last step's loss."""
    model, logits_of = build_peer(run_name, config, compiled)
    model.to(device).train()
    optimizer = build_optimizer(block_groups(model), config)
    scheduler = build_scheduler(optimizer, config)
    seq_len = resolved_seq_len(config)
    accum = config.global_batch // micro_batch
    bf16 = config.precision == "bf16"
    step_times, loss = [], float("nan")
    for step in range(config.steps):
        inputs, targets = global_batch(tokens, config.seed, step, config.global_batch, seq_len)
        tic = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        for x, y in zip(inputs.split(micro_batch), targets.split(micro_batch), strict=True):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = logits_of(x.to(device, non_blocking=True))
            micro_loss = F.cross_entropy(
                logits.flatten(0, 1).float(), y.to(device, non_blocking=True).flatten()
            )
            (micro_loss / accum).backward()
            loss_sum += micro_loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        loss = (loss_sum / accum).item()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        step_times.append(time.perf_counter() - tic)
    return {
        "step_times_s": step_times,
        "final_loss": loss,
        "micro_batch": micro_batch,
        "compile_s": compile_seconds() if compiled else None,
    }


def free_memory(device: torch.device) -> None:
    """Drop compiled graphs and cached blocks after an out-of-memory attempt."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def size_candidates(size: str, global_batch_size: int) -> list[int]:
    """Micro-batches to try in order: the fixed one, or powers of two from the batch down."""
    if size != "max":
        return [int(size)]
    powers = [2**i for i in range(global_batch_size.bit_length())]
    return sorted((p for p in powers if global_batch_size % p == 0), reverse=True)


def peer_row(row: Row, config: Config, token_file: str, device_type: str) -> dict[str, Any]:
    """One peer row in this (fresh) process: the first candidate micro-batch that fits."""
    device = torch.device(device_type)
    if device.type == "cpu":
        torch.set_num_threads(config.threads_per_rank)
    tokens = load_tokens(Path(token_file))
    too_big: list[int] = []
    for micro_batch in size_candidates(row.size, config.global_batch):
        try:
            result = peer_steps(row.run, row.mode == "compile", config, tokens, micro_batch, device)
        except torch.OutOfMemoryError:
            too_big.append(micro_batch)
        else:
            note = f"out of memory at {too_big}" if too_big else ""
            return {**result, "note": note, "peak_memory_bytes": peak_memory_bytes(device)}
        free_memory(device)
    raise DistlabError(f"out of memory at every micro-batch tried ({too_big})")


# --- distlab's own runs --------------------------------------------------------------------


def distlab_row(
    row: Row, config_file: Path, overrides: dict[str, Any], work_dir: Path
) -> dict[str, Any]:
    """One distlab run on one rank; SIZE ``max`` is distlab's own ``--micro-batch auto``."""
    run_dir = work_dir / row.key.replace("/", "-")
    values = {
        **overrides,
        "strategy": row.run,
        "nproc": 1,
        "micro_batch": AUTO if row.size == "max" else int(row.size),
        "checkpoint_every": 0,
        "final_checkpoint": False,
        "launcher": "local",
        "wandb": False,
        "quiet": True,
        "run_dir": str(run_dir),
    }
    if row.mode == "compile":
        values["compile"] = True
    run(load_config(str(config_file), values))
    resolved = read_yaml_mapping(run_dir / CONFIG_FILE, f"{run_dir}'s config")
    metrics = read_jsonl(run_dir / METRICS_FILE)
    summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    shutil.rmtree(run_dir)
    return {
        "step_times_s": [m["step_time_s"] for m in metrics],
        "final_loss": summary["final_loss"],
        "micro_batch": resolved["micro_batch"],
        "note": "found by --micro-batch auto" if row.size == "max" else "",
        "compile_s": summary.get("compile_s"),
        "peak_memory_bytes": summary["peak_memory_bytes_by_rank"][0],
    }


# --- The table -----------------------------------------------------------------------------


def figures(
    result: dict[str, Any], warmup: int, tokens_per_step: int, flops: float, peak: float
) -> dict[str, float]:
    """tokens/s and MFU from the median of the steps after warm-up."""
    timed = result["step_times_s"][warmup:]
    median = statistics.median(timed)
    tokens_per_s = tokens_per_step / median
    return {
        "median_step_time_s": median,
        "timed_steps": len(timed),
        "tokens_per_s": tokens_per_s,
        "mfu": mfu(flops, tokens_per_s, peak, 1),
    }


def table(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table."""
    lines = [
        "| run | micro-batch | tokens/s | MFU | peak memory | last loss | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['label']} | {r['size']} | - | - | - | - | {r['error'][:100]} |")
            continue
        notes = [r["note"]] if r["note"] else []
        if r["compile_s"]:
            notes.append(f"compiled in {r['compile_s']:.0f} s")
        lines.append(
            f"| {r['label']} | {r['micro_batch']} | {r['tokens_per_s']:,.0f} | "
            f"{100 * r['mfu']:.3g}% | {r['peak_memory_bytes'] / 2**30:.2f} GiB | "
            f"{r['final_loss']:.4f} | {'; '.join(notes)} |"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--config", help="base config (default: per device, see --help)")
    parser.add_argument("--global-batch", type=int, help="sequences per optimizer step")
    parser.add_argument("--micro-batch", type=int, default=8, help="the fixed micro-batch")
    parser.add_argument("--warmup", type=int, help="untimed steps first (compiles happen here)")
    parser.add_argument("--steps", type=int, help="timed steps after the warm-up")
    parser.add_argument("--only", nargs="+", metavar="PATTERN", help="row keys (globs) to run")
    parser.add_argument("--list", action="store_true", help="print the row keys and exit")
    parser.add_argument("--out", type=Path, help="write the JSON results here")
    return parser


def selected_rows(micro_batch: int, patterns: list[str] | None) -> list[Row]:
    """The rows whose key matches one of ``patterns`` (all without patterns)."""
    rows = all_rows(micro_batch)
    if patterns is None:
        return rows
    chosen = [r for r in rows if any(fnmatch.fnmatch(r.key, p) for p in patterns)]
    if not chosen:
        raise DistlabError(f"--only {' '.join(patterns)} matches no row (see --list)")
    return chosen


def main() -> int:
    args = build_parser().parse_args()
    if args.list:
        print("\n".join(r.key for r in all_rows(args.micro_batch)))
        return 0
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    defaults = DEVICE_DEFAULTS[device]
    config_file = Path(args.config or ROOT / defaults.config)
    warmup = defaults.warmup if args.warmup is None else args.warmup
    total_steps = warmup + (defaults.steps if args.steps is None else args.steps)
    if warmup < 0 or total_steps <= warmup:
        raise DistlabError("--warmup must be >= 0 and --steps >= 1")
    overrides: dict[str, Any] = {"device": device, "steps": total_steps}
    global_batch_size = defaults.global_batch if args.global_batch is None else args.global_batch
    if global_batch_size is not None:
        overrides["global_batch"] = global_batch_size
    base = load_config(str(config_file), {**overrides, "micro_batch": args.micro_batch})
    resolve_device(base)  # a one-line error if a GPU is asked for and there is none
    rows = selected_rows(args.micro_batch, args.only)

    shape = PRESETS[base.model]
    seq_len = resolved_seq_len(base)
    tokens_per_step = base.global_batch * seq_len
    flops = flops_per_token(shape, seq_len)
    peak = peak_flops(torch.device(device), base.precision, base.threads_per_rank)
    token_file = prepare_tokens(base.data)
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if device == "cuda" else f"CPU: {cpu_model()}",
        "torch": torch.__version__,
        "config": str(config_file),
        "model": base.model,
        "parameters": count_parameters(shape),
        "global_batch": base.global_batch,
        "seq_len": seq_len,
        "precision": base.precision,
        "warmup_steps": warmup,
        "timed_steps": total_steps - warmup,
        "flops_per_token": flops,
        "peak_flops": peak.flops,
        "peak_flops_source": peak.source,
        "peak_memory": "torch.cuda.max_memory_allocated"
        if device == "cuda"
        else "peak RSS of the process (ru_maxrss)",
        "rows": [],
    }
    print(
        f"{report['device']}: {base.model} ({report['parameters'] / 1e6:.1f}M parameters), "
        f"{base.global_batch} x {seq_len} tokens per step, {base.precision}, "
        f"{warmup} warm-up + {total_steps - warmup} timed steps, {len(rows)} rows",
        flush=True,
    )
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_step-") as work_dir:
        for index, row in enumerate(rows, 1):
            tic = time.perf_counter()
            print(f"[{index}/{len(rows)} {tic - started:5.0f} s] {row.key} ...", flush=True)
            entry: dict[str, Any] = {"key": row.key, "label": row.label, "size": row.size}
            try:
                if row.run in DISTLAB_RUNS:
                    result = distlab_row(row, config_file, overrides, Path(work_dir))
                else:
                    # a process of its own (its peak memory is the row's), forked like a rank
                    with ProcessPoolExecutor(1, mp_context=rank_context()) as pool:
                        result = pool.submit(peer_row, row, base, str(token_file), device).result()
                entry.update(result)
                entry.update(figures(result, warmup, tokens_per_step, flops, peak.flops))
            except (DistlabError, ImportError, RuntimeError) as exc:
                entry["error"] = f"{type(exc).__name__}: {first_line(exc)}"
            entry["wall_s"] = time.perf_counter() - tic
            report["rows"].append(entry)
            status = entry.get("error") or (
                f"micro-batch {entry['micro_batch']}, {entry['tokens_per_s']:,.0f} tokens/s, "
                f"MFU {100 * entry['mfu']:.3g}%"
            )
            print(
                f"[{index}/{len(rows)} {time.perf_counter() - started:5.0f} s] {row.key}: "
                f"{status} ({entry['wall_s']:.0f} s)",
                flush=True,
            )
            report["wall_s"] = time.perf_counter() - started
            if args.out:
                args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(table(report["rows"]))
    return 0


if __name__ == "__main__":
    run_cli(main)
