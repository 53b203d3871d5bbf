"""Which steps a run measures closely: ``--track-memory`` and ``--track-time``.

Both trackers cost their steps something (the memory tracker runs every op through
torch's dispatch; the timeline reads clocks at every event), so by default each takes
a sample: the memory tracker the run's last step, the timeline the last step the memory
tracker leaves alone, and each an early step of a long run.
"""

from __future__ import annotations

from distlab.config import Config
from distlab.strategies.pipeline_schedules import schedule_spec

EARLY_SAMPLE_STEPS = 10
"""``--track-memory sample`` tracks a process's second step only if more steps follow it."""


def tracks_memory(config: Config, step: int, steps_done: int) -> bool:
    """Whether ``step`` runs inside torch's memory tracker (``--track-memory``).

    ``sample``: the run's last step (the summary's), and, in a process with more than
    ``EARLY_SAMPLE_STEPS`` steps still to run after it, the second step it runs (the first
    steady one: a fresh run's first step creates the optimizer state, so it holds less),
    so a long run or a restart shows its memory early. In a shorter one the last step
    comes moments later and would repeat it: a parity run of 5 steps tracks 1 step, not 2.
    Never under ``--compile``: a tracker is a dispatch mode, and torch.compile
    does not compile a frame while one is active (the blocks would run eagerly).
    Never under a pipeline schedule that splits the backward into input and weight
    gradients (zbv, dualpipev, interleaved-zb): the tracker's multi-grad hooks on
    module inputs make that ``autograd.grad`` fail in torch 2.13.
    """
    if config.track_memory == "off" or config.compile:
        return False
    if schedule_spec(config.schedule).split_backward:
        return False
    early = steps_done == 1 and config.steps - 1 - step > EARLY_SAMPLE_STEPS
    return config.track_memory == "every" or early or step == config.steps - 1


EARLY_TIME_SAMPLE_STEP = 2
"""``--track-time sample`` takes a process's third step early (the memory tracker its second)."""


def tracks_time(config: Config, step: int, steps_done: int) -> bool:
    """Whether ``step`` records its timeline (``--track-time``).

    ``sample``: the run's last step that the memory tracker leaves alone (a tracked step
    runs every op through torch's tracker: its time is not the step's), and, in a process
    with more than ``EARLY_SAMPLE_STEPS`` steps still to run after it, its third step (the
    first two carry one-time costs and the memory sample), so a long run shows its time early.
    """
    if config.track_time == "off":
        return False
    if config.track_time == "every":
        return True
    last_free = config.steps - 1 - int(tracks_memory(config, config.steps - 1, 0))
    early = steps_done == EARLY_TIME_SAMPLE_STEP and config.steps - 1 - step > EARLY_SAMPLE_STEPS
    return step == last_free or early
