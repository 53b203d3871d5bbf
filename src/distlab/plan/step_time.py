"""Step time of a layout: compute, communication (what is exposed, not hidden under
compute), the pipeline bubble, and the optimizer step.

Compute: every matmul of one micro-batch on one GPU (q/k/v, attention, projection,
MLP or experts, head), each timed as ``Device.matmul_overhead_s + 2 m n k / (peak x
Device.matmul_efficiency)``; backward is twice the forward's matmuls, ``--ac full``
runs the forward again. Elementwise work (norms, activations, residuals; the s x s
scores where attention is materialized) and AdamW's update stream bytes at the
device's elementwise bandwidth. The host's per-layer cost of issuing a micro-batch
(``Device.layer_overhead_s``) runs ahead of a GPU's kernels (the longer of the two
counts) and adds to a CPU's.

Communication: the collectives a step issues per GPU (``collectives``), each over the
link its group spans (tensor-parallel groups are the nearest ranks, data-parallel the
farthest; a group wider than a node uses the network), in the alpha-beta model with
NCCL's algorithms: ring (2 (n - 1) messages and 2 (n - 1) / n of the buffer for an
all-reduce, half that for all-gather, reduce-scatter and all-to-all) or, for an
all-reduce, a tree (2 log2 n messages) when that is faster. Data-parallel gradient
reductions and ZeRO-3's gathers run under backward and forward compute on a GPU
(separate streams); tensor- and context-parallel collectives and pipeline messages sit
on the critical path.

Bubble: the schedule's idle fraction (``distlab.strategies.pipeline_schedules.
bubble_fraction``).

A CPU's ranks beyond its cores take turns on them. Their messages wait a fair share
(ranks / cores); their compute and optimizer stretch by (ranks / cores) **
``Device.oversubscription_exponent`` (fitted: switching between ranks costs more than
the share), less what a pipeline's idle ranks give back. Pipeline stages that only
exchange messages sleep while they wait, so they share the cores fairly (exponent 1).

``StepTime.by_category`` (and ``predicted_breakdown``) name the parts as the time lab
does (``distlab.measure.timeline``): compute, exposed_comm, bubble and optimizer; the
lab's data and host categories are not modelled (zero).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from distlab.measure.timeline import CATEGORIES
from distlab.plan.hardware import Device, Link
from distlab.plan.layout import Layout, lab_strategy, micro_batch_rows
from distlab.plan.memory import local_parameters
from distlab.plan.shape import ModelShape
from distlab.strategies.pipeline_schedules import bubble_fraction

ELEMENTWISE_BYTES_PER_TOKEN = 40
"""Bytes of elementwise traffic per token, per hidden unit, per layer, per element byte,
forward and backward (two LayerNorms, GELU, two residual adds, softmax statistics:
each reads and writes its tensors about once forward and twice backward)."""
MATERIALIZED_ATTENTION_PASSES = 16
"""Element-sized reads and writes of each s x s attention score when attention is
materialized. Forward: q k^T writes the scores (1), softmax reads and writes them (2),
dropout reads, writes and writes a half-size mask (2.5), the product with v reads them
(1); backward: the value gradient reads the probabilities (1), the incoming gradient's
product writes their gradient (1), dropout's backward reads it and the mask and writes
(2.5), softmax's reads probabilities and gradient and writes (3), the query and key
gradients read the result (2): 16 in all."""
MATERIALIZED_RECOMPUTE_PASSES = 6.5
"""The forward's passes again when ``--ac full`` recomputes it."""
FP32 = 4
ADAMW_BYTES_PER_PARAMETER = 28
"""AdamW's update reads parameter, gradient and two moments and writes three (fp32)."""
ENGINES = {"zero1": "deepspeed", "zero2": "deepspeed", "zero3": "deepspeed-zero3"}
"""The lab strategies that run on an engine with its own per-step cost."""
DDP_BUCKET_BYTES = 25 * 2**20
"""DDP's gradient bucket size (and so the all-reduce calls per step)."""
LAB_CATEGORIES = {
    "compute": "compute_s",
    "exposed_comm": "exposed_comm_s",
    "bubble": "bubble_s",
    "optimizer": "optimizer_s",
}
"""The time lab's categories (``distlab.measure.timeline.CATEGORIES``) the step-time model
predicts, and the ``StepTime`` field that predicts each."""
UNMODELLED_CATEGORIES = tuple(c for c in CATEGORIES if c not in LAB_CATEGORIES)
"""The time lab's categories the model leaves out (``data``: fetching the batch; ``host``:
the loop's work outside every phase), predicted as zero: about 1% of a step on a CPU."""


