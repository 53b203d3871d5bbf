"""``python -m distlab.compare``: the measured-vs-predicted table, the plots and the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from distlab.errors import DistlabError
from distlab.report import runs as report_runs
from distlab.report.compare import main
from distlab.report.markdown import write_report
from distlab.report.runs import load_runs, load_wandb_runs
from distlab.report.tables import markdown_table
from distlab.strategies.resolve import load_config
from distlab.theory import predict


def make_run(root: Path, strategy: str, nproc: int, scale: float = 1.0, new: bool = True) -> Path:
    """A run dir as train.py writes it; ``scale`` multiplies the measured comm bytes."""
    config = load_config(None, {"strategy": strategy, "nproc": nproc, "model": "tiny"})
    predicted = predict(config)
    path = root / f"{strategy}-n{nproc}"
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump(config.to_dict()))
    comm_pred = predicted["comm_per_step"]
    kinds = {f"{k}/bytes": v * scale for k, v in comm_pred["kinds"].items()}
    comm = {"bytes": comm_pred["bytes"] * scale, "wire_bytes": comm_pred["wire_bytes"], **kinds}
    metrics = []
    for step in range(4):
        row = {"step": step, "loss": 5.5 - 0.1 * step, "lr": 1e-3, "step_time_s": 0.1}
        row["tokens_per_s"] = 2560.0
        if new:
            row.update({f"comm/{k}": v for k, v in comm.items()})
            row.update({"mfu": 0.05, "peak_memory_bytes": 400 * 2**20})
        metrics.append(row)
    (path / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    state = predicted["model_state_bytes_per_rank"]
    summary = {
        "strategy": strategy,
        "nproc": nproc,
        "model": "tiny",
        "first_loss": 5.5,
        "final_loss": 5.2,
        "tokens_per_s": 2560.0,
        "median_step_time_s": 0.1,
        "model_state_bytes_per_rank": state,
        "predicted_model_state_bytes_per_rank": state,
        "run_dir": str(path),
    }
    if new:
        summary.update(
            {
                "mfu": 0.05,
                "peak_memory_bytes_by_rank": [400 * 2**20] * nproc,
                "comm_counted": True,
                "comm_per_step": comm,
                "predicted": predicted,
            }
        )
    (path / "summary.json").write_text(json.dumps(summary))
    return path


def test_table_shows_measured_predicted_and_ratio(tmp_path):
    make_run(tmp_path, "ddp", 2)
    make_run(tmp_path, "fsdp", 2, scale=1.1)
    runs = load_runs([str(tmp_path / "*")])
    figures = {report_runs.figures(r)["label"]: report_runs.figures(r) for r in runs}
    assert figures["ddp x2"]["comm_ratio"] == pytest.approx(1.0)
    assert figures["fsdp x2"]["comm_ratio"] == pytest.approx(1.1)
    assert figures["ddp x2"]["state_ratio"] == pytest.approx(1.0)
    assert figures["fsdp x2"]["peak_memory_by_rank"] == [400 * 2**20] * 2
    text = markdown_table(runs)
    assert "| ddp x2 |" in text and "1.100" in text and "5.00" in text  # MFU 5 %


def test_report_writes_markdown_and_plots(tmp_path, capsys):
    for strategy, nproc in (("single", 1), ("ddp", 2), ("pp", 2)):
        make_run(tmp_path / "runs", strategy, nproc)
    report = tmp_path / "docs" / "report.md"
    code = main([str(tmp_path / "runs" / "*"), "--report", str(report)])
    assert code == 0
    out = capsys.readouterr().out
    assert "pp x2" in out and "ratio" in out
    text = report.read_text()
    for name in ("loss", "throughput", "memory", "comm"):
        image = tmp_path / "docs" / "report_files" / f"{name}.png"
        assert image.stat().st_size > 5000
        assert f"report_files/{name}.png" in text
    assert "| pp x2 | send |" in text  # the per-collective breakdown
    assert "0.200" in text  # the predicted pipeline bubble (p - 1) / (m + p - 1) = 1/5


def test_runs_from_before_the_measurements_still_compare(tmp_path):
    make_run(tmp_path, "ddp", 2, new=False)
    (run,) = load_runs([str(tmp_path / "ddp-n2")])
    figures = report_runs.figures(run)
    assert figures["comm_bytes"] is None and figures["mfu"] is None
    assert figures["comm_pred"] > 0  # theory recomputed from config.yaml
    assert "ddp x2" in markdown_table([run])
    write_report([run], tmp_path / "r.md")


def test_restarted_run_keeps_the_last_line_of_each_step(tmp_path):
    path = make_run(tmp_path, "ddp", 2)
    with (path / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 3, "loss": 1.0, "tokens_per_s": 1.0}) + "\n")
    (run,) = load_runs([str(path)])
    assert [m["step"] for m in run.metrics] == [0, 1, 2, 3]
    assert run.metrics[-1]["loss"] == 1.0


def test_errors_are_one_line(tmp_path, monkeypatch):
    with pytest.raises(DistlabError, match="not a finished run dir"):
        load_runs([str(tmp_path / "missing")])
    monkeypatch.setenv("WANDB_MODE", "offline")
    with pytest.raises(DistlabError, match="needs an API key"):
        load_wandb_runs("me/distlab")
