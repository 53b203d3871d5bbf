"""The memory picture of a step: drawn from ``ranks/memory_rank<r>.json`` at the end of a run.

Unit tests draw synthetic timelines (no training); the slow test runs a real
2-rank fsdp run and a single run, and compares them.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from distlab.measure.memory_timeline import draw_memory_timelines, phase_spans, sample_totals
from distlab.measure.step_memory import CATEGORIES
from distlab.run.files import memory_rank_file
from distlab.train.measurements import draw_memory_picture

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) in pixels of a PNG file (its IHDR chunk); fails if it is no PNG."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def synthetic_record(rank: int, scale: int = 1) -> dict:
    """A rank's record: params and optimizer throughout, activations up in forward, down in
    backward, gradients from backward on; forward 0-3, backward 4-7, optimizer 8-9."""
    timeline = []
    for index in range(10):
        phase = "forward" if index < 4 else "backward" if index < 8 else "optimizer"
        activations = index if index < 4 else max(0, 7 - index)
        sample = dict.fromkeys(CATEGORIES, 0)
        sample.update(
            params=1 << 20,
            optimizer=2 << 20,
            activations=activations * (1 << 20) * scale,
            grads=(1 << 20) if index >= 4 else 0,
        )
        timeline.append({"phase": phase, **sample})
    totals = sample_totals(timeline)
    top = max(range(len(timeline)), key=totals.__getitem__)
    split = {c: timeline[top][c] for c in CATEGORIES}
    return {
        "rank": rank,
        "step": 2,
        "peak": totals[top],
        "peak_phase": timeline[top]["phase"],
        "peak_by_category": split,
        "cuda_peak_allocated": None,
        "cuda_peak_reserved": None,
        "timeline": timeline,
    }


def test_phase_spans_follow_the_samples() -> None:
    timeline = synthetic_record(0)["timeline"]
    assert phase_spans(timeline) == [("forward", 0, 4), ("backward", 4, 8), ("optimizer", 8, 10)]
    interleaved = [{"phase": p} for p in ("forward", "backward", "forward", "forward")]
    assert phase_spans(interleaved) == [("forward", 0, 1), ("backward", 1, 2), ("forward", 2, 4)]
    assert phase_spans([]) == []


def test_picture_grows_with_ranks_and_runs(tmp_path: Path) -> None:
    sizes = {}
    for ranks in (1, 2, 4):
        records = [synthetic_record(r) for r in range(ranks)]
        sizes[ranks] = png_size(
            draw_memory_timelines([("ddp", records)], tmp_path / f"{ranks}.png")
        )
    assert sizes[1][1] < sizes[2][1] < sizes[4][1]  # one row per rank
    assert sizes[1][0] == sizes[2][0] == sizes[4][0]
    two_runs = [("a", [synthetic_record(0), synthetic_record(1)]), ("b", [synthetic_record(0)])]
    width, height = png_size(draw_memory_timelines(two_runs, tmp_path / "both.png"))
    assert width > 1.8 * sizes[2][0] and height == sizes[2][1]  # one column per run


def test_a_rank_without_samples_still_draws(tmp_path: Path) -> None:
    empty = {**synthetic_record(1), "timeline": []}
    png_size(draw_memory_timelines([("x", [synthetic_record(0), empty])], tmp_path / "m.png"))


def test_run_end_draws_the_ranks_files_or_warns_in_one_line(tmp_path: Path, capsys) -> None:
    assert draw_memory_picture(tmp_path, "fsdp x2") is None
    warning = capsys.readouterr().out.strip().splitlines()
    assert len(warning) == 1 and warning[0].startswith("distlab: warning: no memory_timeline.png")
    memory_rank_file(tmp_path, 0).parent.mkdir()
    for rank in (0, 1):
        memory_rank_file(tmp_path, rank).write_text(json.dumps(synthetic_record(rank, rank + 1)))
    picture = draw_memory_picture(tmp_path, "fsdp x2")
    assert picture == tmp_path / "memory_timeline.png"
    assert png_size(picture)[1] > 400
    memory_rank_file(tmp_path, 1).write_text('{"rank": 1, "timeline": [')  # torn file
    assert draw_memory_picture(tmp_path, "fsdp x2") is None
    assert capsys.readouterr().out.count("distlab: warning:") == 1
