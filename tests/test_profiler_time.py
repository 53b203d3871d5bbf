"""The profiler's time breakdown, on hand-written Chrome traces (no processes).

Events are written as torch.profiler exports them: complete events (``ph`` "X") with
``ts`` and ``dur`` in microseconds, the rank's main thread and gloo's worker thread
as ``tid``s of one ``pid``, record_function spans in category ``user_annotation``,
ops in ``cpu_op``. One real profiled step checks that ``profiling_step`` writes a
trace ``profiler_breakdown`` reads.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.profiler import record_function

from distlab.measure.profiler_time import (
    CATEGORIES,
    MIN_WAIT_S,
    profiler_breakdown,
    profiling_step,
)

PID, MAIN, WORKER = 4242, 1, 2
SHORT = MIN_WAIT_S * 1e6 / 2
"""A stretch without ops shorter than a wait (us)."""


def op(name: str, start: float, end: float, tid: int = MAIN, cat: str = "cpu_op") -> dict:
    return {
        "ph": "X",
        "cat": cat,
        "name": name,
        "pid": PID,
        "tid": tid,
        "ts": start,
        "dur": end - start,
    }


def span(name: str, start: float, end: float, tid: int = MAIN) -> dict:
    """A record_function span."""
    return op(name, start, end, tid, cat="user_annotation")


def breakdown(*events: dict) -> dict[str, Any]:
    return profiler_breakdown({"traceEvents": [{"ph": "M", "name": "process_name"}, *events]})


def us(result: dict[str, Any]) -> dict[str, float]:
    """The categories, overlapped_comm and comm_s in microseconds, rounded."""
    values = {**result["by_category"], **{k: result[k] for k in ("overlapped_comm", "comm_s")}}
    return {k: round(v * 1e6, 6) for k, v in values.items() if v}


def assert_closes(result: dict[str, Any]) -> None:
    assert sum(result["by_category"].values()) == pytest.approx(result["wall_s"], rel=1e-9)


def test_a_step_without_communication_is_its_phases_and_host_time() -> None:
    result = breakdown(
        span("distlab:step", 0, 10_000),
        span("distlab:data", 100, 600),
        op("aten::slice", 150, 550),
        span("distlab:forward", 1000, 4000),
        op("aten::linear", 1000, 3900),  # 3900-4000 without ops: Python, still forward
        span("distlab:backward", 4000, 8000),
        op("autograd::engine::evaluate_function: MmBackward0", 4000, 7990),
        op("MmBackward0", 4010, 7980),
        op("aten::mm", 4020, 7970),
        span("distlab:optimizer", 8500, 9500),
        span("Optimizer.step#AdamW.step", 8550, 9450),
        op("aten::add_", 8600, 9400),
    )
    assert result["wall_s"] == pytest.approx(0.01)
    assert us(result) == {"data": 500, "compute": 7000, "optimizer": 1000, "host": 1500}
    assert result["overlap_fraction"] is None
    assert list(result["by_category"]) == list(CATEGORIES)


def ddp_bucket_step() -> list[dict]:
    """Backward issues one bucket's all-reduce, computes on, then waits for it."""
    return [
        span("distlab:step", 0, 10_000),
        span("distlab:forward", 0, 3000),
        op("aten::linear", 0, 3000),
        span("distlab:backward", 3000, 9000),
        op("aten::mm", 3000, 4000),
        op("c10d::allreduce_", 4000, 4200),  # issue: in flight from here
        span("gloo:all_reduce", 4300, 8000, tid=WORKER),
        op("aten::mm", 4200, 7000),
        op("aten::add", 7000 + SHORT, 7500),  # a short stretch before it: the engine's own time
        # 7500-8000: no op while the all-reduce is in flight: DDP's reducer waits for it
        op("torch.distributed.ddp.reducer::copy_bucket_to_grad", 8000, 9000),
        span("distlab:optimizer", 9000, 10_000),
        op("aten::add_", 9000, 10_000),
    ]


