"""Injected faults (``--inject-fault``): each fires once per run, at its step or save stage.

A fault kills this rank (SIGKILL) or, for ``RANK@STEP:raise``, raises
``InjectedFault`` inside the step. The marker ``faults/RANK@STEP[-PHASE]`` is
written first, so a restarted rank does not fire it again.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from distlab.config import Config
from distlab.distributed import RankContext
from distlab.fault_spec import FaultSpec, fault_specs
from distlab.run.events import append_event
from distlab.run.files import FAULTS_DIR


def pending_faults(config: Config, rank: int, run_dir: Path) -> set[FaultSpec]:
    """This rank's injected faults that have not fired yet (a restart must not re-fire them)."""
    return {
        spec
        for spec in fault_specs(config)
        if spec.rank == rank and not _fault_marker(run_dir, spec).exists()
    }


def _fault_marker(run_dir: Path, spec: FaultSpec) -> Path:
    return run_dir / FAULTS_DIR / spec.name.replace(":", "-")


class InjectedFault(RuntimeError):
    """The exception ``RANK@STEP:raise`` raises: an ordinary crash, retried like any other."""


def fire_fault(faults: set[FaultSpec], spec: FaultSpec, ctx: RankContext, run_dir: Path) -> None:
    """If ``spec`` is pending, record that it fired, then SIGKILL this process (or raise).

    The marker ``faults/RANK@STEP[-PHASE]`` is written first, so a restarted
    rank does not fire it again (``pending_faults``). A ``raise`` fault raises
    ``InjectedFault``, which the rank reports as a crash (its ``fault`` event
    and traceback come from ``distlab.train.rank.record_crash``).
    """
    if spec not in faults:
        return
    faults.discard(spec)
    marker = _fault_marker(run_dir, spec)
    marker.parent.mkdir(exist_ok=True)
    marker.write_text(f"{time.time()}\n")
    if spec.phase == "raise":
        raise InjectedFault(
            f"rank {ctx.rank} raised at step {spec.step} (--inject-fault {spec.name})"
        )
    append_event(
        run_dir,
        "fault",
        rank=ctx.rank,
        kind="injected",
        step=spec.step,
        during_save=spec.during_save,
        stage=spec.phase or None,
        spec=spec.name,
    )
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)
