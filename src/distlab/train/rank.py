"""The entry points of one rank: join the group, train, report failures.

``run_rank`` is a process of the local launcher; ``ray_train_loop`` runs in a
Ray Train worker, where Ray has already set up the process group (TorchConfig).
Both record a crash as a ``fault`` event in the run dir before failing, so the
launcher can print it and the run's summary can count it.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from distlab.config import Config
from distlab.distributed import RankContext, init_rank, shutdown
from distlab.errors import DistlabError
from distlab.nodes import this_node
from distlab.run.events import append_event
from distlab.run.files import LOGS_DIR
from distlab.train.loop import train

ERROR_FILE = "error_rank{rank}.txt"


def run_rank(
    rank: int,
    world_size: int,
    init_method: str,
    config_dict: dict[str, Any],
    token_file: str,
    run_dir: str,
    errors: Any,
    environment: dict[str, str] | None = None,
) -> None:
    """Run one rank; on failure put a one-line reason on ``errors`` and exit non-zero.

    ``environment``: the launcher's environment, applied first (a rank forked from a
    server started earlier has the server's: ``distlab.launch.spawn``).
    """
    config = rank_config(config_dict, environment)

    def body() -> None:
        ctx = init_rank(rank, world_size, init_method, config)
        train(ctx, config, Path(token_file), Path(run_dir))

    run_reporting(rank, Path(run_dir), errors, body)


def rank_config(config_dict: dict[str, Any], environment: dict[str, str] | None) -> Config:
    """The rank's Config, after applying the launcher's ``environment`` (if given)."""
    if environment is not None:
        os.environ.clear()
        os.environ.update(environment)
    return Config(**config_dict)


def run_reporting(rank: int, run_dir: Path, errors: Any, body: Callable[[], None]) -> None:
    """Run a rank's ``body``, then mark it done and leave the process group; on failure put
    a one-line reason on ``errors`` and exit 2 (a ``DistlabError``: bad input) or 1."""
    try:
        body()
        done_marker(run_dir, rank).touch()
        shutdown()
    except DistlabError as exc:
        errors.put((rank, str(exc)))
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
    except BaseException:  # report any crash in one line, keep the traceback in a file
        errors.put((rank, record_crash(rank, run_dir)))
        sys.stdout.flush()
        os._exit(1)


def done_marker(run_dir: Path, rank: int) -> Path:
    """``logs/rankR.done``: this rank finished training (a crash after it costs nothing)."""
    return run_dir / LOGS_DIR / f"rank{rank}.done"


def record_crash(rank: int, run_dir: Path) -> str:
    """Write the traceback to ``logs/rankR.traceback``, log a fault event; return one line."""
    exc = sys.exc_info()[1]
    log_dir = run_dir / LOGS_DIR
    log_dir.mkdir(parents=True, exist_ok=True)
    log_file = log_dir / f"rank{rank}.traceback"
    log_file.write_text(traceback.format_exc())
    first_line = (str(exc).strip().splitlines() or [""])[0][:300]
    reason = f"{type(exc).__name__}: {first_line} (traceback: {log_file})"
    try:
        append_event(run_dir, "fault", rank=rank, kind="error", reason=reason)
    except OSError:
        pass
    return reason


def ray_train_loop(loop_config: dict[str, Any]) -> None:
    """A Ray Train worker's loop: build the RankContext from Ray's process group, train.

    A ``DistlabError`` (bad input, found identically on every rank) is written
    to ``logs/error_rankR.txt`` and the loop returns, so Ray does not retry a
    run that cannot work; the launcher reports it. Any other failure is raised
    to Ray, whose FailureConfig restarts the worker group.
    """
    import ray.train

    config = Config(**loop_config["config"])
    run_dir = Path(loop_config["run_dir"])
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if config.elastic:  # Ray chose the world size: the run's batches and model stay the same
        config = dataclasses.replace(config, nproc=world_size)
    if config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available()):
        device = ray.train.torch.get_device()
    else:
        device = torch.device("cpu")
        torch.set_num_threads(config.threads_per_rank)
    ctx = RankContext(rank=rank, world_size=world_size, device=device, nodes=_nodes_by_rank())
    # What this fresh worker imported (torch, Ray Train, pandas) lives as long as it does:
    # out of the collector's sight, as in the rank server (launch.frozen_heap), a full
    # collection during training walks the run's objects only (0.22 -> 0.03 CPU s here).
    gc.freeze()
    try:
        train(ctx, config, Path(loop_config["token_file"]), run_dir)
    except DistlabError as exc:
        log_dir = run_dir / LOGS_DIR
        log_dir.mkdir(parents=True, exist_ok=True)
        (log_dir / ERROR_FILE.format(rank=rank)).write_text(str(exc) + "\n")
    except BaseException:
        record_crash(rank, run_dir)
        raise


def _nodes_by_rank() -> tuple[int | None, ...] | None:
    """Every rank's node on a ``distlab cluster up`` cluster (one gather), else None."""
    nodes: list[int | None] = [None] * dist.get_world_size()
    dist.all_gather_object(nodes, this_node())
    return tuple(nodes) if any(n is not None for n in nodes) else None
