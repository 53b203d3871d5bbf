"""Injected faults (``--inject-fault``): each fires once per run, at its step or save stage.

A fault kills this rank (SIGKILL) or, for ``RANK@STEP:raise``, raises
``InjectedFault`` inside the step; ``node:K@STEP`` (rank 0's) kills a whole
cluster node (``distlab.nodes``). The marker ``faults/RANK@STEP[-PHASE]`` is
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
from distlab.nodes import kill_node
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


def fire_fault(
    faults: set[FaultSpec], step: int, phase: str, ctx: RankContext, run_dir: Path
) -> None:
    """Fire this rank's pending faults at ``step`` and ``phase``: record, then kill (or raise).

    The marker ``faults/RANK@STEP[-PHASE]`` is written first, so a restarted
    rank does not fire it again (``pending_faults``). A ``raise`` fault raises
    ``InjectedFault``, which the rank reports as a crash (its ``fault`` event
    and traceback come from ``distlab.train.rank.record_crash``). A node fault
    kills every process of that cluster node, this rank too if it runs there.
    """
    due = sorted((s for s in faults if (s.step, s.phase) == (step, phase)), key=lambda s: s.name)
    for spec in due:
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
            kind="node" if spec.node is not None else "injected",
            node=spec.node,
            step=spec.step,
            during_save=spec.during_save,
            stage=spec.phase or None,
            spec=spec.name,
        )
        sys.stdout.flush()
        if spec.node is not None:
            kill_node(spec.node)  # returns if this rank runs on another node
        else:
            os.kill(os.getpid(), signal.SIGKILL)
