"""Will it fit? ``--dry-run`` and the launch's refusal of a run predicted not to fit.

Nothing here trains: the prediction comes from ``distlab.theory.memory`` (whose
agreement with torch's tracker ``tests/test_memory.py`` checks), and a refused
launch must stop before it creates anything.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.helpers import assert_one_line_error, run_main

from distlab.launch.fit import alternatives, prediction, refusal
from distlab.strategies.resolve import load_config

GIB = 2**30


def test_dry_run_prints_the_peak_by_category_and_fits() -> None:
    result = run_main(
        "distlab.launch", "--strategy", "fsdp", "--nproc", "4", "--model", "gpt2", "--dry-run",
        "--memory-budget", "16GiB",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    for word in ("params", "optimizer", "activations", "comm_buffers", "total", "fits in 16.00"):
        assert word in result.stdout, result.stdout


def test_dry_run_over_budget_exits_2_and_names_a_change() -> None:
    result = run_main(
        "distlab.launch", "--strategy", "single", "--model", "gpt2", "--dry-run",
        "--memory-budget", "4GiB",
    )  # fmt: skip
    assert result.returncode == 2
    assert "does NOT fit in 4.00 GiB" in result.stdout
    assert "--ac full would fit" in result.stdout


def test_launch_predicted_not_to_fit_is_refused_before_anything_starts(tmp_path: Path) -> None:
    run_dir = tmp_path / "never"
    result = run_main(
        "distlab.launch", "--strategy", "ddp", "--nproc", "2", "--model", "gpt2",
        "--memory-budget", "1536MiB", "--run-dir", str(run_dir), "--no-wandb",
    )  # fmt: skip
    assert_one_line_error(result, "exceeds 1.50 GiB")
    assert "would fit" in result.stderr
    assert not run_dir.exists()


def test_the_suggested_change_fits_by_the_same_theory() -> None:
    config = load_config(None, {"strategy": "ddp", "nproc": 2, "model": "gpt2"})
    peak = prediction(config)
    assert peak is not None
    budget = peak.total // 3
    line = refusal(config, peak, budget)
    flags = line.split("; ")[1].removesuffix(")").split(" would fit")[0]
    fitted = next(c for f, c in alternatives(config) if f == flags)
    fitted_peak = prediction(fitted)
    assert fitted_peak is not None and fitted_peak.total <= budget < peak.total


SHARDING = ["fsdp", "zero3"]


@settings(max_examples=25, deadline=None)
@given(
    strategy=st.sampled_from(["single", "ddp", "fsdp", "zero1", "zero2", "zero3", "tp", "pp"]),
    model=st.sampled_from(["tiny", "small", "gpt2"]),
    batch_power=st.integers(min_value=2, max_value=5),
)
def test_checkpointing_never_raises_the_predicted_peak(
    strategy: str, model: str, batch_power: int
) -> None:
    nproc = 1 if strategy == "single" else 2
    fields = {"strategy": strategy, "nproc": nproc, "model": model}
    config = load_config(None, {**fields, "global_batch": 2**batch_power})
    none, full = prediction(config), prediction(dataclasses.replace(config, ac="full"))
    assert none is not None and full is not None
    assert full.by_category["activations"] < none.by_category["activations"]
    assert full.total <= none.total


@pytest.mark.parametrize("strategy", SHARDING)
def test_more_ranks_predict_less_memory_for_sharded_strategies(strategy: str) -> None:
    totals = [
        prediction(load_config(None, {"strategy": strategy, "nproc": n, "model": "gpt2"})).total
        for n in (1, 2, 4, 8)
    ]
    assert totals == sorted(totals, reverse=True) and len(set(totals)) == 4, totals
