"""Ranks without processes: the lab's step traced with fake ranks and fake tensors.

``distlab.train.trace`` runs one real step of a layout as rank 0 of N in this
process. First the trace is held to real runs: at 2 and 4 ranks it files the
same bytes, category by category, as the real run's tracker (the AdamW parity
runs, shared with the parity tests through the session's ``parity_workdir``).
Then, at world sizes no machine here could spawn, each traced strategy's
traced peak stays within ``TRACE_TOLERANCE`` of ``distlab.theory.memory``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from tests.helpers import run_command
from torch.distributed.fsdp._fully_shard._fsdp_common import _chunk_with_empty

from distlab.errors import DistlabError
from distlab.launch.__main__ import main as launch_main
from distlab.plan.__main__ import main as plan_main
from distlab.report.parity import _run_name, _run_once, parity_config
from distlab.strategies.resolve import load_config
from distlab.theory.memory import predict_peak
from distlab.train.fake_ranks import RankChunks
from distlab.train.trace import REFUSED, trace_step

TRACE_TOLERANCE = 0.10
"""Traced peak / predicted peak at scale: the issue's bound, the memory table's (10%)."""

SLOW = pytest.mark.slow

# --- The trace is a real run's measurement ------------------------------------------------

REAL_RUNS = [
    pytest.param("ddp", 2, {}, id="ddp-x2"),
    pytest.param("fsdp", 2, {}, id="fsdp-x2"),
    pytest.param("fsdp", 4, {}, id="fsdp-x4"),
    pytest.param("tp", 2, {}, id="tp-x2", marks=SLOW),
    pytest.param("hsdp", 4, {"dp_replicate": 2, "dp_shard": 2}, id="hsdp-x4", marks=SLOW),
    pytest.param("fsdp+tp", 4, {"tp": 2}, id="fsdp+tp-x4", marks=SLOW),
    pytest.param("cp", 2, {}, id="cp-x2", marks=SLOW),
]


@pytest.mark.parametrize(("strategy", "nproc", "fields"), REAL_RUNS)
def test_trace_files_the_bytes_a_real_run_measured(
    strategy: str, nproc: int, fields: dict, parity_workdir: Path
) -> None:
    """Rank 0's traced peak equals, byte for byte and category by category, the peak the
    run's own tracker measured in its last step (the steady state, as traced)."""
    config = parity_config(strategy, nproc, "adamw", **fields)
    run_dir = _run_once(config, parity_workdir / _run_name(config))
    measured = json.loads((run_dir / "summary.json").read_text())["memory_peak_by_rank"][0]
    traced = trace_step(config)
    assert traced.total == measured["peak"]
    assert traced.by_category == measured["peak_by_category"]
    assert traced.phase == measured["peak_phase"]


# --- At scale: traced against the theory --------------------------------------------------

SHAPE = {"layers": 2, "hidden": 256, "heads": 64, "seq_len": 64}
"""A model shape with heads enough for tensor parallelism over 64 ranks."""
AT_SCALE = [
    pytest.param("fsdp", 1024, 1024, {}, id="fsdp-x1024"),
    pytest.param("hsdp", 1024, 1024, {"model": "small", "dp_replicate": 4}, id="hsdp-x1024"),
    pytest.param("ddp", 256, 256, {}, id="ddp-x256"),
    pytest.param("fsdp+tp", 1024, 256, {"tp": 4}, id="fsdp+tp-x1024"),
    pytest.param("tp", 64, 1, SHAPE, id="tp-x64"),
    pytest.param("fsdp+tp", 256, 4, {**SHAPE, "tp": 64}, id="fsdp+tp64-x256"),
    pytest.param("cp", 16, 1, {}, id="cp-x16"),
    pytest.param("fsdp+cp", 256, 64, {"cp": 4}, id="fsdp+cp-x256"),
]
"""(strategy, ranks, global batch: one row per data-parallel rank, fields); the tiny model
unless another is given (hsdp: ``small``, whose 128 rows FSDP pads less at 256 ranks per
replica group than tiny's 48)."""


