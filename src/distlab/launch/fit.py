"""Will it fit? The predicted peak per rank against the device, before anything runs.

``python -m distlab.launch ... --dry-run`` prints rank 0's predicted peak by
category (``distlab.theory.memory``) next to the memory one rank may use, and
exits; ``--trace`` adds torch's measured peak of one real step of the layout,
traced in this process with fake ranks (``distlab.train.trace``), beside it;
``--json`` prints the same as one JSON object.

A real launch checks the same prediction first and refuses, in one line, a
run that would not fit: on a GPU always, on a CPU when ``--memory-budget`` is
given (a CPU's RAM is shared, so there is no fixed size to check against
unless you set one). The refusal names the first
change that the same theory says would fit: checkpointing, a smaller
micro-batch, a sharded strategy, or more ranks.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Iterator

from distlab.config import Config, fixed_micro_batch, model_label
from distlab.distributed import resolve_device
from distlab.errors import DistlabError
from distlab.launch.micro_batch import budget_bytes, gib, wants_auto
from distlab.measure.step_memory import CATEGORIES
from distlab.strategies import registry
from distlab.strategies.resolve import validate
from distlab.theory.memory import PeakPrediction, predict_peak
from distlab.theory.rank_layout import rank_layout
from distlab.train.trace import TracedStep, check_traceable, trace_step

SHARDED_ALTERNATIVE = {"single": "fsdp", "ddp": "fsdp", "zero1": "zero3", "zero2": "zero3"}
"""The strategy to suggest when the model state itself does not fit."""


def prediction(config: Config) -> PeakPrediction | None:
    """Rank 0's predicted peak, or None for a strategy the theory does not model."""
    return predict_peak(config) if rank_layout(config) is not None else None


def describe(config: Config, budget: int) -> str:
    """The dry-run report: the peak by category, its phase, and the verdict."""
    peak = prediction(config)
    if peak is None:
        return f"no memory prediction for strategy {config.strategy}"
    width = max(map(len, CATEGORIES))
    lines = [
        f"predicted peak of rank 0 ({config.strategy}, {config.nproc} ranks, model "
        f"{model_label(config)}, --ac {config.ac}, {config.precision}):"
    ]
    for category in CATEGORIES:
        if peak.by_category[category]:
            lines.append(f"  {category:<{width}}  {gib(peak.by_category[category]):>12}")
    lines.append(f"  {'total':<{width}}  {gib(peak.total):>12}   (in the {peak.phase} phase)")
    verdict = "fits" if peak.total <= budget else "does NOT fit"
    lines.append(f"{verdict} in {gib(budget)} per rank")
    if peak.total > budget:
        lines.append(refusal(config, peak, budget))
    return "\n".join(lines)


def dry_run(config: Config, trace: bool, as_json: bool) -> int:
    """``--dry-run`` (``--trace``, ``--json``): print the figures; 2 if the peak does not fit."""
    budget = budget_bytes(config, resolve_device(config))
    peak = prediction(config)
    traced = None
    if trace:
        if peak is None:
            raise DistlabError(f"--trace: strategy {config.strategy} has no memory prediction")
        check_traceable(config)
        if not as_json:
            print(
                f"tracing one step of {config.strategy} at {config.nproc:,} fake ranks ...",
                file=sys.stderr,
                flush=True,
            )
        traced = trace_step(config)
    worst = max(traced.total if traced else 0, peak.total if peak else 0)
    if as_json:
        figures: dict[str, object] = {
            "strategy": config.strategy,
            "nproc": config.nproc,
            "model": model_label(config),
            "budget": budget,
            "fits": worst <= budget,
        }
        if peak is not None:
            figures["predicted"] = {**peak.by_category, "total": peak.total}
            figures["predicted_phase"] = peak.phase
        if traced is not None:
            figures["traced"] = {**traced.by_category, "total": traced.total}
            figures["traced_phase"] = traced.phase
            figures["trace_seconds"] = round(traced.seconds, 3)
        print(json.dumps(figures, indent=1))
    elif traced is not None and peak is not None:
        print(describe_trace(config, traced, peak, budget))
    else:
        print(describe(config, budget))
    return 2 if worst > budget else 0


