"""``distlab cluster up|status|down``: a Ray cluster of several nodes on this machine.

distlab cluster up --nodes 3 --cpus-per-node 2      (prints the address on its last line)
distlab launch --strategy hsdp --nproc 4 --ray-address ADDRESS --inject-fault node:1@5
distlab cluster status
distlab cluster down

``up`` starts a supervisor process, which starts the head (node 0) and the
worker nodes: each one ``ray start --block`` process tree with its own raylet,
``--cpus-per-node`` CPUs and the resource ``distlab_node_K`` (``distlab.nodes``),
so Ray schedules on them as on separate machines and losing one (``--inject-fault
node:K@STEP``) takes down its ranks only. The supervisor then watches the nodes:

- a lost worker node comes back after ``--revive-after`` seconds, as a cloud
  replaces a failed machine (a new Ray node with the same index); -1: never;
- a lost head ends the cluster (Ray's control store lives there);
- ``down`` (SIGTERM to the supervisor) stops every node, then the supervisor.

The head checks its nodes' health every 0.2 s and declares a node dead after
three missed checks: a killed node was declared dead 2.4-2.7 s after the kill here
(3.1 s with checks every 0.5 s; Ray's defaults: about 15 s). The state (address,
nodes, losses, revivals) is ``STATE_DIR/cluster.json``, with each node's log beside it;
``--state-dir`` (default ``$DISTLAB_CLUSTER_DIR``, else ``/tmp/distlab-cluster-UID``)
lets several clusters coexist.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from distlab.atomic_file import write_text_atomically
from distlab.cli import OneLineErrorParser, run_cli
from distlab.errors import DistlabError
from distlab.launch.ray_token import ensure_auth_token
from distlab.nodes import node_resource

STATE_FILE = "cluster.json"
STARTED = "Ray runtime started."
"""What ``ray start`` logs once its node has joined the cluster."""
START_TIMEOUT_S = 120.0
POLL_S = 0.2
STOP_GRACE_S = 3.0
"""How long ``down`` lets the nodes stop before killing what is left. An idle cluster stops
in 2 s; after a Ray Train run the head's processes (its raylet, the GCS, Ray Train's
detached autoscaling coordinator) had not stopped 10 s after SIGTERM, when they were
killed. Nothing on these nodes needs a clean stop: the cluster's state lives in its state
dir, not in Ray."""
HEALTH_CHECKS = {
    "health_check_period_ms": 200,
    "health_check_timeout_ms": 2000,
    "health_check_failure_threshold": 3,
}
"""The head's node health checks: a node that fails 3 checks 0.2 s apart is dead; one that
is alive but slow has 2 s to answer each."""


def default_state_dir() -> Path:
    """Where the cluster's state and logs live unless ``--state-dir`` says otherwise."""
    return Path(os.environ.get("DISTLAB_CLUSTER_DIR") or f"/tmp/distlab-cluster-{os.getuid()}")


@dataclass
class NodeState:
    """One node as the supervisor sees it."""

    index: int
    cpus: int
    pid: int | None = None
    """The node's ``ray start`` process (None while the node is lost)."""
    up_since: float | None = None
    lost: int = 0
    lost_at: float | None = None
    revived: int = 0


@dataclass
class ClusterState:
    """``cluster.json``: what ``status`` prints and ``down`` stops."""

    address: str
    supervisor_pid: int
    revive_after_s: float
    status: str = "starting"
    """starting, up, head lost, down, or failed: REASON."""
    nodes: list[NodeState] = field(default_factory=list)

    def write(self, state_dir: Path) -> None:
        """Replace ``cluster.json`` atomically (readers never see half a file)."""
        write_text_atomically(state_dir / STATE_FILE, json.dumps(asdict(self), indent=1) + "\n")


