"""How the launcher's driver gets onto Ray: a private local instance, or a cluster it joins.

With no ``--ray-address`` (and no ``RAY_ADDRESS``) the driver starts a private local
Ray instance sized for the run (``nproc x threads_per_rank`` CPUs, one GPU per rank on
GPUs); with one it joins that cluster, before the run has a run dir, so that a cluster
that is not there, rejects the token, lacks the run's CPUs or a fault's node is a
one-line error with nothing left behind. Either way the workers get the driver's
``PROPAGATED_ENV`` and one OpenMP thread pool of ``threads_per_rank``.

Joining a cluster started with ``ray start``: such clusters use token
authentication, and Ray sends the token only when ``RAY_AUTH_MODE=token``. If
that variable is unset and a token is where Ray looks for one
(``RAY_AUTH_TOKEN``, the file at ``RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token``),
distlab sets it for the join.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from distlab.config import Config
from distlab.distributed import resolve_device
from distlab.errors import DistlabError, first_line
from distlab.fault_spec import fault_specs
from distlab.launch.ray_token import auth_token_available
from distlab.nodes import alive_nodes
from distlab.run.files import LOGS_DIR

PROPAGATED_ENV = ("DS_ACCELERATOR", "WANDB_MODE", "WANDB_SILENT", "WANDB_DIR", "HF_HOME")
"""Environment variables the driver passes on to Ray workers (on any cluster)."""
RAY_TRAIN_SETTINGS = {
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
}
"""Ray Train's controller, as distlab sets it:

- no preemption watcher: Ray Train starts one, one more Ray worker process, with every worker
  group (each restart and resize); it polls for cloud drain notices, which distlab's nodes
  never get, and while a restarted group starts it takes a core from the new ranks;
