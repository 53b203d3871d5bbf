"""``python -m distlab.sweep``: the matrix, skipped and failed cells, reuse, report and docs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from distlab.errors import DistlabError
from distlab.report import sweep

pytestmark = pytest.mark.slow  # the whole file: a sweep of real runs

ROOT = Path(__file__).resolve().parents[1]


def write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_matrix_and_cells_expand_deduplicated(tmp_path):
    file = write(
        tmp_path / "s.yaml",
        {
            "name": "demo",
            "base": {"model": "tiny"},
            "matrix": {"strategy": ["ddp", "fsdp"], "nproc": [2, 4]},
            "cells": [{"strategy": "single"}, {"strategy": "ddp", "nproc": 2}],
        },
    )
    parsed = sweep.load_sweep(str(file), root=tmp_path)
    names = [c.name for c in parsed.cells]
    assert names == ["ddp-n2", "ddp-n4", "fsdp-n2", "fsdp-n4", "single-n1"]
    assert parsed.base["wandb_group"] == "demo"
    assert parsed.runs_root == tmp_path / "runs" / "demo"
    assert sweep.cell_name({"strategy": "fsdp+tp", "nproc": 4, "tp": 2}) == "fsdp+tp-n4-tp2"


def test_invalid_cells_are_skipped_with_the_reason(tmp_path):
    file = write(
        tmp_path / "s.yaml",
        {"base": {"model": "tiny"}, "cells": [{"strategy": "single", "nproc": 2}]},
    )
    parsed = sweep.load_sweep(str(file), root=tmp_path)
    sweep.validate_cells(parsed)
    assert parsed.cells[0].status == "skipped"
    assert "exactly 1 rank" in parsed.cells[0].reason


def test_bad_sweep_files_are_one_line_errors(tmp_path):
    with pytest.raises(DistlabError, match="not found"):
        sweep.load_sweep(str(tmp_path / "none.yaml"))
    with pytest.raises(DistlabError, match="unknown sweep key 'matrx'"):
        sweep.load_sweep(str(write(tmp_path / "a.yaml", {"matrx": {}})))
    with pytest.raises(DistlabError, match="no cells"):
        sweep.load_sweep(str(write(tmp_path / "b.yaml", {"base": {}})))


def test_compare_yaml_covers_every_strategy_family():
    parsed = sweep.load_sweep(str(ROOT / "configs" / "compare.yaml"), root=ROOT)
    strategies = {c.overrides["strategy"] for c in parsed.cells}
    assert {"single", "ddp", "fsdp", "zero1", "zero2", "zero3", "tp", "pp"} <= strategies
    assert any("+" in s for s in strategies)  # a 2D composition
    assert {c.overrides["nproc"] for c in parsed.cells} >= {2, 4}


def test_measured_blocks_in_strategy_pages_are_refilled(tmp_path):
    page = tmp_path / "ddp.md"
    page.write_text("# ddp\n\n<!-- measured: ddp -->\nold\n<!-- /measured -->\n\nafter\n")
    (tmp_path / "plain.md").write_text("# no markers\n")

    class FakeRun:
        summary = {"strategy": "ddp"}

    updated = sweep.update_strategy_pages(tmp_path, [FakeRun()], "CMD", lambda runs: "TABLE")
    assert updated == [page]
    text = page.read_text()
    assert "old" not in text and "TABLE" in text and "`CMD`" in text
    assert text.endswith("<!-- /measured -->\n\nafter\n")
    # idempotent: a second pass changes nothing
    assert sweep.update_strategy_pages(tmp_path, [FakeRun()], "CMD", lambda runs: "TABLE") == []


def test_sweep_runs_reports_and_survives_a_failed_cell(tmp_path, capsys):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "ddp.md").write_text("<!-- measured: ddp -->\n<!-- /measured -->\n")
    file = write(
        tmp_path / "s.yaml",
        {
            "name": "t",
            "runs_root": "runs",
            "report": "report.md",
            "docs_dir": "docs",
            "timeout_s": 300,
            "base": {
                "model": "tiny",
                "steps": 2,
                "global_batch": 4,
                "launcher": "local",
                "wandb": False,
            },
            "cells": [
                {"strategy": "single", "nproc": 1},
                {"strategy": "ddp", "nproc": 2},
                {"strategy": "single", "nproc": 2},  # invalid: skipped
                {"strategy": "ddp", "nproc": 2, "data": str(tmp_path / "no-such-corpus.txt")},
            ],
        },
    )
    import os

    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert sweep.main([str(file)]) == 0
        out = capsys.readouterr().out
        assert "failed" in out and "no-such-corpus" in out
        report = (tmp_path / "report.md").read_text()
        assert "| single x1 |" in report and "| ddp x2 |" in report
        assert "Cells that did not run" in report and "(skipped)" in report
        assert (tmp_path / "report_files" / "comm.png").is_file()
        assert "| ddp x2 |" in (docs / "ddp.md").read_text()
        # a rerun reuses the finished cells and reruns only the failed one
        assert sweep.main([str(file), "--no-docs"]) == 0
        out = capsys.readouterr().out
        assert out.count("reused") >= 2
    finally:
        os.chdir(cwd)
