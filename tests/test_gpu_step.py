"""benchmarks/gpu_step.py on CPU at tiny shapes: every run, a complete and sane table and JSON."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tests.helpers import ROOT

from distlab.data import prepare_tokens
from distlab.errors import DistlabError
from distlab.strategies.resolve import load_config

pytestmark = pytest.mark.slow  # the whole file: the GPU benchmark's CPU smoke runs

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
COMPILED = ("single/compile/8", "hand/compile/8")
"""distlab's --compile and the compiled peer, once each (a cold compile costs ~35 s here)."""


def source_tree_env() -> dict[str, str]:
    """The environment with src/ first on PYTHONPATH, as the script runs on the GPU machine."""
    path = os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}


def run_script(
    *args: str, python_flags: tuple[str, ...] = (), timeout: float = 600
) -> subprocess.CompletedProcess:
    """``python [python_flags] benchmarks/gpu_step.py args...`` from the source tree."""
    return subprocess.run(
        [sys.executable, *python_flags, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=source_tree_env(),
        cwd=ROOT,
    )


@pytest.fixture(scope="module")
def listed() -> subprocess.CompletedProcess:
    """``--list`` run with ``-X importtime``: the row keys on stdout, and on stderr every module
    the script imported (one interpreter serves both checks: its start-up is the cost)."""
    return run_script("--list", "--device", "cpu", python_flags=("-X", "importtime"))


def imported_packages(importtime_log: str) -> set[str]:
    """Top-level packages in ``-X importtime``'s log (``import time: self | total | name``)."""
    names = {
        line.rsplit("|", 1)[1].strip()
        for line in importtime_log.splitlines()
        if line.startswith("import time:")
    }
    return {name.split(".")[0] for name in names} - {"imported package"}


def test_imports_no_library_the_gpu_machine_lacks(listed: subprocess.CompletedProcess):
    assert listed.returncode == 0, listed.stderr
    loaded = imported_packages(listed.stderr)
    assert "distlab" in loaded and "torch" in loaded
    assert not loaded & {*FORBIDDEN, "transformers"}, loaded & {*FORBIDDEN, "transformers"}


def test_list_and_a_filter_that_matches_nothing(listed: subprocess.CompletedProcess):
    assert listed.returncode == 0, listed.stderr
    keys = listed.stdout.split()
    assert len(keys) == 18 and "hf/eager/max" in keys and "hf/compile/8" not in keys
    refused = run_script("--device", "cpu", "--only", "nothing/*")
    assert refused.returncode == 2
    assert refused.stderr.strip() == "distlab: error: --only nothing/* matches no row (see --list)"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_asking_for_a_gpu_without_one_is_a_one_line_error():
    refused = run_script("--device", "cuda")
    assert refused.returncode == 2
    assert refused.stderr.startswith("distlab: error: --device cuda was requested but no CUDA")
    assert "Traceback" not in refused.stderr


def load_script():
    """The benchmark script as a module (registered, as dataclasses need)."""
    spec = importlib.util.spec_from_file_location("gpu_step", SCRIPT)
    module = sys.modules["gpu_step"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_peer_falls_back_to_the_largest_micro_batch_that_does_not_run_out_of_memory(
    monkeypatch,
):
    gpu_step = load_script()
    real_steps = gpu_step.peer_steps

    def steps_under_a_limit(run, compiled, config, tokens, micro_batch, device):
        if micro_batch > 4:
            raise torch.OutOfMemoryError(f"no room for micro-batch {micro_batch}")
        return real_steps(run, compiled, config, tokens, micro_batch, device)

    monkeypatch.setattr(gpu_step, "peer_steps", steps_under_a_limit)
    config = load_config("configs/tiny.yaml", {"global_batch": 16, "steps": 2, "device": "cpu"})
    token_file = str(prepare_tokens(config.data))
    result = gpu_step.peer_row(gpu_step.Row("hand", "eager", "max"), config, token_file, "cpu")
    assert result["micro_batch"] == 4
    assert result["note"] == "out of memory at [16, 8]"
    assert len(result["step_times_s"]) == 2 and math.isfinite(result["final_loss"])
    assert gpu_step.size_candidates("max", 48) == [16, 8, 4, 2, 1]


def test_a_peer_that_never_fits_is_a_one_line_error(monkeypatch):
    gpu_step = load_script()

    def out_of_memory(*args):
        raise torch.OutOfMemoryError("no room")

    monkeypatch.setattr(gpu_step, "peer_steps", out_of_memory)
    config = load_config("configs/tiny.yaml", {"global_batch": 2, "device": "cpu"})
    with pytest.raises(
        DistlabError, match=r"out of memory at every micro-batch tried \(\[2, 1\]\)"
    ):
        gpu_step.peer_row(
            gpu_step.Row("hf", "eager", "max"), config, str(prepare_tokens(None)), "cpu"
        )


def test_cpu_smoke_run_fills_every_row(tmp_path: Path, compile_cache: Path):
    # compile_cache: the script's distlab runs compile into the session's inductor cache, where
    # test_compile's single run left the graphs of this block shape (micro-batch 8 of tiny):
    # single/compile/8 loads them (AOTAutograd cache hit) instead of compiling them again.
    out = tmp_path / "gpu_step.json"
    result = run_script(
        "--device", "cpu", "--warmup", "1", "--steps", "3",
        "--only", "*/eager/*", *COMPILED, "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    assert report["model"] == "tiny" and report["global_batch"] == 16
    assert report["timed_steps"] == 3 and report["peak_flops"] > 0
    rows = {row["key"]: row for row in report["rows"]}
    expected = {f"{run}/eager/{size}" for run in EAGER_RUNS for size in ("8", "max")}
    assert set(rows) == expected | set(COMPILED)
    for key, row in rows.items():
        assert "error" not in row, (key, row["error"])
        assert row["micro_batch"] == (16 if key.endswith("/max") else 8), key
        auto = key.endswith("/max") and key.split("/")[0] in ("single", "ddp", "fsdp")
        assert row["note"] == ("found by --micro-batch auto" if auto else ""), key
        assert len(row["step_times_s"]) == 4 and row["timed_steps"] == 3, key
        assert row["tokens_per_s"] > 0 and 0 < row["mfu"] < 1, key
        assert row["peak_memory_bytes"] > 0 and math.isfinite(row["final_loss"]), key
        assert (row["compile_s"] > 0) if key in COMPILED else row["compile_s"] is None, key
    # The hand-written loop trains distlab's GPT on the same batches with the same
    # optimizer and schedule: it must end at distlab's loss (same work, not a lighter one).
    for size in ("8", "max"):
        assert rows[f"hand/eager/{size}"]["final_loss"] == pytest.approx(
            rows[f"single/eager/{size}"]["final_loss"], rel=1e-4
        )
    for key in COMPILED:
        assert rows[key]["final_loss"] == pytest.approx(
            rows["single/eager/8"]["final_loss"], rel=1e-3
        ), key
    table = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| run | micro-batch | tokens/s | MFU | peak memory")
    assert len(table) == 1 + len(rows)
    for label in EAGER_RUNS.values():
        assert sum(line.startswith(f"| {label} | ") for line in table) == 2, label
    for label in ("distlab single + compile", "hand loop, distlab GPT + compile"):
        (line,) = [line for line in table if line.startswith(f"| {label} | 8 | ")]
        assert "compiled in" in line, line
