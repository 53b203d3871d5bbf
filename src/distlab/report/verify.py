"""``python -m distlab.verify``: check a strategy's parity with the single-process run.

    python -m distlab.verify --strategy fsdp --nproc 4
    python -m distlab.verify --strategy ddp --nproc 2 --optimizer sgd --steps 8
    python -m distlab.verify --strategy fsdp --nproc 2 --compile   # compiled vs eager single
    python -m distlab.verify --strategy fsdp --nproc 2 --precision bf16
    python -m distlab.verify --strategy ep --nproc 4 --model tiny-moe  # a MoE preset

Prints a per-step loss comparison for each optimizer and exits 1 if any step
or final weight is outside the tolerance: the same per-strategy, per-optimizer,
per-precision tolerance the tests hold the strategy to
(``distlab.report.parity.tolerance``). With ``--precision bf16`` both runs are
bf16 and the tolerance is bf16's (derived for the default 5 steps).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from distlab.cli import OneLineErrorParser, add_config_flags, config_overrides, run_cli
from distlab.config_checks import OPTIMIZERS
from distlab.config_reading import FIELD_TYPES
from distlab.errors import DistlabError
from distlab.report.parity import PARITY_STEPS, ParityReport, compare, parity_config
from distlab.strategies import registry


def shape_fields() -> set[str]:
    """The config fields verify passes on: every strategy option, the micro-batch, compile,
    the precision and the model (tiny unless given: ``--model tiny-moe`` for MoE)."""
    return set(registry.option_users()) | {"micro_batch", "compile", "precision", "model"}


def build_parser() -> OneLineErrorParser:
    """Flags: the strategy and its shape, optimizers and steps."""
    parser = OneLineErrorParser(
        prog="python -m distlab.verify", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--strategy", required=True)
    parser.add_argument("--nproc", type=int, required=True)
    parser.add_argument("--optimizer", choices=[*OPTIMIZERS, "both"], default="both")
    parser.add_argument("--steps", type=int, default=PARITY_STEPS)
    # The strategies' own options (``Strategy.options``), micro-batch and precision, as in launch.
    add_config_flags(parser, skip=set(FIELD_TYPES) - shape_fields())
    parser.add_argument("--workdir", help="keep the runs here (default: a temporary dir)")
    return parser


def report_table(title: str, report: ParityReport) -> Table:
    """The per-step comparison as a table."""
    table = Table(title=title)
    for column in ("step", "single loss", "strategy loss", "rel. diff"):
        table.add_column(column, justify="right")
    for step, (ref, loss, diff) in enumerate(
        zip(report.reference_losses, report.losses, report.rel_diffs, strict=True)
    ):
        style = "" if diff <= report.loss_rtol else "bold red"
        table.add_row(str(step), f"{ref:.7f}", f"{loss:.7f}", f"{diff:.2e}", style=style)
    validation = zip(
        report.reference_val_losses, report.val_losses, report.val_rel_diffs, strict=True
    )
    for index, (ref, loss, diff) in enumerate(validation):  # runs with --eval-every
        style = "" if diff <= report.loss_rtol else "bold red"
        table.add_row(f"val {index}", f"{ref:.7f}", f"{loss:.7f}", f"{diff:.2e}", style=style)
    table.caption = (
        f"max rel. loss diff {report.max_rel_diff:.2e} (tolerance {report.loss_rtol:.1e}); "
        f"max |weight diff| {report.max_param_diff:.2e} (tolerance {report.param_atol:.1e}): "
        + ("PASS" if report.passed else "FAIL")
    )
    return table


def main(argv: list[str] | None = None) -> int:
    """Run the comparisons and print them; 0 if all pass, 1 otherwise."""
    args = build_parser().parse_args(argv)
    shape = {k: v for k, v in config_overrides(args).items() if k in shape_fields()}
    if args.strategy == "single" and not shape.get("compile"):
        raise DistlabError(
            "verify compares a strategy with 'single', so 'single' has nothing to be checked "
            "against; pass another --strategy (python -m distlab.launch --list), or --compile "
            "to check compiled 'single' against eager"
        )
    optimizers = OPTIMIZERS if args.optimizer == "both" else (args.optimizer,)
    configs = [
        parity_config(args.strategy, args.nproc, opt, args.steps, **shape) for opt in optimizers
    ]
    console = Console()
    with tempfile.TemporaryDirectory(prefix="distlab-verify-") as tmp:
        workdir = Path(args.workdir or tmp)
        all_passed = True
        for config in configs:
            title = f"{config.strategy} x{config.nproc}, {config.optimizer}, {config.precision}"
            console.print(f"running single and {title}...")
            report = compare(config, workdir)
            console.print(report_table(title, report))
            all_passed &= report.passed
    return 0 if all_passed else 1


if __name__ == "__main__":
    run_cli(main)
