"""Communication of the data-parallel flavours: one function per flavour, one table.

Each function adds rank 0's collectives of one optimizer step under its flavour
(``Strategy.data_parallel``) to the prediction and returns the formula it applies;
the formulas and their derivations are in ``theory.comm``'s docstring.
"""

from __future__ import annotations

from collections.abc import Callable

from distlab.config import Config, model_shape
from distlab.errors import DistlabError
from distlab.strategies.data_parallel import DataParallel
from distlab.strategies.deepspeed_config import deepspeed_config
from distlab.strategies.deepspeed_memory import zero_reduce_mode
from distlab.strategies.degrees import ep_dims
from distlab.strategies.expert_parallel import expert_parameter_count
from distlab.strategies.fairscale_oss import oss_owners, oss_partition
from distlab.strategies.parallel_dims import fsdp_gathered_shapes, numel, parameter_sizes
from distlab.theory.collectives import (
    INT64,
    CommPrediction,
    ExpertRouting,
    StepFacts,
)
from distlab.theory.rank_layout import FP32, RankLayout, layers_of, microbatches


def ddp_comm(pred: CommPrediction, step: StepFacts) -> str:
    """DDP: one all-reduce of the gradients per step, bucketed; the formula."""
    pred.add("all_reduce", FP32 * step.p_local, step.layout.reducers, calls=None)
    return "all-reduce 4P"


def fsdp_comm(pred: CommPrediction, step: StepFacts) -> str:
    """FSDP2's all-gathers (at ``model_bytes`` per element: 2 under the bf16 policy) and its
    fp32 reduce-scatter (``distlab.strategies.fsdp``) over the shard degree; under hsdp also
    the all-reduce of each unit's reduce-scattered gradient shard across the replica groups
    (``distlab.strategies.hsdp``); the formula."""
    config, layout, shapes, model_bytes = step.config, step.layout, step.shapes, step.model_bytes
    dp = layout.shard
    padded_elements = numel(fsdp_gathered_shapes(shapes, dp))
    padded = model_bytes * padded_elements
    root = {n: s for n, s in shapes.items() if not n.startswith("blocks.")}
    blocks_padded = padded - model_bytes * numel(fsdp_gathered_shapes(root, dp))
    blocks = layers_of(config, layout)
    units = blocks + (1 if root else 0)
    # How often every unit is gathered (forward), and how often the blocks again
    # (backward, when forward freed them; the root is never freed after forward).
    resharding = 1 if config.reshard_after_forward else 0
    if not config.reshard_between_microbatches:
        if layout.pp == 1:
            gathers, block_regathers = 1, resharding
        else:  # kept gathered from the first forward to the schedule's last backward
            gathers, block_regathers = 1, 0
    elif layout.pp == 1:
        gathers, block_regathers = step.accum, step.accum * resharding
    else:  # the schedule never frees after backward: each backward that follows a forward
        gathers, block_regathers = 1, microbatches(config, layout) * resharding
    calls = gathers * units + block_regathers * blocks
    pred.add("all_gather", gathers * padded + block_regathers * blocks_padded, dp, calls=calls)
    # Gradients are reduced in fp32 (the policy's reduce_dtype) under bf16 too.
    pred.add("reduce_scatter", FP32 * padded_elements, dp, calls=units)
    size = f"{model_bytes}P'"
    again = f" + {block_regathers}x{size}_blocks" if block_regathers else ""
    formula = f"all-gather {gathers}x{size}{again} + reduce-scatter 4P' (P' = P padded to {dp})"
    if layout.replicate > 1:
        shard_bytes = FP32 * padded_elements // dp
        pred.add("all_reduce", shard_bytes, layout.replicate, calls=units)
        formula += f" + all-reduce 4P'/{dp} over {layout.replicate} replicas"
    return formula


