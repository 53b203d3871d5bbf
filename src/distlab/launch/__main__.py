"""``python -m distlab.launch``: validate the config, prepare data and run dir, start the ranks.

python -m distlab.launch --strategy fsdp --nproc 4
python -m distlab.launch --config configs/small.yaml --steps 50 --no-wandb
python -m distlab.launch --list
python -m distlab.launch --strategy fsdp --nproc 4 --model gpt2 --dry-run
python -m distlab.launch --strategy fsdp --nproc 1024 --model gpt2 --global-batch 1024 \
    --dry-run --trace
python -m distlab.launch --strategy fsdp+tp --tp 8 --nproc 64 --layers 32 --hidden 4096 \
    --heads 32 --vocab 32000 --seq-len 4096 --global-batch 64 --dry-run --trace --json
python -m distlab.launch --strategy ddp --nproc 2 --checkpoint-every 10 --max-failures 2
python -m distlab.launch --resume runs/ddp-n2-... --strategy fsdp --nproc 4 --run-dir runs/more

``--resume RUN_DIR`` continues a finished or killed run from its newest complete
checkpoint (or ``--resume RUN_DIR/checkpoints/step_N`` from that one) in a new
run dir. The source run's config.yaml is the base that ``--config`` and flags
override, so by default it trains to the source's ``--steps`` with the same
settings; ``--steps`` sets a new total (the cosine schedule is then laid over
the new total from the resumed step on). The source run dir is only read.
"""

from __future__ import annotations

import sys

from distlab.launch.spawn import start_early

if __name__ == "__main__":  # before torch is imported below: see launch.spawn.start_early
    start_early(sys.argv[1:])

from distlab.cli import OneLineErrorParser, add_config_flags, config_overrides, run_cli
from distlab.errors import DistlabError
from distlab.launch.fit import check_fits, dry_run
from distlab.launch.prepare import fit_vocabulary, inherited_config
from distlab.launch.runner import run
from distlab.strategies import registry
from distlab.strategies.resolve import load_config
from distlab.tokenizer import declared_vocab


def build_parser() -> OneLineErrorParser:
    """The launch command's flags: --config, --list and one flag per config field."""
    parser = OneLineErrorParser(
        prog="python -m distlab.launch",
        description="Train the distlab GPT with a parallelism strategy.",
    )
    parser.add_argument("--config", help="YAML file of config fields (flags override it)")
    parser.add_argument("--list", action="store_true", help="list the strategies and exit")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print rank 0's predicted peak memory by category against the memory one rank "
        "may use (--memory-budget, the GPU, or RAM / nproc) and exit; exit 2 if it does not fit",
    )
    parser.add_argument(
        "--trace",
        action="store_true",
        help="with --dry-run: trace one real training step of this layout in this process, "
        "with fake ranks and fake tensors (any --nproc, no rank started), and print torch's "
        "measured peak of rank 0 by category next to the prediction",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="with --dry-run: print the figures as one JSON object (keys predicted, and traced "
        "with --trace: category -> bytes, plus total)",
    )
    add_config_flags(parser, skip={"inject_fault"})
    parser.add_argument(
        "--inject-fault",
        dest="inject_fault",
        action="append",
        metavar="RANK@STEP[:PHASE]",
        help="testing: SIGKILL RANK when STEP steps are done; PHASE raise: raise an "
        "exception there instead; PHASE save, save-mid-shard, save-before-rename, "
        "save-after-rename, save-rotation (the last three rank 0 only): SIGKILL it at that "
        "point of writing checkpoint step_STEP; once per run; repeatable",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse flags, launch the run, return the exit status."""
    args = build_parser().parse_args(argv)
    if args.list:
        for name in registry.names():
            strategy = registry.get(name)
            flags = " ".join(f"--{option.replace('_', '-')}" for option in sorted(strategy.options))
            print(f"{name:16s} {strategy.summary}" + (f"  [{flags}]" if flags else ""))
        return 0
    overrides = config_overrides(args)
    if overrides.get("inject_fault"):
        overrides["inject_fault"] = ",".join(overrides["inject_fault"])
    base = inherited_config(overrides["resume"]) if overrides.get("resume") else None
    config = load_config(args.config, overrides, base=base)
    if (args.trace or args.json) and not args.dry_run:
        flag = "--trace" if args.trace else "--json"
        raise DistlabError(f"{flag} goes with --dry-run; add --dry-run (nothing is trained)")
    # the tokenizer's vocabulary sizes the model the dry run and the fit check describe
    config = fit_vocabulary(config, declared_vocab(config.tokenizer))
    if args.dry_run:
        return dry_run(config, args.trace, args.json)
    check_fits(config)
    run_dir = run(config)
    print(f"run dir: {run_dir}")
    return 0


if __name__ == "__main__":
    run_cli(main)
