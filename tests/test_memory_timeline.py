"""The memory picture of a step: drawn from ``ranks/memory_rank<r>.json`` at the end of a run.

Unit tests draw synthetic timelines (no training); the slow test runs a real
2-rank fsdp run and a single run, and compares them.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from tests.helpers import TINY_LOCAL_RUN, run_main
from tests.test_compare import make_run

from distlab.errors import DistlabError
from distlab.measure.memory_timeline import draw_memory_timelines, phase_spans, sample_totals
from distlab.measure.step_memory import CATEGORIES
from distlab.report.compare import main as compare_main
from distlab.report.runs import load_runs
from distlab.report.tables import memory_table_rows
from distlab.run.files import memory_rank_file
from distlab.strategies.resolve import load_config
from distlab.train.measurements import draw_pictures
from distlab.train.sampling import EARLY_SAMPLE_STEPS, tracks_memory

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


@pytest.mark.parametrize(
    ("steps", "restart_at"), [(2, 0), (5, 0), (5, 3), (12, 0), (12, 3), (40, 0), (40, 3)]
)
def test_sample_tracks_the_last_step_and_an_early_one_only_where_many_follow(
    steps: int, restart_at: int
) -> None:
    """A process that starts at ``restart_at``: its last step is tracked, its second step too
    only if more than EARLY_SAMPLE_STEPS steps follow; ``every`` tracks all, ``off`` none."""
    fields = {"strategy": "ddp", "nproc": 2, "steps": steps}
    config = load_config(None, fields)
    tracked = [
        step
        for done, step in enumerate(range(restart_at, steps))
        if tracks_memory(config, step, done)
    ]
    early = restart_at + 1
    expected = ([early] if steps - 1 - early > EARLY_SAMPLE_STEPS else []) + [steps - 1]
    assert tracked == expected
    every = load_config(None, {**fields, "track_memory": "every"})
    off = load_config(None, {**fields, "track_memory": "off"})
    assert all(tracks_memory(every, step, step) for step in range(steps))
    assert not any(tracks_memory(off, step, step) for step in range(steps))


def test_phase_spans_follow_the_samples() -> None:
    timeline = synthetic_record(0)["timeline"]
    assert phase_spans(timeline) == [("forward", 0, 4), ("backward", 4, 8), ("optimizer", 8, 10)]
    interleaved = [{"phase": p} for p in ("forward", "backward", "forward", "forward")]
    assert phase_spans(interleaved) == [("forward", 0, 1), ("backward", 1, 2), ("forward", 2, 4)]
    assert phase_spans([]) == []


@pytest.mark.slow
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
    assert draw_pictures(tmp_path, "fsdp x2") == []  # nothing tracked: nothing to draw
    assert capsys.readouterr().out == ""
    memory_rank_file(tmp_path, 0).parent.mkdir()
    for rank in (0, 1):
        memory_rank_file(tmp_path, rank).write_text(json.dumps(synthetic_record(rank, rank + 1)))
    [picture] = draw_pictures(tmp_path, "fsdp x2")
    assert picture == tmp_path / "memory_timeline.png"
    assert png_size(picture)[1] > 400
    memory_rank_file(tmp_path, 1).write_text('{"rank": 1, "timeline": [')  # torn file
    assert draw_pictures(tmp_path, "fsdp x2") == []
    warning = capsys.readouterr().out.strip().splitlines()
    assert len(warning) == 1 and warning[0].startswith("distlab: warning: no memory_timeline.png")


def _with_memory(path: Path, predicted_total: int | None = None) -> Path:
    """Give a synthetic run dir (``tests.test_compare.make_run``) two ranks' step memory.

    With ``predicted_total``, its summary also holds theory's peak, and its
    ``config.yaml`` goes, so that the report reads the summary's prediction.
    """
    records = [synthetic_record(rank, rank + 1) for rank in (0, 1)]
    memory_rank_file(path, 0).parent.mkdir(exist_ok=True)
    for record in records:
        memory_rank_file(path, record["rank"]).write_text(json.dumps(record))
    summary = json.loads((path / "summary.json").read_text())
    summary["memory_peak_by_rank"] = [
        {k: v for k, v in r.items() if k != "timeline"} for r in records
    ]
    if predicted_total is not None:
        by_category = dict.fromkeys(CATEGORIES, 0)
        by_category.update(
            params=1 << 20, optimizer=2 << 20, activations=predicted_total - (3 << 20)
        )
        summary["predicted"]["memory_peak"] = {
            "by_category": by_category,
            "total": predicted_total,
            "phase": "backward",
        }
        (path / "config.yaml").unlink()
    (path / "summary.json").write_text(json.dumps(summary))
    return path


@pytest.mark.slow
def test_compare_shows_step_memory_beside_the_prediction(tmp_path: Path, capsys) -> None:
    fsdp = _with_memory(make_run(tmp_path, "fsdp", 2), predicted_total=6 << 20)
    ddp = _with_memory(make_run(tmp_path, "ddp", 2))
    old = make_run(tmp_path, "single", 1)
    picture, report = tmp_path / "timelines.png", tmp_path / "docs" / "report.md"
    args = [str(fsdp), str(ddp), str(old), "--memory-timeline", str(picture)]
    assert compare_main([*args, "--report", str(report)]) == 0
    out = capsys.readouterr().out
    assert "step memory of rank 0 at its peak" in out
    assert all(category in out for category in CATEGORIES)
    assert f"left out {old}" in out
    rows = {row[0]: row for row in memory_table_rows(load_runs([str(fsdp), str(ddp), str(old)]))}
    # rank 0's peak: 7 MiB (params 1, optimizer 2, activations 3, grads 1) in backward;
    # rank 1 doubles the activations: 10 MiB
    assert rows["fsdp x2"][1] == "backward"
    assert rows["fsdp x2"][2 + CATEGORIES.index("activations")] == "3.00"
    assert rows["fsdp x2"][-5:] == ["7.00", "10.00", "6.00", "backward", "1.167"]
    # ddp's prediction comes from its config.yaml through distlab.theory
    assert rows["ddp x2"][-2] == "backward" and float(rows["ddp x2"][-1]) > 0
    assert rows["single x1"][1:3] == ["-", "-"]  # a run from before the measurement
    width, height = png_size(picture)
    assert width > height  # two columns (fsdp, ddp), two rows
    text = report.read_text()
    assert "## Memory in one step" in text
    assert "| fsdp x2 | ddp x2 |" in text  # the two pictures side by side
    assert "![fsdp x2](report_files/memory_timeline_0.png)" in text
    png_size(report.parent / "report_files" / "memory_timeline_1.png")
    assert "| fsdp x2 | activations | 3,145,728 | 3,145,728 | 1.000 |" in text


def test_runs_without_step_memory_have_no_memory_table(tmp_path: Path, capsys) -> None:
    run = make_run(tmp_path, "ddp", 2)
    assert compare_main([str(run)]) == 0
    assert "step memory" not in capsys.readouterr().out
    with pytest.raises(DistlabError, match="no run has a memory timeline"):
        compare_main([str(run), "--memory-timeline", str(tmp_path / "m.png")])


def _phases_in_order(timeline: list[dict]) -> list[str]:
    """The timeline's phases, each run of equal ones once."""
    return [phase for phase, _, _ in phase_spans(timeline)]


