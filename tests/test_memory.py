"""Measured model-state bytes per rank agree with each strategy's prediction.

``predicted_state_bytes`` is the ZeRO paper's count plus the terms each library
keeps beyond it (DeepSpeed's fp32 master slice and gradient bucket, OSS's
uneven tensor shards; see ``docs/memory.md``). The measured bytes come from
the tensors a rank actually holds. A prediction 10% off means a term is
missing or a strategy shards less than it claims.

The runs are the 2-rank AdamW parity runs (``parity_config``), shared with
the parity tests through the session's ``parity_workdir``; fsdp and ZeRO also
in bf16, where DeepSpeed holds bf16 parameters and gradients besides its fp32
master slice, and FSDP's sharded state stays fp32.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distlab.report.parity import _run_name, _run_once, parity_config

TOLERANCE = 0.10
GRAD_TOLERANCE = 0.01
"""Gradient bytes alone, predicted to within a few bytes: 1% tells reducing once (4P) from
the slice, bucket and accumulated slice of reducing per micro-batch (13% more for zero2)."""
NEEDS = {"zero": "deepspeed", "fairscale": "fairscale"}


FP32_CASES = ["ddp", "fsdp", "zero1", "zero2", "zero3", "fairscale-oss", "fairscale-sdp"]
BF16_CASES = ["fsdp", "zero1", "zero2", "zero3"]


@pytest.mark.parametrize(
    ("strategy", "precision"),
    [*((s, "fp32") for s in FP32_CASES), *((s, "bf16") for s in BF16_CASES)],
)
def test_measured_state_bytes_match_prediction(
    strategy: str, precision: str, parity_workdir: Path
) -> None:
    for prefix, module in NEEDS.items():
        if strategy.startswith(prefix):
            pytest.importorskip(module)
    config = parity_config(strategy, 2, "adamw", precision=precision)
    run_dir = _run_once(config, parity_workdir / _run_name(config))
    summary = json.loads((run_dir / "summary.json").read_text())
    measured = summary["model_state_bytes_per_rank"]
    predicted = summary["predicted_model_state_bytes_per_rank"]
    ratio = measured["total"] / predicted["total"]
    assert abs(ratio - 1) <= TOLERANCE, f"{strategy}: measured {measured}, predicted {predicted}"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("strategy", "zero_reduce"),
    [("zero2", "once"), ("zero2", "per-microbatch"), ("zero3", "once"), ("zero3", None)],
)
def test_zero_accumulation_gradient_bytes_match_prediction(
    strategy: str, zero_reduce: str | None, parity_workdir: Path
) -> None:
    """Four micro-batches per step: reducing once holds the summed, unsharded gradients.

    The runs are ``tests/test_accumulation.py``'s AdamW parity runs (shared workdir).
    """
    pytest.importorskip("deepspeed")
    fields = {} if zero_reduce is None else {"zero_reduce": zero_reduce}
    config = parity_config(strategy, 2, "adamw", micro_batch=1, **fields)
    run_dir = _run_once(config, parity_workdir / _run_name(config))
    summary = json.loads((run_dir / "summary.json").read_text())
    measured = summary["model_state_bytes_per_rank"]["grads"]
    predicted = summary["predicted_model_state_bytes_per_rank"]["grads"]
    assert abs(measured / predicted - 1) <= GRAD_TOLERANCE, (measured, predicted)
