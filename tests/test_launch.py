"""The launch command as a user runs it: run dir contents, bad input, dying ranks, W&B."""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from tests.helpers import (
    ROOT,
    TINY_LOCAL_RUN,
    assert_one_line_error,
    rank_pids,
    run_command,
    run_main,
)

from distlab.launch.runner import run
from distlab.launch.spawn import rank_context
from distlab.strategies.resolve import load_config

RUN = {
    "strategy": "ddp", "nproc": 2, "model": "tiny", "global_batch": 8, "steps": 1,
    "launcher": "local", "wandb": False, "quiet": True, "final_checkpoint": False,
}  # fmt: skip
"""An in-process run of two local ranks, one step."""

TINY = [
    "--launcher",
    "local",
    "--model",
    "tiny",
    "--steps",
    "6",
    "--global-batch",
    "8",
    "--no-wandb",
]


@pytest.mark.slow
def test_run_dir_contract(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = run_command(
        "distlab.launch",
        "--strategy",
        "ddp",
        "--nproc",
        "2",
        *TINY,
        "--checkpoint-every",
        "3",
        "--run-dir",
        str(run_dir),
    )
    assert result.returncode == 0, result.stderr
    assert "distlab run: ddp x2" in result.stdout
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["strategy"] == "ddp" and config["nproc"] == 2
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(6))
    for m in metrics:
        assert {"step", "loss", "lr", "step_time_s", "tokens_per_s", "grad_norm"} <= set(m)
    assert metrics[0]["loss"] == pytest.approx(5.545, abs=0.05)  # ln(256): uniform start
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final_loss"] == metrics[-1]["loss"] and summary["steps_run"] == 6
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert checkpoints == ["step_000003", "step_000006"]


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--strategy", "nope"], "unknown strategy 'nope'"),
        (["--strategy", "ddp", "--nproc", "0"], "nproc must be >= 1"),
        (["--strategy", "ddp", "--nproc", "3", "--global-batch", "8"], "not divisible"),
        (["--data", "/no/such/corpus.txt"], "data not found"),
        (["--bogus-flag"], "unrecognized arguments: --bogus-flag"),
        (["--steps", "ten"], "expects int"),
    ],
)
def test_bad_input_is_a_one_line_error(args: list[str], fragment: str) -> None:
    assert_one_line_error(
        run_main("distlab.launch", *args, "--launcher", "local", "--no-wandb"), fragment
    )


