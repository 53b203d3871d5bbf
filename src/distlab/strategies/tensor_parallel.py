"""``tp``: Megatron-style tensor parallelism with DTensor's ``parallelize_module``.

Each transformer block's matmuls are split across the ``tp`` ranks so that a
block costs two all-reduces in forward (and two in backward), never more
(``tp_plan`` holds the split, and its ``apply_tp`` turns it into DTensor's styles):

    attention: q, k, v  column-parallel  (each rank computes n_head / tp heads)
               proj     row-parallel     (partial sums -> all-reduce)
    MLP:       up       column-parallel  (each rank holds 4d / tp hidden units)
               down     row-parallel     (partial sums -> all-reduce)

The token embedding is split along the vocabulary (row-parallel: each rank
looks up the tokens it owns, zeros elsewhere, then an all-reduce) and the LM
head along its output (column-parallel), whose logits are all-gathered so every
rank computes the ordinary cross-entropy on the full vocabulary: the loss and
its gradient are exactly those of the unsplit model. (``loss_parallel`` would
avoid gathering the logits; with a 256-byte vocabulary it is not worth the
extra context around every backward.) LayerNorms and the position embedding are
replicated: their parameters become replicated DTensors, so every parameter
is a DTensor and the optimizer, clipping and checkpointing see one kind of
tensor.

``--sequence-parallel`` (Megatron-SP) also splits the regions between the
matmuls, LayerNorms and residual adds, along the sequence: the residual
stream is ``Shard(1)``; before attention/MLP an all-gather makes it whole, and
the row-parallel outputs are reduce-scattered back to sequence shards instead
of all-reduced. Same communication volume, 1/tp of the activation memory in
the norm regions.

Memory per rank: the sharded matrices (and the embedding/head) / tp; norms,
the position embedding and the row-parallel biases are replicated.
Communication per block: 2 all-reduces forward + 2 backward of (batch, seq, d)
activations (with SP: all-gathers + reduce-scatters of the same total volume).
"""

from __future__ import annotations

from torch import nn

from distlab.config import Config, model_shape, resolved_seq_len
from distlab.distributed import RankContext
from distlab.errors import DistlabError
from distlab.measure.memory import ModelStateBytes
from distlab.strategies.base import TP_OPTIONS, ModuleTrainStep, Strategy, TrainStep
from distlab.strategies.data_parallel import DataParallel
from distlab.strategies.degrees import resolve_dims
from distlab.strategies.parallel_dims import (
    ParallelDims,
)
from distlab.strategies.parallelize import parallelize
from distlab.strategies.state_bytes import rank0_state_bytes


def validate_tp(config: Config, tp: int) -> None:
    """One-line errors for shapes that cannot be split ``tp`` ways."""
    shape = model_shape(config)
    if shape.n_head % tp:
        raise DistlabError(
            f"tensor parallelism over {tp} ranks needs n_head divisible by {tp} "
            f"(the model has {shape.n_head} heads); use a --tp dividing {shape.n_head}"
        )
    if shape.d_model % tp:
        raise DistlabError(
            f"tensor parallelism over {tp} ranks needs d_model divisible by {tp} "
            f"(the model has d_model {shape.d_model})"
        )
    if shape.vocab_size % tp:
        raise DistlabError(
            f"tensor parallelism over {tp} ranks needs the vocabulary ({shape.vocab_size}) "
            f"divisible by {tp} (embedding and LM head are split along it)"
        )
    seq_len = resolved_seq_len(config)
    if config.sequence_parallel and seq_len % tp:
        raise DistlabError(
            f"--sequence-parallel over {tp} ranks needs seq_len divisible by {tp} "
            f"(got {seq_len}); change --seq-len or --tp"
        )


class TPStrategy(Strategy):
    """Split every block's matmuls (and embedding/head) across all ranks."""

    name = "tp"
    summary = (
        "tensor parallel (DTensor): q/k/v/up column-, proj/down row-parallel over all ranks "
        "(--sequence-parallel shards the norm regions)"
    )
    options = TP_OPTIONS

    def dims(self, config: Config) -> ParallelDims:
        return resolve_dims(
            config, self.name, data_parallel=False, tensor_parallel=True, pipeline=False
        )

    def validate(self, config: Config) -> None:
        validate_tp(config, self.dims(config).tp)

    def predicted_state_bytes(self, config: Config, n_params: int) -> ModelStateBytes:
        return rank0_state_bytes(config, self.dims(config), DataParallel.NONE)

    def prepare(self, model: nn.Module, ctx: RankContext, config: Config) -> TrainStep:
        mesh = self.build_mesh(config, ctx.device_type)
        ctx.place(model)
        model = parallelize(model, mesh, self.dims(config), config, self.data_parallel, ctx.device)
        return ModuleTrainStep(
            model,
            ctx,
            config,
            dp_rank=0,
            dp_size=1,
            dp_group=None,
        )
