"""The live launcher (``--ft live``): a torchft Lighthouse and one process per replica.

The Lighthouse runs inside this process; each replica (``distlab.train.live``) is a
process forked like the local launcher's ranks (``launch.spawn``), or with ``--launcher
ray`` an actor of the Ray cluster (``launch.ray_live``: a lost node loses its replicas).
When a replica other than 0 dies, the others keep stepping (torchft leaves it out of the
next quorum once its heartbeat is ``HEARTBEAT_TIMEOUT_MS`` old) and this launcher restarts
that replica alone, which heals from a live peer and rejoins; each restart counts against
``--max-failures``. Replica 0 writes the run dir: when it dies, every replica is stopped
and all start again from the newest checkpoint, as under ``--ft restart``. A
``DistlabError`` (bad input) is never retried. A replica that stops without dying
(SIGSTOP, a hang) stops heartbeating to the Lighthouse too and is left out of the quorum;
once its steps have stalled for ``--timeout-s`` the watchdog (``launch.watchdog``) kills
it, and it is restarted as a dead one is. Once replica 0 has finished, stragglers get
``--timeout-s`` to end before they are stopped.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from dataclasses import dataclass
from multiprocessing.connection import wait
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from torchft.coordination import LighthouseServer

from distlab.config import Config
from distlab.errors import DistlabError
from distlab.launch.local import POLL_S, Failure, attempt_failure, stop_ranks
from distlab.launch.printer import EventPrinter
from distlab.launch.spawn import rank_context
from distlab.launch.watchdog import Watchdog
from distlab.run.events import append_event
from distlab.run.files import METRICS_FILE
from distlab.train.live import Join, read_jsonl_count, ready_marker, run_live_replica
from distlab.train.rank import done_marker

if TYPE_CHECKING:
    from distlab.launch.wandb_run import WandbFeed

HEARTBEAT_TIMEOUT_MS = 1000
"""How long a silent replica stays in the quorum (torchft's default: 5 s). A replica's
Manager heartbeats every 100 ms from its own thread, so 1 s is ten missed beats; it bounds
the survivors' wait at a fault."""
JOIN_TIMEOUT_MS = 1000
"""How long the Lighthouse waits for a live replica that is late for a quorum (torchft's
default: 100 ms, which left replica 0 out when it was saving a checkpoint)."""


class Replica(Protocol):
    """A running replica, as the launcher watches it (a process, or a Ray actor)."""

    @property
    def exitcode(self) -> int | None:
        """None while it runs; else 0 (finished), 2 (bad input), 1 (a crash), -signal."""

    @property
    def pid(self) -> int | None:
        """Its process id, once it has one."""


class Replicas(Protocol):
    """Where the replicas run: ``start`` one, ``wait`` for any to end, ``stop`` them; each
    failing replica puts ``(rank, one-line reason)`` on ``errors``."""

    errors: Any

    def start(self, rank: int, job: ReplicaJob) -> Replica: ...

    def wait(self, running: list[Replica], timeout_s: float) -> None: ...

    def stop(self, replicas: list[Replica]) -> None: ...


@dataclass(frozen=True)
class ReplicaJob:
    """What a replica runs: ``run_live_replica``'s arguments but its rank and errors."""

    config: Config
    token_file: Path
    run_dir: Path
    lighthouse: str
    join: Join

    def arguments(self, rank: int, errors: Any, environment: dict[str, str] | None) -> tuple:
        """``run_live_replica``'s arguments for replica ``rank``."""
        config, token_file, run_dir = self.config.to_dict(), str(self.token_file), str(self.run_dir)
        return (rank, config, token_file, run_dir, self.lighthouse, self.join, errors, environment)


class ForkedReplicas:
    """Replicas as processes of this machine, forked from the rank server (``launch.spawn``)."""

    def __init__(self, config: Config) -> None:
        self.context = rank_context([config.strategy], compile=config.compile, live=True)
        self.errors = self.context.Queue()

    def start(self, rank: int, job: ReplicaJob) -> mp.Process:
        process = self.context.Process(
            target=run_live_replica,
            args=job.arguments(rank, self.errors, dict(os.environ)),
            name=f"distlab-replica{rank}",
        )
        process.start()
        return process

    def wait(self, running: list[mp.Process], timeout_s: float) -> None:
        wait([p.sentinel for p in running], timeout_s)

    def stop(self, replicas: list[mp.Process]) -> None:
        stop_ranks(replicas)


def launch_live(
    config: Config,
    token_file: Path,
    run_dir: Path,
    feed: WandbFeed | None = None,
    replicas: Replicas | None = None,
) -> None:
    """Run ``config.nproc`` replicas to completion under a Lighthouse, restarting a dead
    replica alone (or, for replica 0, all of them) up to ``max_failures`` times; the
    replicas are processes of this machine unless ``replicas`` (Ray actors) says else."""
    os.environ.setdefault("OMP_NUM_THREADS", str(config.threads_per_rank))
    printer = EventPrinter(run_dir, config.max_failures, quiet=config.quiet, live=True)
    replicas = replicas or ForkedReplicas(config)
    launcher = LiveLauncher(config, token_file, run_dir, printer, feed, replicas)
    while True:
        # A fresh Lighthouse for each attempt: the last one's would still hold the stopped
        # replicas' quorum requests (their old addresses) and hand them to the new ones.
        lighthouse = start_lighthouse(config)
        try:
            failure = launcher.attempt(lighthouse.address())
        finally:
            lighthouse.shutdown()
        printer.poll()
        printer.flush()
        if failure is None:
            return
        if not failure.retryable or launcher.failures >= config.max_failures:
            suffix = f" (after {launcher.failures} restarts)" if launcher.failures else ""
            raise DistlabError(failure.message + suffix)
        launcher.failures += 1


def start_lighthouse(config: Config) -> LighthouseServer:
    """torchft's Lighthouse, in this process, forming the replicas' quorums."""
    # min_replicas=1: one survivor may go on alone; the Lighthouse still waits for every
    # heartbeating replica (and refuses a quorum of half or less of them: split brain), but
    # for a late one (stuck in the broken step's all-reduce until --timeout-s, or saving a
    # checkpoint) only JOIN_TIMEOUT_MS, under the replicas' own quorum timeout. A replica
    # left out heals forward; replica 0 cannot be (LiveTrainStep.should_commit).
    return LighthouseServer(
        bind="[::]:0",
        min_replicas=1,
        join_timeout_ms=min(JOIN_TIMEOUT_MS, int(config.timeout_s * 500)),
        heartbeat_timeout_ms=HEARTBEAT_TIMEOUT_MS,
    )


class LiveLauncher:
    """Starts the replicas, watches them, restarts the ones that die."""

    def __init__(
        self,
        config: Config,
        token_file: Path,
        run_dir: Path,
        printer: EventPrinter,
        feed: WandbFeed | None,
        replicas: Replicas,
    ) -> None:
        self.config, self.token_file, self.run_dir = config, token_file, run_dir
        self.lighthouse = ""
        """The address of this attempt's Lighthouse."""
        self.printer, self.feed, self.replicas = printer, feed, replicas
        self.failures = 0
        """Restarts so far, of one replica or of all (``--max-failures`` bounds them)."""
        self.watchdog = Watchdog(run_dir, config.nproc, config.timeout_s)
        """Kills a replica whose steps stall for ``--timeout-s`` (a hang, a SIGSTOP): the
        others leave it out of their quorums, but it must die to be restarted."""

    def _start(self, rank: int, join: Join) -> Replica:
        """Start replica ``rank``, to join the run as ``join`` says."""
        job = ReplicaJob(self.config, self.token_file, self.run_dir, self.lighthouse, join)
        return self.replicas.start(rank, job)

    def attempt(self, lighthouse: str) -> Failure | None:
        """Start every replica together under ``lighthouse`` and watch them; None once all
        have finished."""
        self.lighthouse = lighthouse
        nproc = self.config.nproc
        for rank in range(nproc):
            done_marker(self.run_dir, rank).unlink(missing_ok=True)
            ready_marker(self.run_dir, rank).unlink(missing_ok=True)
        self.watchdog.reset()
        processes = [self._start(rank, Join(peers=nproc)) for rank in range(nproc)]
        ignored: set[int] = set()  # died after a peer finished: no step was left for them
        main_done_at: float | None = None
        try:
            while True:
                finished = [r for r in range(nproc) if done_marker(self.run_dir, r).exists()]
                for rank, process in enumerate(processes):
                    code = process.exitcode
                    if code in (None, 0) or rank in ignored or rank in finished:
                        continue
                    if finished and rank != 0:  # replica 0 must still write the summary
                        ignored.add(rank)
                        print(
                            f"distlab: warning: replica {rank} exited with status {code} after "
                            f"replica {finished[0]} finished training (ignored)",
                            flush=True,
                        )
                        continue
                    failure = self._on_death(rank, code, processes)
                    if failure is not None:
                        return failure
                running = [p for p in processes if p.exitcode is None]
                if not running:
                    return None
                if processes[0].exitcode == 0:
                    main_done_at = main_done_at or time.monotonic()
                    # a restart still waiting for a CPU (its node lost) has nothing left to do
                    unstarted = [p for p in running if p.pid is None]
                    self.replicas.stop(unstarted)
                    ignored.update(processes.index(p) for p in unstarted)
                    if time.monotonic() - main_done_at > self.config.timeout_s:
                        # e.g. a stopped (SIGSTOP) replica never ends itself
                        self.replicas.stop(running)
                        return None
                self.watchdog.poll()
                self.printer.poll()
                if self.feed is not None:
                    self.feed.poll()
                self.replicas.wait(running, POLL_S)
        except KeyboardInterrupt:
            self.replicas.stop(processes)
            raise DistlabError("interrupted; all replicas stopped") from None

    def _on_death(self, rank: int, code: int, processes: list[Replica]) -> Failure | None:
        """Replica ``rank`` exited with ``code``: restart it alone (None), or stop all and
        return why (replica 0, bad input, or no restarts left)."""
        hung = {hang.pid for hang in self.watchdog.hangs}  # their fault is logged already
        if code < 0 and processes[rank].pid not in hung:
            append_event(self.run_dir, "fault", rank=rank, kind="signal", signal=-code)
        if rank == 0 or code == 2 or self.failures >= self.config.max_failures:
            self.replicas.stop(processes)
            self.printer.poll()
            self.printer.flush()
            codes = {r: p.exitcode for r, p in enumerate(processes) if p.exitcode not in (None, 0)}
            return attempt_failure((rank, code), codes, self.replicas.errors)
        self.failures += 1
        at_step = read_jsonl_count(self.run_dir / METRICS_FILE) + self.config.rejoin_after
        append_event(
            self.run_dir, "replica_restart", rank=rank, restarts=self.failures, at_step=at_step
        )
        processes[rank] = self._start(rank, Join(peers=0, at_step=at_step))
        return None
