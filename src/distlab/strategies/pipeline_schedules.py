"""Which pipeline schedules exist, where they put the stages, and their theoretical bubble.

Every schedule is a class of ``torch.distributed.pipelining``; this module
says, for each ``--schedule`` name, how many stages each of the p pipeline
ranks holds and where (the *placement*), whether the backward is split into
an input-gradient part B and a weight-gradient part W, and how large the
bubble (the idle fraction of a step) is in theory.

Placements of the S = v p stages (v stages per rank):

- ``loop`` (gpipe, 1f1b: v = 1; interleaved-1f1b, interleaved-zb,
  looped-bfs: v = 2): rank r holds stages r, r + p, ...; the activations loop
  through the ranks v times.
- ``v`` (zbv, dualpipev: v = 2): rank r holds stages r and 2p - 1 - r; the
  activations go down the ranks and come back up, so rank 0 holds the first
  stage (embeddings) *and* the last (final LayerNorm, LM head, loss), and rank
  p - 1 holds two adjacent stages (p - 1 and p) that pass activations locally.

Bubble theory. Let f, b, w be the times of a rank's forward, input-gradient
backward (B) and weight-gradient backward (W) of one microbatch over all its
layers (a non-split backward takes b + w); a rank's work per step is
m (f + b + w). The idle time each schedule leaves on a rank, for equal
stages and free communication:

================  ==============================  ====================================
schedule          idle time per step              source
================  ==============================  ====================================
gpipe, 1f1b       (p - 1)(f + b + w)              fill and drain (Huang et al. 2019)
interleaved-1f1b  (p - 1)(f + b + w) / v          Narayanan et al. 2021
looped-bfs        (p - 1)(f + b + w) / v          Lamy-Poirier 2022 (m >= p)
interleaved-zb    (p - 1)(f + b - w) / v          ZB-H1 on v chunks (Qi et al. 2023)
zbv               (p - 1) max(0, f + b - 2w) / v  ZB-V (Qi et al. 2023, section 6)
dualpipev         (p - 1)(f + 2b - w) / v         DualPipe (DeepSeek-V3), no overlap
================  ==============================  ====================================

The zero-bubble schedules fill the fill-and-drain idle time with W
actions, which depend on nothing downstream. DeepSeek's DualPipe bubble is
(PP/2 - 1)(F&B + B - 3W) in chunk times with B the full backward; its V form
runs on p = PP/2 ranks, and without overlapping a forward with a backward
(no separate compute streams on CPU) F&B = F + B, which gives the row above.
``bubble_fraction`` is idle / (work + idle) with f = b = w (for matmuls the
input and weight gradients each cost about a forward): ZB-V then idles not
at all, interleaved-zb a third and dualpipev two thirds of interleaved 1F1B's
idle time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ScheduleSpec:
    """One ``--schedule``: its torch class, its stage placement and its bubble."""

    name: str
    torch_name: str
    """The name ``get_schedule_class`` knows it by."""
    stages_per_rank: int
    placement: str
    """``loop`` (rank r: r, r + p, ...) or ``v`` (rank r: r and 2p - 1 - r)."""
    split_backward: bool
    """Runs B (input gradients) and W (weight gradients) as separate actions."""
    idle: Callable[[int, float, float, float], float]
    """(p, f, b, w) -> idle time per step, with f, b, w a rank's F, B, W time per microbatch."""
    formula: str
    """``idle`` as text (the table above)."""


def _fill_drain(p: int, f: float, b: float, w: float) -> float:
    return (p - 1) * (f + b + w)


def _interleaved(p: int, f: float, b: float, w: float) -> float:
    return (p - 1) * (f + b + w) / 2


def _zb_h1(p: int, f: float, b: float, w: float) -> float:
    return (p - 1) * (f + b - w) / 2


def _zb_v(p: int, f: float, b: float, w: float) -> float:
    return (p - 1) * max(0.0, f + b - 2 * w) / 2


def _dualpipe_v(p: int, f: float, b: float, w: float) -> float:
    return (p - 1) * (f + 2 * b - w) / 2


