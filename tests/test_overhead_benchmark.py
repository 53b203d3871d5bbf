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
from pathlib import Path

import pytest
from tests.helpers import ROOT

pytestmark = pytest.mark.slow  # the whole file: the overhead benchmark's real runs


def test_hand_steps_match_distlab_steps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    families = ["ddp", "fsdp", "tp", "pp"]
    if importlib.util.find_spec("deepspeed") is not None:
        families.append("zero2")
    out = tmp_path / "overhead.json"
    # In this process, as ``python benchmarks/overhead.py`` with the script's directory on
    # sys.path (its ranks import it and ``hand_steps`` from there): the ranks fork from the
    # session's rank server, which has imported torch and DeepSpeed already.
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    importlib.import_module("overhead").main(
        [
            "--model", "tiny", "--global-batch", "8", "--rounds", "1", "--block", "1",
            "--warmup", "1", "--strategies", *families, "--out", str(out),
        ]
    )  # fmt: skip
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
