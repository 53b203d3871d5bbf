"""ZeRO and fairscale strategies: validation and the DeepSpeed config they generate (no runs)."""

from __future__ import annotations

import importlib.util

import pytest

from distlab.config import Config
from distlab.errors import DistlabError
from distlab.strategies import registry
from distlab.strategies.deepspeed_config import deepspeed_config
from distlab.strategies.deepspeed_memory import bucket_elements
from distlab.strategies.fairscale_oss import oss_partition
from distlab.strategies.resolve import validate


def config(**fields) -> Config:
    return Config(**{"model": "tiny", "nproc": 2, "global_batch": 8, **fields})


@pytest.mark.parametrize(
    ("strategy", "module", "library"),
    [("zero2", "deepspeed", "DeepSpeed"), ("fairscale-sdp", "fairscale", "fairscale")],
)
def test_missing_library_names_the_extra(monkeypatch, strategy, module, library) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == module else real(name, *a)
    )
    with pytest.raises(DistlabError) as error:
        validate(config(strategy=strategy))
    assert str(error.value) == (
        f"strategy '{strategy}' needs {library}: pip install 'distlab[{module}]'"
    )


@pytest.mark.parametrize(
    ("strategy", "offload", "message"),
    [
        ("zero2", "params", "use --strategy zero3"),
        ("zero1", "params", "use --strategy zero3"),
        ("zero3", "disk", "offload must be one of none, optimizer, params"),
        ("fairscale-oss", "optimizer", "not used by strategy 'fairscale-oss'.*zero1, zero2, zero3"),
        ("fairscale-sdp", "params", "not used by strategy 'fairscale-sdp'"),
        ("ddp", "params", "--offload params is not used by strategy 'ddp'"),
    ],
)
def test_offload_is_checked(strategy: str, offload: str, message: str) -> None:
    with pytest.raises(DistlabError, match=message):
        validate(config(strategy=strategy, offload=offload))


@pytest.mark.parametrize(
    ("strategy", "offload"), [("zero3", "params"), ("zero1", "optimizer"), ("zero2", "none")]
)
def test_valid_offload_passes(strategy: str, offload: str) -> None:
    validate(config(strategy=strategy, offload=offload))


@pytest.mark.slow
def test_strategy_modules_import_no_heavy_library() -> None:
    """The launcher validates in the parent process: describing must not import DeepSpeed."""
    import subprocess
    import sys

    code = (
        "import sys; from distlab.strategies import registry\n"
        "for n in ('zero1', 'zero2', 'zero3', 'fairscale-oss', 'fairscale-sdp'):\n"
        "    registry.get(n)\n"
        "print(sorted(m for m in ('deepspeed', 'fairscale') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_deepspeed_config_mirrors_distlab_config() -> None:
    cfg = config(strategy="zero3", nproc=4, micro_batch=1, grad_clip=0.5, weight_decay=0.2)
    ds = deepspeed_config(cfg, stage=3, dp_size=4, n_params=1000)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"]) == (8, 1)
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["gradient_clipping"] == 0.5
    assert ds["optimizer"]["type"] == "AdamW"
    assert ds["optimizer"]["params"]["weight_decay"] == 0.2
    assert ds["optimizer"]["params"]["torch_adam"] is True  # exact parity with torch's AdamW
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["reduce_bucket_size"] == bucket_elements(1000) == 125
    assert "offload_optimizer" not in ds["zero_optimization"]

    offload = deepspeed_config(config(offload="params", optimizer="sgd"), 3, 2, 1000)
    assert offload["optimizer"] == {"type": "SGD", "params": {"lr": 3e-3}}
    assert offload["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert offload["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    bf16 = deepspeed_config(config(precision="bf16"), 2, 2, 1000)
    # DeepSpeed's own bf16 mode (bf16 parameters, fp32 master), gradients reduced in fp32.
    assert bf16["bf16"] == {"enabled": True}
    assert bf16["communication_data_type"] == "fp32"
    assert "torch_autocast" not in bf16
    assert "bf16" not in ds and "communication_data_type" not in ds


def test_oss_partition_is_greedy_by_tensor() -> None:
    assert oss_partition([10, 4, 4, 4], 2) == [10, 12]
    assert sum(oss_partition([3] * 7, 4)) == 21


def test_predictions_shrink_with_the_stage() -> None:
    n_params = 139_296
    totals = [
        registry.get(name).predicted_state_bytes(config(nproc=4), n_params).total
        for name in ("zero1", "zero2", "zero3")
    ]
    assert totals[0] > totals[1] > totals[2]
