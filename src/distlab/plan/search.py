"""Enumerate the layouts of a model on a cluster, predict each, keep those that fit,
rank them by throughput."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, fields, replace

from distlab.config import Config
from distlab.config_reading import option_flag
from distlab.errors import DistlabError
from distlab.plan.calibrate import MAX_RANKS_PER_CORE
from distlab.plan.hardware import Device
from distlab.plan.layout import Layout, check, lab_strategy
from distlab.plan.memory import MemoryEstimate, lab_config, memory_per_gpu
from distlab.plan.shape import ModelShape
from distlab.plan.step_time import StepTime, step_time

MEMORY_HEADROOM = 0.9
"""Fraction of a device's memory a layout may plan to use (the rest: allocator
fragmentation, the CUDA context, workspace)."""


@dataclass(frozen=True)
class Plan:
    """One layout with its predicted memory and step."""

    layout: Layout
    memory: MemoryEstimate
    step: StepTime
    tokens_per_step: int
    model_flops_per_token: float
    peak_flops: float
    fits: bool
    moe: bool = False
    """Whether the model has experts (the lab runs fewer layouts of those)."""

    @property
    def gpus(self) -> int:
        """GPUs the layout uses."""
        return self.layout.gpus

    @property
    def tokens_per_s(self) -> float:
        """Predicted training throughput of the whole cluster."""
        return self.tokens_per_step / self.step.total_s

    @property
    def tflops_per_gpu(self) -> float:
        """Model TFLOP/s per GPU (PaLM's MFU FLOPs: no recomputation)."""
        return self.model_flops_per_token * self.tokens_per_s / self.gpus / 1e12

    @property
    def mfu(self) -> float:
        """Model FLOPs utilisation: model FLOP/s per GPU over the device's peak."""
        return self.tflops_per_gpu * 1e12 / self.peak_flops

    def to_dict(self) -> dict[str, object]:
        """The JSON form (``--json``)."""
        lab = lab_strategy(self.layout, moe=self.moe)
        return {
            "degrees": self.layout.degrees(),
            "zero": self.layout.zero,
            "ac": self.layout.ac,
            "microbatches": self.layout.microbatches,
            "schedule": self.layout.schedule if self.layout.pp > 1 else None,
            "sequence_parallel": self.layout.sequence_parallel,
            "label": self.layout.label(),
            "lab_strategy": lab[0] if lab else None,
            "memory_per_gpu_bytes": self.memory.to_dict(),
            "memory_source": self.memory.source,
            "fits": self.fits,
            "step_time_s": self.step.total_s,
            "step_time_split_s": {
                "compute": self.step.compute_s,
                "exposed_comm": self.step.exposed_comm_s,
                "bubble": self.step.bubble_s,
                "optimizer": self.step.optimizer_s,
                "comm_total": self.step.comm_s,
            },
            "tokens_per_s": self.tokens_per_s,
            "tflops_per_gpu": self.tflops_per_gpu,
            "mfu": self.mfu,
        }


def evaluate(
    shape: ModelShape, layout: Layout, global_batch: int, precision: str, device: Device
) -> Plan:
    """Predict one (checked) layout."""
    memory = memory_per_gpu(shape, layout, global_batch, precision)
    budget = device.memory_bytes * MEMORY_HEADROOM
    if device.cores:  # a CPU's ranks share the machine's memory
        budget /= min(layout.gpus, device.gpus_per_node)
    return Plan(
        layout=layout,
        memory=memory,
        step=step_time(shape, layout, global_batch, precision, device),
        tokens_per_step=global_batch * shape.seq_len,
        model_flops_per_token=shape.flops_per_token(),
        peak_flops=device.peak(precision),
        fits=memory.total <= budget,
        moe=bool(shape.experts),
    )


def lab_command(shape: ModelShape, layout: Layout, global_batch: int, precision: str) -> str | None:
    """The ``distlab.launch`` command that runs ``layout`` in the lab, or None."""
    config = lab_config(shape, layout, global_batch, precision)
    if config is None:
        return None
    default = Config()
    flags = [
        option_flag(f.name, getattr(config, f.name))
        for f in fields(Config)
        if getattr(config, f.name) is not None
        and getattr(config, f.name) != getattr(default, f.name)
    ]
    return "python -m distlab.launch " + " ".join(flags)


def divisors(n: int) -> list[int]:
    """Positive divisors of ``n``."""
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_layouts(
    shape: ModelShape,
    gpus: int,
    global_batch: int,
    device: Device,
    fixed: dict[str, object],
) -> list[Layout]:
    """Every valid layout of ``gpus`` GPUs that agrees with the ``fixed`` settings.

    Tensor parallelism stays within a node; micro-batches: 1, 2, 4, ... per
    data-parallel rank (pipelines: at least ``pp``); on a CPU only the layouts a lab
    strategy runs (so the pick can be measured).
    """
    out: list[Layout] = []
    experts = shape.experts
    for tp, pp, cp in itertools.product(divisors(gpus), repeat=3):
        if gpus % (tp * pp * cp) or tp > device.gpus_per_node:
            continue
        dp = gpus // (tp * pp * cp)
        if global_batch % dp:
            continue
        local = global_batch // dp
        eps = [e for e in divisors(dp * cp) if experts and experts % e == 0] if experts else [1]
        schedules = ["1f1b", "interleaved-1f1b"] if pp > 1 else ["1f1b"]
        zeros = [0, 1, 2, 3] if dp * cp > 1 else [0]
        for ep, zero, ac, schedule in itertools.product(
            eps, zeros, ("none", "selective", "full"), schedules
        ):
            for m in (d for d in divisors(local) if d & (d - 1) == 0 or d == local):
                if pp > 1 and m < pp:
                    continue
                layout = Layout(
                    sequence_parallel=tp > 1 and not device.cores,
                    dp=dp,
                    tp=tp,
                    pp=pp,
                    cp=cp,
                    ep=ep,
                    zero=zero,
                    ac=ac,
                    microbatches=m,
                    schedule=schedule,
                )
                layout = replace(layout, **{k: v for k, v in fixed.items() if v is not None})
                if layout.gpus != gpus:
                    continue
                try:
                    check(layout, shape, gpus, global_batch)
                except DistlabError:
                    continue
                if device.cores and lab_strategy(layout, moe=bool(experts)) is None:
                    continue
                out.append(layout)
    return sorted(set(out), key=lambda lay: lay.label())


def check_fixed(shape: ModelShape, gpus: int, fixed: dict[str, object]) -> None:
    """One-line errors for fixed degrees no layout can have."""
    for name in ("ep", "microbatches"):
        n = fixed.get(name)
        if isinstance(n, int) and n < 1:
            raise DistlabError(f"--{name} {n}: must be at least 1")
    product = 1
    for name in ("dp", "tp", "pp", "cp"):
        n = fixed.get(name)
        if isinstance(n, int):
            if n < 1:
                raise DistlabError(f"--{name} {n}: a degree is at least 1")
            product *= n
    if gpus % product:
        given = " x ".join(f"--{k} {v}" for k, v in fixed.items() if k in ("dp", "tp", "pp", "cp"))
        raise DistlabError(f"{given} = {product} does not divide --gpus {gpus}")
    # the largest data-parallel degree the fixed ones leave: any layout's is a divisor
    probe = replace(
        Layout(dp=1),
        **{k: v for k, v in fixed.items() if k in ("tp", "pp", "cp", "ep", "schedule")},
    )
    check(
        replace(probe, dp=gpus // probe.gpus),
        shape,
        gpus,
        gpus * (fixed.get("microbatches") or 1),  # type: ignore[operator]
    )


def search(
    shape: ModelShape,
    gpus: int,
    global_batch: int,
    precision: str,
    device: Device,
    fixed: dict[str, object],
) -> list[Plan]:
    """Every candidate layout predicted, the ones that fit first, fastest first."""
    fixed_degrees = {k: v for k, v in fixed.items() if k in ("dp", "tp", "pp", "cp") and v}
    check_fixed(shape, gpus, fixed)
    if len(fixed_degrees) == 4:
        layout = replace(Layout(dp=1), **{k: v for k, v in fixed.items() if v is not None})
        check(layout, shape, gpus, global_batch)
        layouts = [layout]
    else:
        layouts = candidate_layouts(shape, gpus, global_batch, device, fixed)
    if not layouts:
        raise DistlabError(
            f"no layout of {gpus} GPUs runs {shape.name} with --global-batch {global_batch}"
            + (f" and {fixed}" if fixed else "")
            + ": change the fixed degrees or the batch"
        )
    plans = [evaluate(shape, layout, global_batch, precision, device) for layout in layouts]
    return ranked(plans)


def ranked(plans: list[Plan]) -> list[Plan]:
    """Those that fit first, fastest first, the smaller memory first at equal speed."""
    return sorted(plans, key=lambda plan: (not plan.fits, -plan.tokens_per_s, plan.memory.total))


def search_rank_counts(
    shape: ModelShape,
    global_batch: int,
    precision: str,
    device: Device,
    fixed: dict[str, object],
) -> list[Plan]:
    """This machine's plans at every rank count from 1 to twice its cores (the
    oversubscription its calibration covers), fastest first."""
    plans: list[Plan] = []
    for ranks in range(1, MAX_RANKS_PER_CORE * device.cores + 1):
        try:
            plans += search(shape, ranks, global_batch, precision, device, fixed)
        except DistlabError:
            continue  # no layout of this many ranks (the batch or fixed degrees)
    if not plans:
        raise DistlabError(
            f"no layout of 1 to {MAX_RANKS_PER_CORE * device.cores} ranks runs {shape.name} "
            f"with --global-batch {global_batch}: change the batch or the fixed degrees"
        )
    return ranked(plans)
