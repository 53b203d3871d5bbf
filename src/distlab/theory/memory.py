"""Predicted peak memory of rank 0 in a training step, by category, activations included.

The candidate moments of a step share one accounting of what is held (state,
activations, gathered parameters, temporaries).

The derivation is written out in ``docs/memory.md`` ("Activation memory");
this module is that derivation in code. Notation: h the model width, a the
heads, V the vocabulary, t = rows x seq the tokens of one micro-batch on this
rank, T the tensor-parallel degree, e the bytes of an activation element (4
in fp32, 2 where the model itself runs in bf16).

Saved for backward by one transformer block (pre-LN, GELU MLP, SDPA attention
that keeps its output and log-sum-exp, never the s x s matrix), in elements:

==========================  ================  =================================
tensor                      elements          saved by
==========================  ================  =================================
block input x               t h               LayerNorm 1
LayerNorm 1 output          t h               the q, k, v matmuls
q, k, v                     3 t h / T         attention
attention output            t h / T           attention, and the proj matmul
x + attn                    t h               LayerNorm 2
LayerNorm 2 output          t h               the up matmul
up output                   4 t h / T         GELU
GELU output                 4 t h / T         the down matmul
LayerNorm mean and rstd     4 t (fp32)        LayerNorm 1 and 2
attention log-sum-exp       a t / T (fp32)    attention
==========================  ================  =================================

so ``e t h (4 + 12 / T) + 4 t (4 + a / T)`` bytes per block: 68 t h + 16 t + 4 a t
in fp32 without tensor parallelism, the analogue of Korthikanti et al.'s 34 s b h
+ 5 a s^2 b (their fp16 model keeps dropout masks and, without flash attention,
the s x s scores). The head adds the final LayerNorm's input and output (2 t h),
its statistics (2 t) and the log-softmax (t V, fp32); the logits (t V) only in
a pipeline, whose schedule keeps each stage's output until its backward (a
train step computes the loss and lets them go). A mixture-of-experts block (``distlab.moe``, k of E
experts per token) saves more in its MLP: ``moe_block_extra_bytes``. Activation
checkpointing keeps only each
block's input (``--ac full``: t h per block) or the matmul and attention
outputs (``--ac selective``: 11 t h per block without tensor parallelism).

Context parallelism over C ranks: t is the rank's tokens, rows x seq / C, and
attention saves the keys and values all-gathered from the C ranks (the whole
sequence, 2 C t h / T) instead of the local ones (2 t h / T): 2 (C - 1) t h / T
more per block. Under checkpointing the gathered keys and values are not kept
(``--ac selective`` keeps the local k and v matmul outputs and gathers again).
``--cp-attention ring`` computes attention with matmuls and one softmax: it
keeps the softmax weights, e (a / T) t s for a sequence of s keys, instead of
the log-sum-exp (under autocast bf16 also their bf16 copy, not modelled).

The peak is the largest of a few candidate moments (``Moment``):

- **start of backward**: every saved activation, the parameters, the optimizer
  state and the gradient buffers that live between steps, FSDP's gathered root
  parameters (ZeRO-3: all gathered parameters), and the loss's first gradients
  (of the log-softmax and of the logits, 2 t V fp32);
- **block k backward** (each block k): the saved activations
  below block k, block k's own (recomputed under checkpointing), the gradients
  made so far and one block's backward temporaries (``block_backward``);
- **pipeline steady state** (pipelines instead of the two above): the in-flight
  micro-batches' activations, the stage's gradients, one block's backward;
- **optimizer step**: parameters, full (local) gradients, optimizer state, the
  optimizer's temporaries (AdamW's foreach step: one parameter-sized buffer).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from distlab.config import Config, grad_accum_steps, model_shape, resolved_seq_len
from distlab.measure.memory import ModelStateBytes
from distlab.measure.step_memory import CATEGORIES
from distlab.model import count_parameters
from distlab.strategies import registry
from distlab.strategies.parallel_dims import (
    fsdp_gathered_shapes,
    numel,
    rank_stage_plans,
    stage_shapes,
    tp_local_shapes,
)
from distlab.strategies.pipeline_schedules import schedule_spec
from distlab.theory.rank_layout import RankLayout, compute_bytes, microbatches, rank_layout

FP32 = 4
ZERO_FLAVOURS = ("zero1", "zero2", "zero3")
FORWARDS_FIRST = ("gpipe", "looped-bfs")
"""Pipeline schedules that run every forward of a step before its first backward."""
ROOT_PARAMETERS = ("wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias", "lm_head.weight")
"""Parameters outside the blocks: FSDP's root unit, gathered for the whole step."""


