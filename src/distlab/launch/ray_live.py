"""``--ft live`` on Ray: each replica a Ray actor, so a lost node loses only its replicas.

The live launcher (``distlab.launch.live``) runs unchanged: the Lighthouse in this
process, replica 0 writing the run dir, a dead replica restarted alone to heal from a
live peer. Only where a replica runs differs: here each is an actor of the Ray cluster
(``--ray-address``, else a private local instance) holding ``--threads-per-rank`` CPUs,
and on a cluster made by ``distlab cluster up`` the first replicas fill node 0 and the
rest the other nodes in turn, as Ray Train places ranks (replica 0 on the head, which a
node fault never takes). When node K is lost (``--inject-fault node:K@STEP``), the
replicas on it die with it, the ones on other nodes keep stepping, and each lost
replica's restart is an actor that waits for a CPU anywhere in the cluster: it starts
when the node comes back (or another has room), heals, and rejoins.

A replica that ends reports its exit like a process: 0, 2 (bad input, with its reason)
or, when its actor died, 1 if it recorded a crash (``logs/rankR.traceback``) and -9
otherwise (a node loss, a kill).
"""

from __future__ import annotations

import gc
import os
import queue
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray

from distlab.config import Config
from distlab.launch.live import ReplicaJob, launch_live
from distlab.launch.ray_connect import send_cluster_messages_to, start_private_instance
from distlab.nodes import alive_nodes, node_resource
from distlab.run.files import LOGS_DIR
from distlab.train.live import run_live_replica

if TYPE_CHECKING:
    from distlab.launch.wandb_run import WandbFeed

NODE_SHARE = 0.001
"""How much of a node's ``distlab_node_K`` resource a replica asks for: any amount pins
the actor to that node without limiting how many replicas it holds (CPUs do that)."""


@ray.remote(max_restarts=0)
class ReplicaActor:
    """One replica's process in the cluster."""

    def pid(self) -> int:
        return os.getpid()

    def run(self, rank: int, job: ReplicaJob) -> tuple[int, str | None]:
        """Run the replica; (exit code, reason) as ``run_reporting`` would exit with."""
        gc.freeze()  # this fresh worker's imports, out of the collector's sight (as ray_train_loop)
        reported: list[tuple[int, str]] = []

        class Errors:  # run_reporting's error queue, kept in this actor
            put = reported.append

        try:
            run_live_replica(*job.arguments(rank, Errors(), None))
        except SystemExit as exc:  # bad input (2) or an interrupt
            code = exc.code if isinstance(exc.code, int) else 1
            return code, reported[0][1] if reported else None
        return 0, None


@dataclass
class RayReplica:
    """A replica actor and its ``run`` call, watched like a process."""

    rank: int
    job: ReplicaJob
    actor: Any
    result: Any
    """The ``run`` call's result."""
    pid_ref: Any
    """The ``pid`` call's result (ready once the actor has started)."""
    errors: queue.Queue
    started_at: float = field(default_factory=time.time)
    _pid: int | None = None
    _exitcode: int | None = field(default=None, repr=False)

    @property
    def pid(self) -> int | None:
        if self._pid is None and ray.wait([self.pid_ref], timeout=0)[0]:
            try:
                self._pid = ray.get(self.pid_ref)
            except ray.exceptions.RayError:
                pass  # it died before it answered
        return self._pid

    @property
    def exitcode(self) -> int | None:
        if self._exitcode is None and ray.wait([self.result], timeout=0)[0]:
            self._exitcode = self._ended()
        return self._exitcode

    def _ended(self) -> int:
        try:
            code, reason = ray.get(self.result)
        except ray.exceptions.RayError:  # the actor's process died: a crash, a kill, its node
            trace = self.job.run_dir / LOGS_DIR / f"rank{self.rank}.traceback"
            crashed = trace.exists() and trace.stat().st_mtime >= self.started_at
            if crashed:
                self.errors.put((self.rank, trace.read_text().strip().splitlines()[-1]))
            return 1 if crashed else -signal.SIGKILL
        if reason is not None:
            self.errors.put((self.rank, reason))
        return code


class RayReplicas:
    """Replicas as Ray actors, placed by node on a ``distlab cluster`` (``launch.live``)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.errors: queue.Queue = queue.Queue()
        nodes = sorted(alive_nodes()) or [None]  # none on a private instance or another cluster
        # ranks in node order, as Ray Train places them: replica 0 on the head node
        self.placement = [nodes[r * len(nodes) // config.nproc] for r in range(config.nproc)]

    def start(self, rank: int, job: ReplicaJob) -> RayReplica:
        options: dict[str, Any] = {"num_cpus": self.config.threads_per_rank}
        node = self.placement[rank]
        if node is not None and job.join.peers:  # a restart goes wherever a CPU is free
            options["resources"] = {node_resource(node): NODE_SHARE}
        actor = ReplicaActor.options(**options).remote()
        result, pid_ref = actor.run.remote(rank, job), actor.pid.remote()
        return RayReplica(rank, job, actor, result, pid_ref, self.errors)

    def wait(self, running: list[RayReplica], timeout_s: float) -> None:
        ray.wait([r.result for r in running], num_returns=1, timeout=timeout_s)

    def stop(self, replicas: list[RayReplica]) -> None:
        for replica in replicas:
            if replica.exitcode is None:
                ray.kill(replica.actor)


def launch_ray_live(
    config: Config,
    token_file: Path,
    run_dir: Path,
    address: str | None,
    feed: WandbFeed | None = None,
) -> None:
    """``launch_live`` with Ray actors as the replicas: on the cluster ``join_cluster``
    joined, else on a private local instance."""
    if not address:
        start_private_instance(config)
    send_cluster_messages_to(run_dir)  # a lost node's raylet
    try:
        launch_live(config, token_file, run_dir, feed, RayReplicas(config))
    finally:
        ray.shutdown()
