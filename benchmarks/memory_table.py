"""Per-rank model-state memory of each strategy, measured against its prediction.

    python benchmarks/memory_table.py      # every registered strategy, 2 and 4 ranks
    python benchmarks/memory_table.py --strategies ddp zero2 zero3 --nproc 2
    python benchmarks/memory_table.py --variants zero3:offload=params,micro_batch=2

Runs each strategy for a couple of AdamW steps (tiny model, CPU, no W&B),
reads ``model_state_bytes_per_rank`` (rank 0's params, grads and optimizer
state, measured from the tensors the strategy holds) from each run's
``summary.json``, compares it with ``Strategy.predicted_state_bytes`` and
writes a Markdown table to ``docs/memory.md`` with the command that produced it.

By default every registered strategy except ``single`` is measured, so a newly
registered strategy shows up without editing this script; one that cannot run
at a world size (its ``validate`` refuses, or its library is missing) gets a
row that says why. ``--variants`` adds runs with extra config fields
(``NAME:field=value,...``), by default the ZeRO offload modes.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from distlab.config import Config
from distlab.errors import DistlabError
from distlab.launch import run
from distlab.strategies import registry
from distlab.strategies.resolve import load_config

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_VARIANTS = ["zero2:offload=optimizer", "zero3:offload=params"]
KIB = 1024

EXPLANATION = """\
## What is counted

*Measured* is rank 0's bytes in the tensors the strategy actually holds, each
storage counted once (views of one buffer are not double-counted):

- **params**: the model parameters as the rank stores them (FSDP/ZeRO-3: its shards).
- **grads**: gradient storage. DDP/FSDP/fairscale: the ``.grad`` tensors after
  the optimizer step. DeepSpeed frees gradients inside its step, so they are
  sampled when autograd finishes and again after DeepSpeed's end-of-backward
  reduction, and the larger is reported: the parameters' ``.grad``, the
  reduction buckets and the reduced gradient partitions.
