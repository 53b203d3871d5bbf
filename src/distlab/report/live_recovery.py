"""What a live-recovered run (``--ft live``) cost: its loss bound, the survivor's lost time.

The bound. Let R replicas train, replica r on its B/R rows of each step's fixed batch.
In a step where only k of them take part, the loss and the gradient are means over
those k B/R rows instead of all B. So, at step s, against the uninterrupted run:

1. sampling: if the parameters are still the uninterrupted run's, the reported loss is
   the mean of the present replicas' losses, and
   ``L_k - L = (1 - k/R) (mean of present - mean of absent)``, at most
   ``(1 - k/R) * spread_s`` in size, spread_s the largest minus the smallest replica
   loss of step s in the uninterrupted run;
2. drift: each short step t moves the parameters by another update. Under SGD with
   clipping at c the two updates differ by at most ``lr_t (min(c, g_t) + min(c, g*_t))``
   (g, g*: the live and uninterrupted gradient norms), so the parameters drift by at most
   ``D_s``, their sum over the short steps before s, and to first order the loss moves by
   at most ``g*_s D_s``.

``bound_s = (1 - k_s/R) spread_s + g*_s D_s``. The drift part is first order (it leaves
out how later steps' curvature grows or shrinks the drift), and holds for SGD only: an
AdamW update is normalised per coordinate, so its size says nothing of the gradient's.
Once every replica is back (k = R) only the drift is left, and as the drift is bounded
by the short steps' updates, the run converges to the same loss at the learning rate's
pace.
"""

from __future__ import annotations

import statistics
from itertools import pairwise
from typing import Any


def loss_bound(
    live: list[dict[str, Any]], reference: list[dict[str, Any]], nproc: int, grad_clip: float
) -> list[float]:
    """Each step's bound on |live loss - uninterrupted loss| (SGD; module docstring).

    ``live``, ``reference``: the two runs' ``metrics.jsonl`` lines; the reference is an
    uninterrupted ``--ft live`` run, whose ``replica_losses`` give each step's spread.
    """
    clip = grad_clip if grad_clip > 0 else float("inf")
    bounds, drift = [], 0.0
    for mine, theirs in zip(live, reference, strict=True):
        losses = [loss for loss in theirs["replica_losses"] if loss is not None]
        spread = max(losses) - min(losses)
        short = 1 - mine["replicas"] / nproc
        bounds.append(short * spread + theirs["grad_norm"] * drift)
        if short:
            updates = min(clip, mine["grad_norm"]) + min(clip, theirs["grad_norm"])
            drift += theirs["lr"] * updates
    return bounds


def survivor_time_lost(metrics: list[dict[str, Any]]) -> dict[str, Any]:
    """Replica 0's seconds lost to a fault, on the clock: at each step where the quorum
    shrank or grew back (a heal), the time since the step before it was recorded minus the
    median of that time over the other steps. The clock (each line's ``time``) counts what
    the step's own figures leave out: its attempts that failed and were run again."""
    gaps = {b["step"]: b["time"] - a["time"] for a, b in pairwise(metrics)}
    changed = [b["step"] for a, b in pairwise(metrics) if b["replicas"] != a["replicas"]]
    steady = [gap for step, gap in gaps.items() if step not in changed] or list(gaps.values())
    median = statistics.median(steady)
    return {
        "median_step_s": median,
        "steps": {step: round(gaps[step] - median, 4) for step in changed},
        "lost_s": sum(gaps[step] - median for step in changed),
    }