@dataclass(frozen=True)
class Moment:
    """Rank 0's predicted bytes at one moment of the step, by category."""

    name: str
    """e.g. "start of backward", "block 3 backward", "optimizer step"."""
    phase: str
    """forward, backward or optimizer."""
    by_category: dict[str, int]

    @property
    def total(self) -> int:
        """All categories together."""
        return sum(self.by_category.values())


@dataclass(frozen=True)
class PeakPrediction:
    """Rank 0's predicted peak: the largest of the step's candidate moments."""

    moments: tuple[Moment, ...]

    @property
    def peak(self) -> Moment:
        """The largest moment: the predicted peak."""
        return max(self.moments, key=lambda moment: moment.total)

    @property
    def by_category(self) -> dict[str, int]:
        """The peak's bytes by category (``step_memory.CATEGORIES``)."""
        return self.peak.by_category

    @property
    def phase(self) -> str:
        """forward, backward or optimizer: when the predicted peak happens."""
        return self.peak.phase

    @property
    def total(self) -> int:
        """The predicted peak."""
        return self.peak.total

    def to_dict(self) -> dict[str, object]:
        """Plain data for summary.json: the peak's ``by_category``, ``total``, ``phase`` and
        ``moment``, and every candidate moment (``moments``)."""
        return {
            "by_category": dict(self.by_category),
            "total": self.total,
            "phase": self.phase,
            "moment": self.peak.name,
            "moments": [
                {"name": m.name, "phase": m.phase, "by_category": m.by_category, "total": m.total}
                for m in self.moments
            ],
        }


@dataclass(frozen=True)
class StepShape:
    """What rank 0 computes in one micro-batch: tokens, layers, degrees, element size."""

    tokens: int
    layers: int
    has_first: bool
    has_last: bool
    in_flight: float
    """Micro-batches whose activations rank 0 holds at once (pipelines: by schedule), in
    units of all of rank 0's blocks."""
    outputs_in_flight: float
    """Of those, the micro-batches whose stage output rank 0 keeps (stages it sends on)."""
    heads_in_flight: float
    """Of those, the micro-batches whose head activations rank 0 keeps (if it has the head)."""
    tp: int
    sequence_parallel: bool
    element: int
    ac: str
    cp: int = 1
    """Context-parallel degree: ``tokens`` are this rank's 1/cp of each sequence."""
    softmax_keys: int = 0
    """Keys each query's softmax weights span when attention keeps them (``--cp-attention
    ring``: the sequence); 0 when SDPA keeps only the log-sum-exp."""
    logits_held: bool = False
    """Whether the logits live until backward ends: a pipeline schedule keeps every stage's
    output for its backward; the train steps let them go once the loss is computed (the
    cross-entropy saves its log-softmax, not its input)."""


def nearest_moment(predicted: dict, measured: dict[str, int], within: float = 0.05) -> dict:
    """Of a prediction's moments (``to_dict`` form) within ``within`` of its peak, the one
    whose categories are closest to ``measured``'s (sum of absolute differences).

    Moments that close are the same size to the theory's precision, so which of them
    the tracker saw as its peak is a coin toss; compare categories with that one.
    """
    close = [m for m in predicted["moments"] if m["total"] >= (1 - within) * predicted["total"]]
    return min(
        close,
        key=lambda m: sum(abs(measured[c] - m["by_category"][c]) for c in m["by_category"]),
    )


