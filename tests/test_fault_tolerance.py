"""Fault tolerance with the local launcher: injected, external and hang faults; resharded resume.

Every check compares per-step losses with an uninterrupted run of the same
config. The tolerance for a restart at the same strategy and world size is
1e-6 absolute (observed: bitwise equal, since the resumed state is bitwise the
saved one and every batch depends only on the step). A resume at another
strategy or world size sums the same numbers in another order, so it gets the
parity tolerance (``distlab.report.parity.LOSS_RTOL``, 1e-5 relative).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from tests.helpers import (
    TINY_LOCAL_RUN,
    BackgroundMain,
    assert_one_line_error,
    rank_pids,
    run_command,
    run_events,
    run_losses,
    run_main,
    wandb_history,
    wandb_offline_runs,
    wandb_run_record,
)

from distlab.errors import DistlabError
from distlab.launch.__main__ import main as launch_main
from distlab.report.parity import LOSS_RTOL
from distlab.strategies.resolve import load_config

pytestmark = pytest.mark.slow  # the whole file: every test kills, hangs or restarts real ranks

RESTART_ATOL = 1e-6
COMMON = [*TINY_LOCAL_RUN, "--keep-checkpoints", "10", "--track-memory", "off"]
"""No test here reads memory: a tracked step runs every op through torch's tracker (0.4 s,
seconds on a loaded machine, where the watchdog of a 5 s test took it for a hang)."""
SHORT = [*COMMON, "--steps", "10", "--checkpoint-every", "2"]
LONG = [*COMMON, "--steps", "40", "--checkpoint-every", "5"]
"""Long enough (in steps) for a test to act on a rank while the run is going."""


def launch(*args: str) -> subprocess.CompletedProcess:
    """The launch command, in this process (its ranks are processes of their own)."""
    return run_main("distlab.launch", *args)


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def max_abs_diff(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b)
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


def max_rel_diff(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b)
    return max(abs(x - y) / abs(x) for x, y in zip(a, b, strict=True))


RESUME_SOURCE = ("ddp", 2)
"""The reference whose SHORT run other tests resume from (its checkpoints are kept); every
other reference is read for its losses alone, so it writes no checkpoint."""
LOSSES_ONLY = ["--checkpoint-every", "0", "--no-final-checkpoint"]


@pytest.fixture(scope="module")
def refs(tmp_path_factory: pytest.TempPathFactory):
    """Uninterrupted runs, each made once on first use: ``refs("ddp", 2, SHORT)``."""
    root = tmp_path_factory.mktemp("refs")
    made: dict[str, Path] = {}

    def get(strategy: str, nproc: int, shape: list[str] = SHORT) -> Path:
        name = f"{strategy}-n{nproc}-{'short' if shape is SHORT else 'long'}"
        if name not in made:
            run_dir = root / name
            source = (strategy, nproc) == RESUME_SOURCE and shape is SHORT
            result = launch(
                *shape, *([] if source else LOSSES_ONLY), "--strategy", strategy,
                "--nproc", str(nproc), "--run-dir", str(run_dir),
            )  # fmt: skip
            assert result.returncode == 0, result.stderr
            made[name] = run_dir
        return made[name]

    return get


# --- Injected faults ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("strategy", "faults", "lost_steps"),
    [
        ("ddp", ["1@5"], 1),
        ("fsdp", ["1@3", "0@6:save"], 1 + 2),
        ("ddp", ["0@2:save", "1@7"], 2 + 1),
        ("fsdp", ["0@5"], 1),
        ("zero2", ["1@3", "0@6:save"], 1 + 2),
        ("pp", ["1@5"], 1),
    ],
)
def test_recovery_equals_no_failure(
    tmp_path: Path, refs, strategy: str, faults: list[str], lost_steps: int
) -> None:
    run_dir = tmp_path / "run"
    fault_flags = [flag for fault in faults for flag in ("--inject-fault", fault)]
    result = launch(
        *SHORT,
        "--strategy",
        strategy,
        "--nproc",
        "2",
        "--max-failures",
        "2",
        *fault_flags,
        "--run-dir",
        str(run_dir),
    )
    assert result.returncode == 0, result.stderr
    assert max_abs_diff(run_losses(refs(strategy, 2)), run_losses(run_dir)) <= RESTART_ATOL
    # one line per fault and per resume, printed by the launcher
    fault_lines = [line for line in result.stdout.splitlines() if "distlab: fault" in line]
    resume_lines = [line for line in result.stdout.splitlines() if "distlab: resumed" in line]
    assert len(fault_lines) == len(faults) and len(resume_lines) == len(faults), result.stdout
    assert all("--inject-fault" in line for line in fault_lines)
    figures = summary(run_dir)
    assert figures["restarts"] == len(faults)
    assert figures["lost_steps"] == lost_steps
    assert len(figures["recovery_s_each"]) == len(faults)
    assert all(r > 0 for r in figures["recovery_s_each"])
    kinds = [e["event"] for e in run_events(run_dir)]
    assert kinds[0] == "launch" and kinds[-1] == "finish"
    assert kinds.count("start") == len(faults) + 1 and kinds.count("resume") == len(faults)
    assert not list((run_dir / "checkpoints").glob(".tmp-*")), "partial checkpoint left"


def test_fault_without_restarts_fails_in_one_line(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = launch(
        *SHORT,
        "--strategy",
        "ddp",
        "--nproc",
        "2",
        "--inject-fault",
        "1@3",
        "--run-dir",
        str(run_dir),
    )
    assert_one_line_error(result, "rank 1 was killed by signal 9")
    assert "no restarts left" in result.stdout
    assert len(run_losses(run_dir)) == 3


# --- Faults from outside: kill -9 and a hung rank ---------------------------------------


def _start(
    run_dir: Path, *extra: str, strategy: str = "ddp", nproc: int = 2, max_failures: int = 1
) -> BackgroundMain:
    """The launch command, running in this process's background while the test acts on its
    ranks (separate processes: killed or stopped from outside, as an operator would)."""
    return BackgroundMain(
        "distlab.launch", *LONG, "--strategy", strategy, "--nproc", str(nproc),
        "--max-failures", str(max_failures), "--run-dir", str(run_dir), *extra,
    )  # fmt: skip


def _rank_pids_after(launch_proc: BackgroundMain, run_dir: Path, steps: int) -> list[int]:
    """Wait until ``steps`` steps are recorded; return the rank processes' pids."""
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.exists() and metrics.read_text().count("\n") >= steps):
        assert time.monotonic() < deadline and launch_proc.poll() is None, "run did not start"
        time.sleep(0.05)
    return rank_pids(run_dir, 2)