def describe_trace(config: Config, traced: TracedStep, peak: PeakPrediction, budget: int) -> str:
    """The traced peak by category beside the predicted one, their ratios, the verdict."""
    worst = max(traced.total, peak.total)
    return "\n".join(
        [
            f"rank 0 of {config.nproc:,} ({config.strategy}, model {model_label(config)}, "
            f"--ac {config.ac}, {config.precision}): one step traced in {traced.seconds:.1f} s",
            side_by_side(traced.by_category, peak.by_category, "predicted"),
            f"peak traced in the {traced.phase} phase; predicted at the {peak.peak.name}",
            f"{'fits' if worst <= budget else 'does NOT fit'} in {gib(budget)} per rank",
        ]
    )


def side_by_side(traced: dict[str, int], expected: dict[str, int], label: str) -> str:
    """Bytes by category, traced beside ``label`` (predicted, planned), with their ratios."""
    width = max(map(len, CATEGORIES))
    lines = [f"  {'':<{width}}  {'traced':>12}  {label:>12}  traced/{label}"]
    rows = [(c, traced[c], expected[c]) for c in CATEGORIES if traced[c] or expected[c]]
    rows.append(("total", sum(traced.values()), sum(expected.values())))
    for name, measured, other in rows:
        lines.append(
            f"  {name:<{width}}  {size(measured):>12}  {size(other):>12}  {ratio(measured, other)}"
        )
    return "\n".join(lines)


def size(value: int) -> str:
    """Bytes with the unit that keeps three figures: ``812.0 KiB``, ``693.8 MiB``, ``12.30 GiB``."""
    if value < 2**20:
        return f"{value / 2**10:.1f} KiB"
    return gib(value)


def ratio(measured: int, expected: int) -> str:
    """``measured / expected`` to three places, or a dash where nothing was expected."""
    return f"{measured / expected:.3f}" if expected else "-"


def check_fits(config: Config) -> None:
    """Refuse (DistlabError) a run predicted not to fit; see the module docstring."""
    if wants_auto(config):
        return  # --micro-batch auto measures what fits instead
    device = resolve_device(config)
    if config.memory_budget is None and device != "cuda":
        return
    budget = budget_bytes(config, device)
    peak = prediction(config)
    if peak is not None and peak.total > budget:
        raise DistlabError(refusal(config, peak, budget))


def refusal(config: Config, peak: PeakPrediction, budget: int) -> str:
    """One line: the predicted peak, the budget, and a change that would fit."""
    line = f"predicted peak {gib(peak.total)} per rank exceeds {gib(budget)}"
    for flags, fitted in alternatives(config):
        total = prediction(fitted)
        if total is not None and total.total <= budget:
            return f"{line}; {flags} would fit (predicted {gib(total.total)})"
    return f"{line}; no change of --ac, --micro-batch, --strategy or --nproc (or two) fits it"


def alternatives(config: Config) -> Iterator[tuple[str, Config]]:
    """Valid configs one change away, cheapest first: checkpointing, smaller micro-batches,
    a sharded strategy, more ranks; then checkpointing with each of the others."""
    changes: list[tuple[str, dict[str, object]]] = []
    if config.ac != "full":
        changes.append(("--ac full", {"ac": "full"}))
    local = config.global_batch // registry.get(config.strategy).data_parallel_size(config)
    micro = fixed_micro_batch(config) or local
    size = micro // 2
    while size >= 1:
        changes.append((f"--micro-batch {size}", {"micro_batch": size}))
        size //= 2
    if config.strategy in SHARDED_ALTERNATIVE:
        target = SHARDED_ALTERNATIVE[config.strategy]
        changes.append((f"--strategy {target}", {"strategy": target}))
    for factor in (2, 4, 8):
        changes.append((f"--nproc {config.nproc * factor}", {"nproc": config.nproc * factor}))
    combined = [
        (f"{first} {flags}", {**fields, **more})
        for first, more in changes[:1]
        if config.ac != "full"
        for flags, fields in changes[1:]
    ]  # --ac full together with each of the others
    for flags, fields in [*changes, *combined]:
        candidate = dataclasses.replace(config, **fields)
        try:
            validate(candidate)
        except DistlabError:
            continue
        yield flags, candidate
