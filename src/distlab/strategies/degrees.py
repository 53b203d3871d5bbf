"""Every strategy's parallelism degrees, read from the config and checked in one place.

A strategy's ``dims`` returns one of these functions' ``ParallelDims``; each raises a
one-line ``DistlabError`` that names the flag to change when the degrees cannot run:

- ``data_parallel_dims``: every rank data-parallel (ddp, fsdp, the ZeRO stages, OSS);
- ``hsdp_dims``: ``--dp-replicate`` groups of ``--dp-shard`` ranks;
- ``ep_dims``: data-parallel ranks, the experts split over ``--ep`` of them;
- ``cp_dims``: ``--cp`` ranks per sequence, ``nproc / cp`` data-parallel groups of them;
- ``resolve_dims``: tensor, pipeline, context and data parallelism composed.
"""

from __future__ import annotations

from distlab.config import Config, model_shape
from distlab.errors import DistlabError
from distlab.strategies.parallel_dims import ParallelDims


def check_positive(**flags: int | None) -> None:
    """Every degree given must be >= 1 (``None``: left to its default)."""
    for flag, value in flags.items():
        if value is not None and value < 1:
            raise DistlabError(f"--{flag.replace('_', '-')} must be >= 1 (got {value})")


def data_parallel_dims(config: Config) -> ParallelDims:
    """Every rank a data-parallel replica (or shard) of the whole model."""
    return ParallelDims(dp=config.nproc, tp=1, pp=1)


def hsdp_dims(config: Config) -> ParallelDims:
    """R replica groups of S ranks each, R x S = nproc; R defaults to 2 when nproc is even
    and at least 4, else 1, and one given degree sets the other."""
    nproc, replicate, shard = config.nproc, config.dp_replicate, config.dp_shard
    check_positive(dp_replicate=replicate, dp_shard=shard)
    if replicate is None and shard is None:
        replicate = 2 if nproc >= 4 and nproc % 2 == 0 else 1
    if replicate is None or shard is None:  # one given: the other is nproc / it
        flag, given = ("dp-shard", shard) if replicate is None else ("dp-replicate", replicate)
        if nproc % given:  # type: ignore[operator]
            raise DistlabError(
                f"--nproc {nproc} is not divisible by --{flag} {given}; "
                "hsdp needs --dp-replicate x --dp-shard = --nproc"
            )
        replicate = replicate if replicate is not None else nproc // shard  # type: ignore[operator]
        shard = shard if shard is not None else nproc // replicate
    if replicate * shard != nproc:
        raise DistlabError(
            f"--dp-replicate {replicate} x --dp-shard {shard} = {replicate * shard} ranks, "
            f"but --nproc is {nproc}; the degrees must multiply to nproc"
        )
    return ParallelDims(dp=nproc, tp=1, pp=1, replicate=replicate)


def ep_dims(config: Config) -> ParallelDims:
    """Every rank data-parallel, the experts of a MoE preset split over ``--ep`` of them
    (default: all)."""
    shape = model_shape(config)
    if not shape.n_expert:
        raise DistlabError(
            f"ep needs a MoE preset: --model tiny-moe or small-moe (got '{config.model}')"
        )
    ep = config.ep if config.ep is not None else config.nproc
    if ep < 2:
        raise DistlabError(
            f"ep needs --ep >= 2 ranks to split the experts over (got {ep}); "
            "with every expert on every rank use ddp or fsdp"
        )
    if config.nproc % ep:
        raise DistlabError(f"--ep {ep} does not divide --nproc {config.nproc}")
    if shape.n_expert % ep:
        raise DistlabError(
            f"--ep {ep} does not divide the {shape.n_expert} experts of '{config.model}'"
        )
    return ParallelDims(dp=config.nproc, tp=1, pp=1, ep=ep)