@dataclass(frozen=True)
class Collective:
    """One kind of collective a GPU takes part in during a step."""

    kind: str
    """all_reduce, all_gather, reduce_scatter, all_to_all or send."""
    group: str
    """The mesh dimension: dp, tp, pp, cp or ep."""
    size: int
    nbytes: float
    """Payload per call (nccl-tests convention: all-gather = output, reduce-scatter = input)."""
    calls: float
    """Calls per step."""
    overlapped: bool
    """Whether it can run under compute (gradient reductions, ZeRO-3 gathers)."""


@dataclass(frozen=True)
class StepTime:
    """Predicted seconds of one step, split into what the GPU waits on."""

    compute_s: float
    exposed_comm_s: float
    bubble_s: float
    optimizer_s: float
    comm_s: float
    """All communication, exposed or hidden."""

    @property
    def total_s(self) -> float:
        """The step: compute, the bubble, exposed communication and the optimizer."""
        return self.compute_s + self.exposed_comm_s + self.bubble_s + self.optimizer_s

    def by_category(self) -> dict[str, float]:
        """The step in the time lab's categories (``LAB_CATEGORIES``; the
        ``UNMODELLED_CATEGORIES`` are zero), in the lab's order; they add up to ``total_s``."""
        return {
            c: getattr(self, LAB_CATEGORIES[c]) if c in LAB_CATEGORIES else 0.0 for c in CATEGORIES
        }


def tokens_per_microbatch(shape: ModelShape, layout: Layout, global_batch: int) -> int:
    """Tokens one GPU computes in one micro-batch."""
    return micro_batch_rows(layout, global_batch) * shape.seq_len // layout.cp


