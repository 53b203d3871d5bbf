"""``distlab cluster``: a 2-node Ray cluster started and stopped here, runs that join it (a
node lost mid-run, a wrong auth token).

One cluster serves the module (starting one costs about 15 s); each run on it
costs Ray's start-up (about 30 s), so the checks share runs.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.helpers import (
    TINY_LOCAL_RUN,
    assert_one_line_error,
    run_command,
    run_events,
    run_losses,
    run_main,
)

from distlab import nodes
from distlab.launch.cluster import alive, read_state
from distlab.launch.ray_token import auth_token_available, ensure_auth_token
from distlab.report.live_recovery import loss_bound
from distlab.report.parity import LOSS_RTOL
from distlab.run.files import read_jsonl

RAY_ENV = ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
HSDP = ["--strategy", "hsdp", "--nproc", "4", "--steps", "6", "--checkpoint-every", "2"]
"""hsdp 2 x 2 on two nodes of 2 CPUs: each node holds one shard group, replicas span nodes."""


def command(module: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    """``python -m module args``, without the test's own Ray address and auth variables, with
    the variables ``env``."""
    return run_command(module, *args, unset=RAY_ENV, env=env)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """(address, state dir) of a 2-node cluster whose lost nodes come back after 15 s: long
    enough for an elastic run to go on without one, and for a restart to wait for it."""
    state_dir = tmp_path_factory.mktemp("cluster")
    flags = ["--state-dir", str(state_dir)]
    result = command(
        "distlab.launch.cluster", "up", "--nodes", "2", "--cpus-per-node", "2", *flags,
        "--revive-after", "15",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    address = result.stdout.splitlines()[-1]
    assert address.startswith("127.0.0.1:")
    again = command("distlab.launch.cluster", "up", *flags)
    assert_one_line_error(again, "a cluster is already up at " + address)
    yield address, state_dir
    state = read_state(state_dir)
    assert state is not None
    result = command("distlab.launch.cluster", "down", *flags)
    assert result.returncode == 0, result.stderr
    pids = [state.supervisor_pid, *(node.pid for node in state.nodes)]
    assert not any(alive(pid) for pid in pids)
    assert command("distlab.launch.cluster", "status", *flags).returncode == 1


def run_on_cluster(
    address: str, tmp_path: Path, run: list[str], *flags: str, reference_as: tuple[str, ...] = ()
) -> tuple[Path, Path, subprocess.CompletedProcess]:
    """(reference, run dir, result): ``run`` uninterrupted on the local launcher (with
    ``reference_as``'s flags after its own: another strategy), then on the cluster with
    ``flags`` (a fault, a recovery mode)."""
    reference = tmp_path / "reference"
    uninterrupted = [*TINY_LOCAL_RUN, *run, *reference_as, "--run-dir", str(reference)]
    result = run_main("distlab.launch", *uninterrupted)
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / "on-cluster"
    quiet_off = [arg for arg in TINY_LOCAL_RUN if arg not in ("local", "--launcher", "--quiet")]
    result = command(
        "distlab.launch", *quiet_off, *run, "--launcher", "ray", "--ray-address", address,
        "--track-memory", "off", *flags, "--run-dir", str(run_dir),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return reference, run_dir, result


@pytest.mark.slow
def test_a_lost_node_restarts_the_run_which_matches_the_uninterrupted_one(
    cluster: tuple[str, Path], tmp_path: Path
) -> None:
    address, state_dir = cluster
    reference, run_dir, result = run_on_cluster(
        address, tmp_path, HSDP, "--max-failures", "1", "--inject-fault", "node:1@3"
    )
    assert run_events(run_dir)[0]["ray_address"] == address  # joined, not a private instance
    assert "took node 1 down, with every rank on it, at step 3" in result.stdout
    assert "state-dump" not in result.stdout + result.stderr  # the raylet's dump went to logs/

    assert run_losses(run_dir) == run_losses(reference)  # bitwise: resumed from step 2's checkpoint
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["restarts"] == 1
    nodes = summary["nodes_by_rank"]
    # hsdp's shard groups (ranks 0-1, 2-3) each on one node, its replicas on both nodes.
    assert nodes[0] == nodes[1] and nodes[2] == nodes[3] and {nodes[0], nodes[2]} == {0, 1}
    node = read_state(state_dir).nodes[1]
    assert (node.lost, node.revived) == (1, 1)
    # distlab left the cluster it joined running, with the lost node back
    status = command("distlab.launch.cluster", "status", "--state-dir", str(state_dir))
    assert status.returncode == 0 and status.stdout.count(" up ") == 2, status.stdout


@pytest.mark.slow
def test_a_live_run_loses_a_node_and_the_other_replicas_step_on(
    cluster: tuple[str, Path], tmp_path: Path
) -> None:
    """--ft live on the cluster: replicas 2 and 3 run on node 1 and die with it at step 10;
    replicas 0 and 1 step on without a restart, within the live loss bound of the
    uninterrupted run. The lost replicas' restarts wait for a CPU (node 1 is back 15 s
    later, after this short run has ended) and are stopped when replica 0 finishes.

    One CI run failed here with every step at 4 replicas; its cause is not established.
    Replica 0 lost at the fault gives exactly that (every replica restarts from step 0):
    a node Ray has already declared dead no longer crashes it, its line now says so, and
    the assertions below look for a whole restart first and show the launcher's output.
    The collective timeout stays at its default: at ``--timeout-s 10`` the replicas'
    start on the busy 2-core machine outlasted it (replica 0 waited for its peers)."""
    pytest.importorskip("torchft")
    address, state_dir = cluster
    run = ["--strategy", "ddp", "--nproc", "4", "--steps", "30", "--optimizer", "sgd"]
    run += ["--ft", "live", "--no-final-checkpoint"]
    reference, run_dir, result = run_on_cluster(
        address, tmp_path, run, "--inject-fault", "node:1@10", "--max-failures", "2"
    )
    assert "the replicas on other nodes step on; restarting the lost ones alone" in result.stdout
    metrics, uninterrupted = (
        read_jsonl(run_dir / "metrics.jsonl"),
        read_jsonl(reference / "metrics.jsonl"),
    )
    events = run_events(run_dir)
    # first what went wrong if anything did: a whole restart, or other ranks lost
    assert not [e for e in events if e["event"] == "start" and e["restart"]], result.stdout
    killed = sorted(e["rank"] for e in events if e.get("kind") == "signal")
    assert killed == [2, 3], result.stdout  # the ranks on node 1
    assert [m["step"] for m in metrics] == list(range(30))  # no step redone
    replicas = [(m["replicas"], round(m["quorum_s"], 1)) for m in metrics]
    assert [k for k, _ in replicas] == [4] * 10 + [2] * 20, (replicas, result.stdout)
    bounds = loss_bound(metrics, uninterrupted, nproc=4, grad_clip=1.0)
    for got, want, bound in zip(metrics, uninterrupted, bounds, strict=True):
        assert abs(got["loss"] - want["loss"]) <= bound + LOSS_RTOL * abs(want["loss"]), got
    wait_until_revived(state_dir, 1)  # the module's later tests use both nodes


def wait_until_revived(state_dir: Path, index: int, timeout_s: float = 60) -> None:
    """Wait until the cluster has brought lost node ``index`` back (``--revive-after``)."""
    deadline = time.monotonic() + timeout_s
    while (node := read_state(state_dir).nodes[index]).revived < node.lost:
        assert time.monotonic() < deadline, f"node {index} did not come back in {timeout_s} s"
        time.sleep(0.5)


@pytest.mark.slow
def test_a_wrong_auth_token_is_one_line(cluster: tuple[str, Path], tmp_path: Path) -> None:
    """The cluster uses token authentication (``ray start`` with ``RAY_AUTH_MODE=token``);
    distlab sends a token whenever one exists, and a token it rejects is one line."""
    address, _ = cluster
    run_dir = tmp_path / "run"
    wrong = command(
        "distlab.launch", *TINY_LOCAL_RUN[2:], "--launcher", "ray", "--ray-address", address,
        "--strategy", "ddp", "--nproc", "2", "--steps", "4", "--run-dir", str(run_dir),
        RAY_AUTH_TOKEN="0" * 32,
    )  # fmt: skip
    assert_one_line_error(wrong, "rejected the authentication token")
    assert wrong.stdout == "" and not run_dir.exists()


@pytest.mark.slow
def test_an_elastic_run_shrinks_grows_back_and_matches_the_uninterrupted_one(
    cluster: tuple[str, Path], tmp_path: Path
) -> None:
    """Node 1 is lost before step 25: the run goes on at 2 ranks from step 20, and once the
    node is back (15 s) it grows to 4 again; enough steps at 2 ranks for Ray to see it.

    The grow comes 20-25 s after the loss (the node restarted 15 s after it, Ray's node
    table, the controller's resize check every 5 s) and the shrunk run starts about 10 s
    after it, so its steps at 2 ranks must last 15 s and more: 600 steps last 20-24 s here
    (0.035-0.042 s a step).

    The uninterrupted run it matches is ``single``'s, the lab's parity reference: one
    process trains the 600 steps on about a third of the CPU that 4 ranks spend.

    The learning rate is 1e-3, not the default 3e-3. The other order of the gradient sums at
    2 ranks compounds: at 3e-3 a run all at 2 ranks left the 4-rank run's losses by 1.9e-4
    (relative) by step 149 (local launcher), and this test, alone on the machine, ran 260
    of its steps at 2 ranks and came within 5.6e-6 of parity's 1e-5. At 1e-3 a run all at
    2 ranks stayed within 2.3e-7 over 500 steps, and this test with 300 steps at 2 ranks
    within 2.0e-7 of the 4-rank run and 3.1e-7 of ``single``. A wrong batch or gradient
    (1e-3 and more) still fails it."""
    address, _ = cluster
    # 12 rows: whole at 4, 3 and 2 ranks (the sizes an elastic run of 2 to 4 may take)
    run = ["--strategy", "ddp", "--nproc", "4", "--global-batch", "12", "--steps", "600"]
    run += ["--lr", "1e-3"]
    reference, run_dir, result = run_on_cluster(
        address, tmp_path, run, "--elastic", "2", "--max-failures", "1",
        "--checkpoint-every", "20", "--inject-fault", "node:1@25",
        reference_as=("--strategy", "single", "--nproc", "1"),
    )  # fmt: skip
    assert "distlab: continuing at 2 ranks (--elastic)" in result.stdout
    assert "capacity for 4 ranks came back: the run grows (--elastic)" in result.stdout
    starts = [e for e in run_events(run_dir) if e["event"] == "start"]
    assert [s["world_size"] for s in starts] == [4, 2, 4]
    assert starts[1]["from_step"] == 20 and starts[1]["nodes"] == [0, 0]  # node 0's two CPUs
    assert starts[2]["from_step"] > 20  # it trained and saved at 2 ranks before it grew
    assert json.loads((run_dir / "summary.json").read_text())["restarts"] == 2
    # The same global batch at 2 ranks: the same losses but for the order of the gradient sums.
    assert run_losses(run_dir) == pytest.approx(run_losses(reference), rel=LOSS_RTOL)


@pytest.mark.slow
def test_a_node_fault_names_a_node_of_the_cluster(cluster: tuple[str, Path]) -> None:
    address, _ = cluster
    result = run_main(
        "distlab.launch", *TINY_LOCAL_RUN[2:], "--launcher", "ray", "--ray-address", address,
        "--strategy", "ddp", "--nproc", "2", "--steps", "4", "--max-failures", "1",
        "--inject-fault", "node:5@2",
    )  # fmt: skip
    assert_one_line_error(result, f"the cluster at {address} has no node 5 (its nodes: 0, 1)")


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (["--inject-fault", "node:0@2"], "node 0 is the cluster's head"),
        (["--inject-fault", "node:x@2"], "must look like node:K@STEP"),
        (["--inject-fault", "node:1@2", "--launcher", "local"], "needs a Ray cluster"),
        (["--inject-fault", "node:1@9"], "never fires: the run has only 4 steps"),
        (["--inject-fault", "node:1@2", "--launcher", "ray"], "start one with 'distlab cluster"),
    ],
)
def test_bad_node_faults_are_one_line(flags: list[str], fragment: str) -> None:
    base = ["--model", "tiny", "--no-wandb", "--steps", "4", "--strategy", "ddp", "--nproc", "2"]
    result = run_main("distlab.launch", *base, "--max-failures", "1", *flags)
    assert_one_line_error(result, fragment)


def test_cluster_commands_without_a_cluster(tmp_path: Path) -> None:
    flags = ["--state-dir", str(tmp_path)]
    status = run_main("distlab.launch.cluster", "status", *flags)
    assert status.returncode == 1 and "no cluster is up" in status.stdout
    down = run_main("distlab.launch.cluster", "down", *flags)
    assert down.returncode == 0 and "no cluster is up" in down.stdout
    bad = run_main("distlab.launch.cluster", "up", "--nodes", "0", *flags)
    assert_one_line_error(bad, "--nodes and --cpus-per-node must be at least 1")
    assert not (tmp_path / "cluster.json").exists()


def test_up_makes_the_auth_token_ray_start_needs_on_a_fresh_machine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``ray start --head`` with token auth fails where no token exists (a machine that never
    ran Ray, as CI's): ``up`` makes one where Ray reads it, once."""
    token_file = tmp_path / "home" / ".ray" / "auth_token"
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token_file))
    assert not auth_token_available()
    assert ensure_auth_token() == token_file
    token = token_file.read_text()
    assert len(token) == 64 and int(token, 16) and token_file.stat().st_mode & 0o777 == 0o600
    assert auth_token_available()
    assert ensure_auth_token() is None and token_file.read_text() == token  # kept, not replaced
    monkeypatch.setenv("RAY_AUTH_TOKEN", "0" * 64)
    token_file.unlink()
    assert ensure_auth_token() is None and not token_file.exists()  # the variable is a token


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (["--elastic", "5"], "--elastic 5 must be between 1 and --nproc 4"),
        (["--elastic", "2", "--strategy", "tp", "--tp", "4"], "tp's layout fixes it"),
        (["--elastic", "2", "--launcher", "local"], "--elastic needs --launcher ray"),
        (["--elastic", "2", "--global-batch", "8"], "at 3 ranks --global-batch 8 does not split"),
    ],
)
def test_bad_elastic_flags_are_one_line(flags: list[str], fragment: str) -> None:
    base = ["--model", "tiny", "--no-wandb", "--steps", "4", "--strategy", "ddp", "--nproc", "4"]
    result = run_main("distlab.launch", *base, "--global-batch", "12", *flags)
    assert_one_line_error(result, fragment)


def test_killing_a_node_ray_already_declared_dead_kills_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A node fault whose node Ray has already lost (its health checks missed) finds it
    down: nothing to kill, and no error to crash the rank that fired it."""
    monkeypatch.setattr(nodes, "alive_nodes", lambda: {0: {"RayletSocketName": "unused"}})
    assert nodes.kill_node(1) == 0