def cp_dims(config: Config) -> ParallelDims:
    """``--cp`` ranks per sequence (default: every rank), nproc / cp data-parallel groups."""
    nproc = config.nproc
    cp = nproc if config.cp == 1 else config.cp
    check_positive(cp=cp)
    if nproc % cp:
        raise DistlabError(
            f"--nproc {nproc} is not divisible by --cp {cp}; the ranks form nproc / cp "
            "data-parallel groups of cp ranks each"
        )
    if cp < 2:
        raise DistlabError(f"strategy 'cp' needs --cp >= 2 ranks (got {cp}); use --nproc 2 or more")
    return ParallelDims(dp=nproc // cp, tp=1, pp=1, cp=cp)


def resolve_dims(
    config: Config,
    name: str,
    data_parallel: bool,
    tensor_parallel: bool,
    pipeline: bool,
    context_parallel: bool = False,
) -> ParallelDims:
    """The degrees strategy ``name`` runs with; a one-line DistlabError if impossible.

    ``data_parallel``/``tensor_parallel``/``pipeline``/``context_parallel`` say which
    parallelisms the strategy composes (context parallelism only with data
    parallelism). A parallelism it names must have degree >= 2 (otherwise another
    strategy says it better); the flags of one it does not use are refused by
    ``distlab.strategies.resolve.validate`` from ``Strategy.options``.
    """
    check_positive(tp=config.tp, pp=config.pp, cp=config.cp, dp=config.dp)
    # A degree the strategy does not use is at its default: resolve.validate refuses others.
    if data_parallel:
        dims = _data_and_model_parallel(config, context_parallel)
    else:
        dims = _model_parallel_only(config, name, tensor_parallel, pipeline)
    for used, degree, flag, what in (
        (tensor_parallel, dims.tp, "--tp", "tensor parallelism"),
        (context_parallel, dims.cp, "--cp", "context parallelism"),
        (pipeline, dims.pp, "--pp", "pipelining"),
    ):
        if used and degree < 2:
            ranks = " pipeline stages" if flag == "--pp" else ""
            raise DistlabError(
                f"strategy '{name}' needs {flag} >= 2{ranks} (got {degree}); "
                f"without {what} use a strategy without {flag[2:]}"
            )
    return dims


def _model_parallel_only(
    config: Config, name: str, tensor_parallel: bool, pipeline: bool
) -> ParallelDims:
    """Plain tp / pp: the one parallelism spans every rank (its flag defaults to nproc)."""
    nproc, tp, pp = config.nproc, config.tp, config.pp
    if tensor_parallel:
        tp = nproc if tp == 1 else tp
    if pipeline:
        pp = nproc if pp == 1 else pp
    if tp * pp != nproc:
        degree, value = ("tp", tp) if tensor_parallel else ("pp", pp)
        raise DistlabError(
            f"strategy '{name}' uses all {nproc} ranks for one parallelism, so --{degree} "
            f"must equal --nproc (got --{degree} {value}); to add data parallelism use "
            f"--strategy fsdp+{name}"
        )
    return ParallelDims(dp=1, tp=tp, pp=pp)


def _data_and_model_parallel(config: Config, context_parallel: bool) -> ParallelDims:
    """dp x cp x tp x pp = nproc, ``--dp`` defaulting to what the others leave."""
    nproc, tp, pp, cp = config.nproc, config.tp, config.pp, config.cp
    # Name --cp only to strategies that have it (its default 1 changes nothing).
    cp_flag, cp_name = (f" x --cp {cp}", "cp * ") if context_parallel else ("", "")
    if nproc % (cp * tp * pp) != 0:
        degrees = f"--cp {cp} x " * context_parallel + f"--tp {tp} x --pp {pp}"
        raise DistlabError(
            f"--nproc {nproc} is not divisible by {degrees}; the data-parallel degree is "
            f"nproc / ({cp_name}tp * pp)"
        )
    dp = config.dp if config.dp is not None else nproc // (cp * tp * pp)
    if dp * cp * tp * pp != nproc:
        raise DistlabError(
            f"--dp {dp}{cp_flag} x --tp {tp} x --pp {pp} = {dp * cp * tp * pp} ranks, but "
            f"--nproc is {nproc}; the degrees must multiply to nproc"
        )
    return ParallelDims(dp=dp, tp=tp, pp=pp, cp=cp)
