"""Gradient accumulation: what each strategy sends per step at 1, 2 and 4 micro-batches.

Communication: every strategy runs on the counting gloo backend
(``distlab.report.comm_check``, tiny model) at several micro-batch counts A per
step (``--micro-batch``; pipelines: their microbatches). At each A the bytes
per step that the counter saw, per collective type, and the calls where
the theory knows them, equal ``distlab.theory.comm.predict_comm``'s exactly.
Where accumulation is meant to cost no communication (ddp, fsdp by default,
zero1, zero2 by default, fairscale, the compositions), the bytes do not depend
on A. The others send more with each micro-batch, and the test states it:
fsdp with --reshard-between-microbatches gathers per micro-batch by choice,
zero2 with --zero-reduce per-microbatch reduces in every micro-batch by
choice; ZeRO-3 gathers the parameters in every micro-batch by design, and by
default reduce-scatters in every one too (--zero-reduce once: once per step).

Training: ``--micro-batch`` runs of fsdp (both modes), fsdp+tp, zero2 (both
``--zero-reduce`` modes) and zero3 (reducing once) reproduce ``single``
(``distlab.report.parity``), end each step with the parameters sharded again
(model-state bytes at rest as predicted) and fsdp resumes from a checkpoint
written between accumulated steps.

The runs on 2 ranks are one multi-rank job, those on 4 another, each started
on first use; each run measures the first step whose traffic is every later
step's (``Case.warmup``), on the counter alone (the TCP bytes are
``tests/test_comm.py``'s). A case that the training tests below run at its most
micro-batches (4) is not run again there: that step is read from the SGD parity
run's own count (``ranks/rank0.jsonl``: the same counting process group, in
the launcher's training loop).
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from tests.helpers import assert_resume_continues

from distlab.config import Config
from distlab.measure.wire import KINDS
from distlab.report.parity import _run_name, _run_once, compare, parity_config
from distlab.run.files import RANKS_DIR, read_jsonl
from distlab.theory.comm import predict_comm

pytestmark = pytest.mark.slow  # the whole file: micro-batch counts on real ranks


@dataclass(frozen=True)
class Case:
    """One strategy setting, run at several micro-batch counts in one job (``nproc``)."""

    fields: dict[str, Any]
    nproc: int
    """Ranks of the job the case runs in: 2, or 4 for the compositions (dp 2 x tp or pp 2);
    one job per rank count, as a launch costs its ranks' start-up."""
    constant: bool
    """Whether the bytes per step are the same at every micro-batch count."""
    needs: str | None = None
    counts: tuple[int, ...] = (1, 2, 4)
    """Micro-batches per step (for pipelines, their microbatches: at least 2)."""
    warmup: int = 1
    """Steps before the one measured: from it on, every step sends the same (counted per
    step over 4 steps at every count). Step 0 initialises lazily; 2 where step 1 still
    differs: DDP rebuilds its buckets (a broadcast of their order), fairscale's OSS
    broadcasts twice more, DeepSpeed's ZeRO-3 (at 1 micro-batch) six small tensors more."""


CASES = {
    "ddp": Case({"strategy": "ddp"}, 2, constant=True, warmup=2),
    "fsdp": Case({"strategy": "fsdp"}, 2, constant=True),
    "fsdp-no-reshard-after-forward": Case(
        {"strategy": "fsdp", "reshard_after_forward": False}, 2, constant=True
    ),
    "fsdp-regather": Case(
        {"strategy": "fsdp", "reshard_between_microbatches": True}, 2, constant=False
    ),
    "zero1": Case({"strategy": "zero1"}, 2, constant=True, needs="deepspeed"),
    "zero2": Case({"strategy": "zero2"}, 2, constant=True, needs="deepspeed"),
    "zero2-per-microbatch": Case(
        {"strategy": "zero2", "zero_reduce": "per-microbatch"},
        2,
        constant=False,
        needs="deepspeed",
    ),
    "zero3": Case({"strategy": "zero3"}, 2, constant=False, needs="deepspeed", warmup=2),
    "zero3-reduce-once": Case(
        {"strategy": "zero3", "zero_reduce": "once"},
        2,
        constant=False,
        needs="deepspeed",
        warmup=2,
    ),
    "fairscale-oss": Case(
        {"strategy": "fairscale-oss"}, 2, constant=True, needs="fairscale", warmup=2
    ),
    "fairscale-sdp": Case({"strategy": "fairscale-sdp"}, 2, constant=True, needs="fairscale"),
    "fsdp+tp": Case({"strategy": "fsdp+tp", "tp": 2}, 4, constant=True),
    "fsdp+pp": Case({"strategy": "fsdp+pp", "pp": 2}, 4, constant=True, counts=(2, 4, 8)),
    "fsdp+pp-regather": Case(
        {"strategy": "fsdp+pp", "pp": 2, "reshard_between_microbatches": True},
        4,
        constant=False,
        counts=(2, 4, 8),
    ),
}
DATA_PARALLEL = 2
"""Data-parallel ranks in every case (the compositions' other 2 are tp or pp)."""


