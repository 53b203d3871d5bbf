"""``--compile``: regional torch.compile trains the same model as eager, compiles only in step 0.

The compiled runs are slow on CPU (inductor builds C++ kernels: 10-50 s per
rank when cold), so there are few of them, all in one session-wide inductor
cache (``compile_cache``) and compared with the eager ``single`` reference that
``test_parity`` shares (``parity_workdir``). Tolerances and the measured
differences: ``distlab.report.parity``.
"""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

import pytest
from rich.console import Console

from distlab.model import build_model
from distlab.report.parity import _run_name, compare, parity_config
from distlab.run.files import METRICS_FILE, SUMMARY_FILE, read_jsonl
from distlab.run.recorder import step_status, summary_table
from distlab.strategies.regional_compile import INDUCTOR_CACHE, apply_compile
from helpers import TINY_LOCAL_RUN, assert_one_line_error, run_main

pytestmark = pytest.mark.slow  # the whole file: torch.compile

COMPILED_RUNS = [
    ("single", 1, "adamw", {}),
    ("ddp", 2, "sgd", {"micro_batch": 2}),  # two micro-batches: accumulation compiles nothing
    ("fsdp", 2, "sgd", {"micro_batch": 2}),  # the block's shape is ddp's: its graphs are cached
    ("fsdp+tp", 2, "sgd", {"tp": 2}),
]
"""(strategy, nproc, optimizer, fields): one compiled run each, the fewest that cover
plain, DDP-wrapped, FSDP2-sharded and DTensor blocks, with accumulation. ddp and fsdp give
their blocks the same micro-batches, so fsdp loads the graphs ddp compiled from the session's
cache (a cold compile is 14-17 s of a 2-rank run here) and still traces and runs its own."""


@pytest.mark.parametrize(("strategy", "nproc", "optimizer", "fields"), COMPILED_RUNS)
def test_compiled_run_matches_eager_and_compiles_once(
    strategy: str,
    nproc: int,
    optimizer: str,
    fields: dict,
    compile_cache: Path,
    parity_workdir: Path,
) -> None:
    config = parity_config(strategy, nproc, optimizer, compile=True, **fields)
    report = compare(config, parity_workdir)
    assert report.passed, (report.rel_diffs, report.max_param_diff)

    run_dir = parity_workdir / _run_name(config)
    summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    metrics = read_jsonl(run_dir / METRICS_FILE)
    # Step 0 compiles forward and backward on every rank; later steps (and their
    # micro-batches, all of one shape) reuse the graphs: no recompilation.
    assert summary["compile_steps"] == [0]
    assert len(summary["compile_s_by_rank"]) == nproc and summary["compile_s"] > 0
    assert metrics[0]["compile_s"] > 0
    assert [m["compile_s"] for m in metrics[1:]] == [0.0] * (len(metrics) - 1)
    # Throughput is that of the steady state: step 0, which compiled, is left out.
    steady = statistics.median(m["step_time_s"] for m in metrics[1:])
    assert summary["median_step_time_s"] == steady
    assert summary["steady_state_steps"] == len(metrics) - 1
    # The compiled kernels went to distlab's cache dir.
    assert any((compile_cache / INDUCTOR_CACHE).iterdir())

    console = Console(record=True, width=200)
    console.print(summary_table(summary))
    assert "not in throughput" in console.export_text()


def test_verify_checks_a_compiled_strategy(compile_cache: Path, parity_workdir: Path) -> None:
    """``verify --compile`` holds the compiled strategy to eager ``single`` (reusing the runs)."""
    result = run_main(
        "distlab.verify",
        *("--strategy", "ddp", "--nproc", "2", "--optimizer", "sgd", "--compile"),
        *("--micro-batch", "2"),  # the compiled ddp run of COMPILED_RUNS
        *("--workdir", str(parity_workdir)),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "PASS" in result.stdout


def test_zero3_refuses_compile() -> None:
    result = run_main(
        "distlab.launch", "--strategy", "zero3", "--nproc", "2", "--compile", *TINY_LOCAL_RUN
    )
    assert_one_line_error(result, "--compile is not supported by strategy 'zero3': ZeRO-3 gathers")


def test_apply_compile_keeps_names_and_points_caches_at_distlab(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Compiling is lazy (nothing compiles here); parameter names stay the plain GPT's."""
    monkeypatch.setenv("DISTLAB_CACHE", str(tmp_path))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/tmp/torchinductor_elsewhere")
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    model = build_model("tiny", 0)
    names = list(model.state_dict())
    apply_compile(model)
    assert list(model.state_dict()) == names
    assert all("forward" in vars(block) for block in model.blocks.values())
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / INDUCTOR_CACHE)
    assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / INDUCTOR_CACHE / "triton")


def test_compile_flag_in_help() -> None:
    result = run_main("distlab.launch", "--help")
    assert result.returncode == 0, result.stderr
    assert "--compile, --no-compile" in result.stdout


def test_progress_line_shows_compile_time() -> None:
    line = step_status({"loss": 5.5, "tokens_per_s": 26.0, "compile_s": 9.74})
    assert line == "loss 5.5000  26 tok/s  (compiling: 9.7 s)"
    assert step_status({"loss": 5.5, "tokens_per_s": 2e4, "compile_s": 0.0}) == (
        "loss 5.5000  20,000 tok/s"
    )