def read_state(state_dir: Path) -> ClusterState | None:
    """The cluster recorded in ``state_dir``, or None."""
    try:
        data = json.loads((state_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    nodes = [NodeState(**node) for node in data.pop("nodes")]
    return ClusterState(**data, nodes=nodes)


def alive(pid: int | None) -> bool:
    """Whether process ``pid`` exists (and is not a zombie of ours)."""
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def ray_start_command(index: int, cpus: int, address: str) -> list[str]:
    """The ``ray start --block`` command line of node ``index``."""
    ray = str(Path(sys.executable).parent / "ray")
    common = [
        f"--num-cpus={cpus}",
        f"--resources={json.dumps({node_resource(index): 1})}",
        "--disable-usage-stats",
        "--block",
    ]
    if index == 0:
        host, _, port = address.rpartition(":")
        return [
            ray,
            "start",
            "--head",
            f"--node-ip-address={host}",
            f"--port={port}",
            "--include-dashboard=false",
            f"--system-config={json.dumps(HEALTH_CHECKS)}",
            *common,
        ]
    return [ray, "start", f"--address={address}", *common]


def auth_mode() -> str:
    """The cluster's ``RAY_AUTH_MODE``: the user's, else token authentication (as ``ray
    start`` defaults to)."""
    return os.environ.get("RAY_AUTH_MODE", "token")


class Supervisor:
    """Starts the nodes, revives lost workers, stops everything on SIGTERM."""

    def __init__(self, state_dir: Path, state: ClusterState) -> None:
        self.state_dir = state_dir
        self.state = state
        self.processes: dict[int, subprocess.Popen] = {}
        self.stopping = False

    def start_node(self, node: NodeState) -> None:
        """Start node ``node.index`` and wait until it has joined (or fail in one line)."""
        log = self.state_dir / f"node{node.index}.log"
        with log.open("ab") as out:
            out.write(f"--- node {node.index} starting at {time.ctime()}\n".encode())
            offset = out.tell()
            # Token authentication, as Ray's `ray start` defaults to (`up` made the token if
            # none existed; worker nodes and launchers joining the cluster read it).
            env = {**os.environ, "RAY_AUTH_MODE": auth_mode()}
            process = subprocess.Popen(
                ray_start_command(node.index, node.cpus, self.state.address),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,  # its own process group: `down` stops it as a whole
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while STARTED not in log.read_bytes()[offset:].decode(errors="replace"):
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise DistlabError(f"node {node.index} did not start; see {log}")
            time.sleep(POLL_S)
        self.processes[node.index] = process
        node.pid, node.up_since, node.lost_at = process.pid, time.time(), None
        self.state.write(self.state_dir)

    def run(self) -> None:
        """Start every node, then watch them until SIGTERM (or the head is lost)."""
        signal.signal(signal.SIGTERM, lambda *_: setattr(self, "stopping", True))
        try:
            for node in self.state.nodes:
                self.start_node(node)
            self.state.status = "up"
            self.state.write(self.state_dir)
            while not self.stopping and self.state.status == "up":
                self.watch()
                time.sleep(POLL_S)
        except DistlabError as exc:
            self.state.status = f"failed: {exc}"
        finally:
            self.stop_all()

    def watch(self) -> None:
        """Record lost nodes; revive a lost worker once ``revive_after_s`` has passed."""
        now = time.time()
        for node in self.state.nodes:
            process = self.processes.get(node.index)
            if process is not None and process.poll() is not None:
                del self.processes[node.index]
                node.pid, node.lost, node.lost_at = None, node.lost + 1, now
                if node.index == 0:
                    self.state.status = "head lost"
                self.state.write(self.state_dir)
            revive = self.state.revive_after_s
            if node.pid is None and node.lost_at is not None and 0 <= revive <= now - node.lost_at:
                try:
                    self.start_node(node)
                    node.revived += 1
                except DistlabError:  # try again after another wait
                    node.lost_at = time.time()
                self.state.write(self.state_dir)

    def stop_all(self) -> None:
        """Stop every node at once (SIGTERM); SIGKILL whatever is left after ``STOP_GRACE_S``."""
        import psutil

        processes: list[psutil.Process] = []
        for process in self.processes.values():
            try:
                root = psutil.Process(process.pid)
                processes += [root, *root.children(recursive=True)]  # Ray workers: own sessions
            except psutil.NoSuchProcess:
                pass
            process.terminate()
        _, left = psutil.wait_procs(processes, timeout=STOP_GRACE_S)
        for process in left:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        for process in self.processes.values():
            process.wait()
        for node in self.state.nodes:
            node.pid = None
        if self.state.status in ("up", "starting"):
            self.state.status = "down"
        self.state.write(self.state_dir)


def up(state_dir: Path, nodes: int, cpus: int, revive_after_s: float) -> int:
    """Start the supervisor and wait until every node is up; print the nodes and the address."""
    from distlab.distributed import free_port

    running = running_state(state_dir)
    if running is not None:
        raise DistlabError(
            f"a cluster is already up at {running.address} (state in {state_dir}): "
            "'distlab cluster down' stops it, or pass another --state-dir"
        )
    state_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / STATE_FILE).unlink(missing_ok=True)
    if auth_mode().lower() == "token":
        made = ensure_auth_token()  # `ray start --head` fails without one
        if made is not None:
            print(f"made a Ray auth token in {made} (nodes and launches read it)", file=sys.stderr)
    address = f"127.0.0.1:{free_port()}"
    with (state_dir / "supervisor.log").open("ab") as log:
        supervisor = subprocess.Popen(
            [sys.executable, "-m", "distlab.launch.cluster", "supervise", str(state_dir)]
            + [address, str(nodes), str(cpus), str(revive_after_s)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # outlives this command
        )
    shown = 0
    while True:
        state = read_state(state_dir)
        started = [n for n in state.nodes if n.pid is not None] if state else []
        for node in started[shown:]:
            print(f"node {node.index} up ({node.cpus} CPUs)", file=sys.stderr, flush=True)
        shown = max(shown, len(started))
        if state is not None and state.status != "starting":
            break
        if supervisor.poll() is not None:
            raise DistlabError(f"the cluster's supervisor stopped; see {state_dir}/supervisor.log")
        time.sleep(POLL_S)
    if state.status != "up":
        raise DistlabError(f"the cluster did not start: {state.status}")
    print(f"{nodes} nodes x {cpus} CPUs; state and logs in {state_dir}")
    print(state.address)
    return 0


def running_state(state_dir: Path) -> ClusterState | None:
    """The cluster recorded in ``state_dir`` if its supervisor still runs, else None."""
    state = read_state(state_dir)
    return state if state is not None and alive(state.supervisor_pid) else None


def status(state_dir: Path) -> int:
    """Print the cluster's nodes; exit 1 if no cluster is up."""
    state = running_state(state_dir)
    if state is None:
        print(f"no cluster is up (state dir {state_dir}; 'distlab cluster up' starts one)")
        return 1
    print(f"cluster at {state.address}: {state.status}; lost nodes revive after ", end="")
    print("never" if state.revive_after_s < 0 else f"{state.revive_after_s:g} s")
    print(f"{'node':>4}  {'CPUs':>4}  {'state':<6}  {'pid':>7}  {'lost':>4}  {'revived':>7}")
    for node in state.nodes:
        up_now = alive(node.pid)
        print(
            f"{node.index:>4}  {node.cpus:>4}  {'up' if up_now else 'lost':<6}  "
            f"{node.pid if up_now else '-':>7}  {node.lost:>4}  {node.revived:>7}"
        )
    return 0


def down(state_dir: Path) -> int:
    """Stop the supervisor, which stops every node; wait for it."""
    state = running_state(state_dir)
    if state is None:
        print(f"no cluster is up (state dir {state_dir})")
        return 0
    os.kill(state.supervisor_pid, signal.SIGTERM)
    print(f"stopping the cluster at {state.address} ...", file=sys.stderr, flush=True)
    deadline = time.monotonic() + 60
    while alive(state.supervisor_pid) and time.monotonic() < deadline:
        time.sleep(POLL_S)
    if alive(state.supervisor_pid):
        raise DistlabError(f"the cluster's supervisor (pid {state.supervisor_pid}) did not stop")
    print("stopped")
    return 0


def build_parser() -> OneLineErrorParser:
    """``distlab cluster``'s flags."""
    parser = OneLineErrorParser(
        prog="distlab cluster", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("action", choices=("up", "status", "down"))
    parser.add_argument("--nodes", type=int, default=2, help="nodes, the head included")
    parser.add_argument("--cpus-per-node", type=int, default=2, help="CPUs Ray sees per node")
    parser.add_argument(
        "--revive-after",
        type=float,
        default=5.0,
        metavar="S",
        help="seconds until a lost worker node comes back (-1: never; default 5)",
    )
    parser.add_argument("--state-dir", type=Path, default=None, help="the cluster's state and logs")
    return parser


def main(argv: list[str]) -> int:
    """Run ``distlab cluster ACTION``."""
    args = build_parser().parse_args(argv)
    state_dir = args.state_dir or default_state_dir()
    if args.action == "up":
        if args.nodes < 1 or args.cpus_per_node < 1:
            raise DistlabError("--nodes and --cpus-per-node must be at least 1")
        return up(state_dir, args.nodes, args.cpus_per_node, args.revive_after)
    return status(state_dir) if args.action == "status" else down(state_dir)


def supervise(argv: list[str]) -> None:
    """The supervisor process (``up`` starts it): STATE_DIR ADDRESS NODES CPUS REVIVE_AFTER_S."""
    state_dir, address, nodes, cpus, revive = Path(argv[0]), argv[1], *argv[2:]
    state = ClusterState(address, os.getpid(), float(revive))
    state.nodes = [NodeState(index, int(cpus)) for index in range(int(nodes))]
    state.write(state_dir)
    Supervisor(state_dir, state).run()


if __name__ == "__main__":
    if sys.argv[1:2] == ["supervise"]:
        supervise(sys.argv[2:])
    else:
        run_cli(lambda: main(sys.argv[1:]))