def test_external_kill_recovers(tmp_path: Path, refs) -> None:
    reference = refs("ddp", 2, LONG)
    run_dir = tmp_path / "run"
    proc = _start(run_dir)
    ranks = _rank_pids_after(proc, run_dir, 8)
    os.kill(ranks[1], signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert "distlab: fault 1: rank 1 was killed by signal 9" in stdout
    assert "distlab: resumed at step" in stdout
    assert max_abs_diff(run_losses(reference), run_losses(run_dir)) <= RESTART_ATOL
    assert summary(run_dir)["restarts"] == 1


@pytest.mark.alone
def test_hung_rank_is_detected_and_recovers(tmp_path: Path, refs) -> None:
    timeout_s = 5
    reference = refs("ddp", 2, LONG)
    run_dir = tmp_path / "run"
    proc = _start(run_dir, "--timeout-s", str(timeout_s))
    ranks = _rank_pids_after(proc, run_dir, 8)
    stopped_at = time.time()
    os.kill(ranks[1], signal.SIGSTOP)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert max_abs_diff(run_losses(reference), run_losses(run_dir)) <= RESTART_ATOL
    log = run_events(run_dir)
    fault = next(e for e in log if e["event"] == "fault")
    resume = next(e for e in log if e["event"] == "resume")
    detected_s = fault["t"] - stopped_at
    # The survivor's collective times out after timeout_s (it may have been just
    # entering one, or finishing a step, when the rank stopped: allow some slack).
    assert timeout_s * 0.8 <= detected_s <= timeout_s + 15, detected_s
    assert resume["t"] - stopped_at <= timeout_s + 15 + resume["recovery_s"]
    assert "distlab: fault 1: rank" in stdout and "distlab: resumed at step" in stdout
    status = Path(f"/proc/{ranks[1]}/status")
    assert not status.exists() or "zombie" in status.read_text(), "hung rank left running"


def _stop_rank0_after(launch_proc: BackgroundMain, run_dir: Path, steps: int) -> float:
    """Wait until ``steps`` steps are recorded, SIGSTOP rank 0 (its pid file); return when."""
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.exists() and metrics.read_text().count("\n") >= steps):
        assert time.monotonic() < deadline and launch_proc.poll() is None, "run did not start"
        time.sleep(0.05)
    (pid,) = rank_pids(run_dir, 1)
    os.kill(pid, signal.SIGSTOP)
    return time.time()


