"""The Ray launcher: Ray Train's TorchTrainer runs one worker per rank and restarts them.

With no ``--ray-address`` (and no ``RAY_ADDRESS``) it starts a private local
Ray instance sized for the run (``nproc x threads_per_rank`` CPUs, one GPU per
rank on GPUs) and shuts it down at the end; with one it joins that cluster and
leaves it running. The trainer is:

- ``ScalingConfig(num_workers=nproc)``: one worker per rank, each reserving
  ``threads_per_rank`` CPUs (and one GPU with ``device`` cuda);
- ``TorchConfig`` (``ray_backend.torch_config``: counted gloo or nccl): Ray creates the
  process group, with distlab's collective timeout (a hung rank then fails);
- ``RunConfig(failure_config=FailureConfig(max_failures))``: after a worker
  dies or raises, Ray stops the whole group and starts a new one, whose ranks
  resume from the run dir's newest complete checkpoint (``distlab.train``).
  Ray's own checkpoint storage is not used: distlab's checkpoints already
  live (atomically committed, rotated) in the run dir, which every worker
  reads, so the run dir must be on a filesystem all Ray nodes share.

Worker output stays in Ray's logs; the launcher prints progress, each fault
and each resume from the run dir (``EventPrinter``) and the summary at the end.
Its watcher thread also runs the step-progress watchdog (``launch.watchdog``:
a hung worker on this machine is SIGKILLed, which makes Ray restart the group)
and feeds the run's W&B run (``launch.wandb_run``).

How the driver starts or joins Ray (auth tokens, capacity checks) is
``launch.ray_connect``.
"""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distlab.config import Config
from distlab.distributed import resolve_device
from distlab.errors import DistlabError, first_line
from distlab.launch.printer import EventPrinter
from distlab.launch.ray_connect import send_cluster_messages_to, start_private_instance
from distlab.launch.watchdog import Watchdog
from distlab.run.files import LOGS_DIR, SUMMARY_FILE
from distlab.run.recorder import summary_table
from distlab.train.rank import ERROR_FILE, ray_train_loop

if TYPE_CHECKING:
    from ray.train.torch import TorchTrainer

    from distlab.launch.wandb_run import WandbFeed

POLL_S = 0.5
ELASTIC_RESIZE_CHECK_S = 5.0
"""How often an elastic run's controller looks for returned capacity to grow into."""


def launch_ray(
    config: Config,
    token_file: Path,
    run_dir: Path,
    address: str | None,
    feed: WandbFeed | None = None,
) -> None:
    """Run the ranks as Ray Train workers until done (on the cluster ``join_cluster`` joined,
    else a private local instance); one-line DistlabError if the run fails."""
    import ray

    from distlab.launch.ray_backend import start_autoscaling_coordinator  # Ray Train's

    cuda = resolve_device(config) == "cuda"
    if not address:
        start_private_instance(config)
    start_autoscaling_coordinator()
    printer = EventPrinter(
        run_dir,
        config.max_failures,
        quiet=config.quiet,
        progress=True,
        log_every=config.log_every,
        steps=config.steps,
    )
    watchdog = Watchdog(run_dir, config.nproc, config.timeout_s)
    stop = threading.Event()
    watched = [watchdog, printer, *([feed] if feed is not None else [])]
    watcher = threading.Thread(target=_watch, args=(watched, stop), daemon=True)
    send_cluster_messages_to(run_dir)
    try:
        trainer = _build_trainer(config, token_file, run_dir, cuda)
        if config.elastic:
            from distlab.launch.ray_capacity import CapacityWatch

            watched.append(CapacityWatch())
        watcher.start()
        _run_trainer(trainer, config, run_dir, watchdog)
    except KeyboardInterrupt:
        raise DistlabError("interrupted; all ranks stopped") from None
    finally:
        stop.set()
        if watcher.is_alive():
            watcher.join()
        printer.poll()
        printer.flush()
        ray.shutdown()
    _report_finished_run(config, run_dir)


