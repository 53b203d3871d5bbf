"""Memory per GPU of a layout, by category: parameters, gradients, optimizer state,
activations (the schedule's in-flight micro-batches), communication buffers and
temporaries.

Where the lab can run the layout (a lab preset, a lab strategy for its degrees, fp32 or
bf16) this is ``distlab.theory.memory.predict_peak``, the prediction the lab checks
against torch's memory tracker on every run. Anywhere else (other shapes, mixed
precision, thousands of GPUs) it is the same accounting without the lab's
strategy-specific moments:

- model state per parameter: params p, gradients g, optimizer K bytes (fp32 AdamW
  4 + 4 + 8; mixed precision 2 + 2 + 12, the ZeRO paper's), of the rank's tensor- and
  pipeline-parallel share, divided by the data-parallel degree (x cp, as FSDP over dp x
  cp) for what ZeRO shards: stage 1 the optimizer state, 2 and the gradients, 3 and the
  parameters;
- activations: ``planned_block_activation_bytes`` below (the lab's per-block table,
  generalised to grouped-query attention and other MLP widths) times the rank's layers
  times the micro-batches the schedule keeps in flight (``theory.activations.
  pipeline_in_flight``), plus the head's on the last stage;
- communication buffers: ZeRO-3 gathers two blocks at a time (the one computing, the
  one prefetched);
- temporaries: the loss's first gradients (2 t V fp32 on the last stage) and one block's
  backward (2 t h + 2 t f / T).

All of it held at once: the start of backward with every gradient already allocated,
a slight overestimate for the strategies that allocate gradients during backward.
"""

from __future__ import annotations

from dataclasses import dataclass

from distlab.config import Config
from distlab.measure.step_memory import CATEGORIES
from distlab.model import PRESETS
from distlab.plan.layout import Layout, lab_strategy, micro_batch_rows
from distlab.plan.shape import ModelShape, from_preset
from distlab.theory.activations import pipeline_in_flight
from distlab.theory.memory import predict_peak