def step_shape(config: Config, layout: RankLayout) -> StepShape:
    """Rank 0's micro-batch and pipeline position under ``config``."""
    seq = resolved_seq_len(config)
    names = stage_shapes(config, layout.pp)
    layers = len({n.split(".")[1] for n in names if n.startswith("blocks.")})
    if layout.pp > 1:
        m = microbatches(config, layout)
        rows = config.global_batch // layout.dp // m
        chunks = pipeline_in_flight(config.schedule, layout.pp, m)
        plans = rank_stage_plans(config, layout.pp, 0)
        # Blocks: the in-flight micro-batches of each of rank 0's stages, by its layers.
        in_flight = sum(n * len(p.layers) for n, p in zip(chunks, plans, strict=True)) / layers
        outputs = sum(n for n, p in zip(chunks, plans, strict=True) if not p.head)
        heads = sum(n for n, p in zip(chunks, plans, strict=True) if p.head)
    else:
        rows = config.global_batch // layout.dp // grad_accum_steps(config, layout.dp)
        in_flight, outputs, heads = 1, 0, 1  # the whole model: no stage output to keep
    return StepShape(
        tokens=rows * seq // layout.cp,
        layers=layers,
        has_first="wte.weight" in names,
        has_last="lm_head.weight" in names,
        in_flight=in_flight,
        outputs_in_flight=outputs,
        heads_in_flight=heads,
        tp=layout.tp,
        sequence_parallel=config.sequence_parallel and layout.tp > 1,
        element=compute_bytes(config, layout),
        ac=config.ac,
        cp=layout.cp,
        softmax_keys=seq if layout.cp > 1 and config.cp_attention == "ring" else 0,
        logits_held=layout.pp > 1,
    )


def pipeline_in_flight(schedule: str, pp: int, m: int) -> list[float]:
    """Micro-batches whose activations rank 0 holds at once, for each of its stages.

    GPipe runs every forward before any backward: m; looped BFS too, on both of
    its stages. 1F1B starts backward after p forwards on the first stage: min(m,
    p). Interleaved 1F1B (and interleaved-zb, which runs the same order of
    forwards; its deferred weight gradients are not counted) runs (v - 1) p +
    2 (p - 1) + 1 warm-up forwards over its v stages before its first backward.
    ZB-V and DualPipeV run 2p - 1 forwards of rank 0's first stage, then its
    last stage (the head) one micro-batch at a time: 2p stages' worth, p
    micro-batches of the rank's layers, as 1F1B.
    """
    spec = schedule_spec(schedule)
    virtual = spec.stages_per_rank
    if schedule in FORWARDS_FIRST:
        return [float(m)] * virtual
    if virtual == 1:
        return [float(min(m, pp))]
    if spec.placement == "v":
        return [float(min(m, 2 * pp - 1)), 1.0]
    chunks = min(m * virtual, (virtual - 1) * pp + 2 * (pp - 1) + 1)
    return [chunks / virtual] * virtual


