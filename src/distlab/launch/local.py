"""The local launcher: one process per rank on this machine, watched until done.

Ranks are forked from a server that has already imported torch and distlab
(``launch.spawn``), so they start in milliseconds, each a separate process.

If any rank exits non-zero (a crash, an error, a kill), the others are stopped
within about a second. Then, while ``--max-failures`` allows, all ranks are
started again on a fresh port and resume from the newest complete checkpoint
(``distlab.train``); otherwise the launch fails with that rank's one-line
reason, instead of waiting for the survivors to time out in a collective. A
rank that reports a ``DistlabError`` (bad input) is never restarted: it would
fail the same way again. A hung rank is killed by the watchdog once its step
progress has stalled for ``--timeout-s`` (``launch.watchdog``; with several
ranks its peers' collectives time out too), which makes it a failure like any
other.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import queue
import signal
import time
from dataclasses import dataclass
from multiprocessing.connection import wait
from pathlib import Path
from typing import TYPE_CHECKING

from distlab.config import Config
from distlab.distributed import free_port
from distlab.errors import DistlabError
from distlab.launch.printer import EventPrinter
from distlab.launch.spawn import rank_context
from distlab.launch.watchdog import Watchdog
from distlab.run.events import append_event
from distlab.train.rank import done_marker, run_rank

if TYPE_CHECKING:
    from distlab.launch.wandb_run import WandbFeed

POLL_S = 0.2
GRACE_S = 3.0


@dataclass(frozen=True)
class Failure:
    """Why one attempt failed."""

    message: str
    """One line: which rank, and why."""
    retryable: bool
    """False for a DistlabError: restarting would fail the same way."""


def stop_ranks(processes: list[mp.Process]) -> None:
    """Terminate, then kill, every rank still running."""
    for process in processes:
        if process.is_alive():
            process.terminate()
            with contextlib.suppress(OSError):  # a stopped (hung) rank acts on SIGTERM only
                os.kill(process.pid, signal.SIGCONT)  # once continued
    deadline = time.monotonic() + GRACE_S
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join()


def launch_local(
    config: Config, token_file: Path, run_dir: Path, feed: WandbFeed | None = None
) -> None:
    """Run ``config.nproc`` ranks to completion, restarting up to ``max_failures`` times."""
    os.environ.setdefault("OMP_NUM_THREADS", str(config.threads_per_rank))
    printer = EventPrinter(run_dir, config.max_failures, quiet=config.quiet)
    watchdog = Watchdog(run_dir, config.nproc, config.timeout_s)
    failures = 0
    while True:
        failure = _attempt(config, token_file, run_dir, printer, watchdog, feed)
        printer.poll()
        printer.flush()
        if failure is None:
            return
        if not failure.retryable or failures >= config.max_failures:
            suffix = f" (after {failures} restarts)" if failures else ""
            raise DistlabError(failure.message + suffix)
        failures += 1


def _attempt(
    config: Config,
    token_file: Path,
    run_dir: Path,
    printer: EventPrinter,
    watchdog: Watchdog,
    feed: WandbFeed | None,
) -> Failure | None:
    """Start every rank on a fresh port and watch them; None if all finished."""
    context = rank_context([config.strategy], compile=config.compile)
    errors = context.Queue()
    init_method = f"tcp://127.0.0.1:{free_port()}"
    processes = [
        context.Process(
            target=run_rank,
            args=(
                rank,
                config.nproc,
                init_method,
                config.to_dict(),
                str(token_file),
                str(run_dir),
                errors,
                dict(os.environ),
            ),
            name=f"distlab-rank{rank}",
        )
        for rank in range(config.nproc)
    ]
    for rank in range(config.nproc):
        done_marker(run_dir, rank).unlink(missing_ok=True)
    watchdog.reset()
    hang = None
    try:
        for process in processes:
            process.start()
        ignored: set[int] = set()
        while True:
            codes = [p.exitcode for p in processes]
            for rank, code in enumerate(codes):
                if code not in (None, 0) and rank not in ignored:
                    if done_marker(run_dir, rank).exists():
                        ignored.add(rank)
                        print(
                            f"distlab: warning: rank {rank} exited with status {code} after "
                            "it finished training (ignored)",
                            flush=True,
                        )
            codes = [0 if rank in ignored else code for rank, code in enumerate(codes)]
            failed = [(rank, code) for rank, code in enumerate(codes) if code not in (None, 0)]
            if failed:
                stop_ranks(processes)
                if hang is not None:  # the watchdog killed it (and logged the fault)
                    printer.poll()
                    printer.flush()
                    return Failure(hang.message(), True)
                killed = [(rank, code) for rank, code in failed if code < 0]
                first = (killed or failed)[0]
                if first[1] < 0:
                    append_event(run_dir, "fault", rank=first[0], kind="signal", signal=-first[1])
                printer.poll()
                printer.flush()
                return attempt_failure(first, dict(failed), errors)
            if all(code == 0 for code in codes):
                return None
            hang = hang or watchdog.poll()
            printer.poll()
            if feed is not None:
                feed.poll()
            # Sleep until the next poll or until a rank exits, whichever comes first.
            wait([p.sentinel for p in processes if p.exitcode is None], POLL_S)
    except KeyboardInterrupt:
        stop_ranks(processes)
        raise DistlabError("interrupted; all ranks stopped") from None


def attempt_failure(first: tuple[int, int], codes: dict[int, int], errors: mp.Queue) -> Failure:
    """Why the attempt failed: a killed rank's signal, else the reason a rank reported."""
    rank, code = first
    if code < 0:
        return Failure(
            f"rank {rank} was killed by signal {-code}; the other ranks were stopped", True
        )
    reasons = {}
    while True:
        try:
            rank, reason = errors.get(timeout=0.5 if not reasons else 0.05)
        except queue.Empty:
            break
        reasons.setdefault(rank, reason)
    bad_input = [r for r, c in codes.items() if c == 2]
    if reasons:
        rank = min((r for r in reasons if r in bad_input), default=min(reasons))
        return Failure(f"rank {rank} failed: {reasons[rank]}", not bad_input)
    return Failure(
        f"rank {rank} exited with status {code}; the other ranks were stopped", not bad_input
    )
