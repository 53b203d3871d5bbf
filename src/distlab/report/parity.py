"""Parity: does a strategy train the same model as the single-process reference?

Runs the ``single`` reference and the strategy on the same small config (tiny
model, fp32, a few steps, the same seed and therefore the same batches and
initial weights), then compares the per-step global-batch losses and the final
weights.

Tolerances (``tolerance``, the one place that sets them; tests and
``python -m distlab.verify`` both use it): in fp32 a parallel run sums the same
numbers in a different order (per-rank partial batches, bucketed or sharded
reductions, split matmuls), so each operation differs by a few units of the
last place (~1e-7 relative). Over a handful of steps those differences grow
only mildly, so a loss that differs by more than ``LOSS_RTOL`` (1e-5
relative), or a weight by more than ``PARAM_ATOL`` (1e-5 absolute on weights of
size ~0.02-1), is a real bug (a missed or double-counted gradient, a wrong
batch slice, a wrong scale) and not rounding: those show up as differences of
1e-3 or more.

One exception, AdamW weights under tensor or pipeline parallelism
(``ADAMW_MODEL_PARALLEL_PARAM_ATOL``, 1e-4): Adam divides each gradient
element by its own running magnitude, so an element whose exact gradient is ~0
(the key bias, whose gradient vanishes because softmax ignores a per-query
constant; dead GELU units) takes a step of up to lr * |g| / eps in a direction
set by rounding. Splitting a matmul (tp) or the batch into pipeline
micro-batches changes the summation order, so those few elements differ by
1.1-2.7e-5 after 5 steps (measured: tp and interleaved 1F1B on 4 ranks) while
the losses still agree to ~1e-7. A real bug moves weights by ~lr = 3e-3, and a
wrong gradient *scale*, which Adam hides, is what the SGD runs (held to 1e-5)
catch. Data-parallel strategies (ddp, fsdp, ZeRO, fairscale) keep 1e-5 with
AdamW too (measured: 2.2e-6).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from distlab.config import DEFAULTS, Config, build_config
from distlab.launch import run
from distlab.run.files import FINAL_WEIGHTS_FILE, METRICS_FILE, SUMMARY_FILE, read_jsonl
from distlab.strategies import registry
from distlab.strategies.resolve import validate

LOSS_RTOL = 1e-5
PARAM_ATOL = 1e-5
ADAMW_MODEL_PARALLEL_PARAM_ATOL = 1e-4
MODEL_PARALLEL_OPTIONS = frozenset({"tp", "pp"})
"""Options of the strategies that split matmuls or the batch into pipeline micro-batches."""
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
    config = build_config({**settings, **fields})  # flag values arrive as text
    validate(config)
    return config


@dataclass(frozen=True)
class Tolerance:
    """How far a strategy's run may be from ``single``'s and still train the same model."""

    loss_rtol: float
    """Relative difference of each step's loss."""
    param_atol: float
    """Absolute difference of every final weight."""


def tolerance(config: Config) -> Tolerance:
    """The parity tolerance of ``config``'s strategy and optimizer (see the module docstring)."""
    options = registry.describe(config.strategy).options
    if config.optimizer == "adamw" and options & MODEL_PARALLEL_OPTIONS:
        return Tolerance(LOSS_RTOL, ADAMW_MODEL_PARALLEL_PARAM_ATOL)
    return Tolerance(LOSS_RTOL, PARAM_ATOL)


def reference_config(config: Config) -> Config:
    """The ``single`` run with the same training settings as ``config``."""
    defaults = {name: DEFAULTS[name] for name in registry.option_users()}
    return replace(config, strategy="single", nproc=1, micro_batch=None, run_dir=None, **defaults)


@dataclass
class ParityReport:
    """Per-step losses of reference and strategy, and how far apart they are."""

    reference_losses: list[float]
    losses: list[float]
    max_param_diff: float
    tolerance: Tolerance
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
    def loss_rtol(self) -> float:
        """The loss tolerance this report is held to."""
        return self.tolerance.loss_rtol

    @property
    def param_atol(self) -> float:
        """The weight tolerance this report is held to."""
        return self.tolerance.param_atol

    @property
    def passed(self) -> bool:
        """Within both tolerances."""
        return self.max_rel_diff <= self.loss_rtol and self.max_param_diff <= self.param_atol


def _losses(run_dir: Path) -> list[float]:
    return [row["loss"] for row in read_jsonl(run_dir / METRICS_FILE)]


def _run_once(config: Config, run_dir: Path) -> Path:
    """Run ``config`` into ``run_dir`` unless a finished run is already there."""
    if (run_dir / SUMMARY_FILE).is_file():
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
    if config.reshard_between_microbatches:
        parts.append("regather")
    if config.sequence_parallel:
        parts.append("sp")
    return "-".join(parts)


def compare(config: Config, workdir: Path) -> ParityReport:
    """Run the reference and ``config`` under ``workdir`` and compare them."""
    reference = reference_config(config)
    ref_dir = _run_once(reference, workdir / _run_name(reference))
    run_dir = _run_once(config, workdir / _run_name(config))
    return compare_runs(ref_dir, run_dir, tolerance(config))


def compare_runs(ref_dir: Path, run_dir: Path, held_to: Tolerance) -> ParityReport:
    """Compare two finished runs that saved their final weights, at tolerance ``held_to``."""
    ref_weights = torch.load(ref_dir / FINAL_WEIGHTS_FILE, weights_only=True)
    weights = torch.load(run_dir / FINAL_WEIGHTS_FILE, weights_only=True)
    missing = set(ref_weights) ^ set(weights)
    if missing:
        raise AssertionError(f"final weights differ in names: {sorted(missing)[:5]}")
    max_param_diff = max(float((ref_weights[k] - weights[k]).abs().max()) for k in ref_weights)
    return ParityReport(_losses(ref_dir), _losses(run_dir), max_param_diff, held_to)
