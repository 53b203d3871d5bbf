"""``tp``: Megatron-style tensor parallelism with DTensor's ``parallelize_module``.

Each transformer block's matmuls are split across the ``tp`` ranks so that a
block costs two all-reduces in forward (and two in backward), never more
(``tp_plan`` holds the split; this module turns it into DTensor's styles):

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
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard, distribute_module
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from distlab.config import Config, model_shape, resolved_seq_len
from distlab.distributed import RankContext
from distlab.errors import DistlabError
from distlab.measure.memory import ModelStateBytes
from distlab.strategies.activation_checkpoint import apply_ac
from distlab.strategies.base import TP_OPTIONS, ModuleTrainStep, Strategy, TrainStep
from distlab.strategies.data_parallel import DataParallel
from distlab.strategies.degrees import resolve_dims
from distlab.strategies.parallel_dims import (
    ParallelDims,
    rank0_state_bytes,
)
from distlab.strategies.regional_compile import apply_compile
from distlab.strategies.tp_plan import BLOCK_PLAN, TOP_PLAN, Split


class ReplicateParallel(ParallelStyle):
    """Replicate a module's parameters as DTensors; it takes and returns plain tensors.

    For modules that tensor parallelism does not split (LayerNorms, the position
    embedding) when sequence parallelism is off: the computation is the same
    on every rank. ``output_layout`` can hand the output on as a shard instead
    (``Shard(0)`` of the position embedding's (seq, d) output under SP).
    """

    def __init__(self, output_layout: Placement | None = None) -> None:
        super().__init__()
        self.output_layout = output_layout or Replicate()

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def to_dtensor(mod, inputs, mesh):
            return tuple(
                DTensor.from_local(x, mesh, [Replicate()], run_check=False) for x in inputs
            )

        def to_local(mod, output, mesh):
            return output.redistribute(placements=[self.output_layout]).to_local()

        # partition_fn None: every parameter becomes a Replicate() DTensor.
        return distribute_module(module, device_mesh, None, to_dtensor, to_local)


def parallel_style(
    split: Split,
    sequence_parallel: bool,
    inputs: Placement | None = None,
    outputs: Placement | None = None,
) -> ParallelStyle:
    """``split`` (``tp_plan``) as DTensor's parallel style. ``inputs``/``outputs``: the
    layouts of the activations the module takes and gives, where not the style's default."""
    layouts = {"input_layouts": inputs, "output_layouts": outputs}
    layouts = {key: layout for key, layout in layouts.items() if layout is not None}
    if split is Split.COLUMN:
        return ColwiseParallel(**layouts)
    if split is Split.ROW:
        return RowwiseParallel(**layouts)
    if sequence_parallel and outputs is None:
        return SequenceParallel()  # a norm on the sequence-sharded residual stream
    return ReplicateParallel(outputs)


def block_plan(sequence_parallel: bool) -> dict[str, ParallelStyle]:
    """How one transformer block is split: ``tp_plan.BLOCK_PLAN`` as parallel styles."""
    sp = sequence_parallel
    # SP: the residual stream is sharded along the sequence (dim 1), so the row-parallel
    # outputs are reduce-scattered back to sequence shards instead of all-reduced.
    outputs = {Split.ROW: Shard(1)} if sp else {}
    plan: dict[str, ParallelStyle] = {}
    for name, split in BLOCK_PLAN.items():
        sublayer = name.partition(".")[0]
        if sp and name != sublayer and sublayer not in plan:
            # SP: gather the stream once per sub-layer (attn, mlp), not once per q/k/v.
            plan[sublayer] = PrepareModuleInput(
                input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)
            )
        plan[name] = parallel_style(split, sp, outputs=outputs.get(split))
    return plan


def top_plan(model: nn.Module, sequence_parallel: bool) -> dict[str, ParallelStyle]:
    """The modules outside the blocks that ``model`` still has (a pipeline stage may lack
    them): ``tp_plan.TOP_PLAN`` as parallel styles, with the layouts of where each sits."""
    stream = Shard(1) if sequence_parallel else Replicate()  # the residual stream
    layouts = {
        "wte": (Replicate(), stream),  # the token ids arrive whole on every rank
        "wpe": (None, Shard(0) if sequence_parallel else Replicate()),  # its (seq, d) output
        "ln_f": (None, None),
        "lm_head": (stream, Replicate()),  # the logits gathered: the ordinary loss
    }
    return {
        name: parallel_style(split, sequence_parallel, *layouts[name])
        for name, split in TOP_PLAN.items()
        if getattr(model, name) is not None
    }


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh, sequence_parallel: bool) -> nn.Module:
    """Split ``model`` (a GPT, or a pipeline stage of one) across ``tp_mesh`` in place.

    Only the parts the model still has are parallelized, so this works on a
    pipeline stage whose other blocks, embeddings or head were removed.
    """
    top = top_plan(model, sequence_parallel)
    if top:
        parallelize_module(model, tp_mesh, top)
    if model.wte is not None:
        # DTensor's embedding backward yields a replicated (full) gradient for the
        # vocabulary-sharded table; keep only this rank's rows (a local slice, no
        # communication), as the optimizer only updates those.
        weight = model.wte.weight
        weight.register_hook(lambda grad: grad.redistribute(placements=weight.placements))
    for block in model.blocks.values():
        parallelize_module(block, tp_mesh, block_plan(sequence_parallel))
    return model


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
        apply_tp(model, mesh["tp"], config.sequence_parallel)
        apply_ac(model, config.ac)  # after tp: recomputation runs the DTensor forward again
        if config.compile:
            apply_compile(model)  # after tp: its DTensor hooks are traced into the graphs
        return ModuleTrainStep(
            model,
            ctx,
            config,
            dp_rank=0,
            dp_size=1,
            dp_group=None,
        )