@pytest.mark.alone
def test_hung_single_rank_is_killed_by_the_watchdog_and_recovers(tmp_path: Path, refs) -> None:
    """One rank, so no peer's collective can time out: the watchdog must find the hang."""
    timeout_s = 5
    reference = refs("single", 1, LONG)
    run_dir = tmp_path / "run"
    proc = _start(run_dir, "--timeout-s", str(timeout_s), strategy="single", nproc=1)
    stopped_at = _stop_rank0_after(proc, run_dir, 8)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert max_abs_diff(run_losses(reference), run_losses(run_dir)) <= RESTART_ATOL
    fault = next(e for e in run_events(run_dir) if e["event"] == "fault")
    assert fault["kind"] == "hang" and fault["rank"] == 0
    # the heartbeat stops at the stop (or one step before it); polls every 0.2 s
    assert timeout_s * 0.8 <= fault["t"] - stopped_at <= timeout_s + 3, fault["t"] - stopped_at
    assert "distlab: fault 1: rank 0 hung (no progress for" in stdout, stdout
    assert "distlab: resumed at step" in stdout
    assert summary(run_dir)["restarts"] == 1


@pytest.mark.alone
def test_hung_single_rank_without_restarts_fails_in_one_line(tmp_path: Path) -> None:
    timeout_s = 5
    run_dir = tmp_path / "run"
    proc = _start(
        run_dir, "--timeout-s", str(timeout_s), strategy="single", nproc=1, max_failures=0
    )
    stopped_at = _stop_rank0_after(proc, run_dir, 8)
    stdout, stderr = proc.communicate(timeout=120)
    ended_s = time.time() - stopped_at
    result = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    assert_one_line_error(result, "rank 0 hung: no progress for")
    assert f"(--timeout-s {timeout_s}); the watchdog killed it" in stderr
    assert ended_s <= timeout_s + 6, ended_s  # detection, then GRACE_S at most to stop


# --- One W&B run per distlab run ---------------------------------------------------------


WANDB_RUN = [c for c in COMMON if c != "--no-wandb"] + ["--checkpoint-every", "2"]


def test_restarts_and_resume_continue_one_wandb_run(tmp_path: Path) -> None:
    """The launcher writes W&B: one run across a restart, each step once; --resume continues it."""
    run_dir = tmp_path / "run"
    result = launch(
        *WANDB_RUN, "--strategy", "ddp", "--nproc", "2", "--steps", "8", "--max-failures", "1",
        "--inject-fault", "1@3", "--run-dir", str(run_dir),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    info = json.loads((run_dir / "wandb.json").read_text())
    files = wandb_offline_runs(run_dir)
    assert len(files) == 1 and files[0].name == f"run-{info['id']}.wandb", files
    history = wandb_history(files[0])
    assert [row["_step"] for row in history] == list(range(8)), "each step once"
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["loss"] for row in history] == [m["loss"] for m in metrics]
    attempts = [row["attempt"] for row in history]
    assert attempts == sorted(attempts) and attempts[0] == 1 and attempts[-1] == 2, attempts

    resumed = tmp_path / "resumed"
    result = launch("--resume", str(run_dir), "--steps", "10", "--run-dir", str(resumed))
    assert result.returncode == 0, result.stderr
    continued = json.loads((resumed / "wandb.json").read_text())
    assert continued["id"] == info["id"] and continued["continues"] == info["id"]
    files = wandb_offline_runs(resumed)
    assert len(files) == 1 and files[0].name == f"run-{info['id']}.wandb", files
    record = wandb_run_record(files[0])
    branch = record.branch_point  # resume_from="ID?_step=7": rewind to the step before 8
    assert (branch.run, branch.metric, branch.value) == (info["id"], "_step", 7)
    assert [row["_step"] for row in wandb_history(files[0])] == [8, 9]


# --- Resume at another world size or strategy -------------------------------------------


