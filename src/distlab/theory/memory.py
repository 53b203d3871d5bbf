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

from dataclasses import dataclass

from distlab.config import Config, model_shape
from distlab.measure.memory import ModelStateBytes
from distlab.measure.step_memory import CATEGORIES
from distlab.model import count_parameters
from distlab.strategies import registry
from distlab.strategies.data_parallel import DataParallel
from distlab.strategies.fully_shard import backward_prefetch_depth
from distlab.theory.activations import (
    FORWARDS_FIRST,
    StepShape,
    block_activation_bytes,
    block_in_backward_bytes,
    held_activation_bytes,
    moe_block_extra_bytes,
    step_shape,
)
from distlab.theory.parameter_bytes import (
    block_elements,
    ddp_pipeline_buckets,
    gathered_bytes,
    optimizer_step_grads,
    optimizer_temporaries,
    root_elements,
)
from distlab.theory.rank_layout import RankLayout, rank_layout

FP32 = 4


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
        activations=held_activation_bytes(shape, config),
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
    unsharded gradients. FSDP holds the root, block k and the N blocks after it in backward
    order (prefetched: ``--prefetch N``, at least FSDP2's default one) gathered.
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
    fsdp = layout.data_parallel is DataParallel.FSDP
    head = 0 if fsdp else root_elements(config, layout, head_only=True)
    done = sum(blocks[k + 1 :]) + head
    shards = 1  # what the gradients made so far are split over
    if fsdp:
        shards = layout.shard  # hsdp: the replica groups hold the same shards
    elif layout.data_parallel.shards_gradients:
        shards = layout.dp
    grads = max(resident.grads, min(state.grads, FP32 * done // shards))
    comm, unsharded_grads = 0, 0
    if fsdp:
        # block k and the blocks prefetched ahead of it, k-1 .. k-N (FSDP2's default N = 1;
        # --prefetch N), gathered (a checkpointed block's recomputation reuses block k's
        # gathered parameters). At block 0 nothing is left to prefetch, yet one block is
        # counted, as before --prefetch (an overcount of one block there, which the
        # tables of docs/memory.md were made with). Block k's gradients, before their
        # reduce-scatter, are backward's own tensors (temporaries).
        ahead = backward_prefetch_depth(config.prefetch)
        prefetched = sum(gathered[max(k - ahead, 0) : k]) if k else gathered[0]
        gathered_blocks = gathered[k] + prefetched
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
        grads=0 if layout.data_parallel is DataParallel.FSDP or no_grads_yet else state.grads,
        activations=held_activation_bytes(in_flight, config) + recomputed,
        temporaries=e * (2 * t * h + 8 * t * h // tp) + buckets,
        comm_buffers=gathered["comm_buffers"],
    )


def _split(**parts: int) -> dict[str, int]:
    return {category: int(parts.get(category, 0)) for category in CATEGORIES}