def test_ddp_bucket_overlaps_backward_and_its_wait_is_exposed() -> None:
    result = breakdown(*ddp_bucket_step())
    # Blocked: issuing (200) and waiting (500) while the all-reduce is in flight (4000-8000).
    assert us(result) == {
        "compute": 3000 + 6000 - 700,
        "exposed_comm": 700,
        "optimizer": 1000,
        "overlapped_comm": 3300,
        "comm_s": 4000,
    }
    assert result["overlap_fraction"] == pytest.approx(3300 / 4000)
    assert_closes(result)


def test_a_wait_op_blocks_however_short_and_only_while_communication_is_in_flight() -> None:
    result = breakdown(
        span("distlab:step", 0, 1000),
        span("distlab:forward", 0, 1000),
        op("_c10d_functional::all_reduce", 0, 100),
        op("c10d::allreduce_", 50, 90),
        span("gloo:all_reduce", 120, 330, tid=WORKER),
        op("aten::mm", 100, 300),
        op("_c10d_functional::wait_tensor", 300, 300 + SHORT),
        op("aten::mm", 300 + SHORT, 800),
        op("_c10d_functional::wait_tensor", 800, 900),  # nothing in flight: returns at once
        op("aten::add", 900, 1000),
    )
    # In flight from the c10d op's start (50) to 330: blocked issuing (50-100) and in the first
    # wait (300-330).
    assert us(result) == {
        "compute": 1000 - 80,
        "exposed_comm": 80,
        "overlapped_comm": 200,
        "comm_s": 280,
    }


def test_a_wait_in_an_autograd_hook_is_exposed() -> None:
    """FSDP2's pre-backward all-gather runs, and is waited for, inside the engine's wrapper."""
    result = breakdown(
        span("distlab:step", 0, 4000),
        span("distlab:backward", 0, 4000),
        op("autograd::engine::evaluate_function: AddBackward0", 0, 3000),
        span("FSDP::pre_backward (blocks.2)", 50, 2950),
        span("FSDP::all_gather (blocks.1)", 100, 2900),
        op("fsdp::all_gather_copy_in", 100, 1200),
        op("c10d::_allgather_base_", 1200, 1300),
        op("aten::empty", 1220, 1240),
        span("gloo:all_gather", 1350, 2800, tid=WORKER),
        op("AddBackward0", 2950, 2990),
        op("aten::mm", 3000, 4000),
    )
    # Blocked 1200-2800 less the op inside the issuing op (aten::empty, 20).
    assert us(result) == {
        "compute": 4000 - 1580,
        "exposed_comm": 1580,
        "overlapped_comm": 20,
        "comm_s": 1600,
    }
    assert_closes(result)


@pytest.mark.parametrize(
    ("phase", "expected"),
    [
        pytest.param(
            "distlab:forward_backward",
            {"compute": 6000, "bubble": 2000, "exposed_comm": 1000, "optimizer": 1000,
             "comm_s": 1000},
            id="pipeline: waiting for the peer is the bubble",
        ),
        pytest.param(
            "distlab:forward",
            {"compute": 6000, "exposed_comm": 3000, "optimizer": 1000, "comm_s": 3000},
            id="elsewhere (context parallelism's ring): communication",
        ),
    ],
)  # fmt: skip
def test_a_recv_is_the_bubble_only_in_a_pipeline(phase: str, expected: dict[str, float]) -> None:
    result = breakdown(
        span("distlab:step", 0, 10_000),
        span(phase, 0, 9000),
        op("aten::mm", 0, 1000),
        op("c10d::recv_", 1000, 1100),
        span("gloo:recv", 1100, 3000),  # on the calling thread, until the data is in
        op("aten::mm", 3000, 6000),
        op("c10d::allreduce_", 6000, 6100),
        span("gloo:all_reduce", 6100, 7000, tid=WORKER),
        op("aten::mm", 7000, 9000),
        span("distlab:optimizer", 9000, 10_000),
        op("aten::add_", 9000, 10_000),
    )
    assert us(result) == expected
    assert_closes(result)


