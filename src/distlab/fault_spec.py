"""The ``--inject-fault`` grammar: ``RANK@STEP[:PHASE]`` and ``node:K@STEP`` specs, checked.

A spec names a rank and a step, and what happens there: a kill before the step
(no phase), an exception inside it (``raise``), or a kill at one crash point of
saving checkpoint ``step_STEP`` (a save stage). ``node:K@STEP`` loses node K
of a cluster from ``distlab cluster up`` (every process on it, ranks included)
before step STEP; rank 0 fires it. ``fault_specs`` refuses, in one line, a spec
that is malformed or could never fire in the configured run.
``distlab.train.faults`` fires them.
"""

from __future__ import annotations

from dataclasses import dataclass

from distlab.config import Config, checkpoint_steps
from distlab.config_checks import require
from distlab.errors import DistlabError

SAVE_STAGES = (
    "save",
    "save-mid-shard",
    "save-before-rename",
    "save-after-rename",
    "save-rotation",
)
"""Crash points of a checkpoint save, in the order a save passes them."""
MAIN_RANK_STAGES = ("save-before-rename", "save-after-rename", "save-rotation")
"""Save stages only rank 0 passes (it alone commits and rotates)."""
FAULT_PHASES = ("", "raise", *SAVE_STAGES)
"""What may follow ``RANK@STEP:`` in a fault spec ("" is a plain kill)."""
FAULT_FORMS = (
    f"RANK@STEP, RANK@STEP:raise, RANK@STEP:STAGE (STAGE: {', '.join(SAVE_STAGES)}) or node:K@STEP"
)
NODE_PREFIX = "node:"


@dataclass(frozen=True)
class FaultSpec:
    """One injected fault: ``rank`` fails when ``step`` steps are done, or while saving them.

    ``phase`` is "" (SIGKILL before step ``step``), "raise" (raise an exception
    there) or a save stage (SIGKILL at that crash point of saving checkpoint
    step_``step``; ``SAVE_STAGES``).
    """

    rank: int
    step: int
    phase: str = ""
    node: int | None = None
    """``node:K@STEP``: the cluster node rank ``rank`` (0) kills with every process on it."""

    @property
    def during_save(self) -> bool:
        """Whether it fires while checkpoint step_``step`` is being saved."""
        return self.phase in SAVE_STAGES

    @property
    def name(self) -> str:
        """The spec as written on the command line, e.g. ``1@4:save`` or ``node:1@4``."""
        if self.node is not None:
            return f"{NODE_PREFIX}{self.node}@{self.step}"
        return f"{self.rank}@{self.step}" + (f":{self.phase}" if self.phase else "")


def fault_specs(config: Config) -> list[FaultSpec]:
    """Parse and check ``inject_fault``; a one-line error names a bad or impossible spec."""
    specs: list[FaultSpec] = []
    for text in (config.inject_fault or "").split(","):
        text = text.strip()
        if not text:
            continue
        if text.startswith(NODE_PREFIX):
            specs.append(_node_fault(text, config))
            continue
        where, _, phase = text.partition(":")
        rank, _, step = where.partition("@")
        if not (rank.isdigit() and step.isdigit() and phase in FAULT_PHASES):
            raise DistlabError(f"inject_fault '{text}' must look like {FAULT_FORMS} (e.g. 1@4)")
        spec = FaultSpec(int(rank), int(step), phase)
        require(
            spec.rank < config.nproc,
            f"inject_fault '{text}': rank {spec.rank} does not exist with nproc {config.nproc}",
        )
        require(
            spec.phase not in MAIN_RANK_STAGES or spec.rank == 0,
            f"inject_fault '{text}' never fires: only rank 0 passes stage {spec.phase}",
        )
        if spec.during_save:
            saved = checkpoint_steps(config)
            require(
                spec.step in saved,
                f"inject_fault '{text}' never fires: no checkpoint is saved after step "
                f"{spec.step} (checkpoint_every {config.checkpoint_every}, steps {config.steps})",
            )
            before = len([s for s in saved if s <= spec.step])
            require(
                spec.phase != "save-rotation" or before > config.keep_checkpoints,
                f"inject_fault '{text}' never fires: saving step_{spec.step} removes no old "
                f"checkpoint (keep_checkpoints {config.keep_checkpoints})",
            )
        else:
            require(
                spec.step < config.steps,
                f"inject_fault '{text}' never fires: the run has only {config.steps} steps",
            )
        specs.append(spec)
    return specs


def _node_fault(text: str, config: Config) -> FaultSpec:
    """``node:K@STEP``, checked against what the configuration alone can tell."""
    node, _, step = text.removeprefix(NODE_PREFIX).partition("@")
    if not (node.isdigit() and step.isdigit()):
        raise DistlabError(f"inject_fault '{text}' must look like node:K@STEP (e.g. node:1@4)")
    spec = FaultSpec(0, int(step), node=int(node))
    require(
        spec.node != 0,
        f"inject_fault '{text}': node 0 is the cluster's head, whose loss ends the cluster; "
        "lose a worker node (1 and up)",
    )
    require(
        config.launcher == "ray",
        f"inject_fault '{text}' needs a Ray cluster: --launcher ray --ray-address ADDRESS "
        "(start one with 'distlab cluster up --nodes 2')",
    )
    require(
        spec.step < config.steps,
        f"inject_fault '{text}' never fires: the run has only {config.steps} steps",
    )
    return spec
