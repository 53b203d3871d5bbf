"""Parallelism degrees (dp x tp x pp) and the one device mesh they live on.

Every model-parallel strategy (``tp``, ``pp`` and their compositions with data
parallelism) arranges its ranks on one 3-D ``DeviceMesh`` with named
dimensions, outermost first::

    ("pp", "dp", "tp")      rank = (pp_index * dp + dp_index) * tp + tp_index

Tensor parallelism is innermost because it talks most (every layer, forward
and backward): on a GPU node its ranks are neighbours on the fastest links.
Pipeline stages are outermost: they only exchange activations at stage
boundaries. Rank 0 is therefore always (first stage, first replica, first
tensor-parallel shard). A degree of 1 is just a size-1 mesh dimension.

Degrees come from ``--dp``, ``--tp``, ``--pp`` and must multiply to ``--nproc``.
``--dp`` may be left out (it is then ``nproc / (tp * pp)``). The plain ``tp``
and ``pp`` strategies use every rank for their one parallelism: ``--tp`` (or
``--pp``) defaults to ``--nproc`` when left at 1.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from distlab.config import Config
from distlab.errors import DistlabError

MESH_DIMS = ("pp", "dp", "tp")


@dataclass(frozen=True)
class ParallelDims:
    """Data-, tensor- and pipeline-parallel degrees; ``dp * tp * pp == nproc``."""

    dp: int
    tp: int
    pp: int

    def build_mesh(self, device_type: str) -> DeviceMesh:
        """The 3-D (pp, dp, tp) mesh over all ranks (call on every rank)."""
        return init_device_mesh(device_type, (self.pp, self.dp, self.tp), mesh_dim_names=MESH_DIMS)


def resolve_dims(
    config: Config, name: str, data_parallel: bool, tensor_parallel: bool, pipeline: bool
) -> ParallelDims:
    """The degrees strategy ``name`` runs with; a one-line DistlabError if impossible.

    ``data_parallel``/``tensor_parallel``/``pipeline`` say which parallelisms the
    strategy composes. A parallelism it names must have degree >= 2 (otherwise
    another strategy says it better); the flags of one it does not use are
    refused by ``distlab.config.validate`` from ``Strategy.options``.
    """
    nproc = config.nproc
    tp, pp = config.tp, config.pp
    for flag, value in (("tp", tp), ("pp", pp), ("dp", config.dp)):
        if value is not None and value < 1:
            raise DistlabError(f"--{flag} must be >= 1 (got {value})")
    # A degree the strategy does not use is at its default: config.validate refuses others.
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
        if nproc % (tp * pp) != 0:
            raise DistlabError(
                f"--nproc {nproc} is not divisible by --tp {tp} x --pp {pp}; "
                f"the data-parallel degree is nproc / (tp * pp)"
            )
        dp = config.dp if config.dp is not None else nproc // (tp * pp)
        if dp * tp * pp != nproc:
            raise DistlabError(
                f"--dp {dp} x --tp {tp} x --pp {pp} = {dp * tp * pp} ranks, but --nproc is "
                f"{nproc}; the degrees must multiply to nproc"
            )
        dims = ParallelDims(dp=dp, tp=tp, pp=pp)
    if tensor_parallel and dims.tp < 2:
        raise DistlabError(
            f"strategy '{name}' needs --tp >= 2 (got {dims.tp}); without tensor "
            "parallelism use a strategy without tp"
        )
    if pipeline and dims.pp < 2:
        raise DistlabError(
            f"strategy '{name}' needs --pp >= 2 pipeline stages (got {dims.pp}); "
            "without pipelining use a strategy without pp"
        )
    return dims
