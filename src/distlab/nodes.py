"""The nodes of a Ray cluster made by ``distlab cluster up``: their names, and how one is lost.

Each node is one ``ray start`` process tree (a raylet with its own CPUs, its
agents and the Ray workers it runs) that carries the custom resource
``distlab_node_K``: K is the node's index, 0 the head. Ray knows nothing of
the index; this module maps between the two through Ray's node table
(``ray.nodes()``, so the callers have joined the cluster with ``ray.init``).

A node loss (``--inject-fault node:K@STEP``) is simulated the way a machine
dies: every process of node K gets SIGKILL at once, the raylet included, so
Ray sees the node's workers vanish and, after its health checks miss, the
node itself. All nodes share this machine, so its process table holds them.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Mapping
from typing import Any

NODE_RESOURCE = "distlab_node_"
"""Prefix of the custom resource that names a node: ``distlab_node_1`` is node 1."""
RAYLET_SOCKET_FLAG = "--raylet_socket_name="
"""The raylet's command-line flag that tells one node's raylet from another's on a machine."""


def node_resource(index: int) -> str:
    """The custom resource that node ``index`` carries."""
    return f"{NODE_RESOURCE}{index}"


def node_index(resources: Mapping[str, float]) -> int | None:
    """The distlab node index among a Ray node's resources, or None (not a distlab node)."""
    for name in resources:
        if name.startswith(NODE_RESOURCE) and name[len(NODE_RESOURCE) :].isdigit():
            return int(name[len(NODE_RESOURCE) :])
    return None


def alive_nodes() -> dict[int, dict[str, Any]]:
    """Ray's entry of every alive distlab node, by index (a revived node replaces its dead one)."""
    import ray

    found: dict[int, dict[str, Any]] = {}
    for node in ray.nodes():
        index = node_index(node["Resources"])
        if node["Alive"] and index is not None:
            found[index] = node
    return found


def this_node() -> int | None:
    """The distlab node index of the Ray node this process runs on (None off a distlab cluster)."""
    import ray

    here = ray.get_runtime_context().get_node_id()
    node = next((n for n in ray.nodes() if n["NodeID"] == here), None)
    return node_index(node["Resources"]) if node is not None else None


def kill_node(index: int) -> int:
    """SIGKILL every process of node ``index`` (the caller last, if it is one); return how many.

    The node's processes are its ``ray start`` process and all that descend from
    it: found from the raylet, which is the only process started with the node's
    socket name. A node that Ray has already declared dead (its health checks
    missed, under load) is down already: nothing to kill, 0. Raising there would
    crash the calling rank, and a live run would restart every replica for it.
    """
    import psutil

    node = alive_nodes().get(index)
    if node is None:
        return 0
    flag = RAYLET_SOCKET_FLAG + node["RayletSocketName"]
    raylet = next(
        (p for p in psutil.process_iter(["cmdline"]) if flag in (p.info["cmdline"] or [])), None
    )
    if raylet is None:
        raise RuntimeError(f"node {index}'s raylet is not a process of this machine")
    root = raylet.parent() or raylet  # the `ray start --block` process that started the node
    processes = [root, *root.children(recursive=True)]
    me = os.getpid()
    for process in sorted(processes, key=lambda p: p.pid == me):  # this process last
        try:
            process.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    return len(processes)
