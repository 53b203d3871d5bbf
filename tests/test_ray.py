"""The Ray launcher (the default): a restart, a separately started cluster, bad addresses.

Ray's start-up costs seconds (a local instance, a controller, one worker
actor per rank), so these tests are few and each does several checks.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.helpers import (
    ROOT,
    assert_one_line_error,
    run_main,
    wandb_history,
    wandb_offline_runs,
)

from distlab.distributed import free_port

pytestmark = pytest.mark.slow  # the whole file: Ray's start-up

RUN = ["--model", "tiny", "--global-batch", "8", "--no-wandb", "--steps", "8"]
RUN += ["--checkpoint-every", "2", "--strategy", "ddp", "--nproc", "2"]


RAY_ENV = ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


def launch(*args: str, env: dict[str, str] | None = None, timeout: float = 480):
    """The launch command without Ray's address and auth variables from the test's environment."""
    base = {k: v for k, v in os.environ.items() if k not in RAY_ENV}
    return subprocess.run(
        [sys.executable, "-m", "distlab.launch", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**base, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1", **(env or {})},
    )


def losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    metrics = [json.loads(line) for line in lines]
    assert [m["step"] for m in metrics] == list(range(len(metrics)))
    return [m["loss"] for m in metrics]


def events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]


def test_default_launcher_is_ray_and_restarts_a_killed_worker(tmp_path: Path) -> None:
    reference = tmp_path / "local"
    result = run_main(
        "distlab.launch", *RUN, "--launcher", "local", "--quiet", "--run-dir", str(reference)
    )
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / "ray"
    with_wandb = [arg for arg in RUN if arg != "--no-wandb"]
    result = launch(
        *with_wandb, "--max-failures", "1", "--inject-fault", "1@5", "--run-dir", str(run_dir)
    )
    assert result.returncode == 0, result.stderr
    log = events(run_dir)
    assert log[0]["event"] == "launch" and log[0]["launcher"] == "ray"
    assert losses(run_dir) == losses(reference)  # bitwise: same ranks, same state
    assert "distlab: fault 1: rank 1 killed itself at step 5" in result.stdout
    assert "distlab: resumed at step 4" in result.stdout
    assert "distlab run: ddp x2" in result.stdout  # the driver prints the summary
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["restarts"] == 1 and summary["lost_steps"] == 1
    assert summary["recovery_s"] > 0 and summary["startup_s"] > 0
    # the driver wrote one W&B run across the restart, each step once
    files = wandb_offline_runs(run_dir)
    assert len(files) == 1, files
    history = wandb_history(files[0])
    assert [row["_step"] for row in history] == list(range(8))
    assert [row["loss"] for row in history] == losses(run_dir)
    assert history[-1]["attempt"] == 2


@pytest.fixture
def ray_cluster() -> Iterator[str]:
    """A one-node Ray cluster started with ``ray start --head``; stopped (only it) after."""
    port = free_port()
    temp_dir = tempfile.mkdtemp(prefix="dlray", dir="/tmp")  # short: Ray's socket paths
    head = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
            "--port", str(port), "--num-cpus", "2", "--node-ip-address", "127.0.0.1",
            "--temp-dir", temp_dir, "--include-dashboard", "false", "--disable-usage-stats",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: stopping it touches nothing else
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while True:
            assert head.poll() is None, "ray start --head exited"
            assert time.monotonic() < deadline, "the Ray head did not come up"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.5)
        yield f"127.0.0.1:{port}"
    finally:
        for sig, wait_s in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
            try:
                os.killpg(head.pid, sig)
            except ProcessLookupError:
                break
            try:
                head.wait(wait_s)
                time.sleep(1)  # its children get the same signal: let them go
            except subprocess.TimeoutExpired:
                continue
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_run_on_a_separately_started_cluster(tmp_path: Path, ray_cluster: str) -> None:
    # ray start --head enables token authentication (the token is in ~/.ray/auth_token);
    # Ray sends it only with RAY_AUTH_MODE=token, which distlab sets when a token exists
    wrong = launch(
        *RUN, "--steps", "4", "--ray-address", ray_cluster, "--run-dir", str(tmp_path / "bad"),
        env={"RAY_AUTH_TOKEN": "0" * 32}, timeout=120,
    )  # fmt: skip
    assert_one_line_error(wrong, "rejected the authentication token")
    assert wrong.stdout == ""
    run_dir = tmp_path / "run"
    result = launch(*RUN, "--steps", "4", "--ray-address", ray_cluster, "--run-dir", str(run_dir))
    assert result.returncode == 0, result.stderr
    assert events(run_dir)[0]["ray_address"] == ray_cluster
    assert len(losses(run_dir)) == 4
    # distlab left the cluster it joined running
    host, port = ray_cluster.split(":")
    socket.create_connection((host, int(port)), timeout=5).close()


@pytest.mark.parametrize("how", ["flag", "env"])
def test_unknown_ray_address_is_a_one_line_error(
    tmp_path: Path, how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # in-process: the address is checked before Ray is imported or a run dir made
    for name in RAY_ENV:
        monkeypatch.delenv(name, raising=False)
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    run_dir = tmp_path / "run"
    if how == "flag":
        result = run_main(
            "distlab.launch", *RUN, "--ray-address", address, "--run-dir", str(run_dir)
        )
    else:
        monkeypatch.setenv("RAY_ADDRESS", address)
        result = run_main("distlab.launch", *RUN, "--run-dir", str(run_dir))
    assert_one_line_error(result, f"no Ray cluster at {address}")
    assert result.stdout == ""
    assert not run_dir.exists()
