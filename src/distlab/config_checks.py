"""The values a Config accepts: each field's choices and range, checked on its own.

``check_fields`` checks every field and the relations between fields that need
no strategy (the model shape, the sequence length, the memory budget's size);
``distlab.strategies.resolve`` adds the strategy's own checks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from distlab.config import (
    AUTO,
    SHAPE_FIELDS,
    Config,
    fixed_micro_batch,
    model_shape,
    resolved_seq_len,
)
from distlab.errors import DistlabError
from distlab.model import PRESETS, VOCAB_SIZE
from distlab.tokenizer import check_tokenizer_spec

OPTIMIZERS = ("sgd", "adamw")
PRECISIONS = ("fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")
LAUNCHERS = ("ray", "local")
FT_MODES = ("restart", "live")
"""``--ft``: restart every rank from a checkpoint, or keep the live replicas stepping (torchft)."""
AC_MODES = ("none", "full", "selective")
"""``--ac``: activation checkpointing per block (``distlab.strategies.activation_checkpoint``)."""
TRACK_MEMORY_MODES = ("sample", "every", "off")
TRACK_TIME_MODES = ("sample", "every", "off")
BYTE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
              "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}  # fmt: skip


def require(condition: bool, message: str) -> None:
    """A one-line DistlabError with ``message`` unless ``condition``."""
    if not condition:
        raise DistlabError(message)


def require_choice(field: str, value: object, choices: Sequence[str]) -> None:
    """A one-line DistlabError unless ``value`` is one of ``choices``."""
    require(value in choices, f"{field} must be one of {', '.join(choices)} (got '{value}')")


def check_fields(config: Config) -> None:
    """Check every field's range and the relations between fields that need no strategy."""
    require(config.nproc >= 1, f"nproc must be >= 1 (got {config.nproc})")
    require(config.steps >= 1, f"steps must be >= 1 (got {config.steps})")
    require(
        config.model in PRESETS,
        f"unknown model preset '{config.model}' (choose one of: {', '.join(PRESETS)})",
    )
    require(config.global_batch >= 1, f"global_batch must be >= 1 (got {config.global_batch})")
    require_choice("optimizer", config.optimizer, OPTIMIZERS)
    require(
        config.lr > 0 and math.isfinite(config.lr),
        f"lr must be a positive number (got {config.lr})",
    )
    require(0 <= config.min_lr_ratio <= 1, "min_lr_ratio must be between 0 and 1")
    require(config.warmup_steps >= 0, "warmup_steps must be >= 0")
    require(config.weight_decay >= 0, "weight_decay must be >= 0")
    require(config.grad_clip >= 0, "grad_clip must be >= 0 (0 disables clipping)")
    require_choice("precision", config.precision, PRECISIONS)
    require_choice("ac", config.ac, AC_MODES)
    require_choice("track_memory", config.track_memory, TRACK_MEMORY_MODES)
    require_choice("track_time", config.track_time, TRACK_TIME_MODES)
    require(
        not (config.profile and config.track_time == "off"),
        "--profile profiles the time-tracked steps: use it with --track-time sample or every, "
        "not off",
    )
    require_choice("device", config.device, DEVICES)
    require_choice("launcher", config.launcher, LAUNCHERS)
    require(
        config.ray_address is None or config.launcher == "ray",
        "--ray-address needs --launcher ray",
    )
    require(config.timeout_s > 0, "timeout_s must be > 0")
    require(config.max_failures >= 0, "max_failures must be >= 0")
    check_elastic(config)
    require_choice("ft", config.ft, FT_MODES)
    require(config.rejoin_after >= 0, f"rejoin_after must be >= 0 (got {config.rejoin_after})")
    require(
        config.rejoin_after == 0 or config.ft == "live",
        "--rejoin-after delays a replica's live restart: it needs --ft live",
    )
    require(
        not (config.init_from and config.resume),
        "--init-from starts a new run's weights and --resume continues a checkpoint: "
        "give one of them",
    )
    require(config.threads_per_rank >= 1, "threads_per_rank must be >= 1")
    require(config.log_every >= 1, "log_every must be >= 1")
    require(config.checkpoint_every >= 0, "checkpoint_every must be >= 0")
    check_data(config)
    require(config.keep_checkpoints >= 1, "keep_checkpoints must be >= 1")
    require(
        config.bucket_mb is None or (config.bucket_mb > 0 and math.isfinite(config.bucket_mb)),
        f"bucket_mb must be a positive number of MiB (got {config.bucket_mb})",
    )
    require(
        config.prefetch is None or config.prefetch >= 0,
        f"prefetch must be >= 0 blocks (got {config.prefetch})",
    )
    check_shape(config)
    shape = model_shape(config)
    seq_len = resolved_seq_len(config)
    require(
        1 <= seq_len <= shape.block_size,
        f"seq_len must be between 1 and the model's context length {shape.block_size} "
        f"(got {seq_len}; a model shape of your own, --layers/--hidden/--heads/--vocab, "
        "takes its context length from --seq-len)",
    )
    if isinstance(config.micro_batch, str) and config.micro_batch != AUTO:
        raise DistlabError(f"micro_batch must be a number or auto (got '{config.micro_batch}')")
    if config.memory_budget is not None:
        parse_bytes(config.memory_budget)


