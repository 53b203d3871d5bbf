"""The time lab: a step's wall time split by category (``distlab.measure.timeline``).

The attribution is checked on hand-made timelines (no processes); the closure, on the
shared parity runs of every strategy family (``tests/test_memory.py``'s, reused), and
the merged Chrome trace on a 4-rank one.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.test_memory import NEEDS, PEAK_RUNS

from distlab.measure.timeline import CATEGORIES, Collective, StepTimeline
from distlab.report.parity import _run_name, _run_once, parity_config
from distlab.strategies.resolve import load_config
from distlab.train.sampling import EARLY_SAMPLE_STEPS, tracks_memory, tracks_time

MS = 1e-3
NS = 1_000_000  # nanoseconds in a millisecond


def timeline(marks, spans=(), comms=(), calls=()) -> StepTimeline:
    """A recorded step: ``marks`` as (ms, thread CPU ms, run-queue ms), spans, collectives and
    communication calls in ms (no clock is read: the attribution alone)."""
    step = StepTimeline(step=3, clock=None)  # type: ignore[arg-type]
    step.marks = [(t * MS, int(cpu * NS), int(queue * NS)) for t, cpu, queue in marks]
    step.wall_s = max(t for t, _, _ in marks) * MS
    step.spans = [(name, start * MS, end * MS) for name, start, end in spans]
    step.comms = [Collective(kind, "g[2]", 64, a * MS, b * MS) for kind, a, b in comms]
    step.calls = [(a * MS, b * MS, p2p) for a, b, p2p in calls]
    return step


def ms(breakdown: dict) -> dict[str, float]:
    return {k: round(v / MS, 6) for k, v in breakdown["by_category"].items()}


def test_blocked_under_a_collective_is_exposed_running_under_it_is_overlapped() -> None:
    # backward 0-10 ms: runs 6 ms while an all-reduce (issued at 4) is in flight until 10,
    # then blocks 0 ms; optimizer 10-14 blocked 2 ms waiting for the last all-reduce
    step = timeline(
        marks=[(0, 0, 0), (4, 4, 0), (10, 10, 0), (12, 11, 0), (14, 12, 0), (15, 13, 0)],
        spans=[("backward", 0, 10), ("optimizer", 10, 14)],
        comms=[("all_reduce", 4, 10), ("all_reduce", 12, 14)],
    )
    result = step.breakdown()
    assert ms(result) == {
        "compute": 10.0, "exposed_comm": 1.0, "bubble": 0.0, "data": 0.0, "optimizer": 3.0,
        "host": 1.0,
    }  # fmt: skip
    assert result["overlapped_comm"] == pytest.approx(7 * MS)  # 6 in backward, 1 in optimizer
    assert result["comm_s"] == pytest.approx(8 * MS)
    assert result["overlap_fraction"] == pytest.approx(7 / 8)


def test_a_pipeline_waiting_only_for_a_peer_is_bubble_and_a_wait_for_a_core_is_not_blocked() -> (
    None
):
    step = timeline(
        # 0-5: runs 2, waits 1 for a core, blocked 2 on a recv; 5-8: blocked on a broadcast
        marks=[(0, 0, 0), (5, 2, 1), (8, 2, 1), (9, 3, 1)],
        spans=[("forward_backward", 0, 8)],
        comms=[("recv", 0, 5), ("broadcast", 5, 8)],
    )
    result = step.breakdown()
    assert ms(result) == {
        "compute": 3.0, "exposed_comm": 3.0, "bubble": 2.0, "data": 0.0, "optimizer": 0.0,
        "host": 1.0,
    }  # fmt: skip
    assert result["cpu_contention_s"] == pytest.approx(1 * MS)


def test_time_inside_a_communication_call_is_communication_even_on_a_core() -> None:
    # forward 0-6: issuing an all-gather 1-3 (on a core throughout: copying, waking gloo),
    # then computing under it until 5; a wait for a recv 6-8 in forward_backward is bubble
    step = timeline(
        marks=[(0, 0, 0), (1, 1, 0), (3, 3, 0), (5, 5, 0), (6, 6, 0), (8, 7, 1)],
        spans=[("forward", 0, 6), ("forward_backward", 6, 8)],
        comms=[("all_gather", 1, 5), ("recv", 6, 8)],
        calls=[(1, 3, False), (6, 8, True)],
    )
    result = step.breakdown()
    assert ms(result)["exposed_comm"] == 2.0 and ms(result)["bubble"] == 2.0
    assert ms(result)["compute"] == 4.0
    assert result["overlapped_comm"] == pytest.approx(2 * MS)  # 3-5 only


def test_a_collective_that_completes_after_the_step_is_not_in_its_time() -> None:
    step = timeline(marks=[(0, 0, 0), (2, 2, 0), (4, 2, 0)], comms=[("all_gather", 2, 4)])
    step.marks.append((6 * MS, 2 * NS, 0))  # its completion, reported after the step ended
    step.wall_s = 4 * MS
    result = step.breakdown()
    assert sum(result["by_category"].values()) == pytest.approx(4 * MS)
    assert result["by_category"]["exposed_comm"] == pytest.approx(2 * MS)


@st.composite
def recorded_steps(draw: st.DrawFn) -> StepTimeline:
    """Random marks (the CPU clock never runs faster than the wall), phases, collectives and
    communication calls."""
    times = sorted(set(draw(st.lists(st.integers(1, 200), min_size=1, max_size=30))))
    marks, cpu, queue = [(0, 0, 0)], 0, 0
    for before, now in zip([0, *times], times, strict=False):
        ran = draw(st.integers(0, now - before))
        cpu, queue = cpu + ran, queue + draw(st.integers(0, now - before - ran))
        marks.append((now, cpu, queue))
    edges = sorted(draw(st.lists(st.sampled_from([0, *times]), max_size=6)))
    names = st.sampled_from(["data", "forward", "backward", "forward_backward", "optimizer"])
    spans = [(draw(names), a, b) for a, b in zip(edges[::2], edges[1::2], strict=False)]
    kinds = st.sampled_from(["all_reduce", "recv", "all_gather"])
    comms = [
        (draw(kinds), *sorted(draw(st.lists(st.sampled_from([0, *times]), min_size=2, max_size=2))))
        for _ in range(draw(st.integers(0, 4)))
    ]
    calls = [
        (*sorted(draw(st.lists(st.sampled_from([0, *times]), min_size=2, max_size=2))), p2p)
        for p2p in draw(st.lists(st.booleans(), max_size=3))
    ]
    return timeline(marks, spans, comms, calls)


@settings(max_examples=200, deadline=None)
@given(recorded_steps())
def test_the_categories_partition_the_step(step: StepTimeline) -> None:
    result = step.breakdown()
    assert set(result["by_category"]) == set(CATEGORIES)
    assert all(v >= 0 for v in result["by_category"].values())
    assert sum(result["by_category"].values()) == pytest.approx(step.wall_s, abs=1e-12)
    assert 0 <= result["overlapped_comm"] <= result["comm_s"] + 1e-12
    pieces = sum(s["end"] - s["start"] for s in result["segments"])
    assert pieces == pytest.approx(step.wall_s, abs=1e-12)


@pytest.mark.parametrize(("steps", "restart_at"), [(2, 0), (5, 0), (5, 3), (40, 0), (40, 3)])
def test_time_samples_avoid_the_memory_tracked_steps(steps: int, restart_at: int) -> None:
    """A process that starts at ``restart_at``: ``sample`` times the last step the memory
    tracker leaves alone and, where many steps follow, the process's third; ``every`` all."""
    fields = {"strategy": "ddp", "nproc": 2, "steps": steps}
    config = load_config(None, fields)
    process = list(enumerate(range(restart_at, steps)))
    timed = [step for done, step in process if tracks_time(config, step, done)]
    memory = [step for done, step in process if tracks_memory(config, step, done)]
    early = restart_at + 2
    expected = ([early] if steps - 1 - early > EARLY_SAMPLE_STEPS else []) + [steps - 2]
    assert timed == expected and not set(timed) & set(memory)
    untracked_memory = load_config(None, {**fields, "track_memory": "off"})
    assert tracks_time(untracked_memory, steps - 1, len(process) - 1)
    every = load_config(None, {**fields, "track_time": "every"})
    off = load_config(None, {**fields, "track_time": "off"})
    assert all(tracks_time(every, step, done) for done, step in process)
    assert not any(tracks_time(off, step, done) for done, step in process)


