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

``distlab.strategies.tensor_parallel`` turns each entry into DTensor's parallel style
and applies it; ``shard_dim`` reads the same entries for the theory (the rank's
parameter shapes, and from them its memory and communication), so what the theory
predicts is what runs. Modules the plan does not name (a MoE block's router and
experts) stay whole.
"""

from __future__ import annotations

from enum import Enum


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
