"""torchft's replica process group and DDP, as distlab's live recovery needs them.

``ReplicaGroup`` bounds how long a new quorum's replicas wait for each other without
shortening the collectives, and drops a failed step's connections so that no survivor
waits on them; ``ReplicaDDP`` keeps DDP's communication hook alive through a failed
all-reduce. ``distlab.train.live`` trains with both.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch
from torchft.ddp import DistributedDataParallel
from torchft.process_group import ProcessGroupGloo

RENDEZVOUS_S = 0.75
"""How long the replicas of a new quorum may take to connect to each other once the run is
going (their process group's rendezvous). They learn the quorum at the same moment, so it
takes milliseconds when they are all alive. One that never comes died after it asked for
the quorum: the Lighthouse forms it about a heartbeat timeout later (1 s, the launcher's
``HEARTBEAT_TIMEOUT_MS``) with the dead one still in, and the survivors then wait this long
(not ``--timeout-s``) before the next quorum leaves it out: 1 s + 0.75 s, under live
mode's 2 s. The first quorum keeps ``--timeout-s``: replicas start at different speeds."""


class ReplicaGroup(ProcessGroupGloo):
    """torchft's gloo group over the quorum's replicas (rebuilt at every new quorum), whose
    collectives always wait ``collective_timeout`` (``--timeout-s``), and whose rendezvous
    does too until the run's first committed step, then ``RENDEZVOUS_S``."""

    def __init__(self, collective_timeout: timedelta) -> None:
        super().__init__(timeout=collective_timeout)
        self.collective_timeout = collective_timeout

    def _opts_hook(self, opts: Any) -> Any:  # torchft passes every collective's options here
        if hasattr(opts, "timeout"):
            opts.timeout = self.collective_timeout
        return opts

    def after_commit(self, committed: bool) -> None:
        """React to this step's ``should_commit``: shorten the next rendezvous once a step
        has committed, or drop the connections of a step that failed.

        A peer may still be inside the failed step's all-reduce, waiting for a message from
        this replica that will not come (it failed on a dead peer; gloo does not tell the
        others). Dropping the connections fails that wait at once, where it took
        ``--timeout-s`` before. torchft gives the quorum after a failed commit a new id, so
        every replica connects afresh there.
        """
        if committed:
            self.set_timeout(min(timedelta(seconds=RENDEZVOUS_S), self.collective_timeout))
        else:
            self.abort()


class ReplicaDDP(DistributedDataParallel):
    """torchft's DDP, whose communication hook survives a failed all-reduce.

    After an error (a peer died, or hung past ``--timeout-s``, inside the step)
    torchft's Manager turns every later all-reduce of the step into a no-op whose
    future is a plain one; torchft 0.2's hook asserts the future is its managed kind,
    and so crashed every survivor. This hook hands DDP a completed future instead: the
    step fails ``should_commit`` and is run again with the replicas of the next quorum,
    as torchft intends.
    """

    @staticmethod
    def _comm_hook(state, bucket):  # noqa: ANN001, ANN205 - DDP reads these annotations: none
        work = state.allreduce(bucket.buffer())
        work.wait()
        if state.errored():  # this step is lost (should_commit fails): any complete future will do
            done: torch.futures.Future[torch.Tensor] = torch.futures.Future()
            done.set_result(bucket.buffer())
            return done
        return work.get_future()._fut  # the managed future's own: DDP waits on it