def forward_matmuls(
    shape: ModelShape, layout: Layout, tokens: int
) -> list[tuple[int, int, int, float]]:
    """(m, n, k, count) of the forward matmuls of one micro-batch on one GPU's stage."""
    t, h, tp = tokens, shape.hidden, layout.tp
    kv_width = shape.kv * shape.head_dim
    layers = -(-shape.layers // layout.pp)
    per_layer: list[tuple[int, int, int, float]] = []
    if shape.fused_qkv:
        per_layer.append((t, h, (h + 2 * kv_width) // tp, 1))
    else:
        per_layer += [(t, h, h // tp, 1), (t, h, kv_width // tp, 2)]
    per_layer.append(attention_matmul(shape, layout, tokens, per_layer=True))
    per_layer.append((t, h // tp, h, 1))
    up = 2 if shape.gated_mlp else 1
    if shape.experts:
        per_layer.append((t, h, shape.experts, 1))
        local = shape.experts // layout.ep
        rows = max(1, shape.top_k * t // local)
        per_layer += [(rows, h, shape.ffn // tp, up * local), (rows, shape.ffn // tp, h, local)]
    else:
        per_layer += [(t, h, shape.ffn // tp, up), (t, shape.ffn // tp, h, 1)]
    matmuls = [(m, n, k, c * layers) for m, n, k, c in per_layer]
    if layout.pp == 1:
        matmuls.append((t, h, shape.vocab // tp, 1))  # the head (last stage)
    return matmuls


def attention_matmul(
    shape: ModelShape, layout: Layout, tokens: int, per_layer: bool = False
) -> tuple[int, int, int, float]:
    """(m, n, k, count) of attention's q k^T and (softmax) v products on one GPU, every
    local head over the whole sequence's keys, for all its layers (or one)."""
    layers = 1 if per_layer else -(-shape.layers // layout.pp)
    heads = shape.heads // layout.tp
    return (tokens, shape.head_dim, shape.seq_len, 2 * heads * layers)


def matmul_seconds(device: Device, precision: str, m: int, n: int, k: int) -> float:
    """One matmul of 2 m n k FLOPs on ``device`` (the alpha-beta model of compute)."""
    rate = device.peak(precision) * device.matmul_efficiency
    return device.matmul_overhead_s + 2.0 * m * n * k / rate


def microbatch_seconds(
    shape: ModelShape, layout: Layout, tokens: int, device: Device, precision: str
) -> tuple[float, float]:
    """(work, host) seconds of one micro-batch's forward and backward on one GPU: its
    matmuls and elementwise kernels, and the host's per-layer cost of issuing them.
    ``--ac full`` runs the forward again, ``selective`` the attention's score products."""
    passes = 3 + (1 if layout.ac == "full" else 0)
    matmuls = forward_matmuls(shape, layout, tokens)
    seconds = [count * matmul_seconds(device, precision, m, n, k) for m, n, k, count in matmuls]
    m, n, k, count = attention_matmul(shape, layout, tokens)
    recomputed = count * matmul_seconds(device, precision, m, n, k)
    element = 4 if precision == "fp32" else 2
    layers = -(-shape.layers // layout.pp)
    elementwise = ELEMENTWISE_BYTES_PER_TOKEN * tokens * shape.hidden * layers * element
    if shape.attention == "materialized":
        scores = tokens * shape.seq_len * (shape.heads // layout.tp) * element * layers
        recompute = MATERIALIZED_RECOMPUTE_PASSES if layout.ac == "full" else 0.0
        elementwise += (MATERIALIZED_ATTENTION_PASSES + recompute) * scores
    # the elementwise constant counts forward and backward (3 passes); --ac full adds one
    elementwise *= passes / 3
    work = passes * sum(seconds) + elementwise / device.elementwise_rate()
    if layout.ac == "selective":
        work += recomputed
    host = device.layer_overhead_s * (layers + (1 if layout.pp == 1 else 0))
    return work, host


def collectives(
    shape: ModelShape, layout: Layout, global_batch: int, precision: str
) -> list[Collective]:
    """The collectives one GPU takes part in during a step (the first pipeline stage)."""
    out: list[Collective] = []
    element = 4 if precision == "fp32" else 2
    grad_bytes = 2 if precision == "mixed" else 4
    tokens = tokens_per_microbatch(shape, layout, global_batch)
    m = layout.microbatches
    layers = -(-shape.layers // layout.pp)
    local = local_parameters(shape, layout)
    reducers = layout.dp * layout.cp
    if reducers > 1:
        grads = local * grad_bytes
        if layout.zero == 0:
            calls = max(1, math.ceil(grads / DDP_BUCKET_BYTES))
            out.append(Collective("all_reduce", "dp", reducers, grads / calls, calls, True))
        elif layout.zero in (1, 2):
            out.append(Collective("reduce_scatter", "dp", reducers, grads, 1, True))
            out.append(Collective("all_gather", "dp", reducers, local * element, 1, False))
        else:
            units = layers + 1
            gathers = 2 * units * (1 if layout.pp > 1 else m)
            out.append(
                Collective("all_gather", "dp", reducers, local * element / units, gathers, True)
            )
            out.append(Collective("reduce_scatter", "dp", reducers, grads / units, units, True))
    if layout.tp > 1:
        per_layer = 2 + (2 if shape.fused_qkv else 4)
        activation = tokens * shape.hidden * element
        out.append(
            Collective(
                "all_reduce", "tp", layout.tp, activation, m * (per_layer * layers + 2), False
            )
        )
        if shape.vocab_parallel_loss:  # max, sum and target logit of every token
            out.append(Collective("all_reduce", "tp", layout.tp, FP32 * tokens, 3 * m, False))
        else:
            logits = tokens * shape.vocab * element
            out.append(Collective("all_gather", "tp", layout.tp, logits, m, False))
    if layout.cp > 1:
        kv = 2 * tokens * layout.cp * shape.kv * shape.head_dim // layout.tp * element
        out.append(Collective("all_gather", "cp", layout.cp, kv, m * layers, False))
        out.append(Collective("reduce_scatter", "cp", layout.cp, kv, m * layers, False))
    if layout.pp > 1:
        activation = tokens * shape.hidden * element
        out.append(Collective("send", "pp", 2, activation, 2 * m * layout.virtual_stages, False))
    if layout.ep > 1:
        rows = shape.top_k * tokens * shape.hidden * element
        out.append(Collective("all_to_all", "ep", layout.ep, rows, 4 * m * layers, False))
    return out


GROUP_STRIDE = ("tp", "cp", "dp", "pp")
"""Mesh dimensions from the nearest ranks to the farthest (ep lies within dp x cp)."""


def group_link(group: str, size: int, layout: Layout, device: Device) -> Link:
    """The link a group's ring crosses: NVLink if all its ranks share a node."""
    stride = 1
    for name in GROUP_STRIDE:
        if name == group or (group == "ep" and name == "cp"):
            break
        stride *= {"tp": layout.tp, "cp": layout.cp, "dp": layout.dp}[name]
    span = stride * size if group != "pp" else stride * 2
    return device.intra_node if span <= device.gpus_per_node else device.inter_node


def collective_seconds(collective: Collective, link: Link) -> float:
    """Seconds of all calls of ``collective`` over ``link`` (ring, or tree if faster)."""
    n, size = collective.size, collective.nbytes
    if collective.kind == "send":
        one = link.seconds(1, size)
    elif collective.kind == "all_reduce":
        ring = link.seconds(2 * (n - 1), 2 * (n - 1) / n * size)
        tree = link.seconds(2 * math.ceil(math.log2(n)), 2 * size)
        one = min(ring, tree)
    else:
        one = link.seconds(n - 1, (n - 1) / n * size)
    return one * collective.calls


def step_time(
    shape: ModelShape, layout: Layout, global_batch: int, precision: str, device: Device
) -> StepTime:
    """Predicted step of ``layout`` on ``device`` (module docstring)."""
    tokens = tokens_per_microbatch(shape, layout, global_batch)
    work, host = microbatch_seconds(shape, layout, tokens, device, precision)
    # a GPU's host issues kernels ahead of them (the longer counts); a CPU does both
    compute = ((work + host) if device.cores else max(work, host)) * layout.microbatches
    bubble = 0.0
    if layout.pp > 1:
        fraction = bubble_fraction(layout.schedule, layout.pp, layout.microbatches)
        bubble = compute * fraction / (1 - fraction)
    comm_exposed, comm_hidden = 0.0, 0.0
    fair = max(1.0, layout.gpus / device.cores) if device.cores else 1.0
    for collective in collectives(shape, layout, global_batch, precision):
        link = group_link(collective.group, collective.size, layout, device)
        seconds = collective_seconds(collective, link) * fair
        if collective.overlapped and device.overlaps_comm:
            comm_hidden += seconds
        else:
            comm_exposed += seconds
    # what backward and forward cannot hide: the excess over the compute it runs under
    exposed = comm_exposed + max(0.0, comm_hidden - compute)
    updated = local_parameters(shape, layout) / (layout.dp * layout.cp if layout.zero else 1)
    optimizer = ADAMW_BYTES_PER_PARAMETER * updated / device.elementwise_rate()
    if fair > 1:  # ranks take turns on the cores (module docstring)
        messages_only = layout.pp > 1 and layout.tp == layout.cp == 1 and layout.zero == 0
        share = fair if messages_only else fair**device.oversubscription_exponent
        busy = compute + optimizer
        stretch = max(1.0, share * busy / (busy + bubble))
        compute, optimizer, bubble = compute * stretch, optimizer * stretch, bubble * stretch
    # an engine's own per-step work (Python bookkeeping), as measured at its world size
    lab = lab_strategy(layout, moe=bool(shape.experts))
    optimizer += device.engine_overhead_s.get(ENGINES.get(lab[0], "") if lab else "", 0.0)
    return StepTime(
        compute_s=compute,
        exposed_comm_s=exposed,
        bubble_s=bubble,
        optimizer_s=optimizer,
        comm_s=comm_exposed + comm_hidden,
    )


def predicted_breakdown(
    shape: ModelShape, layout: Layout, global_batch: int, precision: str, device: Device
) -> dict[str, float]:
    """Predicted seconds of one step of ``layout`` on ``device`` by the time lab's category
    (``StepTime.by_category``): what ``time_breakdown_by_rank`` measures of a run."""
    return step_time(shape, layout, global_batch, precision, device).by_category()
