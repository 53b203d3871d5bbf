"""A layout: how a step is cut over the GPUs (the five parallel degrees, ZeRO stage,
activation checkpointing, pipeline schedule and micro-batches), its checks, and the
lab strategy that runs it.

The mesh is the lab's (``distlab.strategies.parallel_dims``): pipeline outermost, then
data, context and tensor parallelism innermost, so tensor-parallel groups are the
closest ranks (one node) and data-parallel groups the farthest. Expert parallelism
splits the experts over ``ep`` of the data x context ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

from distlab.errors import DistlabError
from distlab.plan.shape import ModelShape
from distlab.strategies.pipeline_schedules import SCHEDULES, schedule_spec

PRECISIONS = ("fp32", "bf16", "mixed")
"""fp32: everything fp32. bf16: the lab's --precision bf16 (fp32 state, bf16 matmuls).
mixed: Megatron/DeepSpeed mixed precision (bf16 parameters and gradients, fp32 master
copy and Adam moments: 2 + 2 + 12 bytes per parameter)."""
ACTIVATION_CHECKPOINTING = ("none", "selective", "full")


@dataclass(frozen=True)
class Layout:
    """The degrees and settings of one way to run a step on ``gpus`` GPUs."""

    dp: int
    tp: int = 1
    pp: int = 1
    cp: int = 1
    ep: int = 1
    zero: int = 0
    """Data-parallel sharding: 0 replicas (DDP), 1 optimizer state, 2 and gradients,
    3 and parameters (FSDP)."""
    ac: str = "none"
    microbatches: int = 1
    """Micro-batches per step per data-parallel rank (pipelines: the schedule's m)."""
    schedule: str = "1f1b"
    sequence_parallel: bool = False
    """Tensor parallelism also splits the norms' and residuals' activations over the
    sequence (Megatron's sequence parallelism): the same bytes on the wire, as
    reduce-scatters and all-gathers, and 1/tp of those activations."""
    replicas: int = 1
    """ZeRO-3 only: replica groups that each hold the sharded state (HSDP); the state is
    sharded over dp x cp / replicas ranks."""
    strategy: str | None = None
    """The lab strategy that runs it, where several could (DeepSpeed's ``zero3`` or
    ``fsdp``, ``hsdp``); None: the one ``lab_strategy`` picks."""

    @property
    def gpus(self) -> int:
        """GPUs the layout uses."""
        return self.dp * self.tp * self.pp * self.cp

    @property
    def virtual_stages(self) -> int:
        """Pipeline stages per rank (interleaved schedules: more than one)."""
        return schedule_spec(self.schedule).stages_per_rank if self.pp > 1 else 1

    def label(self) -> str:
        """e.g. "dp 8 x tp 4 x pp 2, zero 1, ac full, m 16"."""
        parts = [f"{name} {n}" for name, n in self.degrees().items() if n > 1 or name == "dp"]
        settings = [f"zero {self.zero}"]
        if self.ac != "none":
            settings.append(f"ac {self.ac}")
        if self.sequence_parallel:
            settings.append("sp")
        if self.pp > 1:
            settings.append(f"{self.schedule} m {self.microbatches}")
        elif self.microbatches > 1:
            settings.append(f"accum {self.microbatches}")
        return " x ".join(parts) + ", " + ", ".join(settings)

    def degrees(self) -> dict[str, int]:
        """The five degrees by name."""
        return {"dp": self.dp, "tp": self.tp, "pp": self.pp, "cp": self.cp, "ep": self.ep}


def check(layout: Layout, shape: ModelShape, gpus: int, global_batch: int) -> Layout:
    """``layout`` if it can run ``shape`` on ``gpus`` GPUs with ``global_batch`` sequences
    per step; else a ``DistlabError`` that says what to change."""
    if layout.gpus != gpus:
        raise DistlabError(
            f"--dp {layout.dp} x --tp {layout.tp} x --pp {layout.pp} x --cp {layout.cp} = "
            f"{layout.gpus} GPUs, but --gpus is {gpus}"
        )
    if shape.heads % layout.tp or shape.kv % layout.tp:
        raise DistlabError(
            f"--tp {layout.tp} does not divide the model's {shape.heads} heads"
            + (f" and {shape.kv} key/value heads" if shape.kv != shape.heads else "")
        )
    if shape.seq_len % (2 * layout.cp) and layout.cp > 1:
        raise DistlabError(
            f"--cp {layout.cp} needs a sequence length divisible by {2 * layout.cp} "
            f"(got {shape.seq_len})"
        )
    if layout.pp > 1 and shape.layers < layout.pp * layout.virtual_stages:
        raise DistlabError(
            f"--pp {layout.pp} with {layout.schedule} needs {layout.pp * layout.virtual_stages} "
            f"stages but the model has {shape.layers} layers"
        )
    if layout.ep > 1 and (not shape.experts or shape.experts % layout.ep):
        raise DistlabError(
            f"--ep {layout.ep} needs a MoE model whose experts it divides "
            f"(the model has {shape.experts} experts)"
        )
    if (layout.dp * layout.cp) % layout.ep:
        raise DistlabError(f"--ep {layout.ep} must divide --dp x --cp = {layout.dp * layout.cp}")
    if global_batch % (layout.dp * layout.microbatches):
        raise DistlabError(
            f"--global-batch {global_batch} is not divisible by --dp {layout.dp} x "
            f"{layout.microbatches} micro-batches"
        )
    if layout.sequence_parallel and layout.tp == 1:
        raise DistlabError("--sequence-parallel needs --tp above 1")
    if layout.zero not in (0, 1, 2, 3):
        raise DistlabError(f"--zero {layout.zero}: choose 0, 1, 2 or 3")
    if layout.ac not in ACTIVATION_CHECKPOINTING:
        raise DistlabError(f"--ac {layout.ac}: choose one of {', '.join(ACTIVATION_CHECKPOINTING)}")
    if layout.schedule not in SCHEDULES:
        raise DistlabError(f"--schedule {layout.schedule}: choose one of {', '.join(SCHEDULES)}")
    return layout


def micro_batch_rows(layout: Layout, global_batch: int) -> int:
    """Sequences in one micro-batch of one data-parallel rank."""
    return global_batch // layout.dp // layout.microbatches


def lab_strategy(layout: Layout, moe: bool = False) -> tuple[str, dict[str, int]] | None:
    """The lab strategy that runs ``layout`` and its extra flags, or None if none does
    (the CPU search offers only layouts the lab can run and measure)."""
    if layout.strategy is not None:
        extra = {"tp": layout.tp, "pp": layout.pp, "cp": layout.cp, "ep": layout.ep}
        if layout.replicas > 1:
            extra |= {"dp_replicate": layout.replicas, "dp_shard": layout.dp // layout.replicas}
        return layout.strategy, {k: n for k, n in extra.items() if n > 1}
    dims = {"cp": layout.cp, "tp": layout.tp, "pp": layout.pp}
    used = tuple(name for name, n in dims.items() if n > 1)
    extra = {name: n for name, n in dims.items() if n > 1}
    if layout.ep > 1:
        return ("ep", {"ep": layout.ep}) if not used and layout.zero == 0 else None
    if moe and (used or layout.zero in (1, 2)):
        return None
    sharded = {0: None, 1: "zero1", 2: "zero2", 3: "fsdp"}[layout.zero]
    if not used:
        if layout.dp == 1:
            return ("single", {}) if layout.zero == 0 else None
        return (sharded or "ddp", {})
    if layout.dp == 1 and layout.zero == 0 and len(used) == 1:
        return (used[0], {})
    if layout.sequence_parallel:
        return None  # the lab's --sequence-parallel: tp only
    if layout.zero == 3:
        return ("fsdp+" + "+".join(used), extra)
    if used == ("pp",) and layout.zero == 0:
        return ("ddp+pp", extra)
    return None
