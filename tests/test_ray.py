"""The Ray launcher (the default): a private local instance and a restart, bad addresses.

Ray's start-up costs seconds (a local instance, a controller, one worker
actor per rank), so these tests are few and each does several checks. Runs on a
separately started cluster are in ``test_cluster.py``.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from tests.helpers import (
    assert_one_line_error,
    run_command,
    run_events,
    run_losses,
    run_main,
    wandb_history,
    wandb_offline_runs,
)

from distlab.distributed import free_port

pytestmark = pytest.mark.slow  # the whole file: Ray's start-up

RUN = ["--model", "tiny", "--global-batch", "8", "--no-wandb", "--steps", "8"]
RUN += ["--checkpoint-every", "2", "--strategy", "ddp", "--nproc", "2"]


RAY_ENV = ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


def launch(*args: str) -> subprocess.CompletedProcess:
    """The launch command without Ray's address and auth variables from the test's environment."""
    return run_command("distlab.launch", *args, timeout=480, unset=RAY_ENV)


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
    log = run_events(run_dir)
    assert log[0]["event"] == "launch" and log[0]["launcher"] == "ray"
    assert run_losses(run_dir) == run_losses(reference)  # bitwise: same ranks, same state
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
    assert [row["loss"] for row in history] == run_losses(run_dir)
    assert history[-1]["attempt"] == 2


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


def test_a_run_starts_no_ray_data_actor_no_preemption_watcher_and_no_cleaner(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Ray Train starts the first two with every worker group (each restart and resize): a
    Ray Data manager distlab's ranks never ask, and a watcher for cloud drain notices its
    nodes never get. Each is a fresh Ray worker process that takes a core while the new
    ranks start. The third, once a run, held the run's end for 12 s (``ray_backend``)."""
    from ray._private.ray_constants import env_bool
    from ray.train import ScalingConfig
    from ray.train.v2._internal.callbacks import BackendSetupCallback, DatasetsCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import (
        PlacementGroupCleanerCallback,
    )
    from ray.train.v2._internal.constants import (
        DEFAULT_ENABLE_PREEMPTION_WATCHER,
        ENABLE_PREEMPTION_WATCHER_ENV_VAR,
    )

    from distlab.launch.ray_backend import TrainerWithoutRayData
    from distlab.launch.ray_connect import RAY_TRAIN_SETTINGS

    trainer = TrainerWithoutRayData(lambda: None, scaling_config=ScalingConfig(num_workers=1))
    callbacks = trainer._create_default_callbacks()
    assert any(isinstance(each, BackendSetupCallback) for each in callbacks)
    unused = (DatasetsCallback, PlacementGroupCleanerCallback)
    assert not any(isinstance(each, unused) for each in callbacks)
    for name, value in RAY_TRAIN_SETTINGS.items():  # what the controller reads, as the job's env
        monkeypatch.setenv(name, value)
    assert not env_bool(ENABLE_PREEMPTION_WATCHER_ENV_VAR, DEFAULT_ENABLE_PREEMPTION_WATCHER)