@pytest.mark.parametrize(("strategy", "nproc", "global_batch", "fields"), AT_SCALE)
def test_traced_peak_matches_theory_at_scale(
    strategy: str, nproc: int, global_batch: int, fields: dict
) -> None:
    settings = {"strategy": strategy, "nproc": nproc, "global_batch": global_batch}
    config = load_config(None, {**settings, "model": "tiny", **fields})
    traced = trace_step(config)
    predicted = predict_peak(config)
    assert abs(traced.total / predicted.total - 1) <= TRACE_TOLERANCE, (
        traced.by_category,
        predicted.by_category,
    )


# --- What cannot be traced, and the commands ---------------------------------------------


@pytest.mark.parametrize("strategy", [*REFUSED, "pp", "fsdp+pp"])
def test_untraceable_strategies_are_refused_in_one_line(strategy: str) -> None:
    fields = {"pp": 2} if "pp" in strategy else {}
    model = "tiny-moe" if strategy == "ep" else "tiny"
    nproc = 4 if strategy == "fsdp+pp" else 2
    argv = ["--strategy", strategy, "--nproc", str(nproc), "--model", model, "--global-batch", "8"]
    argv += [f"--{k}={v}" for k, v in fields.items()]
    expected = re.escape(f"--trace cannot trace strategy {strategy}: ")
    with pytest.raises(DistlabError, match=expected) as err:
        launch_main([*argv, "--dry-run", "--trace"])
    assert "\n" not in str(err.value)


def test_trace_and_json_need_dry_run() -> None:
    with pytest.raises(DistlabError, match="--trace goes with --dry-run"):
        launch_main(["--strategy", "fsdp", "--nproc", "2", "--trace"])


@pytest.mark.slow
def test_dry_run_trace_json_at_1024_ranks(tmp_path: Path) -> None:
    """The command a user runs: one JSON object with the traced and predicted bytes."""
    result = run_command(
        "distlab.launch", "--strategy", "fsdp", "--nproc", "1024", "--model", "tiny",
        "--global-batch", "1024", "--memory-budget", "1GiB", "--dry-run", "--trace", "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    for key in ("traced", "predicted"):
        assert set(figures[key]) == {
            "params", "grads", "optimizer", "activations", "temporaries", "comm_buffers",
            "other", "total",
        }  # fmt: skip
        assert figures[key]["total"] == sum(v for k, v in figures[key].items() if k != "total")
    assert abs(figures["traced"]["total"] / figures["predicted"]["total"] - 1) <= TRACE_TOLERANCE
    assert figures["fits"] is True


@pytest.mark.slow
def test_planner_traces_its_pick(capsys: pytest.CaptureFixture[str]) -> None:
    """The planner's pick for 64 GPUs among layouts the lab runs (ZeRO-3: fsdp; no sequence
    parallelism), traced in the lab, against the plan's memory."""
    argv = ["--model", "tiny", "--gpus", "64", "--global-batch", "64", "--zero", "3"]
    argv += ["--no-sequence-parallel"]
    assert plan_main([*argv, "--plot", "none", "--trace", "--json"]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert figures["lab_strategy"] == figures["pick"]["lab_strategy"]
    ratio = figures["traced"]["total"] / figures["planned"]["total"]
    assert abs(ratio - 1) <= TRACE_TOLERANCE, figures


# --- The trace's own arithmetic -----------------------------------------------------------


@given(
    rows=st.integers(0, 300),
    cols=st.integers(1, 3),
    count=st.integers(1, 1100),
    dim=st.integers(0, 1),
)
def test_rank_chunks_are_fsdp_chunks(rows: int, cols: int, count: int, dim: int) -> None:
    """The views the trace hands FSDP2 are FSDP2's own: same shapes, strides and offsets."""
    tensor = torch.empty(rows, cols) if dim == 0 else torch.empty(cols, rows)
    eager = _chunk_with_empty(tensor, count, dim)
    lazy = RankChunks(tensor, count, dim)
    assert len(lazy) == len(eager)
    for index in {0, 1, count // 2, count - 1, -1}:
        if -count <= index < count:
            a, b = lazy[index], eager[index]
            assert (a.shape, a.stride(), a.storage_offset()) == (
                b.shape,
                b.stride(),
                b.storage_offset(),
            )