def check_data(config: Config) -> None:
    """The tokenizer and the held-out evaluation's fields."""
    check_tokenizer_spec(config.tokenizer)
    require(config.eval_every >= 0, f"eval_every must be >= 0 (got {config.eval_every})")
    require(config.eval_batches >= 1, f"eval_batches must be >= 1 (got {config.eval_batches})")
    require(
        config.eval_every == 0 or config.ft != "live",
        "--eval-every is not supported with --ft live (a replica's validation loss would "
        "average over whichever replicas are alive); evaluate a --ft restart run",
    )


ELASTIC_STRATEGIES = ("ddp", "fsdp")
"""Strategies whose layout any world size holds: one data-parallel dimension."""


def check_elastic(config: Config) -> None:
    """``--elastic MIN_RANKS``: a strategy, launcher and batch that every world size from
    MIN_RANKS to --nproc can run."""
    if not config.elastic:
        return
    require(
        1 <= config.elastic <= config.nproc,
        f"--elastic {config.elastic} must be between 1 and --nproc {config.nproc} (the fewest "
        "ranks to continue at)",
    )
    require(
        config.strategy in ELASTIC_STRATEGIES,
        f"--elastic works with {' and '.join(ELASTIC_STRATEGIES)}, whose one data-parallel "
        f"dimension fits any world size; {config.strategy}'s layout fixes it (use --max-failures)",
    )
    require(config.launcher == "ray", "--elastic needs --launcher ray (Ray Train resizes the run)")
    require(
        config.ft != "live",
        "--elastic and --ft live are two recovery modes (resize the run, or let the other "
        "replicas step on): choose one",
    )
    for world in range(config.elastic, config.nproc + 1):
        local, rest = divmod(config.global_batch, world)
        require(
            rest == 0 and local % (fixed_micro_batch(config) or local) == 0,
            f"--elastic {config.elastic}: at {world} ranks --global-batch {config.global_batch} "
            "does not split into whole micro-batches; choose a batch that every world size from "
            f"{config.elastic} to {config.nproc} divides",
        )


def check_shape(config: Config) -> None:
    """One-line errors for a model shape the GPT cannot take."""
    for name in SHAPE_FIELDS:
        value = getattr(config, name)
        require(value is None or value >= 1, f"{name} must be >= 1 (got {value})")
    shape = model_shape(config)
    require(
        shape.d_model % shape.n_head == 0,
        f"hidden {shape.d_model} is not divisible by heads {shape.n_head}; "
        "each head takes hidden / heads of the width",
    )
    require(
        shape.vocab_size >= VOCAB_SIZE,
        f"vocab must be >= {VOCAB_SIZE} (got {shape.vocab_size}): every tokenizer holds the bytes",
    )


def parse_bytes(text: str) -> int:
    """``20GiB``, ``512MB``, ``1e9`` -> bytes; a one-line DistlabError for anything else."""
    cleaned = text.strip().lower().replace(" ", "")
    number = cleaned.rstrip("kmgtib")
    unit = cleaned[len(number) :]
    try:
        value = float(number) * BYTE_UNITS[unit]
    except (KeyError, ValueError):
        value = -1.0
    if not (math.isfinite(value) and value >= 1):
        raise DistlabError(
            f"memory_budget '{text}' is not a size: write bytes with a unit, e.g. 20GiB or 512MB"
        )
    return int(value)
