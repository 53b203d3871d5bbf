"""Theory: rank 0's communication in one optimizer step, from the config alone.

One function per parallelism adds its collectives to the same prediction; the table
of formulas below is what they implement.

Communication is predicted per optimizer step in two currencies:

- payload bytes per collective type, the nccl-tests convention that
  ``distlab.measure`` counts (all-reduce: the buffer; all-gather: the gathered
  output; reduce-scatter: the unreduced input; send/recv: the message);
- wire bytes, what rank 0 sends over TCP under gloo's algorithms
  (``distlab.measure.wire.wire_bytes``: ring all-reduce 2 (N-1)/N of the buffer, ring
  all-gather (N-1)/N, and gloo's reduce-scatter is an all-reduce, 2 (N-1)/N).

The formulas (P parameters, fp32 gradients and parameters, N data-parallel
ranks, L layers, d model width, V vocabulary, B x T tokens per rank per step,
A micro-batches per rank per step (``--micro-batch``; 1 without accumulation),
M pipeline microbatches; ``x4`` = bytes per fp32 element):

    ddp    all-reduce 4 P (gradients, once per step, bucketed; no_sync before the last
           micro-batch), whatever A
    fsdp   all-gather 4 P' in forward, and again in backward for the blocks (not the
           root unit) when resharding after forward; reduce-scatter 4 P' once
           (P': P with each parameter's dim 0 padded to a multiple of N). The
           gathers happen once per step by default (parameters stay gathered
           between micro-batches), A times with --reshard-between-microbatches.
           Inside a pipeline: once per step by default; with the flag, torch's
           schedule keeps parameters after each backward, so the forward gather
           happens once and the blocks' backward gather M times (when resharding
           after forward)
    hsdp   fsdp over the S ranks of a replica group (P' padded to S), plus an all-reduce
           of each unit's reduce-scattered gradient shard (4 P' / S together) over the
           R replica groups
    zero1  all-reduce 4 P of gradients (once, at the accumulation boundary) + all-gather
           4 P of the updated parameter partitions: the ZeRO paper's reduce-scatter +
           all-gather would send the same as DDP; DeepSpeed all-reduces on this backend
    zero2  as zero1 (by default, --zero-reduce once: the micro-batches' gradients
           accumulate on each rank and are reduced once, after the last backward);
           with --zero-reduce per-microbatch the gradients are reduced in every
           micro-batch's backward (partitioned gradients): all-reduce A x 4 P
    zero3  per micro-batch all-gather 4 P: DeepSpeed keeps gathered parameters from
           forward to backward when their reuse distance is under
           stage3_max_reuse_distance (default 1e9 elements), so it gathers once per
           micro-batch (the ZeRO paper's 1.5x DDP assumes two gathers); plus
           reduce-scatter 4 P per micro-batch (by default, --zero-reduce
           per-microbatch: each micro-batch's gradients partitioned at once) or once
           per step (--zero-reduce once)
    fairscale-oss  DDP's all-reduce 4 P + every rank broadcasts the parameters it owns
           (4 P together), whatever A
    fairscale-sdp  one reduce per parameter tensor to its owner (4 P) + the broadcasts
           (4 P), whatever A
    tp     all-reduce B T d x (1 + 2 L) forward (embedding, attention and MLP
           outputs) + (4 L + 1) backward (the input gradients of q, k, v, up and
           the LM head: DTensor reduces each column-parallel input separately, where
           Megatron fuses q/k/v into one, 2 L), plus an all-gather of the B T V logits;
           the same bytes in A (or M) times as many calls
    pp     send M activations of (B/M) T d (T / cp tokens under cp) to the next stage,
           receive M gradients back (and the reverse for later stages)
    ep     all-reduce 4 P_dense (one flat buffer) over all ranks (+ 4 E_local P_expert over the
           nproc / ep replicas of each expert, when ep < nproc); per MoE layer and
           micro-batch an all-to-all of the E int64 row counts and four all-to-alls of
           rows of d fp32: dispatch and combine, forward and backward. Rank 0 sends
           k B T rows per layer in the dispatch (dropless: fixed by the config) and
           R rows in the combine, R the rows its experts received: data-dependent,
           taken from the run's routing counts (``ExpertRouting``; balanced routing,
           R = k B T, when none are given). On the wire a rank sends all but the rows
           it routes to itself
    cp     per layer and micro-batch, all-gather the keys and the values over the C
           context-parallel ranks (2 gathers of B T d / tp elements each: the gathered
           output, the whole sequence) in forward, again when --ac recomputes the
           block, and reduce-scatter their gradients in backward (2 of B T d / tp);
           plus the data parallelism's gradient reduction (ddp or fsdp) over the
           dp x C ranks (cp ranks average their gradients too). --cp-attention ring:
           send (and receive) (C - 1) blocks of B T d / (C tp) per layer for K and for V
           in forward (again under --ac) and as many gradient blocks in backward

Small collectives (the loss mean, a DTensor gradient norm: 4 bytes per
parameter tensor) are predicted too, so counts can be compared exactly.

Under ``--precision bf16`` (``compute_bytes``): FSDP's mixed-precision policy
and DeepSpeed's bf16 mode gather parameters in bf16 (2 bytes per element, half
the all-gather bytes) and reduce gradients in fp32 (4 bytes, unchanged), and
their whole forward runs in bf16, so tensor-parallel all-reduces and pipeline
messages are 2 bytes per element too. Under autocast (every other strategy)
only matmul outputs are bf16: the row-parallel forward all-reduces and the
gathered logits take 2 bytes; the embedding's all-reduce, the backward
all-reduces (gradients of fp32 LayerNorm outputs) and the residual stream
between pipeline stages stay fp32.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from distlab.config import Config, grad_accum_steps, model_shape, resolved_seq_len, zero_reduce_mode
from distlab.errors import DistlabError
from distlab.measure.wire import KINDS, wire_bytes
from distlab.strategies import registry
from distlab.strategies.deepspeed_zero import deepspeed_config
from distlab.strategies.expert_parallel import ep_degree, expert_parameter_count
from distlab.strategies.fairscale_oss import oss_owners, oss_partition
from distlab.strategies.parallel_dims import (
    VIRTUAL_STAGES,
    ParallelDims,
    numel,
    parameter_sizes,
    stage_shapes,
    tp_local_shapes,
)
from distlab.strategies.pipeline_parallel import resolve_microbatches
from distlab.strategies.pipeline_schedules import last_stage_rank, rank_stages

FP32 = 4
INT64 = 8


@dataclass
class CommPrediction:
    """Predicted communication of rank 0 in one optimizer step."""

    kinds: dict[str, float] = field(default_factory=dict)
    """Payload bytes per collective type."""
    calls: dict[str, int] = field(default_factory=dict)
    """Number of collectives per type (where the schedule is known exactly)."""
    wire_bytes: float = 0.0
    """Bytes rank 0 sends over TCP under gloo's algorithms."""
    formula: str = ""
    notes: list[str] = field(default_factory=list)
    uncounted: set[str] = field(default_factory=set)
    """Types whose number of calls is not predicted (bucketing decides it)."""

    @property
    def bytes(self) -> float:
        return sum(self.kinds.values())

    def add(
        self,
        kind: str,
        payload: float,
        group_size: int,
        calls: int | None = 1,
        relative_rank: int = 0,
        wire: float | None = None,
    ) -> None:
        """Add ``calls`` collectives of ``kind`` (None: number not predicted) moving ``payload``;
        ``wire``: the bytes sent, where gloo's algorithm model does not say (unequal splits)."""
        if group_size <= 1 and kind not in ("send", "recv"):
            return
        self.kinds[kind] = self.kinds.get(kind, 0.0) + payload
        if calls is None:
            self.uncounted.add(kind)
        else:
            self.calls[kind] = self.calls.get(kind, 0) + calls
        if wire is None:
            wire = wire_bytes(kind, int(payload), group_size, relative_rank)
        self.wire_bytes += wire

    def to_dict(self) -> dict[str, Any]:
        ordered = {k: self.kinds[k] for k in KINDS if k in self.kinds}
        return {
            "bytes": self.bytes,
            "wire_bytes": round(self.wire_bytes),
            "kinds": ordered,
            "calls": {
                k: self.calls[k] for k in KINDS if k in self.calls and k not in self.uncounted
            },
            "formula": self.formula,
            "notes": self.notes,
        }