@pytest.mark.slow
def test_real_runs_draw_their_timelines_and_compare(tmp_path: Path, capsys) -> None:
    """A 2-rank fsdp run and a single run, 2 steps each: pictures, json, compare.

    The fsdp run draws its picture (``--pictures``), the single run does not
    (``--no-pictures``, in ``TINY_LOCAL_RUN``) but keeps its timeline to draw later.
    """
    runs = {}
    for strategy, nproc, picture in (("fsdp", 2, ("--pictures",)), ("single", 1, ())):
        runs[strategy] = tmp_path / strategy
        result = run_main(
            "distlab.launch", *TINY_LOCAL_RUN, *picture,
            "--strategy", strategy, "--nproc", str(nproc), "--steps", "2",
            "--run-dir", str(runs[strategy]),
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        # (gloo sometimes aborts a finished rank at exit: the launcher warns and ignores it)
        assert "no memory_timeline.png" not in result.stdout + result.stderr
    assert not (runs["single"] / "memory_timeline.png").exists()
    assert memory_rank_file(runs["single"], 0).is_file()
    draw_pictures(runs["single"], "single x1")
    for rank in (0, 1):
        record = json.loads(memory_rank_file(runs["fsdp"], rank).read_text())
        assert record["rank"] == rank and record["peak"] > 0
        assert all(set(CATEGORIES) <= set(sample) for sample in record["timeline"])
        phases = _phases_in_order(record["timeline"])
        first_backward = phases.index("backward")
        assert "forward" in phases[:first_backward], phases
        assert "optimizer" in phases[first_backward:], phases
    fsdp_size = png_size(runs["fsdp"] / "memory_timeline.png")
    single_size = png_size(runs["single"] / "memory_timeline.png")
    assert fsdp_size[1] > single_size[1]  # a panel per rank
    picture = tmp_path / "both.png"
    args = [str(runs["fsdp"]), str(runs["single"]), "--memory-timeline", str(picture)]
    assert compare_main(args) == 0
    out = capsys.readouterr().out
    assert all(category in out for category in CATEGORIES) and "fsdp x2" in out
    assert png_size(picture)[0] > fsdp_size[0]  # two columns
