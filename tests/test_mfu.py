"""MFU: GPU peak table, the cached CPU matmul probe, and the per-step measurements hook."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from distlab.measure import mfu


def test_gpu_table_picks_precision_and_most_specific_name():
    assert mfu.gpu_peak("NVIDIA H100 80GB HBM3", "bf16", tf32=False) == 989e12
    assert mfu.gpu_peak("NVIDIA H100 PCIe", "bf16", tf32=False) == 756e12
    assert mfu.gpu_peak("NVIDIA A100-SXM4-40GB", "fp32", tf32=False) == 19.5e12
    assert mfu.gpu_peak("NVIDIA A100-SXM4-40GB", "fp32", tf32=True) == 156e12
    assert mfu.gpu_peak("NVIDIA L4", "bf16", tf32=False) == 121e12
    assert mfu.gpu_peak("Some Future GPU", "bf16", tf32=False) is None


def test_cpu_peak_is_probed_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTLAB_CACHE", str(tmp_path))
    calls = []

    def fake_probe(threads, dtype):
        calls.append((threads, dtype))
        return 1.5e11

    monkeypatch.setattr(mfu, "probe_matmul_flops", fake_probe)
    first = mfu.peak_flops(torch.device("cpu"), "fp32", threads=1)
    second = mfu.peak_flops(torch.device("cpu"), "fp32", threads=1)
    mfu.peak_flops(torch.device("cpu"), "fp32", threads=2)
    assert first.flops == second.flops == 1.5e11
    assert calls == [(1, torch.float32), (2, torch.float32)]
    cache = json.loads((tmp_path / "peak_flops.json").read_text())
    assert len(cache) == 2 and "probe" in first.source


def test_probe_measures_a_plausible_rate():
    rate = mfu.probe_matmul_flops(1, size=256, repeats=3)
    assert 1e8 < rate < 1e13


@given(st.floats(min_value=1e6, max_value=1e13))
def test_probe_size_is_the_largest_that_stays_within_the_time_budget(flops: float) -> None:
    """At ``flops`` FLOP/s, the probe's matmul takes at most PROBE_MATMUL_S unless even the
    smallest size would not, and the next size up would take longer (or is beyond the cap)."""

    def seconds(n: int) -> float:
        return 2 * n**3 / flops

    size, took = mfu.probe_size(seconds)
    assert took == seconds(size)
    assert mfu.MIN_PROBE_SIZE <= size <= mfu.PROBE_SIZE
    assert size == mfu.MIN_PROBE_SIZE or seconds(size) <= mfu.PROBE_MATMUL_S
    assert size == mfu.PROBE_SIZE or seconds(2 * size) > mfu.PROBE_MATMUL_S


def test_the_probe_picks_the_full_size_in_fp32_and_a_smaller_one_for_slow_bf16() -> None:
    """Measured here: fp32 34 GFLOP/s (one core), bf16 without bf16 hardware 0.66 GFLOP/s."""
    assert mfu.probe_size(lambda n: 2 * n**3 / 34e9)[0] == 1024
    assert mfu.probe_size(lambda n: 2 * n**3 / 0.66e9)[0] == 256


def test_mfu_and_effective_ranks():
    assert mfu.mfu(6e6, 1000.0, 1e10, 2) == pytest.approx(0.3)
    assert mfu.effective_ranks("cuda", 8) == 8
    cores = mfu.effective_ranks("cpu", 10**6)
    assert 1 <= cores < 10**6  # oversubscribed CPU ranks add no FLOPs
    assert mfu.effective_ranks("cpu", 1) == 1


def test_run_measurements_without_a_process_group(tmp_path, monkeypatch):
    from distlab.distributed import RankContext
    from distlab.measure.step_memory import HeldTensors
    from distlab.strategies.resolve import load_config
    from distlab.train.measurements import RunMeasurements

    monkeypatch.setenv("DISTLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(mfu, "probe_matmul_flops", lambda threads, dtype: 1e11)
    config = load_config(None, {"strategy": "single", "model": "tiny"})
    measure = RunMeasurements(RankContext(0, 1, torch.device("cpu")), config, tmp_path)
    for step in range(3):
        measure.begin_step(step, HeldTensors())
        extra = measure.end_step(step, 0.5, 1000)
    assert extra["peak_memory_bytes"] > 10 * 2**20
    assert extra["mfu"] == pytest.approx(measure.flops_per_token * 2000 / 1e11)
    assert "comm/bytes" not in extra  # no counting process group
    summary = measure.finish(tokens_per_s=2000.0)
    assert summary["comm_counted"] is False
    assert summary["predicted"]["comm_per_step"]["bytes"] == 0
    assert len(summary["peak_memory_bytes_by_rank"]) == 1
    lines = (tmp_path / "ranks" / "rank0.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [0, 1, 2]
