"""Pipeline settings before any rank starts: micro-batches per step and their checks.

``resolve_microbatches`` gives the micro-batches a step runs (``PipelineTrainStep``,
and ``distlab.theory``'s predictions); ``validate_pp`` turns a --schedule, --pp or
--microbatches that cannot run into a one-line error, for ``pp`` and every
composition with pp.
"""

from __future__ import annotations

from distlab.config import AUTO, Config, fixed_micro_batch, model_shape
from distlab.errors import DistlabError
from distlab.strategies.parallel_dims import VIRTUAL_STAGES, ParallelDims
from distlab.strategies.pipeline_schedules import SCHEDULES, schedule_spec


def resolve_microbatches(config: Config, dims: ParallelDims) -> int:
    """Pipeline microbatches per step: --microbatches, else local/micro_batch, else 2 x pp.

    The default is the largest divisor of the local batch that is at most
    2 x pp, so that every microbatch has the same number of rows.
    """
    if config.microbatches is not None:
        return config.microbatches
    local = config.global_batch // dims.dp
    micro = fixed_micro_batch(config)
    if micro is not None:
        return local // micro
    return max(d for d in range(1, min(local, 2 * dims.pp) + 1) if local % d == 0)


def validate_pp(config: Config, dims: ParallelDims) -> None:
    """One-line errors for pipeline settings that cannot run."""
    if config.schedule not in SCHEDULES:
        raise DistlabError(
            f"unknown pipeline schedule '{config.schedule}' (choose one of: {', '.join(SCHEDULES)})"
        )
    shape = model_shape(config)
    virtual = VIRTUAL_STAGES.get(config.schedule, 1)
    n_stages = dims.pp * virtual
    if n_stages > shape.n_layer:
        per_rank = f" ({virtual} per rank with {config.schedule})" if virtual > 1 else ""
        raise DistlabError(
            f"{n_stages} pipeline stages{per_rank} but the model has only "
            f"{shape.n_layer} layers; use at most {shape.n_layer // virtual} for --pp"
        )
    if schedule_spec(config.schedule).split_backward and config.compile:
        raise DistlabError(
            f"{config.schedule} splits the backward into input and weight gradients, which "
            "torch does not support under --compile; use another --schedule or drop --compile"
        )
    if config.global_batch % dims.dp:
        return  # resolve.validate reports the indivisible global batch
    local = config.global_batch // dims.dp
    micro = fixed_micro_batch(config)
    if config.micro_batch == AUTO and config.microbatches is not None:
        raise DistlabError(
            f"--micro-batch auto and --microbatches {config.microbatches} both set the "
            "micro-batch size; give only one"
        )
    if micro is not None and config.microbatches is not None:
        if micro * config.microbatches != local:
            raise DistlabError(
                f"--micro-batch {micro} x --microbatches {config.microbatches} "
                f"!= the local batch {local}; give only --microbatches for pipelines"
            )
    if micro is not None and local % micro:
        return  # resolve.validate reports it
    m = resolve_microbatches(config, dims)
    if m < dims.pp:
        raise DistlabError(
            f"pipeline schedules need at least as many microbatches as stages: "
            f"--microbatches {m} < --pp {dims.pp} (local batch {local} rows)"
        )
    if local % m:
        raise DistlabError(
            f"--microbatches {m} does not divide the local batch of {local} rows "
            f"(global_batch {config.global_batch} / dp {dims.dp}); microbatches must be equal"
        )
    validate_schedule(config, dims, m)


def validate_schedule(config: Config, dims: ParallelDims, m: int) -> None:
    """One-line errors for what a schedule itself cannot run with ``m`` microbatches."""
    spec = schedule_spec(config.schedule)
    n_stages = dims.pp * spec.stages_per_rank
    rounds = max(1, m // dims.pp)
    if config.schedule in ("interleaved-1f1b", "interleaved-zb") and m % rounds:
        raise DistlabError(
            f"{config.schedule} needs --microbatches a multiple of {rounds} "
            f"(rounds of --pp {dims.pp}); got {m}, use a multiple of --pp"
        )
    if spec.placement == "v" and m < n_stages:
        raise DistlabError(
            f"{config.schedule} needs at least as many microbatches as its {n_stages} stages "
            f"(2 per rank with --pp {dims.pp}); got --microbatches {m}"
        )