def zero12_comm(pred: CommPrediction, step: StepFacts) -> str:
    """ZeRO-1/2 (``distlab.strategies.deepspeed_zero``): the gradients' all-reduce, once or
    per micro-batch, and the updated parameter slices' all-gather; the formula."""
    dp = step.layout.dp
    reductions = step.accum if _reduces_per_microbatch(step.config, step.layout) else 1
    pred.add("all_reduce", reductions * FP32 * step.p_local, dp, calls=None)
    pred.add("all_gather", step.model_bytes * step.p_local, dp, calls=None)
    pred.notes.append(
        "ZeRO paper: reduce-scatter + all-gather = DDP's volume; DeepSpeed all-reduces "
        "the gradient buckets on gloo, so it sends 1.5x DDP"
    )
    if reductions > 1:
        pred.notes.append(
            "--zero-reduce per-microbatch: ZeRO-2 reduces the gradients in every "
            "micro-batch's backward"
        )
    times = f"{reductions} x " if reductions > 1 else ""
    return f"all-reduce {times}4P (gradients) + all-gather {step.model_bytes}P (parameters)"


def zero3_comm(pred: CommPrediction, step: StepFacts) -> str:
    """ZeRO-3: the parameters' all-gathers per micro-batch and the gradients' reduce-scatter,
    per micro-batch or once; the formula."""
    dp, accum, model_bytes = step.layout.dp, step.accum, step.model_bytes
    gathers = _zero3_gathers(step.config, step.p_local)
    reductions = accum if _reduces_per_microbatch(step.config, step.layout) else 1
    pred.add("all_gather", accum * gathers * model_bytes * step.p_local, dp, calls=None)
    pred.add("reduce_scatter", reductions * FP32 * step.p_local, dp, calls=None)
    if gathers == 1:
        pred.notes.append(
            "DeepSpeed keeps forward's gathered parameters for backward "
            "(reuse distance < stage3_max_reuse_distance): one all-gather per micro-batch, "
            "not the ZeRO paper's two"
        )
    per_step = "" if reductions == accum else " + reduce-scatter 4P once"
    per_micro = " + reduce-scatter 4P" if reductions == accum else ""
    return f"({gathers}x all-gather {model_bytes}P{per_micro}) per micro-batch{per_step}"


def _reduces_per_microbatch(config: Config, layout: RankLayout) -> bool:
    """Whether ZeRO-2/3 reduce the gradients in every micro-batch (``--zero-reduce``): the
    stages that split the gradients can; ZeRO-1 reduces them whole, once per step."""
    stage = layout.data_parallel.zero_stage
    return (
        layout.data_parallel.shards_gradients
        and zero_reduce_mode(config, stage) == "per-microbatch"
    )


def _zero3_gathers(config: Config, p_local: int) -> int:
    """All-gathers of the parameters per ZeRO-3 step under the strategy's DeepSpeed config."""
    try:
        zero = deepspeed_config(config, 3, config.nproc, p_local)["zero_optimization"]
    except Exception:  # noqa: BLE001 - DeepSpeed strategy missing or changed: paper's count
        return 2
    reuse = zero.get("stage3_max_reuse_distance", 1e9)
    live = zero.get("stage3_max_live_parameters", 1e9)
    return 1 if p_local <= min(reuse, live) else 2


def fairscale_comm(pred: CommPrediction, step: StepFacts) -> str:
    """OSS's broadcasts, and DDP's all-reduce or ShardedDataParallel's reduces; the formula."""
    layout = step.layout
    n = layout.dp
    sizes = parameter_sizes(step.config)
    owners = oss_owners(sizes, n)
    if layout.data_parallel is DataParallel.FAIRSCALE_OSS:
        pred.add("all_reduce", FP32 * sum(sizes), n, calls=None)
    else:
        for size, owner in zip(sizes, owners, strict=True):
            pred.add("reduce", FP32 * size, n, relative_rank=-owner % n)
    for owner, owned in enumerate(oss_partition(sizes, n)):
        if owned:
            pred.add("broadcast", FP32 * owned, n, relative_rank=-owner % n)
    pred.add("all_reduce", FP32, n)  # OSS's gradient norm
    reduction = "all-reduce" if layout.data_parallel is DataParallel.FAIRSCALE_OSS else "reduce"
    return f"{reduction} 4P (gradients) + broadcast 4P (owned parameters)"