def test_unwritable_run_dir(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        target = "/proc/distlab-run"  # even root cannot create directories in /proc
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        target = str(locked / "run")
    result = run_main("distlab.launch", *TINY, "--run-dir", target)
    assert_one_line_error(result, "not writable")


def test_existing_run_is_not_overwritten(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    assert run_main("distlab.launch", *TINY, "--run-dir", str(run_dir)).returncode == 0
    before = (run_dir / "metrics.jsonl").read_bytes()
    assert_one_line_error(
        run_main("distlab.launch", *TINY, "--run-dir", str(run_dir)), "already holds a run"
    )
    assert (run_dir / "metrics.jsonl").read_bytes() == before


@pytest.mark.slow
def test_a_dying_rank_fails_the_launch_within_seconds(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    launch = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "distlab.launch",
            "--strategy",
            "ddp",
            "--nproc",
            "2",
            "--launcher",
            "local",
            "--model",
            "tiny",
            "--steps",
            "100000",
            "--no-wandb",
            "--run-dir",
            str(run_dir),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        assert time.monotonic() < deadline and launch.poll() is None, "run did not start"
        time.sleep(0.2)
    ranks = rank_pids(run_dir, 2)
    killed_at = time.monotonic()
    os.kill(ranks[-1], signal.SIGKILL)
    _, stderr = launch.communicate(timeout=30)
    assert time.monotonic() - killed_at < 15
    assert launch.returncode == 2
    assert "was killed by signal 9" in stderr and "Traceback" not in stderr
    for pid in ranks:
        assert (
            not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
        )


def test_wandb_offline_run(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = run_main(
        "distlab.launch",
        "--launcher",
        "local",
        "--model",
        "tiny",
        "--steps",
        "3",
        "--wandb",
        "--wandb-group",
        "g1",
        "--run-dir",
        str(run_dir),
    )
    assert result.returncode == 0, result.stderr
    offline_runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1
    assert any(offline_runs[0].glob("*.wandb"))


def test_list_strategies() -> None:
    result = run_main("distlab.launch", "--list")
    assert result.returncode == 0
    lines = {line.split()[0]: line for line in result.stdout.splitlines()}
    assert {"single", "ddp", "fsdp"} <= set(lines)
    # each strategy's own flags, from what it declares (Strategy.options)
    assert lines["fsdp"].endswith(
        "[--offload --prefetch --reshard-after-forward --reshard-between-microbatches]"
    )
    assert lines["fsdp+tp+pp"].endswith(
        "[--dp --microbatches --pp --prefetch --reshard-after-forward "
        "--reshard-between-microbatches --schedule --sequence-parallel --tp]"
    )
    assert lines["ddp"].endswith("[--bucket-mb]")
    assert "[" not in lines["single"]


@pytest.mark.slow
def test_verify_command_prints_a_table() -> None:
    result = run_main("distlab.verify", "--strategy", "ddp", "--nproc", "2", "--optimizer", "sgd")
    assert result.returncode == 0, result.stderr
    assert "PASS" in result.stdout and "single loss" in result.stdout


def test_no_final_checkpoint_saves_nothing(tmp_path: Path) -> None:
    """--no-final-checkpoint (benchmarks, probes): the run finishes and writes no checkpoint."""
    run_dir = tmp_path / "run"
    flags = [*TINY_LOCAL_RUN, "--steps", "2", "--no-final-checkpoint", "--run-dir", str(run_dir)]
    result = run_main("distlab.launch", *flags)
    assert result.returncode == 0, result.stderr
    assert (run_dir / "summary.json").exists()
    assert not list((run_dir / "checkpoints").glob("step_*"))


@pytest.mark.slow
def test_verify_command_compares_bf16_runs_at_the_bf16_tolerance() -> None:
    result = run_main(
        "distlab.verify", "--strategy", "fsdp", "--nproc", "2", "--optimizer", "sgd",
        "--precision", "bf16",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "fsdp x2, sgd, bf16" in result.stdout
    assert "(tolerance 3.9e-03)" in result.stdout and "PASS" in result.stdout


def test_ranks_are_forked_processes_with_the_launchers_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Local ranks come from the rank server (``launch.spawn``): separate processes, none of
    them this one, that see the environment of the launch, not the server's. Here the
    cache dir is moved after the server started (a run of this session started it):
    rank 0 writes its CPU peak probe there."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog\n" * 200)
    run(load_config(None, {**RUN, "run_dir": str(tmp_path / "warm"), "data": str(corpus)}))
    cache = tmp_path / "moved-cache"
    monkeypatch.setenv("DISTLAB_CACHE", str(cache))
    run_dir = run(load_config(None, {**RUN, "run_dir": str(tmp_path / "run"), "data": str(corpus)}))
    pids = rank_pids(run_dir, 2)
    assert len(set(pids)) == 2 and os.getpid() not in pids
    assert (cache / "peak_flops.json").is_file()


def test_ranks_inherit_a_heap_frozen_out_of_garbage_collection() -> None:
    """The rank server freezes what it imported (``launch.frozen_heap``): a rank's full
    garbage collection then skips the inherited heap (torch alone: hundreds of thousands
    of objects) instead of walking it, and copying its pages, once in every rank."""
    with rank_context().Pool(1) as pool:
        assert pool.apply(gc.get_freeze_count) > 100_000