- **optimizer**: optimizer state tensors (AdamW's two moments and step), plus,
  for DeepSpeed, the fp32 master copy of the rank's parameter slice.

*Predicted* is each strategy's ``predicted_state_bytes``: the ZeRO paper's
count for fp32 AdamW (4 B/param params, 4 grads, 8 optimizer state; each
divided by the degree it is sharded over), plus the terms below where a
library keeps more than the paper counts.

## Terms beyond the ZeRO paper

P is the parameter count, N the number of ranks, B the DeepSpeed bucket size,
P0 rank 0's share where a library shards whole tensors.

- **fp32 master slice** (zero1/2/3): +4 P / N, optimizer. DeepSpeed's optimizer
  updates a separate fp32 copy of the rank's slice of the flat parameters, even
  when the model is fp32 (it is built for bf16/fp16 models, where that copy is
  the master weights). Counted with the optimizer state, as the paper counts
  master weights: optimizer = (4 + 8) P / N.
- **gradient bucket** (zero1/2/3): +4 B, grads, with B = P / 8 elements.
  Backward copies gradients into a contiguous bucket before reducing it.
  DeepSpeed's default bucket (5e8 elements, 2 GB) exceeds every lab model and
  would be a full gradient copy; distlab sets P / 8. A fixed cost: it does not
  shrink with N.
- **whole tensors** (zero2 without offload): grads = 4 P0 + 4 B. The reduced
  gradient partition holds every tensor that overlaps the rank's 1/N slice
  whole, so P0, the elements of those tensors, exceeds P / N by up to one
  tensor; the prediction replays DeepSpeed's flat layout.
- **full gradients** (zero1): grads = 4 P + 4 B. DeepSpeed's ZeRO-1 keeps full
  gradients until the end of backward and only then reduces them to the rank's
  4 P / N slice: the peak is the full size, as the paper counts for ZeRO-1.
- **accumulated slice** (zero2 with gradient accumulation): +4 P0, grads.
  With several micro-batches per step, ZeRO-2 keeps the reduced slice of the
  earlier micro-batches apart from the one being reduced (ZeRO-1 accumulates in
  the full gradients, ZeRO-3 in its partition).
- **offload buffers** (zero1/2 with offload): +2 x 4 x (largest tensor) grads,
  two staging buffers for gradients on their way to the CPU, and +4 P / N
  optimizer, the updated slice staged on its way back. The CPU optimizer's
  fp32 gradient slice is +4 P / N grads for zero1 and zero3 (zero2 reduces
  straight into it instead of into a partition).
- **bf16 bucket** (zero1/2/3 with bf16): +4 B grads (zero3: +2 B). With
  ``torch_autocast`` DeepSpeed reduces matmul-weight gradients in bf16,
  through a bucket of their own (ZeRO-1/2 stage it in fp32).
- **uneven shards** (fairscale-oss/sdp): optimizer 8 P0, sdp also grads 4 P0.
  OSS gives whole tensors to ranks, each to the least-loaded one, so rank 0
  owns P0 elements, not exactly P / N; the prediction replays that assignment.
- **none** (ddp, fsdp): DDP's gradients are views of its communication buckets
  (``gradient_as_bucket_view``); FSDP2 pads dim 0 to a multiple of N (a few
  elements).

Other strategies (tensor, pipeline parallel and their compositions) explain
their predictions in their own module docstrings.

Not counted anywhere: activations, temporarily gathered parameters (FSDP,
ZeRO-3) and communication staging that lives only inside a collective.
"""


@dataclass
class Row:
    """One measured (or skipped) run."""

    label: str
    nproc: int
    measured: dict[str, int] | None = None
    predicted: dict[str, int] | None = None
    parameters: int = 0
    note: str = ""


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    """``zero3:offload=params,micro_batch=2`` -> ("zero3", {"offload": "params", ...})."""
    name, _, settings = text.partition(":")
    fields = {}
    for item in filter(None, settings.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"memory_table: variant '{text}' must look like NAME:field=value,...")
        fields[key.strip().replace("-", "_")] = value.strip()
    return name, fields


def label(name: str, fields: dict[str, str]) -> str:
    """``zero3 (offload params, micro batch 2)``."""
    settings = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in fields.items())
    return f"{name} ({settings})" if settings else name


MODEL_PARALLEL_DEGREES = [{}, {"tp": "2"}, {"pp": "2"}, {"tp": "2", "pp": "2"}]
"""Tried in turn for a strategy without explicit fields, so composed ones (fsdp+tp, ...) run."""


def base_overrides(name: str, nproc: int, args: argparse.Namespace) -> dict:
    return {
        "strategy": name,
        "nproc": nproc,
        "model": args.model,
        "steps": args.steps,
        "global_batch": args.global_batch,
        "optimizer": "adamw",
        "device": "cpu",
        "launcher": "local",
        "wandb": False,
        "quiet": True,
        "warmup_steps": 1,
    }


def resolve(name: str, fields: dict[str, str], nproc: int, args) -> tuple[Config, dict]:
    """The config to run: ``fields`` as given, or the first model-parallel degrees that validate."""
    candidates = [fields] if fields else MODEL_PARALLEL_DEGREES
    first_error = None
    for candidate in candidates:
        try:
            return load_config(None, {**base_overrides(name, nproc, args), **candidate}), candidate
        except DistlabError as exc:
            first_error = first_error or exc
    raise first_error


def measure(
    name: str, fields: dict[str, str], nproc: int, args: argparse.Namespace, workdir: Path
) -> Row:
    """Run one strategy (or reuse a finished run in ``workdir``) and read its summary."""
    try:
        config, fields = resolve(name, fields, nproc, args)
    except DistlabError as exc:
        return Row(label(name, fields), nproc, note=f"not run: {exc}")
    row = Row(label(name, fields), nproc)
    slug = "-".join([name, f"n{nproc}", *(f"{k}-{v}" for k, v in fields.items())])
    config.run_dir = str(workdir / f"{slug}-{args.model}-s{args.steps}")
    summary_file = Path(config.run_dir) / "summary.json"
    try:
        if not summary_file.is_file():
            print(f"running {row.label} x{nproc} ...", file=sys.stderr, flush=True)
            run(config)
    except DistlabError as exc:
        row.note = f"failed: {exc}"
        return row
    summary = json.loads(summary_file.read_text())
    row.measured = summary["model_state_bytes_per_rank"]
    row.parameters = summary["parameters"]
    # Recomputed rather than read from the summary, so reused runs show the current theory.
    strategy = registry.describe(name)
    row.predicted = strategy.predicted_state_bytes(config, row.parameters).to_dict()
    return row


def kib(value: int) -> str:
    return f"{value / KIB:,.1f}"


def markdown(rows: list[Row], command: str, args: argparse.Namespace) -> str:
    """The whole docs/memory.md page."""
    import torch

    parameters = next((r.parameters for r in rows if r.parameters), 0)
    lines = [
        "# Model-state memory per rank: measured vs predicted",
        "",
        "Generated by:",
        "",
        "```",
        command,
        "```",
        "",
        f"Model `{args.model}` ({parameters:,} parameters), AdamW, fp32, {args.steps} steps, "
        f"CPU/gloo, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}. "
        "Bytes of rank 0, in KiB; B/param is the measured total per model parameter.",
        "",
        "| strategy | ranks | params | grads | optimizer | total | B/param | predicted "
        "| measured / predicted |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        if row.measured is None:
            lines.append(f"| {row.label} | {row.nproc} | | | | | | | {row.note} |")
            continue
        m, p = row.measured, row.predicted
        ratio = m["total"] / p["total"] if p and p["total"] else float("nan")
        lines.append(
            f"| {row.label} | {row.nproc} | {kib(m['params'])} | {kib(m['grads'])} "
            f"| {kib(m['optimizer'])} | {kib(m['total'])} | {m['total'] / row.parameters:.2f} "
            f"| {kib(p['total'])} | {ratio:.3f} |"
        )
    return "\n".join([*lines, "", EXPLANATION])


def without_workdir(argv: list[str] | None) -> list[str]:
    """The arguments minus ``--workdir DIR``, which only caches runs (for the page's command)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "--workdir" in args:
        index = args.index("--workdir")
        del args[index : index + 2]
    return [a for a in args if not a.startswith("--workdir=")]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--strategies",
        nargs="*",
        help="strategy names (default: every registered strategy except single)",
    )
    parser.add_argument(
        "--variants",
        nargs="*",
        default=DEFAULT_VARIANTS,
        help="extra runs as NAME:field=value,... (default: %(default)s)",
    )
    parser.add_argument("--nproc", nargs="+", type=int, default=[2, 4])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "memory.md")
    parser.add_argument("--workdir", type=Path, help="keep (and reuse) the runs here")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    names = args.strategies or [n for n in registry.names() if n != "single"]
    runs = [(name, {}) for name in names]
    runs += [parse_variant(v) for v in args.variants if parse_variant(v)[0] in registry.names()]
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="distlab-memory-"))
    rows = [
        measure(name, fields, nproc, args, workdir) for name, fields in runs for nproc in args.nproc
    ]
    command = "python benchmarks/memory_table.py " + shlex.join(without_workdir(argv))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown(rows, command.strip(), args))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