def cells(case: Case) -> list[dict[str, Any]]:
    """The case's comm_check cells, one per micro-batch count (the largest: one row each)."""
    local = max(case.counts)
    base = {"model": "tiny", "global_batch": DATA_PARALLEL * local}
    return [{**base, **case.fields, "micro_batch": local // count} for count in case.counts]


def available(case: Case) -> bool:
    return case.needs is None or importlib.util.find_spec(case.needs) is not None


def parity_run(label: str) -> Config | None:
    """The SGD parity run below (``PARITY``) that trains case ``label`` at its most
    micro-batches, if there is one."""
    case = CASES[label]
    for param in PARITY:
        strategy, nproc, optimizer, fields = param.values
        if optimizer == "sgd" and {"strategy": strategy, **fields} == case.fields:
            config = parity_config(strategy, nproc, optimizer, micro_batch=1, **fields)
            cell = cells(case)[-1]  # the run is the case's cell at its most micro-batches
            assert (nproc, config.global_batch, config.micro_batch, config.model) == (
                case.nproc, cell["global_batch"], cell["micro_batch"], cell["model"]
            )  # fmt: skip
            return config
    return None


def counted_in_run(config: Config, run_dir: Path, step: int) -> dict[str, Any]:
    """Rank 0's counted traffic in ``step`` of a finished run and the theory's for ``config``,
    as the fields of a ``distlab.report.comm_check.summarize`` row that the tests read."""
    line = read_jsonl(run_dir / RANKS_DIR / "rank0.jsonl")[step]
    kinds = [kind for kind in KINDS if f"comm/{kind}/bytes" in line]
    predicted = predict_comm(config)
    return {
        "cell": _run_name(config),
        "counted_bytes": line["comm/bytes"],
        "kinds": {kind: line[f"comm/{kind}/bytes"] for kind in kinds},
        "calls": {kind: line[f"comm/{kind}/calls"] for kind in kinds},
        "predicted_kinds": dict(predicted.kinds),
        "predicted_calls": predicted.to_dict()["calls"],
    }


@pytest.fixture(scope="module")
def measured(parity_workdir: Path):
    """``measured(nproc)``: per case label, the summarised row per micro-batch count."""
    from distlab.report.comm_check import check, summarize

    done: dict[int, dict[str, dict[int, dict[str, Any]]]] = {}

    def get(nproc: int) -> dict[str, dict[int, dict[str, Any]]]:
        if nproc not in done:
            labels = [k for k, c in CASES.items() if c.nproc == nproc and available(c)]
            runs = {label: parity_run(label) for label in labels}
            job = [  # (label, count, cell): the cells no parity run trains
                (label, count, cell)
                for label in labels
                for count, cell in zip(CASES[label].counts, cells(CASES[label]), strict=True)
                if runs[label] is None or count != max(CASES[label].counts)
            ]
            warmup = [CASES[label].warmup for label, _, _ in job]
            steps = [n + 1 for n in warmup]  # one measured step
            job_cells = [cell for _, _, cell in job]
            results = check(job_cells, nproc=nproc, steps=steps, warmup=warmup, tcp=False)
            rows: dict[str, dict[int, dict[str, Any]]] = {label: {} for label in labels}
            for (label, count, _), row in zip(
                job, summarize(job_cells, results, nproc), strict=True
            ):
                rows[label][count] = row
            for label, config in runs.items():
                if config is not None:
                    run_dir = _run_once(config, parity_workdir / _run_name(config))
                    row = counted_in_run(config, run_dir, CASES[label].warmup)
                    rows[label][max(CASES[label].counts)] = row
            done[nproc] = {  # in the order of the counts
                label: {count: rows[label][count] for count in CASES[label].counts}
                for label in labels
            }
        return done[nproc]

    return get


def case_params(only=lambda case: True) -> list:
    params = []
    for label, case in CASES.items():
        if not only(case):
            continue
        marks = [] if available(case) else [pytest.mark.skip(reason=f"needs {case.needs}")]
        params.append(pytest.param(label, id=label, marks=marks))
    return params


@pytest.mark.parametrize("label", case_params())
def test_counted_bytes_equal_theory_at_every_micro_batch_count(measured, label: str) -> None:
    case = CASES[label]
    for count, row in measured(case.nproc)[label].items():
        assert row["kinds"] == row["predicted_kinds"], (count, row["cell"])
        for kind, calls in row["predicted_calls"].items():
            assert row["calls"][kind] == calls, (count, kind, row["cell"])


@pytest.mark.parametrize("label", case_params())
def test_bytes_per_step_against_micro_batch_count(measured, label: str) -> None:
    """Constant where accumulation needs no extra communication; growing where it does."""
    case = CASES[label]
    counted = [row["counted_bytes"] for row in measured(case.nproc)[label].values()]
    if case.constant:
        assert counted == [counted[0]] * len(counted), counted
    else:
        assert counted == sorted(set(counted)), counted  # strictly more at each count


# --- Training with accumulation ---------------------------------------------------------

deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed"
)
PER_MICROBATCH = {"zero_reduce": "per-microbatch"}
REDUCE_ONCE = {"zero_reduce": "once"}
PARITY = [
    pytest.param("fsdp", 2, "sgd", {}, id="fsdp-sgd"),
    pytest.param("fsdp", 2, "adamw", {}, id="fsdp-adamw"),
    pytest.param("fsdp", 2, "sgd", {"reshard_between_microbatches": True}, id="fsdp-regather-sgd"),
    pytest.param(
        "fsdp", 2, "adamw", {"reshard_between_microbatches": True}, id="fsdp-regather-adamw"
    ),
    # ZeRO-2 reduces the summed gradients once (default) or every micro-batch's; ZeRO-3 once.
    pytest.param("zero2", 2, "sgd", {}, id="zero2-sgd", marks=deepspeed),
    pytest.param("zero2", 2, "adamw", {}, id="zero2-adamw", marks=deepspeed),
    pytest.param("zero2", 2, "sgd", PER_MICROBATCH, id="zero2-per-microbatch-sgd", marks=deepspeed),
    pytest.param(
        "zero2",
        2,
        "adamw",
        PER_MICROBATCH,
        id="zero2-per-microbatch-adamw",
        marks=deepspeed,
    ),
    pytest.param("zero3", 2, "sgd", REDUCE_ONCE, id="zero3-reduce-once-sgd", marks=deepspeed),
    pytest.param("zero3", 2, "adamw", REDUCE_ONCE, id="zero3-reduce-once-adamw", marks=deepspeed),
    pytest.param("fsdp+tp", 4, "sgd", {"tp": 2}, id="fsdp+tp-sgd"),
    pytest.param("fsdp+tp", 4, "adamw", {"tp": 2}, id="fsdp+tp-adamw"),
]


@pytest.mark.parametrize(("strategy", "nproc", "optimizer", "fields"), PARITY)
def test_accumulation_reproduces_single(
    strategy: str, nproc: int, optimizer: str, fields: dict, parity_workdir: Path
) -> None:
    """Four micro-batches per step train the same model, and the step ends sharded (ZeRO:
    parameters at rest as predicted)."""
    config = parity_config(strategy, nproc, optimizer, micro_batch=1, **fields)
    report = compare(config, parity_workdir)
    assert report.passed, (report.rel_diffs, report.max_param_diff, report.tolerance)
    assert report.losses[-1] < report.losses[0]  # it trained
    summary = json.loads((parity_workdir / _run_name(config) / "summary.json").read_text())
    at_rest = summary["model_state_bytes_per_rank"]["params"]
    # Parameters left gathered after the step would count in full here.
    assert at_rest == summary["predicted_model_state_bytes_per_rank"]["params"]


def test_resume_between_accumulated_steps(tmp_path: Path) -> None:
    """fsdp with 4 micro-batches: a run resumed at step 2 continues like the uninterrupted one."""
    assert_resume_continues(tmp_path, "--strategy", "fsdp", "--nproc", "2", "--micro-batch", "1")
