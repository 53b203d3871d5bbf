"""``--compile``: regional ``torch.compile``, every transformer block compiled on its own.

Compiling block by block instead of the whole model keeps compilation short
(the blocks share one code path and one shape, so one graph is compiled and
reused by all of them), and leaves the parallelism around the blocks alone.
The order in a strategy's ``prepare`` is the one torchtitan uses:

1. tensor parallelism (``parallelize_module``): its input/output hooks on the
   block's submodules and its DTensor parameters are traced into the graph;
2. ``apply_compile``: each block's ``forward`` becomes a compiled function (after
   ``--ac`` wrapped it in a checkpoint, ``distlab.strategies.activation_checkpoint``,
   so the checkpoint is traced into the graph);
3. data parallelism (FSDP2 ``fully_shard`` per block, or DDP around the model).

Only ``forward`` is compiled, not the module's whole call, so the hooks that
FSDP2 registers on the block itself (all-gather before, reshard after) stay
outside the graph and run eagerly, as in eager training, and parameter names
stay those of the plain GPT (checkpoints move freely between compiled and
eager runs). Backward is compiled by AOTAutograd from the same trace, in the
first backward. Shapes are static (``dynamic=False``): every micro-batch of a
run has the same shape, so nothing recompiles after step 0.

The compiled artefacts (inductor's FX graphs, AOTAutograd's cache, C++ or
Triton kernels) go under distlab's cache dir, so a second run of the same
shapes loads them instead of compiling again: ``TORCHINDUCTOR_CACHE_DIR`` and
``TRITON_CACHE_DIR`` are set in each rank's process before anything compiles.
They are set, not defaulted: importing ``torch.distributed.pipelining`` already
sets ``TORCHINDUCTOR_CACHE_DIR`` to torch's own default (``/tmp/torchinductor_USER``,
measured on torch 2.13), so a user-set value cannot be told from it; move the
cache with ``DISTLAB_CACHE`` instead.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from distlab.config import cache_dir

INDUCTOR_CACHE = "inductor"
"""Subdirectory of ``distlab.config.cache_dir()`` holding inductor's (and Triton's) cache."""


def use_distlab_compile_cache() -> None:
    """Point inductor's and Triton's caches into distlab's cache dir (read when compiling)."""
    inductor = cache_dir() / INDUCTOR_CACHE
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(inductor)
    os.environ["TRITON_CACHE_DIR"] = str(inductor / "triton")


def apply_compile(model: nn.Module) -> None:
    """Compile the ``forward`` of each of ``model.blocks`` in place (a GPT or a pipeline stage).

    Call after tensor parallelism and before FSDP / DDP wrap the model.
    Compilation itself is lazy: it happens in the first forward (and backward).
    """
    use_distlab_compile_cache()
    for block in model.blocks.values():
        block.forward = torch.compile(block.forward, fullgraph=True, dynamic=False)