def _build_trainer(config: Config, token_file: Path, run_dir: Path, cuda: bool) -> TorchTrainer:
    """Ray Train's trainer of the run: one worker per rank, restarted up to max_failures times."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig

    from distlab.launch import ray_backend
    from distlab.launch.ray_callback import FaultRecorder, ResizeRecorder

    resources: dict[str, float] = {"CPU": config.threads_per_rank}
    if cuda:
        resources["GPU"] = 1
    return ray_backend.TrainerWithoutRayData(
        ray_train_loop,
        train_loop_config={
            "config": config.to_dict(),
            "token_file": str(token_file),
            "run_dir": str(run_dir),
        },
        scaling_config=ScalingConfig(
            # elastic: any size from --elastic to --nproc, whatever the cluster's nodes hold
            num_workers=(config.elastic, config.nproc) if config.elastic else config.nproc,
            use_gpu=cuda,
            resources_per_worker=resources,
            elastic_resize_monitor_interval_s=ELASTIC_RESIZE_CHECK_S,
        ),
        torch_config=ray_backend.torch_config(
            cuda, max(1, math.ceil(config.timeout_s)), config.comm_stats
        ),
        run_config=RunConfig(
            name=f"distlab-{run_dir.name}",
            storage_path=str(run_dir / "ray"),
            failure_config=FailureConfig(max_failures=config.max_failures),
            callbacks=[FaultRecorder(str(run_dir)), ResizeRecorder(str(run_dir))],
        ),
    )


def _run_trainer(trainer: TorchTrainer, config: Config, run_dir: Path, watchdog: Watchdog) -> None:
    """Run the trainer; if Ray gives up, one line: a worker's error, a hang, or Ray's failure."""
    try:
        trainer.fit()
    except Exception as exc:  # noqa: BLE001 - TrainingFailedError and Ray's own errors
        hang = watchdog.hangs[-1].message() if watchdog.hangs else None
        after = f" (after {config.max_failures} restarts)" if config.max_failures else ""
        raise DistlabError(
            _worker_error(run_dir)
            or (hang + after if hang else _failure_message(exc, config.max_failures))
        ) from None


def _report_finished_run(config: Config, run_dir: Path) -> None:
    """After Ray is shut down: fail on a worker's recorded error or a missing summary; print it."""
    error = _worker_error(run_dir)
    if error:
        raise DistlabError(error)
    summary_file = run_dir / SUMMARY_FILE
    if not summary_file.is_file():
        raise DistlabError(f"the ranks finished without writing {summary_file}; see Ray's logs")
    if not config.quiet:
        from rich.console import Console

        Console().print(summary_table(json.loads(summary_file.read_text())))


def _watch(watched: list[Any], stop: threading.Event) -> None:
    """The watcher thread: poll each of ``watched`` (the watchdog, the event printer, the W&B
    feed, an elastic run's capacity watch) until stopped."""
    while not stop.wait(POLL_S):
        for each in watched:
            each.poll()


def _worker_error(run_dir: Path) -> str | None:
    """A DistlabError a worker recorded (bad input: the same on every rank)."""
    files = sorted((run_dir / LOGS_DIR).glob(ERROR_FILE.format(rank="*")))
    if not files:
        return None
    rank = files[0].name.removeprefix("error_rank").removesuffix(".txt")
    return f"rank {rank} failed: {files[0].read_text().strip()}"


def _failure_message(exc: BaseException, max_failures: int) -> str:
    """One line for a run Ray gave up on: the lowest failing rank's first error line."""
    failures: dict[int, Any] = getattr(exc, "worker_failures", None) or {}
    after = f" (after {max_failures} restarts)" if max_failures else ""
    if failures:
        rank = min(failures)
        return f"rank {rank} failed: {first_line(failures[rank])}{after}"
    return f"the Ray run failed: {first_line(exc)}{after}"
