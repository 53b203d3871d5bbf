"""``python -m distlab.plan`` (``distlab plan``): which layout, how much memory per GPU
and how fast, for a model on a cluster; ``--calibrate`` fits this machine from runs.

    python -m distlab.plan --model gpt2 --gpus cpu --nproc 2 --global-batch 8
    python -m distlab.plan --params 7.5e9 --gpus 64 --gpu a100-80gb --zero 3
    python -m distlab.plan --layers 126 --hidden 16384 --heads 128 --kv-heads 8 \\
        --ffn-hidden 53248 --gated-mlp --vocab 128000 --seq-len 8192 --gpus 8192 \\
        --gpu h100-sxm --global-batch 2048 --precision mixed --tp 8 --pp 16
    python -m distlab.plan --calibrate runs/compare/* --calibration cpu.json

Prints the best layouts as a table (memory per GPU by category, step time split into
compute, exposed communication and bubble, tokens/s, TFLOP/s and MFU) and draws them
(``--plot``); ``--json`` prints every layout as JSON instead. ``--trace`` traces one
step of the pick in the lab, with fake ranks at its full GPU count
(``distlab.train.trace``), and prints torch's measured memory per GPU beside the plan's.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from functools import partial
from pathlib import Path

from distlab.cli import OneLineErrorParser, run_cli
from distlab.errors import DistlabError
from distlab.launch.fit import side_by_side
from distlab.plan.calibrate import fit, fit_matmul_rates, write_calibration
from distlab.plan.hardware import GPUS, cpu_device, device_spec
from distlab.plan.layout import ACTIVATION_CHECKPOINTING, PRECISIONS
from distlab.plan.memory import lab_config
from distlab.plan.render import picture, table
from distlab.plan.runs import read_runs
from distlab.plan.search import Plan, lab_command, search, search_rank_counts
from distlab.plan.shape import ModelShape, from_parameter_count, from_preset, with_seq_len
from distlab.strategies.pipeline_schedules import SCHEDULES
from distlab.train.trace import check_traceable, trace_step

SHAPE_FLAGS = ("layers", "hidden", "heads", "vocab")
DEFAULT_GPU = "h100-sxm"
FIXED = (
    "dp",
    "tp",
    "pp",
    "cp",
    "ep",
    "zero",
    "ac",
    "microbatches",
    "schedule",
    "sequence_parallel",
)
"""Layout settings a flag can fix (the rest are searched)."""


def parser() -> OneLineErrorParser:
    """The command's flags."""
    p = OneLineErrorParser(prog="distlab plan", description=__doc__.split("\n\n")[0])
    model = p.add_argument_group("model (a preset, a shape, or a parameter count)")
    model.add_argument("--model", help="a lab preset: tiny, small, gpt2, tiny-moe, small-moe")
    for name in SHAPE_FLAGS:
        model.add_argument(f"--{name}", type=int)
    model.add_argument("--seq-len", type=int, help="tokens per sequence")
    model.add_argument("--ffn-hidden", type=int, default=0, help="MLP width (default 4 x hidden)")
    model.add_argument("--kv-heads", type=int, default=0, help="key/value heads (default: --heads)")
    model.add_argument("--gated-mlp", action="store_true", help="SwiGLU MLP (three matrices)")
    model.add_argument("--experts", type=int, default=0, help="MoE: experts per layer")
    model.add_argument("--top-k", type=int, default=2, help="MoE: experts per token")
    model.add_argument("--params", type=float, help="parameter count; the shape follows a rule")
    cluster = p.add_argument_group("cluster")
    cluster.add_argument(
        "--gpus", default="8", help="GPU count, or 'cpu' for this machine (with --nproc ranks)"
    )
    cluster.add_argument(
        "--nproc", type=int, help="with --gpus cpu: ranks (default: search 1 to 2 x the cores)"
    )
    cluster.add_argument("--gpu", help=f"one of: {', '.join(GPUS)} (default h100-sxm)")
    cluster.add_argument("--gpu-spec", type=Path, help="a JSON device file instead of --gpu")
    cluster.add_argument("--gpus-per-node", type=int, help="default: the device's (8)")
    cluster.add_argument("--calibration", type=Path, help="a fitted device (from --calibrate)")
    step = p.add_argument_group("training step")
    step.add_argument("--global-batch", type=int, default=16, help="sequences per step")
    step.add_argument("--precision", default="bf16", choices=PRECISIONS)
    layout = p.add_argument_group("fixed degrees and settings (searched when left out)")
    for name in ("dp", "tp", "pp", "cp", "ep", "microbatches"):
        layout.add_argument(f"--{name}", type=int)
    layout.add_argument("--zero", type=int, choices=(0, 1, 2, 3))
    layout.add_argument("--ac", choices=ACTIVATION_CHECKPOINTING)
    layout.add_argument("--schedule", choices=tuple(SCHEDULES))
    layout.add_argument(
        "--sequence-parallel",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="tensor parallelism splits norms and residuals too (default: on GPUs with tp)",
    )
    out = p.add_argument_group("output")
    out.add_argument("--top", type=int, default=10, help="layouts shown (default 10)")
    out.add_argument("--json", action="store_true", help="print every layout as JSON")
    out.add_argument(
        "--trace",
        action="store_true",
        help="trace one step of the pick in the lab with fake ranks (no GPU needed) and print "
        "its measured memory per GPU beside the plan's (with --json: one object)",
    )
    out.add_argument("--plot", default="runs/plan/plan.png", help="picture path, or 'none'")
    out.add_argument(
        "--calibrate",
        nargs="+",
        type=Path,
        metavar="RUN_DIR",
        help="fit this machine's constants to these runs (or a GPU's matmuls to a "
        "benchmarks/matmul_rate.py JSON, with --gpu) and write --calibration",
    )
    return p


