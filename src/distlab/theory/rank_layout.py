"""How a strategy uses the ranks, as the theory reads it: degrees and data-parallel flavour.

``rank_layout(config)`` is what ``config.strategy`` declares (``Strategy.dims`` and
``Strategy.data_parallel``); communication (``theory.comm``) and peak memory
(``theory.memory``) both predict from it, for rank 0 (first stage, first replica,
first tensor-parallel shard).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from distlab.config import Config, model_shape
from distlab.strategies import registry
from distlab.strategies.data_parallel import DataParallel
from distlab.strategies.parallel_dims import ParallelDims, stage_shapes
from distlab.strategies.pipeline_settings import resolve_microbatches

FP32 = 4

MODELLED_DATA_PARALLEL = frozenset(
    {
        DataParallel.NONE,
        DataParallel.DDP,
        DataParallel.FSDP,
        DataParallel.ZERO1,
        DataParallel.ZERO2,
        DataParallel.ZERO3,
        DataParallel.FAIRSCALE_OSS,
        DataParallel.FAIRSCALE_SDP,
        DataParallel.EP,
    }
)
"""The data-parallel flavours (``Strategy.data_parallel``) whose communication and memory
the theory models, today every one; a flavour added to ``DataParallel`` joins once the
theory handles it (until then ``rank_layout`` returns None for its strategies)."""


@dataclass(frozen=True)
class RankLayout(ParallelDims):
    """How a strategy uses the ranks: its degrees (``ParallelDims``: dp, tp, pp, hsdp's
    replicate, cp, ep, with the reducer and shard counts they imply) and its data-parallel
    flavour."""

    data_parallel: DataParallel = DataParallel.NONE
    """The strategy's data-parallel flavour (``Strategy.data_parallel``)."""


def compute_bytes(config: Config, layout: RankLayout) -> int:
    """Bytes per element of the parameters gathered and activations computed under ``config``.

    2 where bf16 replaces fp32 in the model itself: FSDP2's ``MixedPrecisionPolicy``
    and DeepSpeed's bf16 mode (every op in bf16); 4 in fp32, and for the
    parameters of autocast strategies (their activations: see the module docstring).
    """
    return 2 if config.precision == "bf16" and layout.data_parallel.casts_model else FP32


def rank_layout(config: Config) -> RankLayout | None:
    """What ``config.strategy`` declares (its flavour and mesh); None if not modelled."""
    strategy = registry.get(config.strategy)
    if strategy.data_parallel not in MODELLED_DATA_PARALLEL:
        return None
    dims = strategy.dims(config)
    return RankLayout(**asdict(dims), data_parallel=strategy.data_parallel)


def microbatches(config: Config, layout: RankLayout) -> int:
    """Pipeline microbatches per step under this layout (``resolve_microbatches``)."""
    return resolve_microbatches(config, layout)


def layers_of(config: Config, layout: RankLayout) -> int:
    """Transformer blocks rank 0 holds: all of them, or its pipeline stages' blocks."""
    shape = model_shape(config)
    if layout.pp <= 1:
        return shape.n_layer
    return len(
        {n.split(".")[1] for n in stage_shapes(config, layout.pp) if n.startswith("blocks.")}
    )


def has_first_last(config: Config, layout: RankLayout) -> tuple[bool, bool]:
    """Whether rank 0 holds the embeddings (first stage) and the LM head (last stage)."""
    names = stage_shapes(config, layout.pp)
    return "wte.weight" in names, "lm_head.weight" in names