def test_the_last_step_is_read_and_communication_is_clipped_to_it() -> None:
    result = breakdown(
        span("distlab:step", 0, 900),
        op("aten::mm", 0, 900),
        span("gloo:all_reduce", 850, 1300, tid=WORKER),
        span("distlab:step", 1000, 2000),
        span("distlab:forward", 1000, 2000),
        op("aten::mm", 1300, 2000),
    )
    assert result["wall_s"] == pytest.approx(1e-3)
    assert us(result) == {"compute": 700, "exposed_comm": 300, "comm_s": 300}


def test_nccl_kernels_are_the_communication_on_a_gpu() -> None:
    """Synthetic: NCCL's kernel names as 2.19+ writes them, not checked against a GPU here."""
    kernel = {"pid": 0, "tid": 7, "cat": "kernel"}
    result = breakdown(
        span("distlab:step", 0, 3000),
        {**span("distlab:step", 200, 3100), **kernel, "cat": "gpu_user_annotation"},
        span("distlab:backward", 0, 2000),
        op("aten::mm", 0, 2000),
        {**op("ncclDevKernel_AllReduce_Sum_f32_RING_LL(ncclDevKernelArgsStorage<4096ul>)",
              1000, 2500), **kernel},
        span("distlab:optimizer", 2000, 3000),
        op("cudaStreamSynchronize", 2000, 2500, cat="cuda_runtime"),
        op("aten::add_", 2500, 3000),
    )  # fmt: skip
    assert us(result) == {
        "compute": 2000,
        "exposed_comm": 500,
        "optimizer": 500,
        "overlapped_comm": 1000,
        "comm_s": 1500,
    }


def test_a_trace_without_a_step_span_is_refused() -> None:
    with pytest.raises(ValueError, match="distlab:step"):
        breakdown(op("aten::mm", 0, 10))


@pytest.mark.slow  # the first profiler session in a process starts Kineto: about 2 s
def test_profiling_step_exports_a_trace_that_profiler_breakdown_reads(tmp_path) -> None:
    path = tmp_path / "profile" / "rank0.json"
    with profiling_step(path):
        with record_function("distlab:step"), record_function("distlab:forward"):
            torch.ones(64, 64).mm(torch.ones(64, 64))
    result = profiler_breakdown(path)
    assert result["by_category"]["compute"] > 0
    assert result["comm_s"] == 0
    assert_closes(result)


# --- Any layout: the categories partition the step ------------------------------------------

PHASES = [
    "distlab:data",
    "distlab:forward",
    "distlab:backward",
    "distlab:optimizer",
    "distlab:forward_backward",
]
MAIN_OPS = ["aten::mm", "c10d::allreduce_", "_c10d_functional::wait_tensor", "c10d::recv_"]


@st.composite
def layouts(draw: st.DrawFn) -> list[dict]:
    """A step of 1000 us: phase spans and main-thread ops each laid end to end (some gaps),
    worker collectives and point-to-point spans anywhere, even across the step's edges."""
    events = [span("distlab:step", 0, 1000)]
    for kinds, make in ((PHASES, span), (MAIN_OPS, op)):
        cuts = sorted(draw(st.sets(st.integers(0, 1000), max_size=16)))
        for start, end in zip(cuts, cuts[1:], strict=False):
            name = draw(st.sampled_from([*kinds, None]))
            if name is not None:
                events.append(make(name, start, end))
    interval = st.tuples(st.integers(-200, 1200), st.integers(1, 600))
    for start, length in draw(st.lists(interval, max_size=5)):
        events.append(span("gloo:all_reduce", start, start + length, tid=WORKER))
    for start, length in draw(st.lists(interval, max_size=2)):
        events.append(span("gloo:recv", start, start + length, tid=MAIN + 10))
    return events


@settings(deadline=None, max_examples=60)
@given(layouts())
def test_the_categories_add_up_to_the_step(events: list[dict]) -> None:
    result = breakdown(*events)
    assert_closes(result)
    assert min(result["by_category"].values()) >= 0
    exposed = result["by_category"]["exposed_comm"]
    assert exposed + result["overlapped_comm"] == pytest.approx(result["comm_s"], abs=1e-12)
    if not any(e["name"] == "distlab:forward_backward" for e in events):
        assert result["by_category"]["bubble"] == 0
