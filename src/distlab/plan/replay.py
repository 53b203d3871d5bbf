"""The published runs of ``distlab.plan.published`` replayed by the planner: each run's
model, layout and device as the paper states them, and the planner's throughput in the
paper's own FLOP convention (Megatron-LM: hardware FLOPs with recomputation, by its
formula; Llama 3: model FLOPs)."""

from __future__ import annotations

from distlab.plan.hardware import GPUS
from distlab.plan.layout import Layout
from distlab.plan.memory import state_bytes
from distlab.plan.published import FLOPS_HARDWARE_WITH_RECOMPUTE, ZERO_PAPER, PublishedRun
from distlab.plan.search import Plan, evaluate
from distlab.plan.shape import ModelShape, from_parameter_count


def zero_paper_state_gb(stage: int) -> float:
    """Model states per GPU (10^9 bytes) of the ZeRO paper's example at ``stage``:
    7.5B parameters, 64 GPUs, mixed-precision Adam."""
    # a 7.5B shape by the --params rule scaled to the paper's exact count: the model
    # states depend on the count alone
    shape = from_parameter_count(ZERO_PAPER.parameters, 2048, 51200)
    scale = ZERO_PAPER.parameters / shape.parameters()
    state = state_bytes(shape, Layout(dp=ZERO_PAPER.gpus, zero=stage), "mixed")
    return sum(state.values()) * scale / 1e9


def is_megatron_2021(run: PublishedRun) -> bool:
    """Whether ``run`` is one of Megatron-LM's 2021 runs (before FlashAttention and
    sequence parallelism)."""
    return run.flops_convention == FLOPS_HARDWARE_WITH_RECOMPUTE


def planner_shape(run: PublishedRun) -> ModelShape:
    """The run's model as the planner's shape (Megatron: GPT with biases and learned
    positions, attention scores through memory; Llama: SwiGLU, grouped-query attention,
    no biases, RoPE, flash attention)."""
    s = run.shape
    return ModelShape(
        name=run.name,
        layers=s.layers,
        hidden=s.hidden,
        heads=s.heads,
        vocab=s.vocab,
        seq_len=s.seq_len,
        ffn_hidden=s.ffn_hidden,
        kv_heads=s.kv_heads,
        gated_mlp=s.swiglu,
        biases=not s.swiglu,
        positions=0 if s.swiglu else s.seq_len,
        attention="materialized" if is_megatron_2021(run) else "flash",
    )


def planner_layout(run: PublishedRun) -> Layout:
    """The run's degrees, micro-batches, schedule and recomputation. Interleaved runs
    use the lab's interleaved schedule (two chunks per rank); sequence parallelism is off
    for Megatron-LM 2021 (it came in 2022) and assumed on for Llama 3 (not stated)."""
    interleaved = run.pp > 1 and run.virtual_stages > 1
    return Layout(
        dp=run.dp,
        tp=run.tp,
        pp=run.pp,
        cp=run.cp,
        zero=run.zero,
        ac="full" if run.recompute == "full" else "none",
        microbatches=run.global_batch // run.dp // run.micro_batch,
        schedule="interleaved-1f1b" if interleaved else "1f1b",
        sequence_parallel=run.tp > 1 and not is_megatron_2021(run),
    )


def megatron_flops_per_step(run: PublishedRun) -> float:
    """Megatron-LM's own FLOP count of a step, 96 B s l h^2 (1 + s/6h + V/16lh)."""
    s = run.shape
    b, seq, layers, h, v = run.global_batch, s.seq_len, s.layers, s.hidden, s.vocab
    return 96 * b * seq * layers * h * h * (1 + seq / (6 * h) + v / (16 * layers * h))


def replay(run: PublishedRun) -> tuple[Plan, float]:
    """The planner's plan of ``run`` and its TFLOP/s per GPU in the paper's convention."""
    plan = evaluate(
        planner_shape(run), planner_layout(run), run.global_batch, "mixed", GPUS[run.gpu]
    )
    if is_megatron_2021(run):
        return plan, megatron_flops_per_step(run) / plan.step.total_s / run.gpus / 1e12
    return plan, plan.tflops_per_gpu
