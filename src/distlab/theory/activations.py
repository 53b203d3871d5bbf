"""Activations rank 0 holds in a training step: per block, per head, per micro-batch in flight.

``step_shape`` is what rank 0 computes in one micro-batch (tokens, blocks, the
pipeline's micro-batches in flight, degrees, element size); the functions below
turn it into bytes, the table derived in ``docs/memory.md`` ("Activation memory";
notation in ``theory.memory``'s docstring). ``theory.memory.predict_peak`` places
these bytes at the candidate moments of the step.
"""

from __future__ import annotations

from dataclasses import dataclass

from distlab.config import Config, grad_accum_steps, model_shape, resolved_seq_len
from distlab.strategies.parallel_dims import rank_stage_plans, stage_shapes
from distlab.strategies.pipeline_schedules import schedule_spec
from distlab.theory.rank_layout import FP32, RankLayout, compute_bytes, microbatches, rank_layout

FORWARDS_FIRST = ("gpipe", "looped-bfs")
"""Pipeline schedules that run every forward of a step before its first backward."""


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
    return held_activation_bytes(shape, config)


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


def held_activation_bytes(shape: StepShape, config: Config) -> int:
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
