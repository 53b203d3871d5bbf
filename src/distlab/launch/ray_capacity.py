"""Tell Ray Train's elastic scaling at once when a node leaves or joins the cluster.

Ray Train's elastic policy sizes a (re)started worker group from the
reservations of Ray's ``AutoscalingCoordinator`` actor, which refreshes its
view of the cluster's nodes every 20 s only (its ``TICK_INTERVAL_S``). After a
lost node the policy kept asking for the lost capacity until that refresh,
waiting out a worker-group start timeout each time: 22 s of a 36.5 s recovery,
measured. ``CapacityWatch`` compares the alive nodes at every poll of the
launcher's watcher thread and, on a change, makes the coordinator refresh at
once (its ``_tick``, the refresh its own callers run on demand: Ray has no
public switch for it). It also refreshes it once before the run starts: the
coordinator is an actor of the cluster, not of the run, and a run launched
within 20 s of a node's return otherwise started without that node's ranks.
"""

from __future__ import annotations

import ray

COORDINATOR = ("AutoscalingCoordinator", "AutoscalingCoordinator")
"""The coordinator actor's name and namespace (``ray.data``'s default coordinator)."""


class CapacityWatch:
    """Refreshes the autoscaling coordinator whenever the set of alive nodes changes."""

    def __init__(self) -> None:
        self.nodes = self._alive()
        # The coordinator outlives runs on a cluster: its view may predate a node's return,
        # and the run would start short of ranks the cluster holds (seen in the soak).
        self._refresh()

    @staticmethod
    def _alive() -> frozenset[str]:
        return frozenset(node["NodeID"] for node in ray.nodes() if node["Alive"])

    def poll(self) -> bool:
        """Check the nodes; return whether they changed (and the coordinator was refreshed)."""
        nodes = self._alive()
        if nodes == self.nodes:
            return False
        self.nodes = nodes
        self._refresh()
        return True

    @staticmethod
    def _refresh() -> None:
        """Make the coordinator refresh its view of the nodes now, if it exists."""
        try:
            coordinator = ray.get_actor(COORDINATOR[0], namespace=COORDINATOR[1])
        except ValueError:  # no elastic run has created it yet: nothing to refresh
            return
        ray.get(coordinator._tick.remote())
