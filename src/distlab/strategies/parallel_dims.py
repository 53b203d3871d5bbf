"""Parallelism degrees (dp x cp x tp x pp) and the one device mesh they live on.

Every model-parallel strategy (``tp``, ``pp``, ``cp`` and their compositions with
data parallelism) arranges its ranks on one 4-D ``DeviceMesh`` with named
dimensions, outermost first (torchtitan's order)::

    ("pp", "dp", "cp", "tp")
    rank = ((pp_index * dp + dp_index) * cp + cp_index) * tp + tp_index

Tensor parallelism is innermost because it talks most (every layer, forward
and backward): on a GPU node its ranks are neighbours on the fastest links.
Context parallelism (every rank of a cp group holds a slice of each sequence
and gathers the others' keys and values in every layer) talks next most.
Pipeline stages are outermost: they only exchange activations at stage
boundaries. Rank 0 is therefore always (first stage, first replica, first
tensor-parallel shard). A degree of 1 is just a size-1 mesh dimension.

Degrees come from ``--dp``, ``--cp``, ``--tp``, ``--pp`` and must multiply to
``--nproc``. ``--dp`` may be left out (it is then ``nproc / (cp * tp * pp)``). The plain ``tp``
and ``pp`` strategies use every rank for their one parallelism: ``--tp`` (or
``--pp``) defaults to ``--nproc`` when left at 1.

Besides the degrees, this module owns the arithmetic of what a rank holds:
which layers form which pipeline stage and which stages a rank runs, which
parameters tensor parallelism splits and along which dimension (read from
``tp_plan``, the plan ``apply_tp`` applies), and so the parameter shapes on rank 0
under any mesh. The strategies build their modules
from it and ``distlab.theory`` predicts from it, so the two cannot disagree.
It imports only the declaring layer (config, model, memory arithmetic) and the mesh
helper of ``distlab.distributed``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch.distributed.device_mesh import DeviceMesh

from distlab.config import Config, model_shape
from distlab.distributed import device_mesh
from distlab.errors import DistlabError
from distlab.measure.memory import ModelStateBytes, predicted_bytes
from distlab.model import GPT, GPTConfig
from distlab.strategies.data_parallel import DataParallel
from distlab.strategies.pipeline_schedules import SCHEDULES, rank_stages
from distlab.strategies.tp_plan import shard_dim

Shapes = dict[str, tuple[int, ...]]
"""Parameter name (the plain GPT's) -> shape."""

MESH_DIMS = ("pp", "dp", "cp", "tp")


@dataclass(frozen=True)
class ParallelDims:
    """Data-, tensor-, pipeline- and context-parallel degrees; ``dp * cp * tp * pp == nproc``."""

    dp: int
    tp: int
    pp: int
    replicate: int = 1
    """Of the dp ranks, how many groups hold a full copy of the model state (hsdp's
    ``--dp-replicate``); FSDP shards it over the ``dp / replicate`` ranks of each group."""
    cp: int = 1
    """Context-parallel ranks per replica: they train the same rows, each a slice of every
    sequence, so gradients are reduced over dp x cp ranks (``reducers``)."""
    ep: int = 1
    """Of the dp ranks, how many split the experts of a MoE model among themselves (``ep``'s
    ``--ep``); expert parallelism borrows data-parallel ranks, it adds none."""

    @property
    def reducers(self) -> int:
        """Ranks whose gradients are averaged: the dp replicas times the cp ranks of each."""
        return self.dp * self.cp

    @property
    def shard(self) -> int:
        """Ranks FSDP shards the model state over: dp x cp, divided by replicate under hsdp."""
        return self.reducers // self.replicate

    def named(self, sharded: bool) -> dict[str, int]:
        """The degrees under torchtitan's names, outermost first, those above 1.

        ``pp``, ``dp_replicate`` (groups holding a full copy of the model state),
        ``dp_shard`` (ranks sharding it, ``sharded``: FSDP, ZeRO, OSS; FSDP shards over
        dp_shard x cp), ``cp``, ``tp``: their product is the number of ranks. ``ep``
        comes last: it splits the experts over data-parallel ranks, it adds none.
        """
        replicate, shard = (self.replicate, self.dp // self.replicate) if sharded else (self.dp, 1)
        degrees = {
            "pp": self.pp,
            "dp_replicate": replicate,
            "dp_shard": shard,
            "cp": self.cp,
            "tp": self.tp,
            "ep": self.ep,
        }
        return {name: degree for name, degree in degrees.items() if degree > 1}

    def build_mesh(self, device_type: str) -> DeviceMesh:
        """The 4-D (pp, dp, cp, tp) mesh over all ranks (call on every rank)."""
        return device_mesh(device_type, (self.pp, self.dp, self.cp, self.tp), MESH_DIMS)

    def reduction_mesh(self, mesh: DeviceMesh) -> DeviceMesh:
        """The part of ``mesh`` (``build_mesh``'s) that gradients are averaged over: ``dp``,
        or, with context parallelism, ``dp`` and ``cp`` flattened into one dimension."""
        if self.cp == 1:
            return mesh["dp"]
        return mesh["dp", "cp"]._flatten("dp_cp")


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
    nproc = config.nproc
    tp, pp, cp = config.tp, config.pp, config.cp
    for flag, value in (("tp", tp), ("pp", pp), ("cp", cp), ("dp", config.dp)):
        if value is not None and value < 1:
            raise DistlabError(f"--{flag} must be >= 1 (got {value})")
    # A degree the strategy does not use is at its default: resolve.validate refuses others.
    if not data_parallel:
        # Plain tp / pp: the one parallelism spans every rank.
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
        dims = ParallelDims(dp=1, tp=tp, pp=pp)
    else:
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
        dims = ParallelDims(dp=dp, tp=tp, pp=pp, cp=cp)
    if tensor_parallel and dims.tp < 2:
        raise DistlabError(
            f"strategy '{name}' needs --tp >= 2 (got {dims.tp}); without tensor "
            "parallelism use a strategy without tp"
        )
    if context_parallel and dims.cp < 2:
        raise DistlabError(
            f"strategy '{name}' needs --cp >= 2 (got {dims.cp}); without context "
            "parallelism use a strategy without cp"
        )
    if pipeline and dims.pp < 2:
        raise DistlabError(
            f"strategy '{name}' needs --pp >= 2 pipeline stages (got {dims.pp}); "
            "without pipelining use a strategy without pp"
        )
    return dims


# --- Parameters of the plain GPT --------------------------------------------------------


@functools.cache
def parameter_shapes(model: GPTConfig) -> Shapes:
    """Every parameter of a GPT of shape ``model`` and its shape (built once, on meta)."""
    with torch.device("meta"):
        gpt = GPT(model)
    return {name: tuple(p.shape) for name, p in gpt.named_parameters()}


def parameter_sizes(config: Config) -> list[int]:
    """Elements of each parameter tensor of ``config``'s model, in the model's order."""
    return [math.prod(shape) for shape in parameter_shapes(model_shape(config)).values()]


def numel(shapes: Shapes) -> int:
    """Elements of all ``shapes`` together."""
    return sum(math.prod(s) for s in shapes.values())


# --- Pipeline stages ----------------------------------------------------------------------

VIRTUAL_STAGES = {n: s.stages_per_rank for n, s in SCHEDULES.items() if s.stages_per_rank > 1}
"""Stages per rank for each schedule (1 unless listed; ``pipeline_schedules``)."""


@dataclass(frozen=True)
class StagePlan:
    """What one pipeline stage holds."""

    index: int
    layers: range
    """Contiguous block indices."""
    embeddings: bool
    """Token and position embeddings (first stage only)."""
    head: bool
    """Final LayerNorm and LM head (last stage only)."""

    def holds(self, name: str) -> bool:
        """Whether the plain GPT's parameter ``name`` belongs to this stage."""
        part, _, rest = name.partition(".")
        if part == "blocks":
            return int(rest.partition(".")[0]) in self.layers
        return self.embeddings if part in ("wte", "wpe") else self.head


def plan_stages(n_layer: int, n_stages: int) -> list[StagePlan]:
    """Cut ``n_layer`` blocks into ``n_stages`` contiguous, balanced (within 1) stages."""
    if not 1 <= n_stages <= n_layer:
        raise ValueError(f"cannot cut {n_layer} layers into {n_stages} stages")
    base, extra = divmod(n_layer, n_stages)
    plans, start = [], 0
    for index in range(n_stages):
        size = base + (1 if index < extra else 0)
        plans.append(
            StagePlan(index, range(start, start + size), index == 0, index == n_stages - 1)
        )
        start += size
    return plans


def rank_stage_plans(config: Config, pp: int, pp_rank: int) -> list[StagePlan]:
    """The stages pipeline rank ``pp_rank`` runs under ``config``'s schedule."""
    virtual = VIRTUAL_STAGES.get(config.schedule, 1)
    plans = plan_stages(model_shape(config).n_layer, pp * virtual)
    return [plans[i] for i in rank_stages(config.schedule, pp, pp_rank)]


def stage_shapes(config: Config, pp: int, pp_rank: int = 0) -> Shapes:
    """Parameters of the pipeline stage(s) ``pp_rank`` holds (all of them when ``pp`` is 1)."""
    shapes = parameter_shapes(model_shape(config))
    if pp <= 1:
        return dict(shapes)
    plans = rank_stage_plans(config, pp, pp_rank)
    return {n: s for n, s in shapes.items() if any(plan.holds(n) for plan in plans)}


# --- Tensor-parallel shards ---------------------------------------------------------------


def tp_local_shapes(shapes: Shapes, tp: int) -> Shapes:
    """Local shape of each parameter on tensor-parallel rank 0: the dimension that
    ``tp_plan`` splits divided by tp, rounded up; the rest whole."""
    local = {}
    for name, shape in shapes.items():
        dims = list(shape)
        axis = shard_dim(name)
        if tp > 1 and axis is not None:
            dims[axis] = -(-dims[axis] // tp)
        local[name] = tuple(dims)
    return local


def fsdp_gathered_shapes(shapes: Shapes, shard: int) -> Shapes:
    """The parameters as FSDP2 gathers them over ``shard`` ranks: dim 0 padded to a multiple
    of ``shard`` (every rank sends a shard of ceil(rows / shard) rows, and the unsharded
    parameter is a view into that padded all-gather output)."""
    return {n: (-(-s[0] // shard) * shard, *s[1:]) for n, s in shapes.items()}


# --- What rank 0 holds --------------------------------------------------------------------


def rank0_shapes(config: Config, dims: ParallelDims) -> Shapes:
    """Rank 0's parameters: its pipeline stage(s), tensor-parallel local."""
    return tp_local_shapes(stage_shapes(config, dims.pp), dims.tp)


def rank0_state_bytes(
    config: Config, dims: ParallelDims, data_parallel: DataParallel
) -> ModelStateBytes:
    """Theory for rank 0 (first stage, tp shard 0, dp replica 0), tensor by tensor.

    Pipeline: only the first stage's (or, interleaved, stages') parameters.
    Tensor parallel: split matrices and the embedding/head / tp, norms, the
    position embedding and row-parallel biases whole. FSDP (``DataParallel.FSDP``):
    what is left, split along dim 0 over the shard degree (dp, or dp / replicate
    under hsdp; rank 0 takes the rounded-up share). DDP (or none) keeps everything
    of its stage.
    """
    shapes = rank0_shapes(config, dims)
    if data_parallel is DataParallel.FSDP:
        shapes = {n: (-(-s[0] // dims.shard), *s[1:]) for n, s in shapes.items()}
    return predicted_bytes(numel(shapes), config.optimizer)
