"""``benchmarks/overhead.py`` compares like with like (its timings are not tested).

For every family the hand-written step must compute what distlab's step
reports (the same loss and gradient norm) through the same collectives, and
the ``hand`` variant must run on plain gloo (nothing on the counting group),
else the ratios the benchmark prints would measure something other than
distlab's step overhead.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from tests.helpers import ROOT

pytestmark = pytest.mark.slow  # the whole file: the overhead benchmark's real runs


def test_hand_steps_match_distlab_steps(tmp_path: Path) -> None:
    families = ["ddp", "fsdp", "tp", "pp"]
    if importlib.util.find_spec("deepspeed") is not None:
        families.append("zero2")
    out = tmp_path / "overhead.json"
    command = [
        sys.executable, str(ROOT / "benchmarks" / "overhead.py"), "--model", "tiny",
        "--global-batch", "8", "--rounds", "1", "--block", "1", "--warmup", "1",
        "--strategies", *families, "--out", str(out),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())["results"]
    assert sorted(report) == sorted(families)
    for family, measured in report.items():
        for rank, counted in enumerate(measured["counted_collectives"]):
            assert counted["hand"] == {}, f"{family} rank {rank}: hand ran on the counting group"
            assert counted["hand+count"] == counted["distlab"], f"{family} rank {rank}: {counted}"
            assert counted["distlab"], f"{family} rank {rank}: no collective counted"
        loss, norm = measured["last_warmup_figures"]["distlab"]
        for variant in ("hand", "hand+count"):
            assert measured["last_warmup_figures"][variant] == pytest.approx(
                [loss, norm], rel=1e-5
            ), family
        assert measured["cpu"]["median_step_s"]["distlab"] > 0