SCHEDULES = {
    spec.name: spec
    for spec in (
        ScheduleSpec("gpipe", "GPipe", 1, "loop", False, _fill_drain, "(p-1)(f+b+w)"),
        ScheduleSpec("1f1b", "1F1B", 1, "loop", False, _fill_drain, "(p-1)(f+b+w)"),
        ScheduleSpec(
            "interleaved-1f1b", "Interleaved1F1B", 2, "loop", False, _interleaved, "(p-1)(f+b+w)/v"
        ),
        ScheduleSpec("looped-bfs", "LoopedBFS", 2, "loop", False, _interleaved, "(p-1)(f+b+w)/v"),
        ScheduleSpec(
            "interleaved-zb", "InterleavedZeroBubble", 2, "loop", True, _zb_h1, "(p-1)(f+b-w)/v"
        ),
        ScheduleSpec("zbv", "ZBVZeroBubble", 2, "v", True, _zb_v, "(p-1)max(0,f+b-2w)/v"),
        ScheduleSpec("dualpipev", "DualPipeV", 2, "v", True, _dualpipe_v, "(p-1)(f+2b-w)/v"),
    )
}
"""Every ``--schedule``, by name."""


def schedule_spec(name: str) -> ScheduleSpec:
    """The schedule called ``name`` (a KeyError for an unknown one: validate first)."""
    return SCHEDULES[name]


def schedule_class(name: str) -> type:
    """The ``torch.distributed.pipelining`` class that runs schedule ``name``."""
    # imported here: torch's pipelining imports its compiler (about 0.5 s of CPU), and every
    # rank and the planner read this module's placements and bubbles, not only pipelines
    from torch.distributed.pipelining.schedules import get_schedule_class

    return get_schedule_class(SCHEDULES[name].torch_name)


def stages_of_rank(pp_rank: int, pp: int, virtual: int, placement: str = "loop") -> list[int]:
    """Stage indices held by pipeline rank ``pp_rank``: looped (r, r + pp, ...) or, with
    ``placement`` ``v`` (two stages per rank), r and 2 pp - 1 - r."""
    if placement == "v":
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + k * pp for k in range(virtual)]


def rank_stages(schedule: str, pp: int, pp_rank: int) -> list[int]:
    """Stage indices pipeline rank ``pp_rank`` of ``pp`` holds under ``schedule``."""
    spec = SCHEDULES[schedule]
    return stages_of_rank(pp_rank, pp, spec.stages_per_rank, spec.placement)


def last_stage_rank(schedule: str, pp: int) -> int:
    """The pipeline rank holding the last stage (the LM head and the loss): 0 in V placement."""
    return 0 if SCHEDULES[schedule].placement == "v" else pp - 1


def bubble_fraction(schedule: str, stages: int, microbatches: int) -> float:
    """Theoretical idle fraction of a step: idle / (m (f + b + w) + idle), f = b = w.

    ``stages`` is p, the pipeline ranks; ``microbatches`` m.
    """
    idle = SCHEDULES[schedule].idle(stages, 1.0, 1.0, 1.0)
    return idle / (3 * microbatches + idle)


FORWARD_ACTIONS = frozenset({"F", "SEND_F", "RECV_F", "UNSHARD", "RESHARD"})
"""A schedule's actions that a forward-only pass keeps (computation types' values)."""


@contextlib.contextmanager
def forward_program(schedule: Any) -> Iterator[None]:
    """While open, an action-list schedule runs only its forward program: the forwards of
    its actions (the forward half of an overlapped forward-backward), their sends and
    receives, and FSDP's unshard and reshard.

    Why: torch 2.13's ``eval`` still runs a V-placed schedule's backward actions (zbv,
    dualpipev), which fail where two adjacent stages share a rank; without them the
    program is the same forwards in the same order. Schedules without an action list
    (gpipe, 1f1b) are left as they are: their ``eval`` works.
    """
    program = getattr(schedule, "pipeline_order_with_comms", None)
    if program is None:
        yield
        return
    schedule.pipeline_order_with_comms = {
        rank: [kept for action in actions for kept in _forward_part(action)]
        for rank, actions in program.items()
    }
    try:
        yield
    finally:
        schedule.pipeline_order_with_comms = program


def _forward_part(action: Any) -> list[Any]:
    """The part of one action a forward-only program keeps ([] for none of it)."""
    if action is None:
        return []
    if action.sub_actions is not None:  # an overlapped forward and backward
        return [kept for sub in action.sub_actions for kept in _forward_part(sub)]
    return [action] if action.computation_type.value in FORWARD_ACTIONS else []