# --- Model shapes ---------------------------------------------------------------------


def fsdp_padded_numel(shapes: dict[str, tuple[int, ...]], n: int) -> int:
    """Elements FSDP2 all-gathers: each parameter's dim 0 padded to a multiple of ``n``."""
    return sum(-(-s[0] // n) * n * math.prod(s[1:]) for s in shapes.values())


# --- Strategy degrees -----------------------------------------------------------------

MODELLED_DATA_PARALLEL = (
    None,
    "ddp",
    "fsdp",
    "zero1",
    "zero2",
    "zero3",
    "fairscale-oss",
    "fairscale-sdp",
    "ep",
)
"""The data-parallel flavours (``Strategy.data_parallel``) whose communication is modelled."""


@dataclass(frozen=True)
class RankLayout(ParallelDims):
    """How a strategy uses the ranks: its degrees (``ParallelDims``: dp, tp, pp, hsdp's
    replicate, cp, ep, with the reducer and shard counts they imply) and its data-parallel
    flavour."""

    data_parallel: str | None = None
    """ddp, fsdp, zero1/2/3, fairscale-oss/sdp, ep or None."""


def compute_bytes(config: Config, layout: RankLayout) -> int:
    """Bytes per element of the parameters gathered and activations computed under ``config``.

    2 where bf16 replaces fp32 in the model itself: FSDP2's ``MixedPrecisionPolicy``
    and DeepSpeed's bf16 mode (every op in bf16); 4 in fp32, and for the
    parameters of autocast strategies (their activations: see the module docstring).
    """
    casts_model = layout.data_parallel in ("fsdp", "zero1", "zero2", "zero3")
    return 2 if config.precision == "bf16" and casts_model else FP32


def rank_layout(config: Config) -> RankLayout | None:
    """What ``config.strategy`` declares (its flavour and mesh); None if not modelled."""
    strategy = registry.get(config.strategy)
    if strategy.data_parallel not in MODELLED_DATA_PARALLEL:
        return None
    dims = strategy.dims(config)
    return RankLayout(**asdict(dims), data_parallel=strategy.data_parallel)


# --- The predictions ------------------------------------------------------------------


@dataclass(frozen=True)
class ExpertRouting:
    """Rank 0's expert-parallel rows in one step (the run's ``ep/rows_sent``,
    ``ep/rows_received``), summed over MoE layers and micro-batches."""

    rows_sent: list[float]
    """Rows rank 0 sent to each rank of its ep group (itself included); a mean over
    several steps may be fractional."""
    rows_received: list[float]
    """Rows rank 0 received from each rank of its ep group (itself included)."""


def predict_comm(config: Config, routing: ExpertRouting | None = None) -> CommPrediction | None:
    """Rank 0's communication in one steady-state optimizer step (None: not modelled).

    ``routing``: for ``ep``, the step's measured routing counts, on which its
    all-to-all volume depends (balanced routing assumed without them).
    """
    layout = rank_layout(config)
    if layout is None:
        return None
    shape = model_shape(config)
    seq = resolved_seq_len(config)
    model_bytes = compute_bytes(config, layout)  # parameters gathered, activations under FSDP
    matmul_bytes = 2 if config.precision == "bf16" else FP32  # matmul outputs (autocast too)
    pred = CommPrediction()
    shapes = tp_local_shapes(stage_shapes(config, layout.pp), layout.tp)
    n_tensors = len(shapes)
    p_local = numel(shapes)
    rows = config.global_batch // layout.dp  # rows of the global batch on this data-parallel rank
    accum = grad_accum_steps(config, layout.dp) if layout.pp == 1 else 1
    dtensor_params = layout.data_parallel == "fsdp" or layout.tp > 1
    formulas = []

    # Data parallelism over the dp ranks.
    dp = layout.dp
    if layout.data_parallel == "ddp":
        pred.add("all_reduce", FP32 * p_local, layout.reducers, calls=None)
        formulas.append("all-reduce 4P")
    elif layout.data_parallel == "fsdp":
        formulas.append(_fsdp_comm(pred, config, layout, shapes, accum, model_bytes))
    elif layout.data_parallel in ("zero1", "zero2"):
        reductions = accum if _reduces_per_microbatch(config, layout) else 1
        pred.add("all_reduce", reductions * FP32 * p_local, dp, calls=None)
        pred.add("all_gather", model_bytes * p_local, dp, calls=None)
        times = f"{reductions} x " if reductions > 1 else ""
        formulas.append(
            f"all-reduce {times}4P (gradients) + all-gather {model_bytes}P (parameters)"
        )
        pred.notes.append(
            "ZeRO paper: reduce-scatter + all-gather = DDP's volume; DeepSpeed all-reduces "
            "the gradient buckets on gloo, so it sends 1.5x DDP"
        )
        if reductions > 1:
            pred.notes.append(
                "--zero-reduce per-microbatch: ZeRO-2 reduces the gradients in every "
                "micro-batch's backward"
            )
    elif layout.data_parallel == "zero3":
        gathers = _zero3_gathers(config, p_local)
        reductions = accum if _reduces_per_microbatch(config, layout) else 1
        pred.add("all_gather", accum * gathers * model_bytes * p_local, dp, calls=None)
        pred.add("reduce_scatter", reductions * FP32 * p_local, dp, calls=None)
        per_step = "" if reductions == accum else " + reduce-scatter 4P once"
        per_micro = " + reduce-scatter 4P" if reductions == accum else ""
        formulas.append(
            f"({gathers}x all-gather {model_bytes}P{per_micro}) per micro-batch{per_step}"
        )
        if gathers == 1:
            pred.notes.append(
                "DeepSpeed keeps forward's gathered parameters for backward "
                "(reuse distance < stage3_max_reuse_distance): one all-gather per micro-batch, "
                "not the ZeRO paper's two"
            )
    elif layout.data_parallel in ("fairscale-oss", "fairscale-sdp"):
        _fairscale_comm(pred, config, layout)
        reduction = "all-reduce" if layout.data_parallel == "fairscale-oss" else "reduce"
        formulas.append(f"{reduction} 4P (gradients) + broadcast 4P (owned parameters)")
    elif layout.data_parallel == "ep":
        formulas.append(_ep_comm(pred, config, layout, rows * seq, accum, routing))
    if layout.data_parallel in ("zero1", "zero2", "zero3") and dp > 1:
        small = 8 if layout.data_parallel != "zero3" else 12
        # The loss mean, and DeepSpeed's gradient-norm and overflow checks.
        pred.add("all_reduce", small, dp, calls=None)
    elif layout.reducers > 1:
        pred.add("all_reduce", FP32, layout.reducers)  # the loss mean over data-parallel ranks

    # Tensor parallelism inside each replica/stage.
    tp = layout.tp
    if tp > 1:
        if config.sequence_parallel:
            pred.notes.append("sequence parallelism not modelled: tp traffic left out")
        else:
            layers = _layers_of(config, layout)
            first, last = _has_first_last(config, layout)
            tokens = rows * seq // layout.cp  # a cp rank computes its slice of each sequence
            count = 6 * layers + (1 if first else 0) + (1 if last else 0)
            # The 2 L row-parallel outputs are matmul outputs; the rest (embedding,
            # backward input gradients) are in the model's dtype (fp32 under autocast).
            passes = accum if layout.pp == 1 else microbatches(config, layout)
            volume = 2 * layers * matmul_bytes + (count - 2 * layers) * model_bytes
            pred.add("all_reduce", volume * tokens * shape.d_model, tp, calls=passes * count)
            if last:
                pred.add("all_gather", tokens * shape.vocab_size * matmul_bytes, tp, calls=passes)
            formulas.append("all-reduce BTd x (6L + 2) + all-gather BTV")
    if dtensor_params:
        # clip_grad_norm_ on DTensors: one all-reduce of the per-tensor norms per mesh dim.
        # hsdp: the norms of replicated shards agree, so only the shard dim is reduced.
        for degree in (layout.shard if layout.data_parallel == "fsdp" else 1, tp):
            if degree > 1:
                pred.add("all_reduce", FP32 * n_tensors, degree)

    if layout.cp > 1:
        passes = accum if layout.pp == 1 else microbatches(config, layout)  # forwards per step
        formulas.append(
            _context_parallel_comm(pred, config, layout, rows * seq, passes, matmul_bytes)
        )

    # Pipeline parallelism between stages.
    if layout.pp > 1:
        _pipeline_comm(pred, config, layout, rows, seq, model_bytes)
        formulas.append("send/recv M activations of (B/M) T d per stage boundary")
    if not formulas:
        formulas.append("none")
    pred.formula = "; ".join(formulas)
    return pred


def microbatches(config: Config, layout: RankLayout) -> int:
    """Pipeline microbatches per step under this layout (``resolve_microbatches``)."""
    return resolve_microbatches(config, layout)


def _layers_of(config: Config, layout: RankLayout) -> int:
    shape = model_shape(config)
    if layout.pp <= 1:
        return shape.n_layer
    return len(
        {n.split(".")[1] for n in stage_shapes(config, layout.pp) if n.startswith("blocks.")}
    )


def _has_first_last(config: Config, layout: RankLayout) -> tuple[bool, bool]:
    names = stage_shapes(config, layout.pp)
    return "wte.weight" in names, "lm_head.weight" in names


def _fsdp_comm(
    pred: CommPrediction,
    config: Config,
    layout: RankLayout,
    shapes: dict[str, tuple[int, ...]],
    accum: int,
    model_bytes: int,
) -> str:
    """FSDP2's all-gathers (at ``model_bytes`` per element: 2 under the bf16 policy) and its
    fp32 reduce-scatter (``distlab.strategies.fsdp``) over the shard degree; under hsdp also
    the all-reduce of each unit's reduce-scattered gradient shard across the replica groups
    (``distlab.strategies.hsdp``); the formula."""
    dp = layout.shard
    padded = model_bytes * fsdp_padded_numel(shapes, dp)
    root = {n: s for n, s in shapes.items() if not n.startswith("blocks.")}
    blocks_padded = padded - model_bytes * fsdp_padded_numel(root, dp)
    blocks = _layers_of(config, layout)
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
        gathers, block_regathers = accum, accum * resharding
    else:  # the schedule never frees after backward: each backward that follows a forward
        gathers, block_regathers = 1, microbatches(config, layout) * resharding
    calls = gathers * units + block_regathers * blocks
    pred.add("all_gather", gathers * padded + block_regathers * blocks_padded, dp, calls=calls)
    # Gradients are reduced in fp32 (the policy's reduce_dtype) under bf16 too.
    pred.add("reduce_scatter", FP32 * fsdp_padded_numel(shapes, dp), dp, calls=units)
    size = f"{model_bytes}P'"
    again = f" + {block_regathers}x{size}_blocks" if block_regathers else ""
    formula = f"all-gather {gathers}x{size}{again} + reduce-scatter 4P' (P' = P padded to {dp})"
    if layout.replicate > 1:
        shard_bytes = FP32 * fsdp_padded_numel(shapes, dp) // dp
        pred.add("all_reduce", shard_bytes, layout.replicate, calls=units)
        formula += f" + all-reduce 4P'/{dp} over {layout.replicate} replicas"
    return formula


def _context_parallel_comm(
    pred: CommPrediction, config: Config, layout: RankLayout, tokens: int, passes: int, element: int
) -> str:
    """The keys' and values' all-gathers and their gradients' reduce-scatters
    (``distlab.strategies.context_parallel``) for the ``tokens`` of this rank's rows, whole
    sequences, in ``passes`` forwards (micro-batches); ``element`` bytes each (K and V are
    matmul outputs: bf16 under autocast and under FSDP's bf16 policy); the formula."""
    shape = model_shape(config)
    layers = _layers_of(config, layout)
    volume = element * tokens * shape.d_model // layout.tp  # K (or V) of the whole sequence
    gathers = 2 if config.ac != "none" else 1  # recomputing a block gathers again
    again = f"{gathers} x " if gathers > 1 else ""
    if config.cp_attention == "ring":
        # cp - 1 steps, each passing one rank's block (1/cp of the sequence) of K and of V;
        # backward passes their gradients back the same number of steps
        steps = 2 * layers * (layout.cp - 1)
        block = volume // layout.cp
        messages = (gathers + 1) * steps
        pred.add("send", messages * block, layout.cp, calls=passes * messages)
        pred.add("recv", messages * block, layout.cp, calls=passes * messages)
        return (
            f"send/recv ({again}2L + 2L) x (cp - 1) blocks of BTd/cp "
            f"(K, V and their gradients around the ring of {layout.cp} cp ranks)"
        )
    calls = passes * 2 * layers
    pred.add("all_gather", gathers * 2 * layers * volume, layout.cp, calls=gathers * calls)
    pred.add("reduce_scatter", 2 * layers * volume, layout.cp, calls=calls)
    return f"all-gather {again}2L x BTd + reduce-scatter 2L x BTd (K, V over {layout.cp} cp ranks)"


def _fairscale_comm(pred: CommPrediction, config: Config, layout: RankLayout) -> None:
    """OSS's broadcasts, and DDP's all-reduce or ShardedDataParallel's reduces."""
    n = layout.dp
    sizes = parameter_sizes(config)
    owners = oss_owners(sizes, n)
    if layout.data_parallel == "fairscale-oss":
        pred.add("all_reduce", FP32 * sum(sizes), n, calls=None)
    else:
        for size, owner in zip(sizes, owners, strict=True):
            pred.add("reduce", FP32 * size, n, relative_rank=-owner % n)
    for owner, owned in enumerate(oss_partition(sizes, n)):
        if owned:
            pred.add("broadcast", FP32 * owned, n, relative_rank=-owner % n)
    pred.add("all_reduce", FP32, n)  # OSS's gradient norm


def _reduces_per_microbatch(config: Config, layout: RankLayout) -> bool:
    """Whether ZeRO-2/3 reduce the gradients in every micro-batch (``--zero-reduce``)."""
    return layout.data_parallel != "zero1" and zero_reduce_mode(config) == "per-microbatch"


def _zero3_gathers(config: Config, p_local: int) -> int:
    """All-gathers of the parameters per ZeRO-3 step under the strategy's DeepSpeed config."""
    try:
        zero = deepspeed_config(config, 3, config.nproc, p_local)["zero_optimization"]
    except Exception:  # noqa: BLE001 - DeepSpeed strategy missing or changed: paper's count
        return 2
    reuse = zero.get("stage3_max_reuse_distance", 1e9)
    live = zero.get("stage3_max_live_parameters", 1e9)
    return 1 if p_local <= min(reuse, live) else 2


def _pipeline_comm(
    pred: CommPrediction,
    config: Config,
    layout: RankLayout,
    rows: int,
    seq: int,
    element_bytes: int,
) -> None:
    """Point-to-point traffic of pipeline rank 0, plus the loss broadcast and norm all-reduce.

    Messages are the residual stream, ``element_bytes`` per element (fp32 under
    autocast, bf16 from FSDP stages under bf16).
    """
    shape = model_shape(config)
    m = microbatches(config, layout)
    virtual = VIRTUAL_STAGES.get(config.schedule, 1)
    n_stages = layout.pp * virtual
    # Under context parallelism a rank passes on only its T / cp tokens of each sequence.
    message = (rows // m) * (seq // layout.cp) * shape.d_model * element_bytes
    if layout.tp > 1 and config.sequence_parallel:
        message //= layout.tp
    sends = recvs = 0
    for stage in rank_stages(config.schedule, layout.pp, 0):
        if stage < n_stages - 1:
            sends += m  # activations forward
            recvs += m  # their gradients back
        if stage > 0:
            recvs += m
            sends += m
    pred.add("send", sends * message, layout.pp, calls=sends)
    pred.add("recv", recvs * message, layout.pp, calls=recvs)
    # The loss, from the rank of the last stage (rank 0 itself in V placement).
    loss_rank = last_stage_rank(config.schedule, layout.pp)
    pred.add("broadcast", FP32, layout.pp, relative_rank=-loss_rank % layout.pp)
    pred.add("all_reduce", FP32, layout.pp)  # squared gradient norm over the stages


def _ep_comm(
    pred: CommPrediction,
    config: Config,
    layout: RankLayout,
    tokens: int,
    accum: int,
    routing: ExpertRouting | None,
) -> str:
    """Expert parallelism (``distlab.strategies.expert_parallel``): gradient all-reduces, the
    gradient norm's, and the all-to-alls of ``tokens`` per rank (module docstring); the formula."""
    shape = model_shape(config)
    ep, d, layers = ep_degree(config), shape.d_model, shape.n_layer
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
