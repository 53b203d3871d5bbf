"""Which modules tensor parallelism splits, and so which dimension of each parameter.

``TP_PLAN`` is Megatron's layout of the GPT over the tp ranks, one entry per module:

    wte            ROW        vocabulary rows split: each rank looks up the tokens it owns
    wpe            REPLICATE
    blocks.*.ln_1  REPLICATE
    blocks.*.attn.q, .k, .v   COLUMN   output features split: n_head / tp heads per rank
    blocks.*.attn.proj        ROW      input features split: partial sums, then all-reduce
    blocks.*.ln_2  REPLICATE
    blocks.*.mlp.up           COLUMN
    blocks.*.mlp.down         ROW
    ln_f           REPLICATE
    lm_head        COLUMN     vocabulary split: the logits are gathered

``apply_tp`` (below) turns each entry into DTensor's parallel style and applies it;
``shard_dim`` reads the same entries for the theory (the rank's parameter shapes, and
from them its memory and communication), so what the theory predicts is what runs.
Modules the plan does not name (a MoE block's router and experts) stay whole.
"""

from __future__ import annotations

from enum import Enum

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


class Split(Enum):
    """How tensor parallelism splits one module (DTensor's ``ParallelStyle`` family)."""

    COLUMN = "column"
    """Output features split (``ColwiseParallel``): a Linear's weight rows and its bias."""
    ROW = "row"
    """Input features split (``RowwiseParallel``): a Linear's weight columns (its bias is
    added once, after the all-reduce, so it stays whole); an Embedding's rows."""
    REPLICATE = "replicate"
    """Whole on every rank (LayerNorms, the position embedding)."""


BLOCK_PLAN: dict[str, Split] = {
    "ln_1": Split.REPLICATE,
    "attn.q": Split.COLUMN,
    "attn.k": Split.COLUMN,
    "attn.v": Split.COLUMN,
    "attn.proj": Split.ROW,
    "ln_2": Split.REPLICATE,
    "mlp.up": Split.COLUMN,
    "mlp.down": Split.ROW,
}
"""Each transformer block's modules, by their name inside the block."""

TOP_PLAN: dict[str, Split] = {
    "wte": Split.ROW,
    "wpe": Split.REPLICATE,
    "ln_f": Split.REPLICATE,
    "lm_head": Split.COLUMN,
}
"""The modules outside the blocks."""

EMBEDDINGS = frozenset({"wte", "wpe"})
"""The plan's Embedding modules: their weight is (rows, d), so ROW splits dim 0."""


def module_split(module: str) -> Split | None:
    """How the plan splits the plain GPT's module ``module`` (``"blocks.3.attn.q"``), or
    None for a module it does not name."""
    part, _, rest = module.partition(".")
    if part == "blocks":
        return BLOCK_PLAN.get(rest.partition(".")[2])
    return TOP_PLAN.get(module)


def shard_dim(parameter: str) -> int | None:
    """The dimension of the plain GPT's parameter ``parameter`` that the plan splits over
    the tp ranks, or None if every rank holds it whole."""
    module, _, kind = parameter.rpartition(".")
    split = module_split(module)
    if split is Split.COLUMN:
        return 0  # Linear weight (out, in) and bias (out,): the output features
    if split is Split.ROW:
        if module in EMBEDDINGS:
            return 0
        return 1 if kind == "weight" else None
    return None


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
