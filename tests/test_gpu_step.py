"""benchmarks/gpu_step.py on CPU at tiny shapes: every run, a complete and sane table and JSON."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
from tests.helpers import ROOT

SCRIPT = ROOT / "benchmarks" / "gpu_step.py"
FORBIDDEN = ("ray", "deepspeed", "wandb")
"""Absent on the GPU machine: the script must not import them."""
EAGER_RUNS = {
    "single": "distlab single",
    "ddp": "distlab ddp x1",
    "fsdp": "distlab fsdp x1",
    "hf": "HF GPT2LMHeadModel",
    "hand": "hand loop, distlab GPT",
}
COMPILED = "hand/compile/8"
"""One compiled row (a cold compile costs ~35 s or more here)."""


def run_script(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python benchmarks/gpu_step.py args...`` from the source tree (PYTHONPATH=src)."""
    path = os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p)
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"},
        cwd=ROOT,
    )


def test_imports_no_library_the_gpu_machine_lacks():
    code = (
        "import importlib.util, json, sys\n"
        f"spec = importlib.util.spec_from_file_location('gpu_step', {str(SCRIPT)!r})\n"
        "module = sys.modules['gpu_step'] = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n"
    )
    path = os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p)
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": path},
    )
    assert result.returncode == 0, result.stderr
    loaded = set(json.loads(result.stdout.strip().splitlines()[-1]))
    assert "distlab" in loaded and "torch" in loaded
    assert not loaded & {*FORBIDDEN, "transformers"}, loaded & {*FORBIDDEN, "transformers"}


def test_list_and_a_filter_that_matches_nothing():
    listed = run_script("--list", "--device", "cpu")
    assert listed.returncode == 0, listed.stderr
    keys = listed.stdout.split()
    assert len(keys) == 18 and "hf/eager/max" in keys and "hf/compile/8" not in keys
    refused = run_script("--device", "cpu", "--only", "nothing/*")
    assert refused.returncode == 2
    assert refused.stderr.strip() == "distlab: error: --only nothing/* matches no row (see --list)"


@pytest.mark.slow
def test_cpu_smoke_run_fills_every_row(tmp_path):
    out = tmp_path / "gpu_step.json"
    result = run_script(
        "--device", "cpu", "--warmup", "1", "--steps", "3",
        "--only", "*/eager/*", COMPILED, "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    assert report["model"] == "tiny" and report["global_batch"] == 16
    assert report["timed_steps"] == 3 and report["peak_flops"] > 0
    rows = {row["key"]: row for row in report["rows"]}
    expected = {f"{run}/eager/{size}" for run in EAGER_RUNS for size in ("8", "max")}
    assert set(rows) == expected | {COMPILED}
    for key, row in rows.items():
        assert "error" not in row, (key, row["error"])
        assert row["micro_batch"] == (16 if key.endswith("/max") else 8), key
        auto = key.endswith("/max") and key.split("/")[0] in ("single", "ddp", "fsdp")
        assert row["note"] == ("found by --micro-batch auto" if auto else ""), key
        assert len(row["step_times_s"]) == 4 and row["timed_steps"] == 3, key
        assert row["tokens_per_s"] > 0 and 0 < row["mfu"] < 1, key
        assert row["peak_memory_bytes"] > 0 and math.isfinite(row["final_loss"]), key
    # The hand-written loop trains distlab's GPT on the same batches with the same
    # optimizer and schedule: it must end at distlab's loss (same work, not a lighter one).
    for size in ("8", "max"):
        assert rows[f"hand/eager/{size}"]["final_loss"] == pytest.approx(
            rows[f"single/eager/{size}"]["final_loss"], rel=1e-4
        )
    table = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| run | micro-batch | tokens/s | MFU | peak memory")
    assert len(table) == 1 + len(rows)
    for label in EAGER_RUNS.values():
        assert sum(line.startswith(f"| {label} | ") for line in table) == 2, label
    assert any(line.startswith("| hand loop, distlab GPT + compile | 8 | ") for line in table)
