"""``--ac``: activation checkpointing of each transformer block (none, full or selective).

Backward needs tensors that forward computed (a matmul's input, GELU's input,
LayerNorm's statistics). Normally forward keeps them all until backward has used
them, so the peak memory of a step grows with the number of blocks times what
one block saves. Checkpointing a block keeps only what the policy says, and
backward runs the block's forward again to recompute the rest:

- ``full``: a block keeps only its input; backward recomputes the whole block
  (about one more forward per step, the most memory saved);
- ``selective``: op-level selective checkpointing
  (``torch.utils.checkpoint.create_selective_checkpoint_contexts``): the outputs
  of the expensive ops (``SAVED_OPS``: the matmuls ``mm``/``addmm``/``bmm``,
  scaled-dot-product attention, and the reducing collectives of tensor
  parallelism) are kept, everything else (LayerNorm, GELU, residual adds,
  views, transposes) is recomputed, which is cheap in FLOPs.

Both use torch's non-reentrant checkpoint (``use_reentrant=False``), which works
with FSDP2, DDP, DTensor and ``torch.compile``. Recomputation runs the same ops
on the same inputs, so the numbers, and therefore training, are the same as
without checkpointing.

As with ``--compile`` (``distlab.strategies.regional_compile``), only each block's
``forward`` is wrapped, not the module: parameter names and state-dict keys
stay those of the plain GPT (no ``_checkpoint_wrapped_module.`` prefix, so a
checkpoint loads across ``--ac`` modes), and hooks that data parallelism puts
on the block itself (FSDP2's all-gather before forward) stay outside. The
order in a strategy's ``prepare`` is torchtitan's: tensor parallelism, then
``apply_ac``, then ``apply_compile``, then FSDP / DDP / DeepSpeed / fairscale.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

SAVED_OPS = frozenset(
    {
        torch.ops.aten.mm.default,
        torch.ops.aten.addmm.default,
        torch.ops.aten.bmm.default,
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
        torch.ops.aten._scaled_dot_product_flash_attention.default,
        torch.ops.aten._scaled_dot_product_efficient_attention.default,
        torch.ops.aten._scaled_dot_product_cudnn_attention.default,
        torch.ops._c10d_functional.all_reduce.default,
        torch.ops._c10d_functional.reduce_scatter_tensor.default,
    }
)
"""Ops whose outputs ``--ac selective`` keeps for backward: matmuls, attention (CPU and
GPU kernels) and tensor parallelism's reducing collectives (so recomputation sends nothing)."""


def selective_policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    """Keep the outputs of ``SAVED_OPS``; recompute every other op in backward."""
    if op in SAVED_OPS:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def checkpointed(forward: Callable[..., torch.Tensor], mode: str) -> Callable[..., torch.Tensor]:
    """``forward`` run under non-reentrant checkpoint, ``full`` or ``selective``."""
    options: dict[str, Any] = {"use_reentrant": False}
    if mode == "selective":
        options["context_fn"] = functools.partial(
            create_selective_checkpoint_contexts, selective_policy
        )

    @functools.wraps(forward)
    def run(*args: Any, **kwargs: Any) -> torch.Tensor:
        return checkpoint(forward, *args, **options, **kwargs)

    return run


def apply_ac(model: nn.Module, mode: str) -> None:
    """Checkpoint the ``forward`` of each of ``model.blocks`` in place (a GPT or a pipeline stage).

    ``mode`` is one of ``distlab.config_checks.AC_MODES``; ``none`` leaves the model alone.
    Call after tensor parallelism and before ``apply_compile`` and data parallelism.
    """
    if mode == "none":
        return
    for block in model.blocks.values():
        block.forward = checkpointed(block.forward, mode)
