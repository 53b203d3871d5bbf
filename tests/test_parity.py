"""Parity: ddp and fsdp reproduce the single-process run (tolerances in distlab.report.parity)."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from distlab.config import Config
from distlab.launch.runner import run
from distlab.report import parity
from distlab.report.parity import (
    LOSS_RTOL,
    _run_name,
    _run_once,
    compare,
    compare_runs,
    parity_config,
    tolerance,
)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("nproc", [2, 4])
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_data_parallel_parity(
    strategy: str, nproc: int, optimizer: str, parity_workdir: Path
) -> None:
    report = compare(parity_config(strategy, nproc, optimizer), parity_workdir)
    assert report.passed, (report.rel_diffs, report.max_param_diff)
    assert report.losses[-1] < report.losses[0]  # it trained


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_fsdp_without_resharding_and_with_grad_accumulation(
    optimizer: str, parity_workdir: Path
) -> None:
    config = parity_config("fsdp", 2, optimizer, reshard_after_forward=False, micro_batch=2)
    report = compare(config, parity_workdir)
    assert report.passed, (report.rel_diffs, report.max_param_diff)


@pytest.mark.parametrize(
    ("strategy", "optimizer", "fields"),
    [("ddp", "sgd", {"bucket_mb": 0.05}), ("fsdp", "adamw", {"prefetch": 2})],
)
def test_overlap_knobs_train_the_same_model(
    strategy: str, optimizer: str, fields: dict, parity_workdir: Path
) -> None:
    """``--bucket-mb`` and ``--prefetch`` change when the collectives run, not what they
    compute. The ddp run reduces the tiny model's 0.53 MiB of gradients in buckets of
    0.05 MiB (its default: one bucket); the fsdp run's peak memory, with two blocks
    gathered ahead, is ``tests/test_memory.py``'s."""
    config = parity_config(strategy, 2, optimizer, **fields)
    report = compare(config, parity_workdir)
    assert report.passed, (report.rel_diffs, report.max_param_diff)
    if strategy == "ddp":
        summary = json.loads((parity_workdir / _run_name(config) / "summary.json").read_text())
        assert summary["comm_per_step"]["all_reduce/calls"] > 5  # buckets, and the loss


def test_ddp_grad_accumulation(parity_workdir: Path) -> None:
    report = compare(parity_config("ddp", 2, "sgd", micro_batch=1), parity_workdir)
    assert report.passed, (report.rel_diffs, report.max_param_diff)


def test_parity_check_catches_a_different_run(parity_workdir: Path) -> None:
    """The comparison is not vacuous: ddp with another lr is reported as a mismatch."""
    compare(parity_config("ddp", 2, "sgd"), parity_workdir)  # makes sure both runs exist
    other = parity_config("ddp", 2, "sgd", lr=0.4, run_dir=str(parity_workdir / "ddp-other-lr"))
    report = compare_runs(parity_workdir / "single-n1-sgd-s5", run(other), tolerance(other))
    assert report.losses[0] == pytest.approx(report.reference_losses[0], rel=LOSS_RTOL)
    assert not report.passed


def test_a_run_asked_for_twice_at_once_is_made_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two callers (the suite's two workers, two ``compare`` commands) that need the same
    run at once: the second waits for the first's and reads it."""
    made: list[str] = []

    def slow_run(config: Config) -> Path:
        made.append(config.run_dir)
        time.sleep(0.3)  # both callers are inside _run_once by now
        run_dir = Path(config.run_dir)
        run_dir.mkdir()
        (run_dir / "summary.json").write_text("{}")
        return run_dir

    monkeypatch.setattr(parity, "run", slow_run)
    config, run_dir = parity_config("ddp", 2, "sgd"), tmp_path / "ddp"
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: _run_once(config, run_dir), range(2)))
    assert results == [run_dir, run_dir] and made == [str(run_dir)]
