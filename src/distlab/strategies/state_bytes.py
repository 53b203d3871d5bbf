"""Theory of a rank's model state: the bytes of parameters, gradients and optimizer state
rank 0 holds between steps, before any step runs.

``predicted_bytes`` is the ZeRO paper's count (4 B per parameter each of parameters and
gradients, plus the optimizer's state, each divided by the degree it is sharded over);
``rank0_state_bytes`` applies it tensor by tensor to rank 0's own parameters (its
pipeline stage, its tensor-parallel pieces, FSDP's dim-0 shard). Every strategy's
``predicted_state_bytes`` starts here (DeepSpeed's and fairscale's add what their
libraries keep: ``deepspeed_memory``, ``fairscale_oss``); ``distlab.theory`` builds the
step's peak on top of it. It lives with the strategies, not in ``distlab.theory``,
because each strategy's prediction sits beside the code that lays its state out.
"""

from __future__ import annotations

from distlab.config import Config
from distlab.measure.memory import ModelStateBytes
from distlab.strategies.data_parallel import DataParallel
from distlab.strategies.parallel_dims import ParallelDims, numel, rank0_shapes


def optimizer_bytes_per_param(optimizer: str) -> int:
    """Optimizer state per parameter in fp32: AdamW keeps two moments, plain SGD none."""
    return 8 if optimizer == "adamw" else 0


def predicted_bytes(
    n_params: int, optimizer: str, params_div: int = 1, grads_div: int = 1, optim_div: int = 1
) -> ModelStateBytes:
    """The ZeRO paper's count for fp32 training: 4 B/param each of params and grads,
    plus the optimizer state, each divided by the degree it is sharded over."""
    return ModelStateBytes(
        params=4 * n_params // params_div,
        grads=4 * n_params // grads_div,
        optimizer=optimizer_bytes_per_param(optimizer) * n_params // optim_div,
    )


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
