"""Per-rank memory of each strategy, measured by torch's tracker, against the theory.

    python benchmarks/memory_table.py      # every strategy, 2 and 4 ranks, --ac none and full
    python benchmarks/memory_table.py --strategies ddp zero2 zero3 --nproc 2 --ac none
    python benchmarks/memory_table.py --variants zero3:offload=params,micro_batch=2

Runs each strategy for a few AdamW steps (tiny model, CPU, no W&B) and fills
two generated sections of ``docs/memory.md``, each with the command that
produced it:

- ``memory-peak``: rank 0's peak of the last step by category, measured by
  torch's ``MemTracker`` (``summary.json``'s ``memory_peak_by_rank``) next to
  ``distlab.theory.memory.predict_peak``, with and without ``--ac full``;
- ``memory-inventory``: the cross-check of the model state alone
  (``model_state_bytes_per_rank``, summed from the tensors the strategy holds)
  against ``Strategy.predicted_state_bytes``.

By default every registered strategy but ``single`` (and ``ep``, a variant) is measured, so a newly
registered strategy shows up without editing this script; one that cannot run
at a world size (its ``validate`` refuses, or its library is missing) gets a
row that says why. ``--variants`` adds runs with extra config fields
(``NAME:field=value,...``), by default the ZeRO offload modes and ``ep`` on
the MoE preset it needs.
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
from distlab.launch.runner import run
from distlab.measure.step_memory import CATEGORIES
from distlab.report.markdown import fill_marked_section
from distlab.strategies import registry
from distlab.strategies.resolve import load_config
from distlab.theory.memory import nearest_moment, predict_peak

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_VARIANTS = ["zero2:offload=optimizer", "zero3:offload=params", "ep:model=tiny-moe"]
KIB = 1024


@dataclass
class Row:
    """One measured (or skipped) run."""

    label: str
    nproc: int
    ac: str = "none"
    measured: dict[str, int] | None = None
    predicted: dict[str, int] | None = None
    peak: dict | None = None
    """Rank 0's tracked peak (``memory_peak_by_rank[0]``)."""
    predicted_peak: dict | None = None
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


MODEL_PARALLEL_DEGREES = [
    {},
    {"tp": "2"},
    {"pp": "2"},
    {"cp": "2"},
    {"tp": "2", "pp": "2"},
    {"cp": "2", "tp": "2"},
    {"cp": "2", "pp": "2"},
]
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


def resolve(name: str, fields: dict[str, str], nproc: int, ac: str, args) -> tuple[Config, dict]:
    """The config to run: ``fields`` as given, or the first model-parallel degrees that validate."""
    candidates = [fields] if fields else MODEL_PARALLEL_DEGREES
    first_error = None
    for candidate in candidates:
        overrides = {**base_overrides(name, nproc, args), **candidate, "ac": ac}
        try:
            return load_config(None, overrides), candidate
        except DistlabError as exc:
            first_error = first_error or exc
    raise first_error


def measure(
    name: str, fields: dict[str, str], nproc: int, ac: str, args: argparse.Namespace, workdir: Path
) -> Row:
    """Run one strategy (or reuse a finished run in ``workdir``) and read its summary."""
    try:
        config, fields = resolve(name, fields, nproc, ac, args)
    except DistlabError as exc:
        return Row(label(name, fields), nproc, ac, note=f"not run: {exc}")
    row = Row(label(name, fields), nproc, ac)
    slug = "-".join([name, f"n{nproc}", f"ac-{ac}", *(f"{k}-{v}" for k, v in fields.items())])
    config.run_dir = str(workdir / f"{slug}-{args.model}-s{args.steps}")
    summary_file = Path(config.run_dir) / "summary.json"
    try:
        if not summary_file.is_file():
            print(f"running {row.label} x{nproc} --ac {ac} ...", file=sys.stderr, flush=True)
            run(config)
    except DistlabError as exc:
        row.note = f"failed: {exc}"
        return row
    summary = json.loads(summary_file.read_text())
    row.measured = summary["model_state_bytes_per_rank"]
    row.parameters = summary["parameters"]
    row.peak = summary["memory_peak_by_rank"][0]
    # Recomputed rather than read from the summary, so reused runs show the current theory.
    strategy = registry.get(name)
    row.predicted = strategy.predicted_state_bytes(config, row.parameters).to_dict()
    row.predicted_peak = predict_peak(config).to_dict()
    return row