def model_shape(args) -> ModelShape:  # noqa: ANN001 (argparse namespace)
    """The model from ``--model``, the shape flags or ``--params``."""
    for name in (*SHAPE_FLAGS, "seq_len"):
        n = getattr(args, name)
        if n is not None and n < 1:
            raise DistlabError(f"--{name.replace('_', '-')} {n}: must be at least 1")
    given = [name for name in SHAPE_FLAGS if getattr(args, name) is not None]
    chosen = sum([args.model is not None, bool(given), args.params is not None])
    if chosen != 1:
        raise DistlabError(
            "give the model one way: --model PRESET, or --layers --hidden --heads --vocab "
            "--seq-len, or --params N"
        )
    if args.model is not None:
        return with_seq_len(from_preset(args.model), args.seq_len)
    if args.params is not None:
        return from_parameter_count(args.params, args.seq_len or 2048, args.vocab or 51200)
    missing = [f"--{n}" for n in (*SHAPE_FLAGS, "seq_len") if getattr(args, n) is None]
    if missing:
        raise DistlabError(f"a model shape needs {' '.join(missing).replace('_', '-')} too")
    if args.hidden % args.heads:
        raise DistlabError(f"--hidden {args.hidden} is not divisible by --heads {args.heads}")
    return ModelShape(
        name=f"{args.layers}x{args.hidden}",
        layers=args.layers,
        hidden=args.hidden,
        heads=args.heads,
        vocab=args.vocab,
        seq_len=args.seq_len,
        ffn_hidden=args.ffn_hidden,
        kv_heads=args.kv_heads,
        gated_mlp=args.gated_mlp,
        biases=not args.gated_mlp,
        experts=args.experts,
        top_k=args.top_k,
    )


def read_matmul_rates(path: Path) -> list[dict]:
    """The rows of a ``benchmarks/matmul_rate.py`` JSON file."""
    try:
        rows = json.loads(path.read_text())["rows"]
    except FileNotFoundError:
        raise DistlabError(f"--calibrate {path}: no such file") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DistlabError(
            f"--calibrate {path}: not a matmul-rate JSON with 'rows' ({exc})"
        ) from None
    return rows


