"""The time pictures and the time table, drawn from hand-written time lab files (no training).

Two ranks of a ddp-like step (ms; rank 1 starts 3 ms after rank 0):

    rank 0: data 0-5, forward 5-35, backward 35-80, waits for its last bucket 80-88,
            optimizer 88-98, host 98-100; all_reduce 50-70 and 72-88, an all_gather
            issued at 95 and not done at the step's end
    rank 1: data 0-4, forward 4-32, backward 32-83, waits 83-85, optimizer 85-95,
            host 95-97; all_reduce 47-67 and 80-85, all_gather issued at 92, not done
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tests.test_compare import make_run
from tests.test_memory_timeline import png_size

from distlab.errors import DistlabError
from distlab.measure.time_gantt import comm_sublanes
from distlab.measure.timeline import CATEGORIES
from distlab.report.compare import main as compare_main
from distlab.report.markdown import time_section
from distlab.report.runs import load_runs
from distlab.report.time_plots import (
    draw_run_gantt,
    draw_time_breakdown_bars,
    last_step_breakdown,
    run_title,
    time_breakdown_markdown,
    time_breakdown_rows,
)

T0 = 1_700_000_000.0
BLOCKED = ("exposed_comm", "bubble")

RANK_STEPS = {
    0: (
        0.0,
        [
            ("data", 0, 5),
            ("compute", 5, 80),
            ("exposed_comm", 80, 88),
            ("optimizer", 88, 98),
            ("host", 98, 100),
        ],
        [("data", 0, 5), ("forward", 5, 35), ("backward", 35, 80), ("optimizer", 88, 98)],
        [("all_reduce", 50, 70), ("all_reduce", 72, 88), ("all_gather", 95, None)],
    ),
    1: (
        0.003,
        [
            ("data", 0, 4),
            ("compute", 4, 83),
            ("exposed_comm", 83, 85),
            ("optimizer", 85, 95),
            ("host", 95, 97),
        ],
        [("data", 0, 4), ("forward", 4, 32), ("backward", 32, 83), ("optimizer", 85, 95)],
        [("all_reduce", 47, 67), ("all_reduce", 80, 85), ("all_gather", 92, None)],
    ),
}


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[tuple[float, float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def fake_step(step: int, rank: int, stretch: float = 1.0) -> dict:
    """One tracked step of ``rank`` as the contract writes it (seconds; times ``stretch``)."""
    offset, parts, spans, comms = RANK_STEPS[rank]
    ms = 0.001 * stretch
    wall = parts[-1][2] * ms
    in_flight = _union([(i * ms, wall if d is None else d * ms) for _, i, d in comms])
    working = [(s * ms, e * ms) for c, s, e in parts if c not in BLOCKED]
    overlapped = [
        (max(a, c), min(b, d)) for a, b in in_flight for c, d in working if min(b, d) > max(a, c)
    ]
    by_category = dict.fromkeys(CATEGORIES, 0.0)
    for category, start, end in parts:
        by_category[category] += (end - start) * ms
    comm_s = sum(e - s for s, e in in_flight)
    overlapped_s = sum(e - s for s, e in overlapped)
    return {
        "step": step,
        "t0_unix": T0 + 10 * step + offset,
        "wall_s": wall,
        "spans": [
            {"name": "distlab:step", "start": 0.0, "end": wall},
            *({"name": f"distlab:{n}", "start": s * ms, "end": e * ms} for n, s, e in spans),
        ],
        "comms": [
            {
                "kind": kind,
                "group": "mesh_dp[2]",
                "bytes": 1 << 20,
                "issue": issue * ms,
                "done": None if done is None else done * ms,
            }
            for kind, issue, done in comms
        ],
        "segments": [
            *({"start": s * ms, "end": e * ms, "category": c} for c, s, e in parts),
            *({"start": s, "end": e, "category": "overlapped"} for s, e in overlapped),
        ],
        "by_category": by_category,
        "overlapped_comm": overlapped_s,
        "comm_s": comm_s,
        "overlap_fraction": overlapped_s / comm_s if comm_s else None,
        "cpu_contention_s": 0.0,
    }


def add_time_lab(run_dir: Path, summary: dict | None = None) -> Path:
    """Write ``ranks/time_rank<r>.json`` (steps 3 and 4, step 3 five times slower) for 2 ranks
    into ``run_dir`` and their breakdown into its summary.json (``summary`` if it has none)."""
    (run_dir / "ranks").mkdir(parents=True, exist_ok=True)
    breakdown = []
    for rank in RANK_STEPS:
        steps = [fake_step(3, rank, stretch=5.0), fake_step(4, rank)]
        (run_dir / "ranks" / f"time_rank{rank}.json").write_text(
            json.dumps({"rank": rank, "steps": steps})
        )
        keys = ("step", "wall_s", "by_category", "overlapped_comm", "comm_s", "overlap_fraction")
        breakdown += [{"rank": rank, **{k: s[k] for k in keys}} for s in steps]
    file = run_dir / "summary.json"
    summary = json.loads(file.read_text()) if file.is_file() else dict(summary or {})
    summary["time_breakdown_by_rank"] = breakdown
    file.write_text(json.dumps(summary))
    return run_dir


def test_the_fake_steps_add_up() -> None:
    step = fake_step(4, 0)
    assert sum(step["by_category"].values()) == pytest.approx(step["wall_s"])
    assert step["comm_s"] == pytest.approx(0.041)  # 20 + 16 + 5 ms in flight
    assert step["overlapped_comm"] == pytest.approx(0.033)  # all but the 8 ms waited


def test_gantt_draws_each_ranks_last_step(tmp_path: Path) -> None:
    run = add_time_lab(tmp_path / "ddp-2", {"strategy": "ddp", "nproc": 2})
    picture = draw_run_gantt(run)
    assert picture == run / "time_rank_gantt.png"
    width, height = png_size(picture)
    assert width > height > 200
    assert run_title(run) == "ddp x2"
    other = draw_run_gantt(run, tmp_path / "out" / "g.png")
    assert png_size(other) == (width, height)


def test_gantt_title_falls_back_to_the_config_then_the_dir(tmp_path: Path) -> None:
    run = add_time_lab(tmp_path / "r")
    (run / "summary.json").write_text("{not json")
    assert run_title(run) == "r"
    (run / "config.yaml").write_text("strategy: fsdp\nnproc: 2\n")
    assert run_title(run) == "fsdp x2"


def test_gantt_without_time_files_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(DistlabError, match="no time-tracked step"):
        draw_run_gantt(tmp_path)
    (tmp_path / "ranks").mkdir()
    (tmp_path / "ranks" / "time_rank0.json").write_text('{"rank": 0, "steps": []}')
    with pytest.raises(DistlabError, match="no time-tracked step"):
        draw_run_gantt(tmp_path)
    (tmp_path / "ranks" / "time_rank1.json").write_text("{")
    with pytest.raises(DistlabError, match="time_rank1.json is corrupt"):
        draw_run_gantt(tmp_path)


def test_concurrent_collectives_get_their_own_sublane() -> None:
    comms = [
        {"issue": 0.0, "done": 0.5},
        {"issue": 0.1, "done": 0.2},
        {"issue": 0.3, "done": None},  # lasts to the step's end
        {"issue": 0.6, "done": 0.7},
    ]
    assert comm_sublanes(comms, wall_s=1.0) == [0, 1, 1, 0]


def test_breakdown_is_the_mean_of_each_ranks_last_step(tmp_path: Path) -> None:
    summary = json.loads((add_time_lab(tmp_path) / "summary.json").read_text())
    b = last_step_breakdown(summary)
    assert b is not None and b["ranks"] == 2 and b["steps"] == [4]
    assert b["wall_s"] == pytest.approx(0.0985)  # (100 + 97) / 2 ms
    assert b["by_category"]["compute"] == pytest.approx(0.077)  # (75 + 79) / 2
    assert b["overlapped_comm"] == pytest.approx(0.0305)  # (33 + 28) / 2
    assert b["overlap_fraction"] == pytest.approx(30.5 / 35.5)  # over (41 + 30) / 2
    assert last_step_breakdown({}) is None


def test_table_rows_hold_ms_percent_and_overlap(tmp_path: Path) -> None:
    summary = json.loads((add_time_lab(tmp_path) / "summary.json").read_text())
    (row,) = time_breakdown_rows([("ddp x2", summary), ("old", {"strategy": "ddp"})])
    assert row[:3] == ["ddp x2", "4", "98.50"]
    cells = dict(zip(CATEGORIES, row[3:9], strict=True))
    assert cells == {
        "compute": "77.00 (78.2%)",
        "exposed_comm": "5.00 (5.1%)",
        "bubble": "0.00 (0.0%)",
        "data": "4.50 (4.6%)",
        "optimizer": "10.00 (10.2%)",
        "host": "2.00 (2.0%)",
    }
    assert row[9:] == ["30.50", "0.859"]
    text = time_breakdown_markdown([("ddp x2", summary)])
    assert text.splitlines()[0].startswith("| run | step | wall ms | compute ms (%) |")
    assert "| ddp x2 | 4 | 98.50 | 77.00 (78.2%) |" in text
    no_comm = {"time_breakdown_by_rank": [{**summary["time_breakdown_by_rank"][1], "comm_s": 0}]}
    assert time_breakdown_rows([("x", no_comm)])[0][-1] == "-"


def test_bars_are_drawn_for_the_runs_with_a_breakdown(tmp_path: Path) -> None:
    summary = json.loads((add_time_lab(tmp_path / "a") / "summary.json").read_text())
    runs = [("ddp x2", summary), ("old", {"strategy": "ddp"})]
    one = png_size(draw_time_breakdown_bars(runs, tmp_path / "one.png"))
    two = png_size(draw_time_breakdown_bars([*runs, ("again", summary)], tmp_path / "two.png"))
    assert one[1] < two[1]  # a bar more, a taller picture
    with pytest.raises(DistlabError, match="no run has time_breakdown_by_rank"):
        draw_time_breakdown_bars(runs[1:], tmp_path / "none.png")


def test_compare_shows_the_runs_with_a_breakdown_and_skips_the_others(
    tmp_path: Path, capsys
) -> None:
    timed = add_time_lab(make_run(tmp_path, "ddp", 2))
    plain = make_run(tmp_path, "fsdp", 2)
    picture = tmp_path / "time.png"
    assert compare_main([str(timed), str(plain), "--time-breakdown", str(picture)]) == 0
    out = capsys.readouterr().out
    assert "time of the last tracked step" in out and f"time breakdown: {picture}" in out
    png_size(picture)
    # the report's section (what --report adds, without its other plots)
    runs, images = load_runs([str(timed), str(plain)]), []
    text = "\n".join(time_section(runs, tmp_path / "report_files", images))
    assert "## Time in one step" in text
    assert "| ddp x2 | 4 | 98.50 | 77.00 (78.2%) |" in text
    assert "| fsdp x2 |" not in text
    assert "![time per step by category](report_files/time_breakdown.png)" in text
    assert images == [tmp_path / "report_files" / "time_breakdown.png"]
    png_size(images[0])

    assert compare_main([str(plain), "--time-breakdown", str(tmp_path / "no.png")]) == 0
    out = capsys.readouterr().out
    assert "time of the last tracked step" not in out and "nothing drawn" in out
    assert not (tmp_path / "no.png").exists()
    assert time_section(runs[1:], tmp_path / "report_files", images) == []