FP32 = 4
STATE_BYTES = {"fp32": (4, 4, 8), "bf16": (4, 4, 8), "mixed": (2, 2, 12)}
"""Bytes per parameter of (parameters, gradients, AdamW state) by precision."""


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU by category, and which model produced them."""

    by_category: dict[str, int]
    source: str
    """"lab theory" (``distlab.theory.memory``) or "planner" (this module's accounting)."""

    @property
    def total(self) -> int:
        """All categories together."""
        return sum(self.by_category.values())

    def to_dict(self) -> dict[str, int]:
        """Categories and ``total`` (the JSON form)."""
        return {**self.by_category, "total": self.total}


def lab_config(
    shape: ModelShape, layout: Layout, global_batch: int, precision: str
) -> Config | None:
    """The lab run of ``layout`` (a ``Config``), or None if the lab cannot run it."""
    lab = lab_strategy(layout, moe=bool(shape.experts))
    if lab is None or precision == "mixed" or shape.name not in PRESETS:
        return None
    if from_preset(shape.name, shape.seq_len) != shape:
        return None
    strategy, extra = lab
    pipeline = {"schedule": layout.schedule, "microbatches": layout.microbatches}
    accumulation = {"micro_batch": micro_batch_rows(layout, global_batch)}
    return Config(
        strategy=strategy,
        nproc=layout.gpus,
        model=shape.name,
        seq_len=shape.seq_len,
        global_batch=global_batch,
        precision=precision,
        ac=layout.ac,
        sequence_parallel=layout.sequence_parallel,
        dp=layout.dp if layout.dp > 1 and strategy.count("+") >= 3 else None,
        **extra,
        **(pipeline if layout.pp > 1 else accumulation),
    )


def state_bytes(shape: ModelShape, layout: Layout, precision: str) -> dict[str, int]:
    """Parameters, gradients and optimizer state per GPU (the ZeRO paper's model states)."""
    p, g, k = STATE_BYTES[precision]
    local = local_parameters(shape, layout)
    shards = layout.dp * layout.cp // layout.replicas
    return {
        "params": int(p * local / (shards if layout.zero >= 3 else 1)),
        "grads": int(g * local / (shards if layout.zero >= 2 else 1)),
        "optimizer": int(k * local / (shards if layout.zero >= 1 else 1)),
    }


def local_parameters(shape: ModelShape, layout: Layout) -> float:
    """Parameters of one GPU's tensor-parallel share of its pipeline stage (the largest:
    the first stage's blocks and embeddings, or the last's with the head), experts
    split over ``ep``."""
    per_block = shape.block_parameters()
    if shape.experts:
        experts = shape.experts * shape.mlp_parameters()
        per_block += experts / layout.ep - experts
    blocks = -(-shape.layers // layout.pp) * per_block
    if layout.pp == 1:
        ends = shape.embedding_parameters()
    else:
        ends = shape.embedding_parameters() / 2
    return (blocks + ends) / layout.tp


def planned_block_activation_bytes(
    shape: ModelShape, tokens: int, layout: Layout, element: int
) -> int:
    """Bytes one block saves for backward for one micro-batch of ``tokens`` tokens.

    The lab's table (``distlab.theory.memory``) with the MLP's width f and the key/value
    width generalised: x, x + attn and both LayerNorm outputs (4 t h), q and the
    attention output (2 t h / T), k and v (2 t h_kv / T), the MLP's inputs and outputs
    (2 t f / T, gated: 3 t f / T), LayerNorm statistics (4 t fp32) and the attention's
    log-sum-exp (a t / T fp32); context parallelism keeps the gathered keys and values
    (2 (C - 1) t h_kv / T more); sequence parallelism splits the 4 t h over T;
    materialized attention keeps its softmax output, dropout mask and output (5 a s^2
    bytes per sequence in 16-bit, Korthikanti et al.). ``--ac full`` keeps the block
    input, ``selective`` the matmul outputs.
    """
    t, h, tp, cp = tokens, shape.hidden, layout.tp, layout.cp
    kv_width = shape.kv * shape.head_dim
    mlp = (3 if shape.gated_mlp else 2) * shape.ffn
    if shape.experts:
        mlp = shape.top_k * mlp + 2 * shape.hidden
    split = tp if layout.sequence_parallel else 1
    if layout.ac == "full":
        return element * t * h // split
    lse = FP32 * t * shape.heads // tp
    if layout.ac == "selective":
        reduced = 2 * t * h * (2 if tp > 1 else 1)
        return element * (t * h + (2 * h + 2 * kv_width + shape.ffn) * t // tp + reduced) + lse
    attention = 2 * h + 2 * kv_width + 2 * (cp - 1) * kv_width
    scores = 0
    if shape.attention == "materialized":
        # softmax output, dropout mask and output per score: Korthikanti et al.'s 5 a s^2 b
        scores = 5 * (shape.heads // tp) * t * shape.seq_len * element // 2
    replicated = 4 * t * h // split
    return element * (replicated + (attention + mlp) * t // tp) + FP32 * 4 * t + lse + scores


def planned_activation_bytes(
    shape: ModelShape, layout: Layout, global_batch: int, element: int
) -> tuple[int, int]:
    """(activations, temporaries) of the first pipeline stage (or the only one)."""
    tokens = micro_batch_rows(layout, global_batch) * shape.seq_len // layout.cp
    layers = -(-shape.layers // layout.pp)
    if layout.pp > 1:
        in_flight = sum(pipeline_in_flight(layout.schedule, layout.pp, layout.microbatches))
        in_flight /= layout.virtual_stages
    else:
        in_flight = 1.0
    per_block = planned_block_activation_bytes(shape, tokens, layout, element)
    blocks = layers * per_block * in_flight
    vocab_share = shape.vocab // layout.tp
    head = element * 2 * tokens * shape.hidden + FP32 * tokens * vocab_share
    outputs = element * tokens * shape.hidden * (in_flight if layout.pp > 1 else 0)
    last_stage = layout.pp == 1
    temporaries = element * (2 * tokens * shape.hidden + 2 * tokens * shape.ffn // layout.tp)
    if last_stage:
        temporaries += 2 * FP32 * tokens * vocab_share
    return int(blocks + (head if last_stage else 0) + outputs), int(temporaries)


def planner_memory(
    shape: ModelShape, layout: Layout, global_batch: int, precision: str
) -> MemoryEstimate:
    """The planner's own accounting (module docstring): every category held at once."""
    element = 4 if precision == "fp32" else 2
    state = state_bytes(shape, layout, precision)
    activations, temporaries = planned_activation_bytes(shape, layout, global_batch, element)
    comm = 0
    if layout.zero >= 3:
        block = shape.block_parameters() / layout.tp
        comm = int(2 * element * block)
    parts = {
        **state,
        "activations": activations,
        "temporaries": temporaries,
        "comm_buffers": comm,
    }
    return MemoryEstimate({c: int(parts.get(c, 0)) for c in CATEGORIES}, "planner")


def memory_per_gpu(
    shape: ModelShape, layout: Layout, global_batch: int, precision: str
) -> MemoryEstimate:
    """Peak bytes per GPU by category: the lab's theory where the lab runs the layout,
    the planner's accounting elsewhere."""
    config = lab_config(shape, layout, global_batch, precision)
    if config is not None:
        peak = predict_peak(config)
        return MemoryEstimate(dict(peak.by_category), "lab theory")
    return planner_memory(shape, layout, global_batch, precision)
