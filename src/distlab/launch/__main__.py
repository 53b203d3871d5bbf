"""``python -m distlab.launch``: validate the config, prepare data and run dir, start the ranks.

python -m distlab.launch --strategy fsdp --nproc 4
python -m distlab.launch --config configs/small.yaml --steps 50 --no-wandb
python -m distlab.launch --list
"""

from __future__ import annotations

from distlab.cli import OneLineErrorParser, add_config_flags, config_overrides, run_cli
from distlab.config import load_config
from distlab.launch import run
from distlab.strategies import registry


def build_parser() -> OneLineErrorParser:
    """The launch command's flags: --config, --list and one flag per config field."""
    parser = OneLineErrorParser(
        prog="python -m distlab.launch",
        description="Train the distlab GPT with a parallelism strategy.",
    )
    parser.add_argument("--config", help="YAML file of config fields (flags override it)")
    parser.add_argument("--list", action="store_true", help="list the strategies and exit")
    add_config_flags(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse flags, launch the run, return the exit status."""
    args = build_parser().parse_args(argv)
    if args.list:
        for name in registry.names():
            print(f"{name:16s} {registry.describe(name).summary}")
        return 0
    config = load_config(args.config, config_overrides(args))
    run_dir = run(config)
    print(f"run dir: {run_dir}")
    return 0


if __name__ == "__main__":
    run_cli(main)
