"""The local launcher: one spawned process per rank on this machine, watched until done.

If any rank exits non-zero (a crash, an error, a kill), the others are stopped
within about a second and the launch fails with that rank's one-line reason,
instead of waiting for the survivors to time out in a collective.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import time
from pathlib import Path

from distlab.config import Config
from distlab.distributed import free_port
from distlab.errors import DistlabError
from distlab.worker import run_rank

POLL_S = 0.2
GRACE_S = 3.0


def _stop(processes: list[mp.Process]) -> None:
    """Terminate, then kill, every rank still running."""
    for process in processes:
        if process.is_alive():
            process.terminate()
    deadline = time.monotonic() + GRACE_S
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join()


def launch_local(config: Config, token_file: Path, run_dir: Path) -> None:
    """Run ``config.nproc`` ranks to completion; raise DistlabError if any fails."""
    context = mp.get_context("spawn")
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
            ),
            name=f"distlab-rank{rank}",
        )
        for rank in range(config.nproc)
    ]
    os.environ.setdefault("OMP_NUM_THREADS", str(config.threads_per_rank))
    try:
        for process in processes:
            process.start()
        while True:
            codes = [p.exitcode for p in processes]
            failed = [(rank, code) for rank, code in enumerate(codes) if code not in (None, 0)]
            if failed:
                _stop(processes)
                killed = [(rank, code) for rank, code in failed if code < 0]
                raise DistlabError(_failure_message((killed or failed)[0], errors))
            if all(code == 0 for code in codes):
                return
            time.sleep(POLL_S)
    except KeyboardInterrupt:
        _stop(processes)
        raise DistlabError("interrupted; all ranks stopped") from None


def _failure_message(first: tuple[int, int], errors: mp.Queue) -> str:
    """Why the run failed: a killed rank's signal, else the reason a rank reported."""
    rank, code = first
    if code < 0:
        return f"rank {rank} was killed by signal {-code}; the other ranks were stopped"
    reasons = {}
    while True:
        try:
            rank, reason = errors.get(timeout=0.5 if not reasons else 0.05)
        except queue.Empty:
            break
        reasons.setdefault(rank, reason)
    if reasons:
        rank = min(reasons)
        return f"rank {rank} failed: {reasons[rank]}"
    return f"rank {rank} exited with status {code}; the other ranks were stopped"
