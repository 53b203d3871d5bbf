"""Communication of the model-parallel dimensions: tensor, context and pipeline parallelism.

Each function adds rank 0's collectives of one optimizer step along one dimension
to the prediction and returns the formula it applies (None where the layout does
not use the dimension); the formulas are in ``theory.comm``'s docstring.
"""

from __future__ import annotations

from distlab.config import model_shape
from distlab.strategies.data_parallel import DataParallel
from distlab.strategies.parallel_dims import VIRTUAL_STAGES
from distlab.strategies.pipeline_schedules import last_stage_rank, rank_stages
from distlab.theory.collectives import CommPrediction, StepFacts
from distlab.theory.rank_layout import FP32, has_first_last, layers_of, microbatches


def tensor_parallel_comm(pred: CommPrediction, step: StepFacts) -> str | None:
    """The row-parallel outputs' and column-parallel inputs' all-reduces in every block, the
    embedding's and LM head's, and the gathered logits (``tensor_parallel``); the formula.
    None without tp, or under sequence parallelism (not modelled: a note says so)."""
    config, layout = step.config, step.layout
    if layout.tp <= 1:
        return None
    if config.sequence_parallel:
        pred.notes.append("sequence parallelism not modelled: tp traffic left out")
        return None
    shape = model_shape(config)
    layers = layers_of(config, layout)
    first, last = has_first_last(config, layout)
    tokens = step.rows * step.seq // layout.cp  # a cp rank computes its slice of each sequence
    count = 6 * layers + (1 if first else 0) + (1 if last else 0)
    # The 2 L row-parallel outputs are matmul outputs; the rest (embedding,
    # backward input gradients) are in the model's dtype (fp32 under autocast).
    passes = step.accum if layout.pp == 1 else microbatches(config, layout)
    volume = 2 * layers * step.matmul_bytes + (count - 2 * layers) * step.model_bytes
    pred.add("all_reduce", volume * tokens * shape.d_model, layout.tp, calls=passes * count)
    if last:
        pred.add(
            "all_gather", tokens * shape.vocab_size * step.matmul_bytes, layout.tp, calls=passes
        )
    return "all-reduce BTd x (6L + 2) + all-gather BTV"


def clipping_comm(pred: CommPrediction, step: StepFacts) -> None:
    """clip_grad_norm_ on DTensors (fsdp's and tp's parameters): one all-reduce of the
    per-tensor norms over the ranks a parameter is split over, FSDP's shards and tp's
    pieces together (the mesh's flattened ``dp_shard_cp_tp`` view). hsdp: the norms of
    replicated shards agree, so only the shard dimension is reduced."""
    layout = step.layout
    fsdp = layout.data_parallel is DataParallel.FSDP
    split_over = (layout.shard if fsdp else 1) * layout.tp
    pred.add("all_reduce", FP32 * len(step.shapes), split_over)  # nothing when 1


def context_parallel_comm(pred: CommPrediction, step: StepFacts) -> str | None:
    """The keys' and values' all-gathers and their gradients' reduce-scatters
    (``distlab.strategies.context_parallel``) for this rank's rows, whole sequences, in
    every forward (micro-batch), at the matmul outputs' bytes per element (K and V: bf16
    under autocast and under FSDP's bf16 policy); the formula. None without cp."""
    config, layout = step.config, step.layout
    if layout.cp <= 1:
        return None
    tokens, element = step.rows * step.seq, step.matmul_bytes
    passes = step.accum if layout.pp == 1 else microbatches(config, layout)  # forwards per step
    shape = model_shape(config)
    layers = layers_of(config, layout)
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


def pipeline_comm(pred: CommPrediction, step: StepFacts) -> str | None:
    """Point-to-point traffic of pipeline rank 0, plus the loss broadcast and norm all-reduce;
    the formula. None without pipelining.

    Messages are the residual stream, at the model's bytes per element (fp32 under
    autocast, bf16 from FSDP stages under bf16).
    """
    config, layout, rows, seq = step.config, step.layout, step.rows, step.seq
    if layout.pp <= 1:
        return None
    element_bytes = step.model_bytes
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
    return "send/recv M activations of (B/M) T d per stage boundary"