@pytest.fixture(scope="module")
def killed_fsdp4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An fsdp run at 4 ranks killed after step 7 (newest checkpoint: step_000006)."""
    run_dir = tmp_path_factory.mktemp("killed") / "fsdp4"
    result = launch(
        *SHORT,
        "--strategy",
        "fsdp",
        "--nproc",
        "4",
        "--inject-fault",
        "2@7",
        "--run-dir",
        str(run_dir),
    )
    assert result.returncode == 2
    assert (run_dir / "checkpoints" / "step_000006" / "meta.json").is_file()
    return run_dir


@pytest.mark.parametrize(
    ("source", "flags", "from_step"),
    [
        ("fsdp4", ["--nproc", "2"], 6),
        ("fsdp4", ["--strategy", "single", "--nproc", "1"], 6),
        ("ddp2", ["--strategy", "fsdp", "--nproc", "4"], 4),
    ],
)
def test_resharded_resume_matches_uninterrupted(
    tmp_path: Path, refs, killed_fsdp4: Path, source: str, flags: list[str], from_step: int
) -> None:
    if source == "fsdp4":
        resume = killed_fsdp4
    else:  # an intermediate checkpoint of a finished ddp run
        resume = refs("ddp", 2) / "checkpoints" / f"step_{from_step:06d}"
    before = _tree_digest(resume)
    run_dir = tmp_path / "resumed"
    result = launch(
        "--resume", str(resume), *flags, "--launcher", "local", "--run-dir", str(run_dir)
    )
    assert result.returncode == 0, result.stderr
    assert f"distlab: resumed at step {from_step} from" in result.stdout
    assert _tree_digest(resume) == before, "the source run was changed"
    assert max_rel_diff(run_losses(refs("single", 1)), run_losses(run_dir)) <= LOSS_RTOL
    figures = summary(run_dir)
    assert figures["resumed_from"]["step"] == from_step and figures["restarts"] == 0
    assert figures["steps_run"] == 10


def _tree_digest(path: Path) -> dict[str, str]:
    root = path if path.is_dir() else path.parent
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# --- Bad resumes: one-line errors, nothing lost -----------------------------------------


def _corrupt_shard(run: Path) -> None:
    shard = sorted((run / "checkpoints" / "step_000010").glob("*.distcp"))[-1]
    shard.write_bytes(shard.read_bytes()[:100])


def _garbage_meta(run: Path) -> None:
    (run / "checkpoints" / "step_000010" / "meta.json").write_text("{not json")


def _pickle_bomb(run: Path) -> None:
    import pickle

    class Bomb:
        def __reduce__(self):
            return (os.system, (f"touch {run}/PWNED",))

    (run / "checkpoints" / "step_000010" / ".metadata").write_bytes(pickle.dumps(Bomb()))


def _zero2_checkpoint(run: Path) -> None:
    meta_file = run / "checkpoints" / "step_000010" / "meta.json"
    meta = json.loads(meta_file.read_text())
    meta.update(strategy="zero2", format="zero2")
    meta_file.write_text(json.dumps(meta))


@pytest.mark.parametrize(
    ("damage", "extra", "fragment"),
    [
        (None, ["--steps", "12", "--resume", "/no/such/run"], "no such run dir or checkpoint"),
        (None, [], "already holds all 10 steps"),
        (_corrupt_shard, ["--steps", "12"], "is corrupt"),
        (_garbage_meta, ["--steps", "12"], "is corrupt (meta.json"),
        (_pickle_bomb, ["--steps", "12"], "refused: .metadata names posix.system"),
        (_zero2_checkpoint, ["--steps", "12", "--strategy", "fsdp"], "zero2's own format"),
    ],
)
def test_bad_resume_is_refused(
    tmp_path: Path, refs, damage, extra: list[str], fragment: str
) -> None:
    """In-process (the command's main), so each case costs no interpreter start."""
    source = tmp_path / "source"
    shutil.copytree(refs("ddp", 2), source)
    if damage is not None:
        damage(source)
    before = _tree_digest(source)
    target = tmp_path / "new"
    args = ["--launcher", "local", "--run-dir", str(target)]
    if "--resume" not in extra:
        args += ["--resume", str(source)]
    with pytest.raises(DistlabError) as error:
        launch_main([*args, *extra])
    assert fragment in str(error.value) and "\n" not in str(error.value)
    assert _tree_digest(source) == before
    assert not (source / "PWNED").exists()
    assert not target.exists()


def test_bad_resume_is_a_one_line_error_exit_2(tmp_path: Path, refs) -> None:
    """The command itself: one ``distlab: error:`` line, exit 2, the source unchanged."""
    source = tmp_path / "source"
    shutil.copytree(refs("ddp", 2), source)
    _corrupt_shard(source)
    before = _tree_digest(source)
    result = run_command(
        "distlab.launch", "--launcher", "local", "--resume", str(source), "--steps", "12"
    )
    assert_one_line_error(result, "is corrupt")
    assert _tree_digest(source) == before


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("1", "must look like RANK@STEP"),
        ("x@2", "must look like RANK@STEP"),
        ("1@2:boom", "must look like RANK@STEP"),
        ("5@2", "rank 5 does not exist"),
        ("1@99", "never fires"),
        ("1@3:save", "never fires"),
    ],
)
def test_bad_fault_specs(spec: str, fragment: str) -> None:
    overrides = {"strategy": "ddp", "nproc": 2, "steps": 10, "checkpoint_every": 2}
    with pytest.raises(DistlabError, match=fragment.replace("(", r"\(")):
        load_config(None, {**overrides, "inject_fault": spec})