- the workers polled every 0.5 s, not 2 s: a rank's error (a lost node's peers fail at
  once) reaches the controller at its next poll, so recovery began up to 2 s late. A poll
  is one small call per worker; one that a busy worker answers late is waited for, not
  counted as a failure."""
START_TIMEOUT_VARIABLE = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
ELASTIC_START_TIMEOUT_S = 1.0
"""An elastic restart that asked for capacity which is gone (a lost node Ray has not yet
declared dead) gives up after this long and asks again, instead of Ray's 60 s. It bounds
only the wait for the group's placement (0.00 s when the capacity is there), not its start.
Whole seconds only: Ray's placement wait truncates the fraction, and 0.5 failed every
placement at once (the controller retried the first start in a loop, measured)."""
RAY_MESSAGES_FILE = "ray_messages.log"
"""The run's ``logs/`` file for what Ray's control store tells the driver (a lost node's dump)."""
CONNECT_TIMEOUT_S = 5.0
JOIN_ATTEMPTS_VARIABLE = "RAY_gcs_server_port_wait_time_s"
JOIN_ATTEMPTS = 5
"""How many times (1 s apart) the driver asks a cluster for its id. Ray's default, 20, is
for a head still starting; a head that answers the port check is up, and a token it
rejects would be asked again for 20 s before the one-line error."""


def resolve_address(config: Config) -> str | None:
    """The cluster to join: --ray-address, else $RAY_ADDRESS, else None (start a local one)."""
    return config.ray_address or os.environ.get("RAY_ADDRESS") or None


def check_address(address: str) -> None:
    """One-line error unless something listens at ``address`` (``[ray://]host:port``)."""
    if address == "auto":
        return
    hostport = address.removeprefix("ray://")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise DistlabError(f"Ray address '{address}' is not HOST:PORT (e.g. 127.0.0.1:6379)")
    try:
        with socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        raise DistlabError(
            f"no Ray cluster at {address} ({exc.strerror or exc}); start one with "
            "'ray start --head' or drop --ray-address to start a local one"
        ) from None


def use_token_auth_for_join() -> bool:
    """Set ``RAY_AUTH_MODE=token`` if it is unset and a token exists; return whether set."""
    if "RAY_AUTH_MODE" in os.environ or not auth_token_available():
        return False
    os.environ["RAY_AUTH_MODE"] = "token"
    return True


@contextmanager
def captured_stderr() -> Iterator[list[str]]:
    """Send fd 2 (Python's and Ray's C++ core's writes) to a temporary file while inside.

    The caller gets a list that holds the captured text afterwards: replay it on
    success, drop it when the failure is reported in one line.
    """
    captured: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as file:
        os.dup2(file.fileno(), 2)
        try:
            yield captured
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            file.seek(0)
            captured.append(file.read().decode(errors="replace"))


def join_cluster(config: Config, address: str | None) -> None:
    """Join the Ray cluster at ``address`` before the run has a run dir, so that a cluster
    that is not there or rejects the token is a one-line error with nothing left behind."""
    node_faults = sorted({spec.node for spec in fault_specs(config) if spec.node is not None})
    if node_faults and not address:
        raise DistlabError(
            f"--inject-fault node:{node_faults[0]} needs a cluster of several nodes: start one "
            "with 'distlab cluster up --nodes 2' and pass the address it prints to --ray-address"
        )
    if address:
        check_address(address)
        use_token_auth_for_join()
        _init_ray(config, address, 0, 0)
        try:
            _check_capacity(config, address)
            _check_fault_nodes_exist(node_faults, address)
        except DistlabError:
            leave_cluster()
            raise


def start_private_instance(config: Config) -> None:
    """Start this run's own local Ray instance, sized to its ranks (no ``--ray-address``);
    one-line error (and no instance) if this machine lacks the GPUs it asks for."""
    cuda = resolve_device(config) == "cuda"
    _init_ray(config, None, config.nproc * config.threads_per_rank, config.nproc if cuda else 0)
    try:
        _check_capacity(config, None)
    except DistlabError:
        leave_cluster()
        raise


def leave_cluster() -> None:
    """Disconnect this driver from Ray (a run that failed before it launched)."""
    import ray

    ray.shutdown()


def send_cluster_messages_to(run_dir: Path) -> None:
    """Append the messages Ray's control store sends this driver to the run's
    ``logs/ray_messages.log``, not to stdout.

    A lost node's raylet reaches the driver as a screenful of its internal state;
    the launcher reports the fault in one line instead. Ray prints these from a
    thread of its own, through ``ray._private.worker.print_to_stdstream`` (no
    public switch), so that function is wrapped; worker logs are off anyway
    (``log_to_driver=False``).
    """
    from ray._private import worker

    printer = getattr(worker.print_to_stdstream, "__wrapped__", worker.print_to_stdstream)

    def to_file(data: dict[str, Any], ignore_prefix: bool) -> None:
        if data.get("pid") != "raylet":
            printer(data, ignore_prefix)
            return
        path = run_dir / LOGS_DIR / RAY_MESSAGES_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as log:
            log.write("".join(f"{line}\n" for line in data["lines"]))

    to_file.__wrapped__ = printer  # type: ignore[attr-defined]
    worker.print_to_stdstream = to_file


def _init_ray(config: Config, address: str | None, cpus: int, gpus: int) -> None:
    """Join the Ray cluster at ``address``, else start a local instance of ``cpus`` and ``gpus``."""
    import ray

    env_vars = {name: os.environ[name] for name in PROPAGATED_ENV if name in os.environ}
    env_vars["OMP_NUM_THREADS"] = str(config.threads_per_rank)
    controller_env = dict(RAY_TRAIN_SETTINGS)  # read by Ray Train's controller
    if config.elastic:  # see ELASTIC_START_TIMEOUT_S
        controller_env[START_TIMEOUT_VARIABLE] = str(ELASTIC_START_TIMEOUT_S)
    env_vars.update(controller_env)  # a cluster's controller
    os.environ.update(controller_env)  # a local instance's controller
    common = {"log_to_driver": False, "logging_level": logging.ERROR}
    captured: list[str] = []
    try:
        if address:  # a local instance inherits this process's environment; a cluster does not
            # Ray's C++ core logs connection and auth failures to fd 2 before raising:
            # keep them out of the way, replay them only if the join works
            ours = JOIN_ATTEMPTS_VARIABLE not in os.environ  # a user's setting is kept
            os.environ.setdefault(JOIN_ATTEMPTS_VARIABLE, str(JOIN_ATTEMPTS))
            with captured_stderr() as captured:
                try:
                    ray.init(address=address, runtime_env={"env_vars": env_vars}, **common)
                except BaseException:
                    ray.shutdown()
                    raise
                finally:
                    if ours:  # read once, while joining
                        os.environ.pop(JOIN_ATTEMPTS_VARIABLE)
            if captured[0]:
                sys.stderr.write(captured[0])
        else:
            ray.init(
                address="local", num_cpus=cpus, num_gpus=gpus, include_dashboard=False, **common
            )
    except Exception as exc:  # noqa: BLE001 - Ray raises many types for an unusable cluster
        ray.shutdown()
        raise DistlabError(_init_failure_message(exc, address, "".join(captured))) from None


def _init_failure_message(exc: Exception, address: str | None, captured: str) -> str:
    """One line for a Ray that would not start or join, with a hint about auth tokens."""
    where = f"the Ray cluster at {address}" if address else "a local Ray instance"
    reason, hint = first_line(exc), ""
    if address and any(s in captured for s in ("Unauthenticated", "InvalidAuthToken")):
        reason = "it rejected the authentication token"
        hint = (
            " (Ray reads the token from RAY_AUTH_TOKEN, the file at RAY_AUTH_TOKEN_PATH or "
            "~/.ray/auth_token; 'ray get-auth-token' on the head node prints the right one)"
        )
    elif address and os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        hint = (
            " (if the cluster uses token authentication, put its token in "
            "~/.ray/auth_token or RAY_AUTH_TOKEN)"
        )
    return f"could not start or join {where}: {reason}{hint}"


def _check_capacity(config: Config, address: str | None) -> None:
    """One-line error unless the Ray cluster holds the run's CPUs and GPUs (an elastic run's
    minimum)."""
    import ray

    fewest = config.elastic or config.nproc
    cpus = fewest * config.threads_per_rank
    gpus = fewest if resolve_device(config) == "cuda" else 0
    resources = ray.cluster_resources()
    have_cpus, have_gpus = resources.get("CPU", 0), resources.get("GPU", 0)
    if have_cpus < cpus or have_gpus < gpus:
        where = f"the Ray cluster at {address}" if address else "the local Ray instance"
        raise DistlabError(
            f"{where} has {have_cpus:g} CPUs and {have_gpus:g} GPUs; the run needs {cpus} CPUs "
            f"and {gpus} GPUs (nproc x threads_per_rank CPUs, one GPU per rank on cuda)"
        )


def _check_fault_nodes_exist(nodes: list[int], address: str | None) -> None:
    """One-line error unless every node of a ``node:K`` fault is a node of the joined cluster."""
    alive = alive_nodes() if nodes else {}
    for node in nodes:
        if node not in alive:
            raise DistlabError(
                f"--inject-fault node:{node}: the cluster at {address} has no node {node} (its "
                f"nodes: {', '.join(map(str, sorted(alive))) or 'none from distlab cluster up'})"
            )
