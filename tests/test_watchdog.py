"""The step watchdog on its own: heartbeats of real processes, no training run.

A stalled heartbeat (no progress for ``--timeout-s``) gets its process killed
and a ``hang`` fault recorded. When the attempt is already failing (a peer's
collective timed out first and its crash is recorded), the watchdog records
nothing more, but still kills a rank that is *stopped* (SIGSTOP): a stopped
process never exits when asked, and Ray would wait for it before restarting.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from distlab.launch.watchdog import Watchdog
from distlab.run.events import append_event, read_events
from distlab.run.heartbeat import beat, heartbeat_file


def sleeper() -> subprocess.Popen:
    return subprocess.Popen(["sleep", "60"])


def fake_beat(run_dir: Path, rank: int, pid: int) -> None:
    """A heartbeat as rank ``rank`` (process ``pid``) writes it after a step."""
    beat(run_dir, rank, "step", 3)
    file = heartbeat_file(run_dir, rank)
    file.write_text(file.read_text().replace(f'"pid": {os.getpid()}', f'"pid": {pid}'))


def stop(process: subprocess.Popen) -> None:
    """SIGSTOP ``process`` and wait until the kernel shows it stopped (state T)."""
    process.send_signal(signal.SIGSTOP)
    deadline = time.monotonic() + 5
    while Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "T":
        assert time.monotonic() < deadline, "the process did not stop"
        time.sleep(0.01)


def test_a_stalled_rank_is_killed_and_reported(tmp_path: Path) -> None:
    # Beside other tests too: the watchdog times the stall on the monotonic clock, and a
    # busy machine can only lengthen the 0.5 s the test waits past the 0.3 s timeout.
    process = sleeper()
    try:
        append_event(tmp_path, "start", attempt=1)
        fake_beat(tmp_path, 0, process.pid)
        watchdog = Watchdog(tmp_path, nproc=1, timeout_s=0.3)
        assert watchdog.poll() is None  # first sight of the heartbeat
        time.sleep(0.5)
        hang = watchdog.poll()
        assert hang is not None and hang.rank == 0 and hang.pid == process.pid
        assert process.wait(timeout=5) == -signal.SIGKILL
        assert [e["kind"] for e in read_events(tmp_path) if e["event"] == "fault"] == ["hang"]
    finally:
        process.kill()


def test_a_stopped_rank_of_a_failing_attempt_is_killed(tmp_path: Path) -> None:
    stopped, waiting = sleeper(), sleeper()
    try:
        stop(stopped)
        append_event(tmp_path, "start", attempt=1)
        fake_beat(tmp_path, 0, waiting.pid)
        fake_beat(tmp_path, 1, stopped.pid)
        # rank 0's collective timed out first: the attempt is failing already
        append_event(tmp_path, "fault", rank=0, kind="error", reason="Timed out")
        watchdog = Watchdog(tmp_path, nproc=2, timeout_s=60)
        assert watchdog.poll() is None  # nothing new is recorded ...
        assert stopped.wait(timeout=5) == -signal.SIGKILL  # ... but the stopped rank is gone
        assert waiting.poll() is None  # a running rank is left to the launcher
        assert len([e for e in read_events(tmp_path) if e["event"] == "fault"]) == 1
    finally:
        for process in (stopped, waiting):
            process.kill()