def ep_comm(pred: CommPrediction, step: StepFacts) -> str:
    """Expert parallelism (``distlab.strategies.expert_parallel``): gradient all-reduces, the
    gradient norm's, and the all-to-alls of the rank's tokens (``theory.comm``); the formula."""
    config, layout, accum, routing = step.config, step.layout, step.accum, step.routing
    tokens = step.rows * step.seq
    shape = model_shape(config)
    ep, d, layers = ep_dims(config).ep, shape.d_model, shape.n_layer
    experts = expert_parameter_count(shape)
    dense = sum(parameter_sizes(config)) - experts
    pred.add("all_reduce", FP32 * dense, layout.dp)
    replicas = layout.dp // ep
    pred.add("all_reduce", FP32 * experts // ep, replicas, calls=4 * layers)
    pred.add("all_reduce", FP32, ep)  # the expert shards' squared gradient norm
    sent = layers * shape.top_k * tokens  # dropless: every token to k experts, every layer
    if routing is None:
        routing = ExpertRouting([sent // ep] * ep, [sent // ep] * ep)
        pred.notes.append("all-to-all volume assumes balanced routing (it depends on the data)")
    elif abs(sum(routing.rows_sent) - sent) > 0.5 or len(routing.rows_sent) != ep:
        raise DistlabError(
            f"routing counts {routing.rows_sent} do not fit the config: rank 0 sends "
            f"{sent} rows per step to {ep} ranks"
        )
    received, own = sum(routing.rows_received), routing.rows_sent[0]
    row = FP32 * d
    passes = layers * accum
    counts = INT64 * shape.n_expert
    pred.add("all_to_all", passes * counts, ep, calls=passes, wire=passes * counts * (ep - 1) / ep)
    pred.add(
        "all_to_all",
        2 * row * (sent + received),
        ep,
        calls=4 * passes,
        wire=2 * row * (sent - own + received - own),
    )
    return (
        "all-reduce 4P_dense + per layer: all-to-all 8E (counts) + 2 x 4d x (kBT sent + R "
        "received, data-dependent)"
    )


DATA_PARALLEL_COMM: dict[DataParallel, Callable[[CommPrediction, StepFacts], str]] = {
    DataParallel.DDP: ddp_comm,
    DataParallel.FSDP: fsdp_comm,
    DataParallel.ZERO1: zero12_comm,
    DataParallel.ZERO2: zero12_comm,
    DataParallel.ZERO3: zero3_comm,
    DataParallel.FAIRSCALE_OSS: fairscale_comm,
    DataParallel.FAIRSCALE_SDP: fairscale_comm,
    DataParallel.EP: ep_comm,
}
"""Each data-parallel flavour (``Strategy.data_parallel``) -> the part it adds; none for
``DataParallel.NONE``."""


def data_parallel_comm(pred: CommPrediction, step: StepFacts) -> str | None:
    """The data-parallel flavour's collectives and the small ones beside them (the loss
    mean; DeepSpeed's norm and overflow checks); its formula, None without one."""
    layout = step.layout
    part = DATA_PARALLEL_COMM.get(layout.data_parallel)  # None under DataParallel.NONE
    formula = part(pred, step) if part is not None else None
    if layout.data_parallel.deepspeed and layout.dp > 1:
        small = 8 if layout.data_parallel is not DataParallel.ZERO3 else 12
        # The loss mean, and DeepSpeed's gradient-norm and overflow checks.
        pred.add("all_reduce", small, layout.dp, calls=None)
    elif layout.reducers > 1:
        pred.add("all_reduce", FP32, layout.reducers)  # the loss mean over data-parallel ranks
    return formula