def kib(value: int) -> str:
    return f"{value / KIB:,.1f}"


def category_ratio(measured: int, predicted: int) -> str:
    """``1.00``; a category the theory or the tracker has as zero shows both sizes."""
    if measured == predicted == 0:
        return ""
    if measured == 0 or predicted == 0:
        return f"{kib(measured)} / {kib(predicted)} KiB"
    return f"{measured / predicted:.2f}"


SHOWN_CATEGORIES = [c for c in CATEGORIES if c != "other"]
COLUMNS = [*SHOWN_CATEGORIES[:5], "act+temp", *SHOWN_CATEGORIES[5:]]
"""Activations and temporaries also together: under checkpointing torch's tracker may file
recomputed tensors under either (its documented limitation)."""


def header(command: str, args: argparse.Namespace, what: str) -> list[str]:
    import torch

    return [
        "Generated by:",
        "",
        "```",
        command,
        "```",
        "",
        f"Model `{args.model}`, global batch {args.global_batch}, AdamW, fp32, {args.steps} "
        f"steps (the last one measured), CPU/gloo, torch {torch.__version__}, "
        f"{time.strftime('%Y-%m-%d')}. {what}",
        "",
    ]


def peak_markdown(rows: list[Row], command: str, args: argparse.Namespace) -> str:
    """The ``memory-peak`` section: tracked peak vs predicted, total and by category."""
    lines = header(
        command,
        args,
        "Rank 0's peak in KiB, measured and predicted; *phase / moment* is the phase the "
        "tracker saw the peak in and the theory's moment it is compared with (of the "
        "moments within 5% of the predicted peak, the nearest by category: "
        "`theory.memory.nearest_moment`); per category the ratio measured / that moment "
        "(a category one side has as zero shows both sizes).",
    )
    lines += [
        "| strategy | ranks | --ac | measured | predicted | ratio | phase / moment | "
        + " | ".join(COLUMNS)
        + " |",
        "|---|---:|---|---:|---:|---:|---|" + "---:|" * len(COLUMNS),
    ]
    for row in rows:
        if row.peak is None or row.predicted_peak is None:
            lines.append(f"| {row.label} | {row.nproc} | {row.ac} | {row.note} |")
            continue
        m, p = row.peak, row.predicted_peak
        moment = nearest_moment(p, m["peak_by_category"])
        got, want = m["peak_by_category"], moment["by_category"]
        cells = [category_ratio(got[c], want[c]) for c in SHOWN_CATEGORIES]
        act_temp = category_ratio(
            got["activations"] + got["temporaries"], want["activations"] + want["temporaries"]
        )
        cells.insert(SHOWN_CATEGORIES.index("temporaries") + 1, act_temp)
        lines.append(
            f"| {row.label} | {row.nproc} | {row.ac} | {kib(m['peak'])} | {kib(p['total'])} "
            f"| {m['peak'] / p['total']:.3f} | {m['peak_phase']} / {moment['name']} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines)


def inventory_markdown(rows: list[Row], command: str, args: argparse.Namespace) -> str:
    """The ``memory-inventory`` section: model-state bytes summed from the held tensors."""
    parameters = next((r.parameters for r in rows if r.parameters), 0)
    lines = header(
        command,
        args,
        f"{parameters:,} parameters. Bytes of rank 0, in KiB; B/param is the measured "
        "total per model parameter.",
    )
    lines += [
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
    return "\n".join(lines)


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
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--ac", nargs="+", default=["none", "full"], help="--ac modes to run")
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "memory.md")
    parser.add_argument("--workdir", type=Path, help="keep (and reuse) the runs here")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # single is the reference; ep runs as a variant, on the MoE preset it needs.
    names = args.strategies or [n for n in registry.names() if n not in ("single", "ep")]
    runs = [(name, {}) for name in names]
    runs += [parse_variant(v) for v in args.variants if parse_variant(v)[0] in registry.names()]
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="distlab-memory-"))
    rows = [
        measure(name, fields, nproc, ac, args, workdir)
        for name, fields in runs
        for nproc in args.nproc
        for ac in args.ac
    ]
    command = ("python benchmarks/memory_table.py " + shlex.join(without_workdir(argv))).strip()
    fill_marked_section(args.out, "memory-peak", peak_markdown(rows, command, args))
    plain = [row for row in rows if row.ac == "none"]
    fill_marked_section(args.out, "memory-inventory", inventory_markdown(plain, command, args))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
