"""Parity: does a strategy train the same model as the single-process reference?

Runs the ``single`` reference and the strategy on the same small config (tiny
model, fp32, a few steps, the same seed and therefore the same batches and
initial weights), then compares the per-step global-batch losses and the final
weights.

Tolerance: in fp32 a parallel run sums the same numbers in a different order
(per-rank partial batches, bucketed or sharded reductions, split matmuls), so
each operation differs by a few units of the last place (~1e-7 relative). Over
a handful of steps those differences grow only mildly, so a loss that differs
by more than ``LOSS_RTOL`` (1e-5 relative), or a weight by more than
``PARAM_ATOL`` (1e-5 absolute on weights of size ~0.02-1), is a real bug
(a missed or double-counted gradient, a wrong batch slice, a wrong scale) and
not rounding: those show up as differences of 1e-3 or more.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from distlab.config import Config, validate
from distlab.launch import run

LOSS_RTOL = 1e-5
PARAM_ATOL = 1e-5
PARITY_STEPS = 5
SGD_LR = 0.5
"""Plain SGD needs a large lr for the weights to move visibly in 5 steps."""


def parity_config(
    strategy: str, nproc: int, optimizer: str, steps: int = PARITY_STEPS, **fields
) -> Config:
    """The small, fast, fp32 config parity checks run."""
    settings = {
        "strategy": strategy,
        "nproc": nproc,
        "model": "tiny",
        "steps": steps,
        "global_batch": 8,
        "optimizer": optimizer,
        "lr": SGD_LR if optimizer == "sgd" else 3e-3,
        "warmup_steps": 2,
        "precision": "fp32",
        "device": "cpu",
        "wandb": False,
        "save_final_weights": True,
        "quiet": True,
        "launcher": "local",
    }
    config = Config(**{**settings, **fields})
    validate(config)
    return config


def reference_config(config: Config) -> Config:
    """The ``single`` run with the same training settings as ``config``."""
    return replace(
        config,
        strategy="single",
        nproc=1,
        dp=None,
        tp=1,
        pp=1,
        offload="none",
        micro_batch=None,
        microbatches=None,
        schedule="1f1b",
        sequence_parallel=False,
        reshard_after_forward=True,
        run_dir=None,
    )


@dataclass
class ParityReport:
    """Per-step losses of reference and strategy, and how far apart they are."""

    reference_losses: list[float]
    losses: list[float]
    max_param_diff: float
    loss_rtol: float = LOSS_RTOL
    param_atol: float = PARAM_ATOL
    rel_diffs: list[float] = field(init=False)

    def __post_init__(self) -> None:
        self.rel_diffs = [
            abs(a - b) / abs(a) for a, b in zip(self.reference_losses, self.losses, strict=True)
        ]

    @property
    def max_rel_diff(self) -> float:
        """Largest relative per-step loss difference."""
        return max(self.rel_diffs)

    @property
    def passed(self) -> bool:
        """Within both tolerances."""
        return self.max_rel_diff <= self.loss_rtol and self.max_param_diff <= self.param_atol


def _losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


def _run_once(config: Config, run_dir: Path) -> Path:
    """Run ``config`` into ``run_dir`` unless a finished run is already there."""
    if (run_dir / "summary.json").is_file():
        return run_dir
    return run(replace(config, run_dir=str(run_dir)))


def _run_name(config: Config) -> str:
    parts = [config.strategy, f"n{config.nproc}", config.optimizer, f"s{config.steps}"]
    if config.tp > 1 or config.pp > 1:
        parts += [f"tp{config.tp}", f"pp{config.pp}", config.schedule]
    if config.micro_batch:
        parts.append(f"mb{config.micro_batch}")
    if config.offload != "none":
        parts.append(f"off-{config.offload}")
    if not config.reshard_after_forward:
        parts.append("noreshard")
    if config.sequence_parallel:
        parts.append("sp")
    return "-".join(parts)


def compare(config: Config, workdir: Path) -> ParityReport:
    """Run the reference and ``config`` under ``workdir`` and compare them."""
    reference = reference_config(config)
    ref_dir = _run_once(reference, workdir / _run_name(reference))
    run_dir = _run_once(config, workdir / _run_name(config))
    return compare_runs(ref_dir, run_dir)


def compare_runs(ref_dir: Path, run_dir: Path) -> ParityReport:
    """Compare two finished runs that saved their final weights."""
    ref_weights = torch.load(ref_dir / "final_weights.pt", weights_only=True)
    weights = torch.load(run_dir / "final_weights.pt", weights_only=True)
    missing = set(ref_weights) ^ set(weights)
    if missing:
        raise AssertionError(f"final weights differ in names: {sorted(missing)[:5]}")
    max_param_diff = max(float((ref_weights[k] - weights[k]).abs().max()) for k in ref_weights)
    return ParityReport(_losses(ref_dir), _losses(run_dir), max_param_diff)
