"""``--calibrate``: fit a device's constants to measurements.

From the lab's runs (``fit``), in two stages: first the links' latency and bandwidth
(alpha, beta) to the runs' measured communication times (the comm counter's seconds in
flight), then, with the links fixed, the compute constants (matmul efficiency and
overhead, elementwise bandwidth, the host's cost per layer, and on a CPU the
oversubscription exponent and DeepSpeed's per-step engine cost, each only where some
run can tell it) to the runs' measured median step times. From a GPU's measured matmul
rates (``fit_matmul_rates``): the matmul efficiency and overhead alone. Both minimise
the mean squared log(predicted / measured) with a restarted Nelder-Mead simplex (no
gradients: the model has maxima and minima). The fitted device is written as JSON
(``hardware.device_from_file`` reads it back).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from distlab.errors import DistlabError
from distlab.plan.hardware import Device, Link
from distlab.plan.runs import MeasuredRun
from distlab.plan.step_time import ENGINES, matmul_seconds, step_time

RESTARTS = 3
"""Nelder-Mead runs, each from the previous one's best point."""
MAX_RANKS_PER_CORE = 2
"""The most ranks per core a CPU run may have to calibrate (``calibrates``)."""
MIN_COMM_S = 0.005
"""Runs with less measured communication time per step do not inform the link fit."""

LINK = ("latency", "bandwidth")
"""Fitted first, to the runs' measured communication times."""
COMPUTE = (
    "matmul_efficiency",
    "elementwise_bandwidth",
    "matmul_overhead_s",
    "layer_overhead_s",
)
"""Fitted second, with the links fixed, to the runs' measured step times; on a CPU also
the oversubscription exponent, and the per-step cost of any engine the runs used
(``fitted_constants``)."""


def with_constants(device: Device, **c: float) -> Device:
    """``device`` with some of the ``LINK`` and ``COMPUTE`` constants replaced."""
    link = Link(
        bandwidth=c.get("bandwidth", device.intra_node.bandwidth),
        latency=c.get("latency", device.intra_node.latency),
    )
    engines = dict(device.engine_overhead_s)
    for key, engine in (
        ("deepspeed_overhead_s", "deepspeed"),
        ("deepspeed_zero3_overhead_s", "deepspeed-zero3"),
    ):
        if key in c:
            engines[engine] = c[key]
    return replace(
        device,
        matmul_efficiency=c.get("matmul_efficiency", device.matmul_efficiency),
        matmul_overhead_s=c.get("matmul_overhead_s", device.matmul_overhead_s),
        layer_overhead_s=c.get("layer_overhead_s", device.layer_overhead_s),
        elementwise_bandwidth=c.get("elementwise_bandwidth", device.elementwise_rate()),
        intra_node=link,
        inter_node=link,
        oversubscription_exponent=c.get(
            "oversubscription_exponent", device.oversubscription_exponent
        ),
        engine_overhead_s=engines,
    )


def constants_of(device: Device, names: Sequence[str]) -> list[float]:
    """``device``'s current values of the constants ``names`` (a fit's starting point)."""
    values = {
        "latency": device.intra_node.latency,
        "bandwidth": device.intra_node.bandwidth,
        "matmul_efficiency": device.matmul_efficiency,
        "matmul_overhead_s": device.matmul_overhead_s,
        "layer_overhead_s": device.layer_overhead_s or 1e-4,
        "elementwise_bandwidth": device.elementwise_rate(),
        "oversubscription_exponent": device.oversubscription_exponent,
        "deepspeed_overhead_s": device.engine_overhead_s.get("deepspeed", 0.01),
        "deepspeed_zero3_overhead_s": device.engine_overhead_s.get("deepspeed-zero3", 0.01),
    }
    return [values[name] for name in names]


def predicted_step(run: MeasuredRun, device: Device) -> float:
    """The planner's step time for ``run``'s model and layout on ``device``."""
    return step_time(run.shape, run.layout, run.global_batch, run.precision, device).total_s


def log_error(runs: Sequence[MeasuredRun], device: Device) -> float:
    """Mean squared log(predicted / measured) step time over ``runs``."""
    return float(
        np.mean([math.log(predicted_step(run, device) / run.step_time_s) ** 2 for run in runs])
    )


def nelder_mead(
    objective: Callable[[np.ndarray], float],
    start: np.ndarray,
    steps: int = 3000,
    scale: float = 0.5,
) -> np.ndarray:
    """Minimise ``objective`` from ``start`` with the Nelder-Mead simplex."""
    simplex = [start] + [start + scale * np.eye(len(start))[i] for i in range(len(start))]
    values = [objective(x) for x in simplex]
    for _ in range(steps):
        order = np.argsort(values)
        simplex = [simplex[i] for i in order]
        values = [values[i] for i in order]
        if values[-1] - values[0] < 1e-10:
            break
        centroid = np.mean(simplex[:-1], axis=0)
        worst = simplex[-1]
        reflected = centroid + (centroid - worst)
        r = objective(reflected)
        if r < values[0]:
            expanded = centroid + 2 * (centroid - worst)
            e = objective(expanded)
            simplex[-1], values[-1] = (expanded, e) if e < r else (reflected, r)
        elif r < values[-2]:
            simplex[-1], values[-1] = reflected, r
        else:
            contracted = centroid + 0.5 * (worst - centroid)
            c = objective(contracted)
            if c < values[-1]:
                simplex[-1], values[-1] = contracted, c
            else:
                best = simplex[0]
                simplex = [best + 0.5 * (x - best) for x in simplex]
                values = [objective(x) for x in simplex]
    return simplex[int(np.argmin(values))]


