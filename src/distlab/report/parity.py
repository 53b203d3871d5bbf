"""Parity: does a strategy train the same model as the single-process reference?

Runs the ``single`` reference and the strategy on the same small config (tiny
model, fp32 or both bf16, a few steps, the same seed and therefore the same
batches and initial weights), then compares the per-step global-batch losses
and the final weights.

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

``--compile`` runs are compared with the *eager* ``single`` run (the reference
is never compiled) and held to the same tolerances, AdamW weights to
``ADAMW_MODEL_PARALLEL_PARAM_ATOL`` for the same reason as above: inductor
fuses each block's ops into its own kernels, which sum the same numbers in
another order (not bitwise equal, ~1 ulp per op), the way a split matmul does.
Measured over 5 steps on 1-2 ranks, every strategy that compiles, compiled
against eager of the same strategy and against eager ``single``: losses within
1.0e-7 relative, SGD weights within 1.2e-7, AdamW weights within 1.24e-5, in
1-3 elements per tensor above 1e-6 (MLP up-projections, key biases: the pattern
described above). So 1e-5 on losses (100x margin) and 1e-4 on AdamW weights
(8x margin) hold with room, while a real compile bug (a wrong fusion, a stale
graph replayed with the wrong weights, a missed gradient) moves losses by 1e-3
or more.

``--cp-attention ring`` is held to the same AdamW weight tolerance: it computes
attention with plain matmuls and a softmax over the ring's key blocks instead of
SDPA's fused kernel, the same numbers summed in another order. Measured (cp x4,
5 steps): losses within 1.7e-7, SGD weights within 1.2e-7, AdamW weights within
5.0e-6; a version that only laid q and k out differently in memory (so its
matmuls summed in another order) reached 1.02e-5 in one MLP up-projection
element (a dead GELU unit), the rest under 2e-6.

A run that evaluates (``--eval-every``) is compared on its validation losses too, held
to the same loss tolerance: the same kind of sum over the same model, forward only.

bf16 (``parity_config(..., precision="bf16")``, checked against a bf16
``single`` run): the bounds are derived in ``bf16_tolerance``'s docstring,
with the differences measured for every strategy family.
"""

from __future__ import annotations

import fcntl
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from distlab.config import Config
from distlab.config_reading import DEFAULTS, build_config
from distlab.launch.runner import run
from distlab.optim import ADAMW_BETAS, lr_factor
from distlab.run.files import FINAL_WEIGHTS_FILE, METRICS_FILE, SUMMARY_FILE, read_jsonl
from distlab.strategies import registry
from distlab.strategies.resolve import validate

LOSS_RTOL = 1e-5
PARAM_ATOL = 1e-5
ADAMW_MODEL_PARALLEL_PARAM_ATOL = 1e-4
MODEL_PARALLEL_OPTIONS = frozenset({"tp", "pp"})
"""Options of the strategies that split matmuls or the batch into pipeline micro-batches."""
PARITY_STEPS = 5
PARITY_GLOBAL_BATCH = 8
"""Sequences per step of a parity run: 4 rows per rank on 2 ranks."""
SGD_LR = 0.5
"""Plain SGD needs a large lr for the weights to move visibly in 5 steps."""
BF16_UNIT_ROUNDOFF = 2.0**-8
"""u of bfloat16: an 8-bit significand (7 stored bits and the implicit one), so one
rounding changes a value by at most 2^-8 of it (3.9e-3)."""