TIME_RUNS = [
    *PEAK_RUNS[:9],  # single, every data-parallel flavour at 2 ranks, pp
    ("hsdp", 4, "adamw", {"dp_replicate": 2, "dp_shard": 2, "global_batch": 16}),
    ("tp", 2, "adamw", {"tp": 2}),
    ("fsdp+tp", 4, "sgd", {"tp": 2}),
    ("cp", 2, "adamw", {}),
    ("ep", 2, "sgd", {"model": "tiny-moe"}),
]
"""Shared parity runs (tests/test_memory.py's, the model-parallel, context and expert
parity tests'): every strategy family."""

CLOSURE = 0.02
"""The categories' sum against the measured step time (``step_time_s``, the issue's goal). A
tracked step's time is the window its timeline splits (``StepClock``), so a miss means
pieces lost or counted twice."""


def _shared_run(strategy: str, nproc: int, optimizer: str, fields: dict, workdir: Path) -> dict:
    for prefix, module in NEEDS.items():
        if strategy.startswith(prefix):
            pytest.importorskip(module)
    config = parity_config(strategy, nproc, optimizer, **fields)
    run_dir = _run_once(config, workdir / _run_name(config))
    return json.loads((run_dir / "summary.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize(("strategy", "nproc", "optimizer", "fields"), TIME_RUNS)
def test_every_ranks_breakdown_closes_on_its_step_time(
    strategy: str, nproc: int, optimizer: str, fields: dict, parity_workdir: Path
) -> None:
    summary = _shared_run(strategy, nproc, optimizer, fields, parity_workdir)
    entries = summary["time_breakdown_by_rank"]
    assert sorted(e["rank"] for e in entries) == list(range(nproc))  # one sampled step each
    for entry in entries:
        parts = entry["by_category"]
        assert set(parts) == set(CATEGORIES) and min(parts.values()) >= 0, entry
        total = sum(parts.values())
        assert abs(total - entry["step_time_s"]) <= CLOSURE * entry["step_time_s"], entry
        assert parts["compute"] > 0 and parts["optimizer"] > 0, entry
        if nproc == 1:
            assert entry["comm_s"] == 0 and parts["exposed_comm"] == 0, entry
        else:  # every layout here communicates in a step; what it waited for is part of it
            assert 0 < parts["exposed_comm"] <= entry["comm_s"] + 1e-9, entry
        if "pp" not in strategy:
            assert parts["bubble"] == 0, entry
    if "pp" in strategy:  # the schedule's actions: a forward and a backward per micro-batch
        record = json.loads((Path(summary["run_dir"]) / "ranks" / "time_rank0.json").read_text())
        actions = [(a["kind"], a["microbatch"]) for a in record["steps"][-1]["actions"]]
        microbatches = {mb for _, mb in actions}
        assert sorted(actions) == sorted((k, mb) for k in "BF" for mb in microbatches), actions


@pytest.mark.slow
def test_the_trace_has_a_process_per_rank_and_every_collective(parity_workdir: Path) -> None:
    strategy, nproc, optimizer, fields = TIME_RUNS[9]  # hsdp on 4 ranks
    summary = _shared_run(strategy, nproc, optimizer, fields, parity_workdir)
    run_dir = Path(summary["run_dir"])
    events = json.loads((run_dir / "trace.json").read_text())["traceEvents"]
    names = {e["pid"]: e["args"]["name"] for e in events if e["name"] == "process_name"}
    assert names == {r: f"rank {r}" for r in range(nproc)}
    for rank in range(nproc):
        record = json.loads((run_dir / "ranks" / f"time_rank{rank}.json").read_text())
        [step] = record["steps"]
        mine = [e for e in events if e["pid"] == rank]
        begun = [e for e in mine if e["ph"] in ("b", "i")]
        assert len(begun) == len(step["comms"]) > 0
        assert sum(e["args"]["bytes"] for e in begun) == sum(c["bytes"] for c in step["comms"])
        pieces = [e for e in mine if e["ph"] == "X" and e["tid"] == 2]
        assert sum(e["dur"] for e in pieces) == pytest.approx(step["wall_s"] * 1e6)


AGREEMENT = 0.10
"""distlab's and the profiler's breakdowns of the same step, each category within this share
of the step's wall time (the issue's goal): two instruments, one step."""

PROFILED = [
    ("ddp", {}),
    ("fsdp", {}),
    ("tp", {"tp": 2}),
    ("pp", {"pp": 2}),
]
"""2-rank runs with ``--profile``: data parallel (replicated and sharded), tensor and pipeline
parallel (the profiler's first session in a rank costs about 2 s, so a few runs).

They train the ``small`` model, not ``tiny``: a rank the OS takes off its core between two
ops is computing to the timeline (its phase is forward) and idle host time to the profiler
(no op runs), so one such pause moves a category in one instrument only. On the tiny model's
50-160 ms steps one pause of 10-12 ms did (profiler host 13.8 ms, timeline 2.0 ms): 2 of 6
sessions of these 4 tests failed here. On the small model's 150-620 ms steps the worst
category was 4.3% apart in 6 of 6 sessions, and the walls 0.1%; but in a fresh-clone CI run
ddp's rank 0 (a 354 ms step) opened or closed its profiler span 4.9 ms off the timeline's,
1.4% against the 1% allowed. At a global batch of 32 rows (600-1,200 ms steps) three
sessions here had the walls at most 2.0 ms (0.3%) apart and the worst category 2.8%."""


@pytest.mark.slow
@pytest.mark.parametrize(("strategy", "fields"), PROFILED)
@pytest.mark.alone
def test_the_profiler_and_the_timeline_agree_on_the_same_step(
    strategy: str, fields: dict, parity_workdir: Path
) -> None:
    config = parity_config(
        strategy, 2, "sgd", steps=4, profile=True, model="small", global_batch=32, **fields
    )
    run_dir = _run_once(config, parity_workdir / f"profiled-{_run_name(config)}")
    summary = json.loads((run_dir / "summary.json").read_text())
    theirs = {(e["rank"], e["step"]): e for e in summary["profiler_time_breakdown_by_rank"]}
    assert len(theirs) == len(summary["time_breakdown_by_rank"]) == 2
    for mine in summary["time_breakdown_by_rank"]:
        other = theirs[(mine["rank"], mine["step"])]
        wall = mine["wall_s"]
        # The same step, two clocks: the profiler's span opens right after the timeline begins
        # and closes right before it ends, so it is shorter by the span's own opening and closing
        # (0.11-0.18 ms measured here), never longer (clock conversion: microseconds).
        assert wall - max(0.01 * wall, 1e-3) <= other["wall_s"] <= wall + 50e-6
        for category in CATEGORIES:
            gap = abs(mine["by_category"][category] - other["by_category"][category])
            assert gap <= AGREEMENT * wall, (category, mine, other)
        assert (run_dir / "profile" / f"rank{mine['rank']}.json").is_file()
