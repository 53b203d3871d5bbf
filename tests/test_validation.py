"""Held-out evaluation (``--eval-every``): every strategy family's validation loss equals
``single``'s, within the parity tolerance (distlab.report.parity), forward-only pipeline
schedules and DeepSpeed's engine included."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distlab.report.parity import _run_name, compare, parity_config
from distlab.run.files import read_jsonl

EVALUATION = {"eval_every": 3, "eval_batches": 2}
"""5 parity steps: evaluated after steps 2 and 4 (the last), on 2 batches each."""
FAMILIES = [
    ("ddp", 2, {}),
    ("fsdp", 2, {}),
    ("fsdp", 2, {"precision": "bf16"}),  # against a bf16 single, at the bf16 tolerance
    ("zero1", 2, {}),
    ("zero2", 2, {}),
    ("zero3", 2, {}),
    ("fairscale-oss", 2, {}),
    ("fairscale-sdp", 2, {}),
    ("pp", 2, {"pp": 2}),
    ("pp", 2, {"pp": 2, "schedule": "zbv"}),  # forward-only program of a V placement
    ("pp", 2, {"pp": 2, "schedule": "dualpipev"}),  # ... with overlapped forward-backwards
    ("tp", 2, {}),
    ("cp", 2, {}),
    ("ep", 2, {"model": "tiny-moe"}),
    ("hsdp", 4, {"dp_replicate": 2, "dp_shard": 2}),
    ("fsdp+tp", 4, {"tp": 2}),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("strategy", "nproc", "fields"),
    FAMILIES,
    ids=[f"{s}-n{n}" + "".join(f"-{v}" for v in f.values()) for s, n, f in FAMILIES],
)
def test_validation_loss_matches_single(
    strategy: str, nproc: int, fields: dict, parity_workdir: Path
) -> None:
    config = parity_config(strategy, nproc, "sgd", **EVALUATION, **fields)
    report = compare(config, parity_workdir)
    assert len(report.val_losses) == 2, "evaluated after steps 2 and 4"
    assert report.passed, (report.val_rel_diffs, report.rel_diffs, report.max_param_diff)
    summary = json.loads((parity_workdir / _run_name(config) / "summary.json").read_text())
    assert summary["final_val_loss"] == report.val_losses[-1]
    assert report.val_losses[-1] < report.val_losses[0]  # it learned what it did not see


@pytest.mark.slow
def test_evaluating_leaves_training_untouched(parity_workdir: Path) -> None:
    """Evaluating after every step (a forward-only pass of the V schedule between training
    steps) trains bitwise as evaluating twice does."""
    fields = {"pp": 2, "schedule": "zbv", "eval_batches": 2}
    twice = parity_config("pp", 2, "sgd", eval_every=3, **fields)
    compare(twice, parity_workdir)  # makes sure the run exists
    every = parity_config("pp", 2, "sgd", eval_every=1, **fields)
    report = compare(every, parity_workdir)
    assert len(report.val_losses) == 5
    runs = [parity_workdir / _run_name(config) for config in (twice, every)]
    losses = [[m["loss"] for m in read_jsonl(run / "metrics.jsonl")] for run in runs]
    assert losses[0] == losses[1]