def comm_log_error(runs: Sequence[MeasuredRun], device: Device) -> float:
    """Mean squared log(predicted / measured) communication time over ``runs``."""
    errors = [
        math.log(comm_seconds(run, device) / run.comm_time_s) ** 2
        for run in runs
        if run.comm_time_s > MIN_COMM_S
    ]
    return float(np.mean(errors)) if errors else 0.0


def comm_seconds(run: MeasuredRun, device: Device) -> float:
    """The planner's communication seconds of ``run`` (all of it, hidden or not)."""
    return step_time(run.shape, run.layout, run.global_batch, run.precision, device).comm_s


def fitted_constants(runs: Sequence[MeasuredRun], device: Device) -> list[str]:
    """The ``COMPUTE`` constants ``runs`` can tell: oversubscription only on a CPU, an
    engine's cost only if some run used it."""
    engines = {ENGINES.get(run.layout.strategy or "", "") for run in runs}
    names = list(COMPUTE)
    if device.cores:
        names.append("oversubscription_exponent")
    names += [f"{engine.replace('-', '_')}_overhead_s" for engine in sorted(engines - {""})]
    return names


def _fit(device: Device, names: Sequence[str], error: Callable[[Device], float]) -> Device:
    start = np.log(np.array(constants_of(device, names), dtype=float))

    def objective(x: np.ndarray) -> float:
        values = dict(zip(names, np.exp(x), strict=True))
        if values.get("matmul_efficiency", 0.0) > 1.0:  # above the peak is not a fit
            return 1e9
        return error(with_constants(device, **values))

    best = start
    for _ in range(RESTARTS):  # a fresh simplex around the best point escapes a stall
        best = nelder_mead(objective, best)
    best = np.exp(best)
    return with_constants(device, **dict(zip(names, best, strict=True)))


def calibrates(run: MeasuredRun, device: Device) -> bool:
    """Whether ``run`` may calibrate ``device``: on a CPU at most ``MAX_RANKS_PER_CORE``
    ranks per core (the oversubscription the model is fitted for; beyond it runs are
    only predicted)."""
    return not device.cores or run.layout.gpus <= MAX_RANKS_PER_CORE * device.cores


def fit(runs: Sequence[MeasuredRun], device: Device) -> Device:
    """``device`` with the constants that best predict ``runs`` (those that calibrate
    it): the links from their measured communication times, then compute from their
    step times."""
    used = [run for run in runs if calibrates(run, device)]
    if not used:
        raise DistlabError(
            f"no run to calibrate {device.name} with (runs beyond {MAX_RANKS_PER_CORE} ranks "
            "per core only get predicted)"
        )
    linked = device
    if any(run.comm_time_s > MIN_COMM_S for run in used):
        linked = _fit(device, LINK, lambda d: comm_log_error(used, d))
    fitted = _fit(linked, fitted_constants(used, device), lambda d: log_error(used, d))
    names = ", ".join(run.name for run in used)
    skipped = [run.name for run in runs if not calibrates(run, device)]
    notes = [f"rms log error on those runs: {math.sqrt(log_error(used, fitted)):.3f}"]
    if skipped:
        notes.append(
            f"not calibrating (over {MAX_RANKS_PER_CORE} ranks per core): {', '.join(skipped)}"
        )
    return replace(
        fitted,
        source=f"{device.source}; calibrated on {len(used)} runs ({names})",
        notes=tuple(notes),
    )


def fit_matmul_rates(rows: Sequence[dict], device: Device) -> Device:
    """``device``'s matmul efficiency and overhead fitted to measured matmul rates (the
    rows of ``benchmarks/matmul_rate.py``: dtype, m, k, n, tflops), least squares of the
    log of predicted over measured rate."""
    measured = [r for r in rows if r["dtype"] in ("bf16", "fp32")]
    if not measured:
        raise DistlabError(
            "no bf16 or fp32 rows to fit (expected benchmarks/matmul_rate.py's JSON)"
        )

    def error(candidate: Device) -> float:
        return float(
            np.mean(
                [
                    math.log(
                        matmul_seconds(candidate, r["dtype"], r["m"], r["n"], r["k"])
                        * r["tflops"]
                        * 1e12
                        / (2.0 * r["m"] * r["n"] * r["k"])
                    )
                    ** 2
                    for r in measured
                ]
            )
        )

    fitted = _fit(device, ("matmul_efficiency", "matmul_overhead_s"), error)
    return replace(
        fitted,
        source=f"{device.source}; matmuls fitted to {len(measured)} measured rates",
        notes=(f"rms log error of the matmul rates: {math.sqrt(error(fitted)):.3f}",),
    )


def write_calibration(device: Device, path: Path) -> None:
    """Save a fitted device as JSON (what ``--calibration`` reads)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(device.to_dict(), indent=1) + "\n")
