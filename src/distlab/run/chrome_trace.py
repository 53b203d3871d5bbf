"""Every rank's time-tracked steps as one Chrome trace (``RUN_DIR/trace.json``).

The Trace Event Format (https://docs.google.com/document/d/1CvAClvFfyA5R-PhYUmn5OOQtYMH4h6I0nSsKchNAySU)
that Perfetto (ui.perfetto.dev) and chrome://tracing open: one process per rank,
with tracks for the step, its phases (data, forward, backward, optimizer), where
its time went (the breakdown's pieces: compute, exposed_comm, ...), its
collectives from issue to completion, with their kind, group and bytes, and a
pipeline schedule's actions (F, B, W of each micro-batch, with its stage).
Collectives overlap one another, so they are async events (each its own slice);
a send/recv, whose completion gloo does not report, is an instant at its issue.
Ranks share one clock: each step's wall-clock start (``t0_unix``) places it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from distlab.run.files import TRACE_FILE

TRACKS = ("step", "phases", "time", "collectives", "pipeline")
"""The tracks (threads) of each rank's process, top to bottom."""


def write_chrome_trace(run_dir: Path, ranks: list[dict[str, Any]]) -> Path | None:
    """Write ``trace.json`` from every rank's ``{"rank", "steps"}`` record (what
    ``ranks/time_rank<r>.json`` holds); None when no step was tracked."""
    if not any(rank["steps"] for rank in ranks):
        return None
    origin = min(step["t0_unix"] for rank in ranks for step in rank["steps"])
    events: list[dict[str, Any]] = []
    for rank in ranks:
        events += _rank_events(rank, origin)
    path = Path(run_dir) / TRACE_FILE
    path.write_text(json.dumps({"traceEvents": events, "displayTimeUnit": "ms"}))
    return path


def _rank_events(rank: dict[str, Any], origin: float) -> list[dict[str, Any]]:
    pid = rank["rank"]
    events: list[dict[str, Any]] = [_meta("process_name", pid, 0, f"rank {pid}")]
    events += [_meta("process_sort_index", pid, 0, pid)]
    events += [_meta("thread_name", pid, tid, name) for tid, name in enumerate(TRACKS)]
    for step in rank["steps"]:
        base = (step["t0_unix"] - origin) * 1e6
        by_category = {k: round(v * 1e3, 3) for k, v in step["by_category"].items()}
        slices = [(0, f"step {step['step']}", 0.0, step["wall_s"], {"ms": by_category})]
        slices += [(1, s["name"], s["start"], s["end"], {}) for s in step["spans"]]
        slices += [(2, p["category"], p["start"], p["end"], {}) for p in step["segments"]]
        slices += [
            (4, f"{a['kind']}{a['microbatch']}", a["start"], a["end"], {"stage": a["stage"]})
            for a in step.get("actions", [])
        ]
        for tid, name, start, end, args in slices:
            events.append(
                {
                    "ph": "X",
                    "pid": pid,
                    "tid": tid,
                    "name": name,
                    "cat": TRACKS[tid],
                    "ts": base + start * 1e6,
                    "dur": (end - start) * 1e6,
                    "args": args,
                }
            )
        for index, comm in enumerate(step["comms"]):
            events += _collective(pid, base, f"{pid}.{step['step']}.{index}", comm)
    return events


def _collective(pid: int, base: float, ident: str, comm: dict[str, Any]) -> list[dict[str, Any]]:
    """An async slice from issue to completion (an instant where the completion is unknown)."""
    common = {"pid": pid, "tid": 3, "name": comm["kind"], "cat": "collective"}
    args = {"group": comm["group"], "bytes": comm["bytes"], "completion": comm["completion"]}
    start = base + comm["issue"] * 1e6
    if comm["done"] is None:
        return [{**common, "ph": "i", "s": "t", "ts": start, "args": args}]
    end = base + comm["done"] * 1e6
    return [
        {**common, "ph": "b", "id": ident, "ts": start, "args": args},
        {**common, "ph": "e", "id": ident, "ts": end},
    ]


def _meta(name: str, pid: int, tid: int, value: str | int) -> dict[str, Any]:
    key = "sort_index" if name.endswith("sort_index") else "name"
    return {"ph": "M", "pid": pid, "tid": tid, "name": name, "args": {key: value}}