def parity_config(
    strategy: str, nproc: int, optimizer: str, steps: int = PARITY_STEPS, **fields
) -> Config:
    """The small, fast config parity checks run (fp32 unless ``precision`` says otherwise)."""
    settings = {
        "strategy": strategy,
        "nproc": nproc,
        "model": "tiny",
        "steps": steps,
        "global_batch": PARITY_GLOBAL_BATCH,
        "optimizer": optimizer,
        "lr": SGD_LR if optimizer == "sgd" else 3e-3,
        "warmup_steps": 2,
        "precision": "fp32",
        "device": "cpu",
        "wandb": False,
        "save_final_weights": True,
        "final_checkpoint": False,  # compared by their weights; nothing resumes them
        "pictures": False,  # read as numbers (summary, ranks/memory_rank*.json)
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
    """The parity tolerance of ``config``'s strategy, optimizer and precision.

    fp32: see the module docstring; bf16: ``bf16_tolerance``.
    """
    if config.precision == "bf16":
        return bf16_tolerance(config)
    options = registry.get(config.strategy).options
    # ring attention: plain matmuls and softmax instead of SDPA's kernel, as --compile
    reordered = (
        bool(options & MODEL_PARALLEL_OPTIONS) or config.compile or config.cp_attention == "ring"
    )
    if config.optimizer == "adamw" and reordered:
        return Tolerance(LOSS_RTOL, ADAMW_MODEL_PARALLEL_PARAM_ATOL)
    return Tolerance(LOSS_RTOL, PARAM_ATOL)


def lr_sum(config: Config) -> float:
    """The sum of the learning rates of ``config``'s steps (warm-up and cosine included)."""
    return config.lr * sum(lr_factor(step, config) for step in range(config.steps))


def adam_max_step() -> float:
    """The most one AdamW step can move a weight, in units of lr (weight decay aside).

    The update m_hat / sqrt(v_hat) is a weighted sum of past gradients over the
    root of a weighted sum of their squares; by Cauchy-Schwarz it is at most
    (1 - b1) / sqrt((1 - b2) (1 - b1^2 / b2)) (1.17 for betas 0.9, 0.95).
    """
    b1, b2 = ADAMW_BETAS
    return (1 - b1) / ((1 - b2) * (1 - b1**2 / b2)) ** 0.5


def bf16_tolerance(config: Config) -> Tolerance:
    """How far a bf16 run may be from the bf16 ``single`` run: derivation and measurements.

    Two bf16 runs round differently. ``single``, ddp, tp, pp, ddp+pp and
    fairscale run under autocast: fp32 parameters, bf16 matmul outputs, norms,
    softmax and residual adds in fp32. FSDP (and its compositions) and DeepSpeed
    cast the parameters to bf16 and run every op in bf16, norms and residual
    adds included; tp and pipelines also split the matmuls or the batch
    differently. Each op's result then differs by up to u = 2^-8 (3.9e-3)
    relative, with signs that vary from element to element.

    Loss. At step 0 the weights are equal and the loss, a mean over 256 tokens,
    averages the per-element differences away: measured 1e-5 relative. After
    that the weights differ by what the updates differed. Let eps be the
    relative difference of the two runs' updates along the gradient (<= u: one
    rounding's worth, since the independent per-element errors do not add up in
    that projection). Step s lowered the loss by about dL_s (SGD: lr |g|^2;
    AdamW's per-element normalisation scales the same way), so the loss
    difference at step t is at most eps * V_t, V_t = sum of |dL_s| for s < t,
    and relative to the loss
        delta_t <= delta_0 + u V_t / L_t.
    The parity runs have V_t / L_t <= 0.66 (SGD at lr 0.5: 5.57 -> 5.26 -> 4.48
    -> 3.59 -> 4.79) and <= 0.15 (AdamW), so delta <= 2.6e-3: the tolerance is
    u (3.9e-3). It is derived for these 5-step runs: over more steps V_t grows
    and bf16 runs drift apart further. A bug that scales the SGD update by
    1 + f moves the loss by about f V_t / L_t, so f > u / 0.66 = 0.6% fails: a
    gradient summed instead of averaged, a rank's gradient missing, another lr
    (0.4 instead of 0.5: ``tests/test_bf16_parity.py``).

    Weights, SGD. w_T = w_0 - sum_s lr_s g_s with the gradient clipped to norm
    ``grad_clip`` (1), so each element of g_s is at most 1 and differs by at most
    u between the runs: |dw| <= u grad_clip sum_s lr_s = 7.0e-3 (``lr_sum`` = 1.8).

    Weights, AdamW. An element whose gradient is rounding noise (the key bias,
    dead GELU units: see the module docstring) takes full-size steps of either
    sign, so two runs may part by up to twice the largest distance AdamW can move
    a weight, 2 * ``adam_max_step`` * sum_s lr_s = 2.5e-2; measured 1.3e-2. That
    bound checks only that the final weights are the trained ones (a wrong
    gather or load is off by the weights' own size, 0.02-1); the losses check
    the training.

    Measured (2 ranks, tiny model, 5 steps, against bf16 ``single``; max relative
    loss difference, max |weight difference| SGD / AdamW; ``tests/test_bf16_parity.py``):

        ddp       5.6e-5   1.3e-3 / 5.8e-3    fsdp       6.2e-4   7.5e-4 / 1.3e-2
        tp        8.7e-4   5.1e-4 / 1.2e-2    fsdp+tp    6.9e-4   1.7e-3 / 1.3e-2
        pp        1.8e-4   7.1e-4 / 6.4e-3    fsdp+pp    1.7e-4   6.9e-4 / 1.3e-2
        zero1     1.1e-3   2.1e-3 / 1.3e-2    zero2      1.1e-3   2.1e-3 / 1.3e-2
        zero3     9.1e-4   2.1e-3 / 1.3e-2    fairscale  3.3e-4   9.5e-4 / 5.8e-3

    Largest: loss 1.1e-3 (DeepSpeed, whose gradients are stored in bf16) against
    the bound 2.6e-3 and the tolerance 3.9e-3; SGD weights 2.1e-3 against 7.0e-3.
    fsdp at lr 0.4 instead of 0.5 is 5.1e-2 off in loss, 3.9e-2 in weights.
    """
    clip = config.grad_clip if config.grad_clip > 0 else math.inf  # unclipped: no bound
    if config.optimizer == "sgd":
        return Tolerance(BF16_UNIT_ROUNDOFF, BF16_UNIT_ROUNDOFF * clip * lr_sum(config))
    return Tolerance(BF16_UNIT_ROUNDOFF, 2 * adam_max_step() * lr_sum(config))


def reference_config(config: Config) -> Config:
    """The eager ``single`` run with the same training settings as ``config``, without ``--ac``.

    Activation checkpointing must not change the math (recomputation runs the same
    ops on the same inputs), so ``--ac`` runs are held to the run without it.
    """
    defaults = {name: DEFAULTS[name] for name in registry.option_users()}
    return replace(
        config,
        strategy="single",
        nproc=1,
        micro_batch=None,
        run_dir=None,
        compile=False,
        ac="none",
        **defaults,
    )


@dataclass
class ParityReport:
    """Per-step losses of reference and strategy (training, and validation where the runs
    evaluated), and how far apart they are."""

    reference_losses: list[float]
    losses: list[float]
    max_param_diff: float
    tolerance: Tolerance
    reference_val_losses: list[float] = field(default_factory=list)
    val_losses: list[float] = field(default_factory=list)
    rel_diffs: list[float] = field(init=False)
    val_rel_diffs: list[float] = field(init=False)

    def __post_init__(self) -> None:
        self.rel_diffs = _rel_diffs(self.reference_losses, self.losses)
        self.val_rel_diffs = _rel_diffs(self.reference_val_losses, self.val_losses)

    @property
    def max_rel_diff(self) -> float:
        """Largest relative per-step loss difference, training or validation (held to the same
        tolerance: a validation loss is the same kind of sum over the same model)."""
        return max(self.rel_diffs + self.val_rel_diffs)

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


def _rel_diffs(reference: list[float], other: list[float]) -> list[float]:
    return [abs(a - b) / abs(a) for a, b in zip(reference, other, strict=True)]


def _losses(run_dir: Path, key: str = "loss") -> list[float]:
    return [row[key] for row in read_jsonl(run_dir / METRICS_FILE) if key in row]


def _run_once(config: Config, run_dir: Path) -> Path:
    """Run ``config`` into ``run_dir`` unless a finished run is already there.

    Processes that share a workdir (two ``compare`` commands, the test suite's workers)
    take turns on a lock beside the run: the second waits for the first's run and reads
    it, instead of training into the same dir beside it.
    """
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(run_dir.parent / f".{run_dir.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if (run_dir / SUMMARY_FILE).is_file():
            return run_dir
        return run(replace(config, run_dir=str(run_dir)))


def _run_name(config: Config) -> str:
    parts = [config.strategy, f"n{config.nproc}", config.optimizer, f"s{config.steps}"]
    if config.model != "tiny":
        parts.append(config.model)
    if config.ep is not None:
        parts.append(f"ep{config.ep}")
    if config.tp > 1 or config.pp > 1:
        parts += [f"tp{config.tp}", f"pp{config.pp}", config.schedule]
    if config.cp > 1:
        parts.append(f"cp{config.cp}")
    if config.cp_attention != DEFAULTS["cp_attention"]:
        parts.append(config.cp_attention)
    if config.dp_replicate is not None or config.dp_shard is not None:
        parts.append(f"r{config.dp_replicate}s{config.dp_shard}")
    if config.global_batch != PARITY_GLOBAL_BATCH:
        parts.append(f"gb{config.global_batch}")
    if config.micro_batch:
        parts.append(f"mb{config.micro_batch}")
    if config.offload != "none":
        parts.append(f"off-{config.offload}")
    if not config.reshard_after_forward:
        parts.append("noreshard")
    if config.reshard_between_microbatches:
        parts.append("regather")
    if config.prefetch is not None:
        parts.append(f"prefetch{config.prefetch}")
    if config.bucket_mb is not None:
        parts.append(f"bucket{config.bucket_mb:g}mb")
    if config.zero_reduce is not None:
        parts.append(f"reduce-{config.zero_reduce}")
    if config.sequence_parallel:
        parts.append("sp")
    if config.compile:
        parts.append("compiled")
    if config.ac != "none":
        parts.append(f"ac-{config.ac}")
    if config.precision != "fp32":
        parts.append(config.precision)
    if config.eval_every:
        parts.append(f"eval{config.eval_every}x{config.eval_batches}")
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
    return ParityReport(
        _losses(ref_dir),
        _losses(run_dir),
        max_param_diff,
        held_to,
        _losses(ref_dir, "val_loss"),
        _losses(run_dir, "val_loss"),
    )
