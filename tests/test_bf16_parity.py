"""bf16 parity: each strategy family's bf16 run reproduces the bf16 ``single`` run.

``single`` (and ddp, tp, pp, fairscale) run under bf16 autocast; FSDP and its
compositions under FSDP2's ``MixedPrecisionPolicy``; DeepSpeed in its own bf16
mode. All keep fp32 master weights, so the runs differ only by where bf16
rounds. The tolerance (``distlab.report.parity.bf16_tolerance``: losses within
u = 2^-8 relative, weights within a bound on how far rounding can move them)
is derived, with the measured differences, in that function's docstring.
Every case is 2 ranks, the tiny model, 5 steps, SGD and AdamW.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from distlab.launch.runner import run
from distlab.report.parity import compare, compare_runs, parity_config, tolerance

pytestmark = pytest.mark.slow  # the whole file: real runs in bf16 against a bf16 single

BF16 = {"precision": "bf16"}
NEEDS = {"zero": "deepspeed", "fairscale": "fairscale"}


def case(strategy: str, optimizer: str, **fields):
    name = "-".join([strategy, optimizer, *(f"{k}={v}" for k, v in fields.items())])
    return pytest.param(strategy, optimizer, fields, id=name)


CASES = [
    *(case(s, o) for s in ("ddp", "fsdp", "zero2") for o in ("sgd", "adamw")),
    *(case(s, o, tp=2) for s in ("tp", "fsdp+tp") for o in ("sgd", "adamw")),
    *(case("pp", o, pp=2, schedule="gpipe") for o in ("sgd", "adamw")),
    # FSDP stages send bf16 activations through the pipeline.
    case("fsdp+pp", "sgd", pp=2),
    case("zero1", "sgd"),
    case("zero3", "adamw"),
    case("fairscale-sdp", "sgd"),
    # FSDP's policy under gradient accumulation, parameters kept from forward to backward.
    case("fsdp", "sgd", reshard_after_forward=False, micro_batch=2),
]


@pytest.mark.parametrize(("strategy", "optimizer", "fields"), CASES)
def test_bf16_parity(strategy: str, optimizer: str, fields: dict, parity_workdir: Path) -> None:
    for prefix, module in NEEDS.items():
        if strategy.startswith(prefix):
            pytest.importorskip(module)
    config = parity_config(strategy, 2, optimizer, **BF16, **fields)
    report = compare(config, parity_workdir)
    assert report.passed, (report.rel_diffs, report.max_param_diff, report.tolerance)
    assert report.losses[-1] < report.losses[0]  # it trained


def test_bf16_parity_check_catches_a_different_run(parity_workdir: Path) -> None:
    """The bf16 tolerance is not vacuous: fsdp at lr 0.4 instead of 0.5 is a mismatch."""
    compare(parity_config("fsdp", 2, "sgd", **BF16), parity_workdir)  # both runs exist
    other = parity_config(
        "fsdp", 2, "sgd", lr=0.4, run_dir=str(parity_workdir / "fsdp-other-lr-bf16"), **BF16
    )
    held_to = tolerance(other)
    report = compare_runs(parity_workdir / "single-n1-sgd-s5-bf16", run(other), held_to)
    assert report.rel_diffs[0] <= held_to.loss_rtol  # the same first step
    assert report.max_rel_diff > 3 * held_to.loss_rtol, report.rel_diffs
    assert not report.passed
