"""What DeepSpeed's ZeRO keeps per rank: predicted term by term, and measured from the engine.

Memory per rank, fp32 AdamW, P parameters. The ZeRO paper counts 4 B/param of
params, 4 of grads, 8 of optimizer state, and ZeRO-1 divides the 8 by N,
ZeRO-2 also the grads, ZeRO-3 also the params. DeepSpeed keeps more, and
``predicted_zero_bytes`` adds each term (``docs/memory.md`` measures them).
Under ``--precision bf16`` (DeepSpeed's bf16 mode) the model's parameters and
gradients, ZeRO-1/2's bucket and the offload staging copies take 2 bytes per
element instead of 4; the fp32 master slice, the optimizer state, ZeRO-3's
bucket (it holds the fp32 communication dtype) and the CPU optimizer's
gradient slice stay fp32.

    stage  params  grads              optimizer
    1      4P      4P     + 4B        4P/N + 8P/N
    2      4P      4P/N   + 4B        4P/N + 8P/N
    3      4P/N    4P/N   + 4B        4P/N + 8P/N

- 4P/N *master copy*: DeepSpeed's optimizer updates a separate fp32 copy of the
  rank's parameter slice even when the model is fp32 (it is built for bf16 and
  fp16 models, where that copy is the master weights, as under
  ``--precision bf16``). Counted, as the paper does, with the optimizer state.
- 4B *gradient bucket*: backward copies gradients into a contiguous bucket of
  B = ``reduce_bucket_size`` elements before reducing it. DeepSpeed's default
  (5e8 elements, 2 GB) exceeds every lab model and would hold all gradients
  at once; distlab sets B = P/8, a fixed cost that does not shrink with N.
- smaller terms: ZeRO-2's gradient partition keeps every tensor that overlaps
  the rank's slice whole (up to one tensor more than P/N), and with gradient
  accumulation keeps the earlier micro-batches' slice apart (twice that);
  offload adds the CPU optimizer's fp32 gradient slice and staging buffers.
- reducing once per step (``--zero-reduce once``, ZeRO-2's default, with
  several micro-batches): the micro-batches' gradients add up, unsharded, on
  the parameters until the last backward (4P, ZeRO-1's gradients); ZeRO-2 then
  holds 4P at its peak instead of its slice, ZeRO-3 4P on top of its slice and
  bucket.

The measurement (``measure_grad_bytes``, ``measure_optimizer_bytes``) walks
the engine's own buffers: the parameters as stored, ZeRO's gradient buckets and
partitions, the fp32 master slice, the inner optimizer's state and offload's
staging copies, each storage counted once.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from distlab.config import Config, grad_accum_steps, model_shape
from distlab.measure.memory import ModelStateBytes
from distlab.strategies.parallel_dims import parameter_sizes
from distlab.strategies.state_bytes import optimizer_bytes_per_param

ZERO_REDUCE_CHOICES = ("once", "per-microbatch")
"""What ``--zero-reduce`` may say: when ZeRO-2/3 reduce the accumulated gradients."""


def zero_reduce_mode(config: Config, stage: int) -> str:
    """When ZeRO reduces accumulated gradients: the configured mode, else the stage's default.

    ZeRO-1 always reduces once (at the step's last backward); ZeRO-2 by default too,
    ZeRO-3 by default in every micro-batch (its gradients stay sharded).
    """
    if config.zero_reduce is not None:
        return config.zero_reduce
    return "per-microbatch" if stage == 3 else "once"


BUCKET_FRACTION = 8
"""The gradient bucket holds 1/8 of the model's elements (see ``bucket_elements``)."""


def bucket_elements(n_params: int) -> int:
    """Elements of DeepSpeed's gradient bucket (``reduce_bucket_size``) for a P-parameter model.

    DeepSpeed's default, 5e8 elements (2 GB in fp32), is larger than every lab
    model: all gradients would sit in one bucket, a full extra copy that hides
    ZeRO-2's gradient sharding. P/8 is still larger than any single tensor of
    the lab's models (larger ones would bypass the bucket).
    """
    return max(1, n_params // BUCKET_FRACTION)


def largest_tensor_elements(config: Config) -> int:
    """Elements of the model's largest parameter (embedding, LM head or MLP matrix)."""
    shape = model_shape(config)
    d = shape.d_model
    return max(shape.vocab_size * d, shape.block_size * d, 4 * d * d)


def first_slice_tensor_elements(config: Config) -> int:
    """Elements of the tensors that overlap rank 0's 1/N slice of DeepSpeed's flat buffer.

    ZeRO-2 (without offload) keeps the reduced gradients of every tensor that
    overlaps the rank's slice whole, so a tensor crossing a slice boundary
    counts on both ranks: rank 0's partition is slightly more than P/N.
    """
    sizes = parameter_sizes(config)
    slice_end = -(-sum(sizes) // config.nproc)
    total, start = 0, 0
    for size in sizes:
        if start < slice_end:
            total += size
        start += size
    return total


GRADIENT_ATTRIBUTE = re.compile(r"grad|ipg")
"""ZeRO optimizer attributes that hold gradients: partitions, buckets ("ipg"), offload buffers."""


def _tensors(obj: Any, depth: int = 4) -> Iterator[torch.Tensor]:
    """Tensors reachable from ``obj`` through lists, dicts and DeepSpeed's own objects."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif depth > 0 and isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors(item, depth - 1)
    elif depth > 0 and isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item, depth - 1)
    elif depth > 0 and type(obj).__module__.startswith("deepspeed") and hasattr(obj, "__dict__"):
        for item in vars(obj).values():
            yield from _tensors(item, depth - 1)


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views of one buffer count once)."""
    storages = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        if storage.nbytes():
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def _parameter_tensors(engine) -> list[torch.Tensor]:
    """The model parameters as this rank stores them (ZeRO-3: each one's local slice)."""
    return [getattr(p, "ds_tensor", p) for p in engine.module.parameters()]


def _master_tensors(engine) -> list[torch.Tensor]:
    """This rank's fp32 master slice: what DeepSpeed's inner (torch) optimizer updates."""
    zero = engine.optimizer
    if hasattr(zero, "single_partition_of_fp32_groups"):  # ZeRO-1/2
        return list(zero.single_partition_of_fp32_groups)
    return list(zero.fp32_partitioned_groups_flat)  # ZeRO-3


def measure_parameter_bytes(engine) -> int:
    """Parameter storage as this rank holds it (ZeRO-3: the local slices)."""
    return storage_bytes(_parameter_tensors(engine))


def measure_grad_bytes(engine) -> int:
    """Gradient storage held right now: on the parameters, in ZeRO's buckets and partitions."""
    found = [p.grad for p in engine.module.parameters() if p.grad is not None]
    found += [p.grad for p in _master_tensors(engine) if p.grad is not None]
    for name, value in vars(engine.optimizer).items():
        if GRADIENT_ATTRIBUTE.search(name):
            # A tensor that requires grad is a parameter, not a gradient: count its .grad.
            found += [
                t.grad if t.requires_grad else t
                for t in _tensors(value)
                if not t.requires_grad or t.grad is not None
            ]
    return storage_bytes(found)


def held_buffers(engine) -> dict[str, list[torch.Tensor]]:
    """DeepSpeed's own buffers by lab category, for the step's memory tracker.

    The flat parameter buffers the model's parameters are views of (ZeRO-3: the
    local slices), the gradient partitions and buckets, and the fp32 master
    slice with offload's staging copy: tensors the engine allocated before the
    step, which the tracker would otherwise first meet as the output of some
    view and misfile as an activation.
    """
    zero = engine.optimizer
    params = _parameter_tensors(engine) + list(getattr(zero, "bit16_groups_flat", []))
    grads = [
        t.grad if t.requires_grad else t
        for name, value in vars(zero).items()
        if GRADIENT_ATTRIBUTE.search(name)
        for t in _tensors(value)
        if not t.requires_grad or t.grad is not None
    ]
    staging = getattr(zero, "param_buffer_of_bit16_for_cpu_offload_groups", [])
    return {"params": params, "grads": grads, "optimizer": _master_tensors(engine) + list(staging)}


def measure_optimizer_bytes(engine) -> int:
    """The fp32 master slice, the inner optimizer's state and offload's staging copy."""
    inner = engine.optimizer.optimizer
    state = [v for s in inner.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    staging = getattr(engine.optimizer, "param_buffer_of_bit16_for_cpu_offload_groups", [])
    return storage_bytes([*_master_tensors(engine), *state, *staging])


def predicted_zero_bytes(config: Config, stage: int, n_params: int) -> ModelStateBytes:
    """The ZeRO paper's count for this stage plus what DeepSpeed keeps besides (see above)."""
    n, p = config.nproc, n_params
    offload = config.offload != "none"
    width = 2 if config.precision == "bf16" else 4  # bytes of a model parameter or gradient
    params = width * p // n if stage == 3 else width * p
    # ZeRO-1: full gradients until the end of backward; ZeRO-2/3: this rank's slice
    # (ZeRO-2: whole tensors overlapping it, unless they go straight to the CPU).
    grad_slice = p // n
    if stage == 2 and not offload:
        grad_slice = first_slice_tensor_elements(config)
    # ZeRO-2 with offload reduces straight into the CPU optimizer's fp32 slice.
    slice_width = 4 if stage == 2 and offload else width
    grads = width * p if stage == 1 else slice_width * grad_slice
    # ZeRO-3's bucket holds the communication dtype (fp32), ZeRO-1/2's the gradients'.
    grads += (4 if stage == 3 else width) * bucket_elements(p)
    accumulating = grad_accum_steps(config, n) > 1
    once = accumulating and stage > 1 and zero_reduce_mode(config, stage) == "once"
    if stage == 2 and accumulating and not once:
        grads += width * grad_slice  # earlier micro-batches' slice, accumulated apart
    if stage == 2 and once:
        # The summed gradients on the parameters, measured at the end of the last backward
        # (the slice and the bucket are filled only after that, as the sum is reduced).
        grads = width * p
        if offload:
            grads += 4 * p // n  # the CPU optimizer's fp32 gradient slice, kept between steps
    elif stage == 3 and once:
        grads += width * p  # the summed gradients on the (gathered) parameters
    if offload and stage != 2:
        grads += 4 * p // n  # the fp32 gradient slice the CPU optimizer reads
    if offload and stage != 3:
        grads += 2 * width * largest_tensor_elements(config)  # two staging buffers
    optimizer = 4 * p // n + optimizer_bytes_per_param(config.optimizer) * p // n
    if offload and stage != 3:
        optimizer += width * p // n  # staging copy of the updated slice for the way back
    return ModelStateBytes(params=params, grads=grads, optimizer=optimizer)
