"""Parallelism degrees and the one device mesh every strategy's ranks live on.

``ParallelDims`` holds the degrees (``distlab.strategies.degrees`` reads them from the
config); ``build_mesh`` lays all ranks out on one ``DeviceMesh`` with torchtitan's
dimension names, outermost first, each of them present (size 1 when unused)::

    ("pp", "dp_replicate", "dp_shard", "cp", "tp")
    rank = (((pp_i * R + replicate_i) * S + shard_i) * cp + cp_i) * tp + tp_i

``dp_replicate`` ranks hold copies of the model state (DDP, hsdp's replica groups),
``dp_shard`` ranks shard it (FSDP, ZeRO, OSS); a strategy's data-parallel ranks are
one or the other, or both under hsdp. Expert parallelism borrows data-parallel ranks:
with ``ep > 1`` the replicas are laid out as ``("dp_mod_ep", "ep")``. The flattened
views (``MESH_VIEWS``: ``dp``, ``dp_shard_cp``, ``dp_cp``, ``dp_replicate``) are
named the same on every mesh, and ``view`` returns them.

Tensor parallelism is innermost because it talks most (every layer, forward
and backward): on a GPU node its ranks are neighbours on the fastest links.
Context parallelism (every rank of a cp group holds a slice of each sequence
and gathers the others' keys and values in every layer) talks next most.
Pipeline stages are outermost: they only exchange activations at stage
boundaries. Rank 0 is therefore always (first stage, first replica, first
tensor-parallel shard).

Besides the degrees, this module owns the arithmetic of what a rank holds:
which layers form which pipeline stage and which stages a rank runs, which
parameters tensor parallelism splits and along which dimension (read from
``tp_plan``, the plan ``apply_tp`` applies), and so the parameter shapes on rank 0
under any mesh. The strategies build their modules
from it and ``distlab.theory`` predicts from it, so the two cannot disagree.
It imports only the declaring layer (config, model) and the mesh
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
from distlab.model import GPT, GPTConfig
from distlab.strategies.pipeline_schedules import SCHEDULES, rank_stages
from distlab.strategies.tp_plan import shard_dim

Shapes = dict[str, tuple[int, ...]]
"""Parameter name (the plain GPT's) -> shape."""


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

    def data_parallel_split(self, sharded: bool) -> tuple[int, int]:
        """(dp_replicate, dp_shard): ranks holding copies of the model state and ranks
        sharding it (``sharded``: FSDP, ZeRO, OSS); their product is ``dp``."""
        return (self.replicate, self.dp // self.replicate) if sharded else (self.dp, 1)

    def named(self, sharded: bool) -> dict[str, int]:
        """The degrees under torchtitan's names, outermost first, those above 1.

        ``pp``, ``dp_replicate`` (groups holding a full copy of the model state),
        ``dp_shard`` (ranks sharding it, ``sharded``: FSDP, ZeRO, OSS; FSDP shards over
        dp_shard x cp), ``cp``, ``tp``: their product is the number of ranks. ``ep``
        comes last: it splits the experts over data-parallel ranks, it adds none.
        """
        replicate, shard = self.data_parallel_split(sharded)
        degrees = {
            "pp": self.pp,
            "dp_replicate": replicate,
            "dp_shard": shard,
            "cp": self.cp,
            "tp": self.tp,
            "ep": self.ep,
        }
        return {name: degree for name, degree in degrees.items() if degree > 1}

    def mesh_shape(self, sharded: bool) -> dict[str, int]:
        """The device mesh's dimensions and sizes, outermost first, every one (size 1 too).

        The names of ``named``, with one change when experts are split (``ep > 1``):
        expert parallelism borrows data-parallel ranks, so the replicas are laid out as
        ``dp_mod_ep`` groups of ``ep`` consecutive ranks (torchtitan splits its dp_shard
        the same way); ``view("dp_replicate")`` flattens the two again.
        """
        replicate, shard = self.data_parallel_split(sharded)
        if self.ep == 1:
            replicas = {"dp_replicate": replicate}
        else:
            replicas = {"dp_mod_ep": replicate // self.ep, "ep": self.ep}
        return {"pp": self.pp, **replicas, "dp_shard": shard, "cp": self.cp, "tp": self.tp}

    def build_mesh(self, device_type: str, sharded: bool) -> DeviceMesh:
        """The one device mesh over all ranks, of ``mesh_shape`` (call on every rank)."""
        shape = self.mesh_shape(sharded)
        return device_mesh(device_type, tuple(shape.values()), tuple(shape))


MESH_VIEWS = {
    "dp_replicate": ("dp_mod_ep", "ep"),
    "dp": ("dp_replicate", "dp_shard"),
    "dp_shard_cp": ("dp_shard", "cp"),
    "dp_cp": ("dp", "cp"),
    "dp_shard_cp_tp": ("dp_shard_cp", "tp"),
}
"""The mesh's flattened views and what each is made of, the same on every strategy's mesh:

- ``dp``: the data-parallel ranks, each training its own rows of the global batch;
- ``dp_shard_cp``: the ranks FSDP shards the model state over (cp ranks train the same
  rows, so they share the shards and the gradient reduce-scatter);
- ``dp_cp``: the ranks whose gradients and losses are averaged;
- ``dp_shard_cp_tp``: the ranks one parameter is split over when FSDP shards tp's
  pieces: the gradient norm is summed over them in one all-reduce (DTensor finds this
  view and uses it, instead of one all-reduce per dimension)."""


def _mesh_dims(name: str, mesh: DeviceMesh) -> list[str]:
    """The mesh dimensions view (or dimension) ``name`` is made of, outermost first."""
    if name in (mesh.mesh_dim_names or ()):
        return [name]
    return [dim for part in MESH_VIEWS.get(name, ()) for dim in _mesh_dims(part, mesh)]


def view(mesh: DeviceMesh, name: str) -> DeviceMesh:
    """The 1-D mesh of ``name``: a dimension of ``mesh`` (``ParallelDims.build_mesh``'s) or
    one of ``MESH_VIEWS``, flattened from the dimensions of size > 1 it is made of (a view
    with one such dimension is that dimension: no new process group)."""
    dims = _mesh_dims(name, mesh)
    sizes = dict(zip(mesh.mesh_dim_names or (), mesh.shape, strict=True))
    sized = [dim for dim in dims if sizes[dim] > 1]
    if len(sized) > 1:
        return mesh[tuple(sized)]._flatten(name)
    return mesh[sized[0] if sized else dims[0]]


def fsdp_mesh(mesh: DeviceMesh, dims: ParallelDims) -> DeviceMesh:
    """The mesh FSDP2 shards over: ``dp_shard_cp``; with replica groups (hsdp) the 2-D
    (``dp_replicate``, ``dp_shard_cp``), on which FSDP2 also all-reduces the gradient shards
    across the groups. Without replica groups the 1-D mesh: on a (1, S) mesh FSDP2 would
    all-reduce every unit's gradient shard over a one-rank group, a no-op collective."""
    shard = view(mesh, "dp_shard_cp")
    if dims.replicate == 1:
        return shard
    replicate = view(mesh, "dp_replicate")
    return mesh[replicate.mesh_dim_names[0], shard.mesh_dim_names[0]]


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