def block_activation_bytes(shape: StepShape, n_head: int, d: int) -> int:
    """Bytes one block saves for backward for one micro-batch (table above)."""
    t, tp, e = shape.tokens, shape.tp, shape.element
    replicated = t * d // tp if shape.sequence_parallel else t * d
    if shape.ac == "full":
        return e * replicated
    stats = FP32 * t * (4 // tp if shape.sequence_parallel else 4)
    # what attention keeps besides its inputs and output: SDPA's log-sum-exp, or the
    # softmax weights of ring attention
    softmax = FP32 * t * n_head // tp
    if shape.softmax_keys:
        softmax = e * t * n_head // tp * shape.softmax_keys
    if shape.ac == "selective":
        # input, q k v, attention output, the two row-parallel outputs (each as the
        # local matmul result and, with T > 1, the all-reduced one), up output
        reduced = 2 * t * d * (2 if tp > 1 else 1)
        return e * (replicated + 8 * t * d // tp + reduced) + softmax
    # x, x + attn (sharded under SP); LayerNorm outputs as the matmuls see them (gathered);
    # attention keeps the keys and values of all cp ranks
    gathered_kv = 2 * (shape.cp - 1) * t * d // tp
    return e * (2 * replicated + 2 * t * d + 12 * t * d // tp + gathered_kv) + stats + softmax


def block_in_backward_bytes(shape: StepShape, n_head: int, d: int) -> int:
    """A block's whole saved set (recomputed under checkpointing) once its down
    projection's backward has freed the GELU output (4 t h / T)."""
    full = StepShape(**{**shape.__dict__, "ac": "none"})
    return (
        block_activation_bytes(full, n_head, d) - shape.element * 4 * shape.tokens * d // shape.tp
    )


def head_activation_bytes(shape: StepShape, d: int, vocab: int) -> int:
    """Bytes the final LayerNorm, LM head and loss keep for one micro-batch (last stage)."""
    t, e = shape.tokens, shape.element
    logits = e * t * vocab if shape.logits_held else 0
    return e * 2 * t * d + FP32 * 2 * t + logits + FP32 * t * vocab


def activation_bytes(config: Config) -> int:
    """Saved activations of rank 0 at the start of backward (all in-flight micro-batches)."""
    layout = rank_layout(config)
    if layout is None:
        raise ValueError(f"no activation model for strategy {config.strategy!r}")
    shape = step_shape(config, layout)
    return _activations(shape, config)


def moe_block_extra_bytes(config: Config, shape: StepShape) -> int:
    """What a MoE block saves beyond the dense MLP's (0 for a dense model or under ``--ac``).

    Dense: LayerNorm 2 output, up and GELU outputs, 9 t h. MoE with k of E
    experts: the LayerNorm 2 output (the router's input, t h), the rows sorted
    by expert (k t h: the up matmuls' input), the up and GELU outputs of every
    row (8 k t h) and the expert outputs (k t h, weighted by the routing), so
    (1 + 10 k) t h; plus the router probabilities (t E, fp32) and int64
    indices (the sort's t E, three permutations of k t). Under ``ep`` the rows
    are the ones this rank's experts received, k t under balanced routing (the
    real number is the routing's). Checkpointed runs are not modelled for MoE.
    """
    model = model_shape(config)
    if not model.n_expert or shape.ac != "none":
        return 0
    t, h, k, experts = shape.tokens, model.d_model, model.top_k, model.n_expert
    return shape.element * (10 * k - 8) * t * h + FP32 * t * experts + 8 * t * (experts + 3 * k)


def _activations(shape: StepShape, config: Config) -> int:
    model = model_shape(config)
    per_block = block_activation_bytes(shape, model.n_head, model.d_model)
    blocks = shape.layers * (per_block + moe_block_extra_bytes(config, shape))
    total = blocks * shape.in_flight
    if shape.has_last:
        total += head_activation_bytes(shape, model.d_model, model.vocab_size) * (
            shape.heads_in_flight
        )
    # the stage outputs, kept to take their gradients
    total += shape.element * shape.tokens * model.d_model * shape.outputs_in_flight
    return int(total)


def predict_peak(config: Config) -> PeakPrediction:
    """Rank 0's predicted peak by category: the largest of the moments above."""
    layout = rank_layout(config)
    if layout is None:
        raise ValueError(f"no memory model for strategy {config.strategy!r}")
    model = model_shape(config)
    strategy = registry.get(config.strategy)
    n_params = count_parameters(model)
    state = strategy.predicted_state_bytes(config, n_params)
    resident = strategy.resident_between_steps(config, n_params)
    shape = step_shape(config, layout)
    gathered = gathered_bytes(config, layout)
    common = {"params": state.params + gathered["params"], "optimizer": state.optimizer}
    if layout.pp > 1:
        moments = [
            Moment(
                "pipeline steady state",
                "backward",
                pipeline_moment(config, layout, shape, state, common, gathered),
            ),
            Moment(
                "last micro-batch backward",
                "backward",
                pipeline_moment(config, layout, shape, state, common, gathered, last=True),
            ),
        ]
    else:
        moments = [
            Moment(
                "start of backward",
                "backward",
                backward_start(config, shape, resident, common, gathered),
            ),
            *(
                Moment(
                    f"block {k} backward",
                    "backward",
                    block_backward(config, layout, shape, state, resident, common, k),
                )
                for k in range(shape.layers)
            ),
        ]
    optimizer_step = _split(
        params=state.params,
        grads=optimizer_step_grads(config, layout, state),
        optimizer=state.optimizer + optimizer_temporaries(config, layout, state),
        temporaries=ddp_pipeline_buckets(layout, state),
    )
    moments.append(Moment("optimizer step", "optimizer", optimizer_step))
    return PeakPrediction(tuple(moments))


def backward_start(
    config: Config,
    shape: StepShape,
    resident: ModelStateBytes,
    common: dict[str, int],
    gathered: dict[str, int],
) -> dict[str, int]:
    """Every activation saved, and the loss's first gradients: log-softmax's and the logits'."""
    vocab = model_shape(config).vocab_size
    return _split(
        **common,
        grads=resident.grads,
        activations=_activations(shape, config),
        temporaries=2 * FP32 * shape.tokens * vocab,
        comm_buffers=gathered["comm_buffers"],
    )


def block_backward(
    config: Config,
    layout: RankLayout,
    shape: StepShape,
    state: ModelStateBytes,
    resident: ModelStateBytes,
    common: dict[str, int],
    k: int,
) -> dict[str, int]:
    """Inside block k's backward, just after its down projection's.

    Saved: blocks 0..k-1 (as ``--ac`` keeps them), block k whole (recomputed
    under checkpointing) but for the GELU output the down projection used, and
    the logits if a pipeline holds them. Gradients: those of the head and of
    blocks k+1.. (sharded ones divided by the data-parallel degree). Temporaries: the incoming
    gradient and its residual copy (2 t h), the gradients of the GELU output
    and of the up projection (4 t h / T each); under FSDP also block k's
    unsharded gradients. FSDP holds the root, block k and the next block
    (prefetched) gathered, block k twice when it is recomputed.
    """
    model = model_shape(config)
    t, h, e, tp = shape.tokens, model.d_model, shape.element, shape.tp
    moe = moe_block_extra_bytes(config, shape)
    recomputed = block_in_backward_bytes(shape, model.n_head, h) + moe
    saved = k * (block_activation_bytes(shape, model.n_head, h) + moe)
    logits = e * t * model.vocab_size if shape.has_last and shape.logits_held else 0
    blocks = block_elements(config, layout)
    gathered = block_elements(config, layout, gathered=True)
    # FSDP reduce-scatters the root unit (final norm, head) only at the end of backward.
    head = 0 if layout.data_parallel == "fsdp" else root_elements(config, layout, head_only=True)
    done = sum(blocks[k + 1 :]) + head
    shards = 1  # what the gradients made so far are split over
    if layout.data_parallel == "fsdp":
        shards = layout.shard  # hsdp: the replica groups hold the same shards
    elif layout.data_parallel in ("zero2", "zero3", "fairscale-sdp"):
        shards = layout.dp
    grads = max(resident.grads, min(state.grads, FP32 * done // shards))
    comm, unsharded_grads = 0, 0
    if layout.data_parallel == "fsdp":
        # block k and the prefetched k-1 gathered (a checkpointed block's recomputation
        # reuses block k's gathered parameters). Block k's gradients, before their
        # reduce-scatter, are backward's own tensors (temporaries).
        gathered_blocks = gathered[k] + gathered[max(k - 1, 0)]
        comm = e * (root_elements(config, layout, gathered=True) + gathered_blocks)
        # FSDP2 holds the last reduce-scatter's input (block k + 1's gradients, fp32,
        # padded as gathered) until the next one starts (reduce_scatter_states)
        comm += FP32 * (gathered[k + 1] if k + 1 < len(gathered) else 0)
        unsharded_grads = FP32 * blocks[k]
    return _split(
        **common,
        grads=grads,
        activations=saved + recomputed + logits,
        temporaries=e * (2 * t * h + 8 * t * h // tp) + unsharded_grads,
        comm_buffers=comm,
    )


def pipeline_moment(
    config: Config,
    layout: RankLayout,
    shape: StepShape,
    state: ModelStateBytes,
    common: dict[str, int],
    gathered: dict[str, int],
    last: bool = False,
) -> dict[str, int]:
    """A pipeline rank in a backward: the in-flight micro-batches' activations (and,
    under checkpointing, the block being recomputed), the stage's gradients (from the
    first backward on; GPipe and looped BFS peak before it), one block's backward
    temporaries (as in ``block_backward``).

    ``last``: the last micro-batch's backward, with only its own activations left,
    in which DDP fills its buckets (``ddp_pipeline_buckets``)."""
    model = model_shape(config)
    t, h, e, tp = shape.tokens, model.d_model, shape.element, shape.tp
    recomputed = block_in_backward_bytes(shape, model.n_head, h) if shape.ac != "none" else 0
    # The last backward: one micro-batch, of the stage that sends its output if any.
    output = min(1, shape.outputs_in_flight)
    one = {"in_flight": 1, "outputs_in_flight": output, "heads_in_flight": 1 - output}
    in_flight = StepShape(**{**shape.__dict__, **one}) if last else shape
    buckets = ddp_pipeline_buckets(layout, state) if last else 0
    # Every forward before any backward: all activations live, no gradient made yet.
    no_grads_yet = config.schedule in FORWARDS_FIRST and not last
    return _split(
        **common,
        grads=0 if layout.data_parallel == "fsdp" or no_grads_yet else state.grads,
        activations=_activations(in_flight, config) + recomputed,
        temporaries=e * (2 * t * h + 8 * t * h // tp) + buckets,
        comm_buffers=gathered["comm_buffers"],
    )


def ddp_pipeline_buckets(layout: RankLayout, state: ModelStateBytes) -> int:
    """DDP inside a pipeline skips its all-reduce until the last micro-batch, whose
    backward copies the accumulated gradients into DDP's buckets: a second copy of the
    stage's gradients, alive from then to the end of the step."""
    return state.grads if layout.data_parallel == "ddp" and layout.pp > 1 else 0


def block_elements(config: Config, layout: RankLayout, gathered: bool = False) -> list[int]:
    """Rank 0's parameter elements of each of its blocks (tensor-parallel local);
    ``gathered``: as FSDP2 gathers them (``fsdp_gathered_shapes``)."""
    shapes = _local_shapes(config, layout, gathered)
    per_block: dict[str, int] = {}
    for name, shape in shapes.items():
        if name.startswith("blocks."):
            index = name.split(".")[1]
            per_block[index] = per_block.get(index, 0) + math.prod(shape)
    return [per_block[i] for i in sorted(per_block, key=int)]


def root_elements(
    config: Config, layout: RankLayout, head_only: bool = False, gathered: bool = False
) -> int:
    """Rank 0's elements outside the blocks (only the final norm and head: ``head_only``);
    ``gathered``: as FSDP2 gathers them (``fsdp_gathered_shapes``)."""
    shapes = _local_shapes(config, layout, gathered)
    names = ROOT_PARAMETERS[2:] if head_only else ROOT_PARAMETERS
    return numel({name: shape for name, shape in shapes.items() if name in names})


def _local_shapes(config: Config, layout: RankLayout, gathered: bool) -> dict[str, tuple[int, ...]]:
    """Rank 0's tensor-parallel local parameter shapes of its stage(s), padded as FSDP2
    gathers them if ``gathered``."""
    shapes = tp_local_shapes(stage_shapes(config, layout.pp), layout.tp)
    return fsdp_gathered_shapes(shapes, layout.shard) if gathered else shapes


def gathered_bytes(config: Config, layout: RankLayout) -> dict[str, int]:
    """Parameters gathered for the step, by the category the tracker files them in.

    FSDP (``comm_buffers``): the root unit (embeddings, final norm, head) stays
    gathered all step; inside a pipeline every unit of the stage stays gathered
    across the micro-batches, and its unsharded gradients accumulate until the
    one reduce-scatter at the end (twice the stage's parameters). ZeRO-3
    (``params``): DeepSpeed keeps every gathered parameter until its backward
    (``stage3_max_reuse_distance``), so at the start of backward all of them.
    """
    e = compute_bytes(config, layout)
    shapes = tp_local_shapes(stage_shapes(config, layout.pp), layout.tp)
    if layout.data_parallel == "fsdp" and layout.pp > 1:
        padded = numel(fsdp_gathered_shapes(shapes, layout.shard))
        return {"params": 0, "comm_buffers": e * (padded + numel(shapes))}
    if layout.data_parallel == "fsdp":
        return {"params": 0, "comm_buffers": e * root_elements(config, layout, gathered=True)}
    if layout.data_parallel == "zero3":
        return {"params": e * numel(shapes), "comm_buffers": 0}
    return {"params": 0, "comm_buffers": 0}


def optimizer_temporaries(config: Config, layout: RankLayout, state: ModelStateBytes) -> int:
    """AdamW's foreach step allocates one fp32 buffer the size of what it updates.

    That is the rank's parameters, or its optimizer slice where the state is
    sharded: AdamW keeps 8 B per updated element (DeepSpeed 12, with its fp32
    master slice).
    """
    if config.optimizer != "adamw":
        return 0
    if layout.data_parallel in ZERO_FLAVOURS:
        return state.optimizer // 3
    if layout.data_parallel in ("fairscale-oss", "fairscale-sdp"):
        return state.optimizer // 2
    return state.params


def optimizer_step_grads(config: Config, layout: RankLayout, state: ModelStateBytes) -> int:
    """Gradients alive during the optimizer step: the rank's own, except under DeepSpeed,
    whose inner optimizer reads the fp32 gradient of its slice (4 P / N) after the
    reduction has freed the rest."""
    if layout.data_parallel in ZERO_FLAVOURS:
        return FP32 * count_parameters(model_shape(config)) // layout.dp
    return state.grads


def _split(**parts: int) -> dict[str, int]:
    return {category: int(parts.get(category, 0)) for category in CATEGORIES}