def calibrate(args) -> int:  # noqa: ANN001
    """``--calibrate``: fit a device to runs and write the calibration file. The device is
    this machine's CPU unless ``--gpu`` or ``--gpu-spec`` names one (then the runs are that
    GPU's, e.g. from ``benchmarks/plan_gpu_runs.sh``)."""
    target = args.calibration or Path("runs/plan/calibration.json")
    if args.gpu is None and args.gpu_spec is None:
        base = cpu_device()
    else:
        base = device_spec(args.gpu or DEFAULT_GPU, args.gpu_spec)
    if len(args.calibrate) == 1 and args.calibrate[0].suffix == ".json":
        rows = read_matmul_rates(args.calibrate[0])
        sys.stderr.write(f"fitting {base.name}'s matmuls to {len(rows)} measured rates ...\n")
        device = fit_matmul_rates(rows, base)
    else:
        runs = read_runs(args.calibrate)
        sys.stderr.write(f"fitting {base.name} to {len(runs)} runs ...\n")
        device = fit(runs, base)
    write_calibration(device, target)
    print(f"calibration written to {target} ({device.notes[0]})")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Plan (or calibrate); ``distlab: error: ...`` and exit 2 on bad input."""
    args = parser().parse_args(argv)
    if args.calibrate:
        return calibrate(args)
    shape = model_shape(args)
    if args.gpus == "cpu":
        device = device_spec("cpu", args.gpu_spec, args.calibration)
        gpus = args.nproc or device.cores  # without --nproc: every rank count (below)
    else:
        try:
            gpus = int(args.gpus)
        except ValueError:
            raise DistlabError(f"--gpus {args.gpus}: give a GPU count or 'cpu'") from None
        device = device_spec(args.gpu or DEFAULT_GPU, args.gpu_spec, args.calibration)
    if gpus < 1:
        raise DistlabError(f"--gpus {gpus}: need at least one")
    if args.gpus_per_node:
        device = replace(device, gpus_per_node=args.gpus_per_node)
    for name in ("global_batch", "top", "nproc", "gpus_per_node"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise DistlabError(f"--{name.replace('_', '-')} {getattr(args, name)}: at least 1")
    fixed = {name: getattr(args, name) for name in FIXED if getattr(args, name) is not None}
    if args.gpus == "cpu" and args.nproc is None:
        plans = search_rank_counts(shape, args.global_batch, args.precision, device, fixed)
        where = f"1 to {max(plan.gpus for plan in plans)} ranks on this machine's CPU"
    else:
        plans = search(shape, gpus, args.global_batch, args.precision, device, fixed)
        where = f"{gpus} x {device.name}"
    if args.trace:
        return trace_pick(shape, plans[0], args.global_batch, args.precision, args.json)
    if args.json:
        print(json.dumps([plan.to_dict() for plan in plans], indent=1))
        return 0
    fitting = sum(plan.fits for plan in plans)
    print(shape.describe())
    print(f"device: {device.source}")
    if args.gpus == "cpu" and args.calibration is None:
        print(
            "uncalibrated: fit this machine to its runs with `python -m distlab.plan "
            "--calibrate runs/compare/* --calibration cpu.json`, then pass --calibration cpu.json"
        )
    print(
        f"{where}, global batch {args.global_batch}, {args.precision}: {len(plans)} layouts, "
        f"{fitting} fit in memory\n"
    )
    print(table(plans, args.top))
    command = lab_command(shape, plans[0].layout, args.global_batch, args.precision)
    if command:
        print(f"\nrun the pick in the lab: {command}")
    if args.plot != "none":
        title = f"{shape.name} on {where}, global batch {args.global_batch}"
        path = picture(plans, args.top, Path(args.plot), title, device.memory_bytes)
        print(f"\npicture: {path}")
    return 0


def trace_pick(
    shape: ModelShape, plan: Plan, global_batch: int, precision: str, as_json: bool
) -> int:
    """``--trace``: one step of the pick traced in the lab, its memory beside the plan's."""
    config = lab_config(shape, plan.layout, global_batch, precision)
    if config is None:
        raise DistlabError(
            f"--trace: the lab cannot run the pick ({plan.layout.label()}, {precision}): it "
            "runs plain GPT shapes in fp32 or bf16 with a lab strategy"
        )
    check_traceable(config)
    if not as_json:
        print(f"tracing the pick ({plan.layout.label()}) at {config.nproc:,} fake ranks ...")
    traced = trace_step(config)
    measured = {**traced.by_category, "total": traced.total}
    if as_json:
        figures = {"pick": plan.to_dict(), "lab_strategy": config.strategy}
        print(json.dumps({**figures, "traced": measured, "planned": plan.memory.to_dict()}))
        return 0
    print(
        f"lab strategy {config.strategy}, one step traced in {traced.seconds:.1f} s; "
        f"planned by the {plan.memory.source}"
    )
    print(side_by_side(traced.by_category, plan.memory.by_category, "planned"))
    return 0


def cli() -> None:
    """Entry point with one-line errors."""
    run_cli(partial(main, sys.argv[1:]))


if __name__ == "__main__":
    cli()
