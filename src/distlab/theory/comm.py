"""Theory: rank 0's communication in one optimizer step, from the config alone.

``predict_comm`` adds up the parts of a step: the data-parallel flavour's
collectives (``comm_data_parallel``, one function per flavour in a table), then
tensor, context and pipeline parallelism's (``comm_model_parallel``), each
returning the formula it applies. The table of formulas below is what they
implement.

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

from collections.abc import Callable

from distlab.config import Config, grad_accum_steps, resolved_seq_len
from distlab.strategies.parallel_dims import rank0_shapes
from distlab.theory.collectives import CommPrediction, ExpertRouting, StepFacts
from distlab.theory.comm_data_parallel import data_parallel_comm
from distlab.theory.comm_model_parallel import (
    clipping_comm,
    context_parallel_comm,
    pipeline_comm,
    tensor_parallel_comm,
)
from distlab.theory.rank_layout import FP32, RankLayout, compute_bytes, rank_layout

PARTS: tuple[Callable[[CommPrediction, StepFacts], str | None], ...] = (
    data_parallel_comm,
    tensor_parallel_comm,
    clipping_comm,
    context_parallel_comm,
    pipeline_comm,
)
"""The parts of a step's communication, in the order they are added."""


def predict_comm(config: Config, routing: ExpertRouting | None = None) -> CommPrediction | None:
    """Rank 0's communication in one steady-state optimizer step (None: not modelled).

    ``routing``: for ``ep``, the step's measured routing counts, on which its
    all-to-all volume depends (balanced routing assumed without them).
    """
    layout = rank_layout(config)
    if layout is None:
        return None
    pred, step = CommPrediction(), step_facts(config, layout, routing)
    formulas = [part(pred, step) for part in PARTS]
    pred.formula = "; ".join([f for f in formulas if f] or ["none"])
    return pred


def step_facts(config: Config, layout: RankLayout, routing: ExpertRouting | None) -> StepFacts:
    """What the parts read of rank 0's step under ``config``."""
    return StepFacts(
        config=config,
        layout=layout,
        shapes=rank0_shapes(config, layout),
        rows=config.global_batch // layout.dp,
        seq=resolved_seq_len(config),
        accum=grad_accum_steps(config, layout.dp) if layout.pp == 1 else 1,
        model_bytes=compute_bytes(config, layout),
        matmul_bytes=2 if config.precision == "bf16" else FP32,  # autocast's matmuls too
        routing=routing,
    )
