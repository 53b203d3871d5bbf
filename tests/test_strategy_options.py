"""Every flag a strategy does not use is refused; verify's tolerances are the tests'.

The refusal is derived from what each strategy declares (``Strategy.options``),
so these tests walk the registry instead of a hand-kept list: for every
strategy, every other strategy's option set away from its default is a
one-line error naming the flag and the strategies that do use it.
"""

from __future__ import annotations

import pytest
from tests.helpers import assert_one_line_error, run_main

from distlab.config_reading import DEFAULTS, option_flag
from distlab.errors import DistlabError
from distlab.report.parity import parity_config, tolerance
from distlab.strategies import registry
from distlab.strategies.resolve import load_config

NPROC = {"single": 1, "tp": 2, "pp": 2, "fsdp+tp+pp": 8, "fsdp+cp+tp+pp": 16}
"""A valid world size per strategy (4 for the other compositions, 2 for the rest)."""
SAMPLE = {
    "dp": 2,
    "dp_replicate": 2,
    "dp_shard": 2,
    "ep": 2,
    "tp": 2,
    "pp": 2,
    "cp": 2,
    "cp_attention": "ring",
    "schedule": "gpipe",
    "microbatches": 4,
    "sequence_parallel": True,
    "reshard_after_forward": False,
    "reshard_between_microbatches": True,
    "offload": "optimizer",
    "zero_reduce": "per-microbatch",
    "bucket_mb": 1.0,
    "prefetch": 2,
}
"""A value other than the default for every strategy option."""


def nproc(strategy: str) -> int:
    return NPROC.get(strategy, 4 if "+" in strategy else 2)


def unused_options() -> list:
    users = registry.option_users()
    return [
        pytest.param(strategy, option, id=f"{strategy}-{option}")
        for strategy in registry.names()
        for option in users
        if option not in registry.get(strategy).options
    ]


def test_every_option_has_a_sample_and_a_default() -> None:
    assert set(registry.option_users()) == set(SAMPLE)
    assert all(SAMPLE[name] != DEFAULTS[name] for name in SAMPLE)


@pytest.mark.parametrize(("strategy", "option"), unused_options())
def test_an_option_the_strategy_does_not_use_is_refused(strategy: str, option: str) -> None:
    model = "small-moe" if strategy == "ep" else "small"
    overrides = {"strategy": strategy, "nproc": nproc(strategy), "model": model}
    parts = strategy.split("+")
    overrides.update({degree: 2 for degree in ("tp", "pp", "cp") if degree in parts})
    load_config(None, overrides)  # valid without the option
    with pytest.raises(DistlabError) as error:
        load_config(None, {**overrides, option: SAMPLE[option]})
    message = str(error.value)
    assert message.startswith(f"{option_flag(option, SAMPLE[option])} is not used by strategy")
    assert f"'{strategy}'" in message and "\n" not in message
    assert ", ".join(registry.option_users()[option]) in message


@pytest.mark.parametrize(
    "overrides",
    [
        {"strategy": "fsdp", "nproc": 2, "reshard_after_forward": False},
        {"strategy": "zero2", "nproc": 2, "offload": "optimizer"},
        {"strategy": "pp", "nproc": 2, "schedule": "gpipe", "microbatches": 4},
        {"strategy": "tp", "nproc": 2, "sequence_parallel": True},
        {"strategy": "fsdp+tp+pp", "nproc": 8, "dp": 2, "tp": 2, "pp": 2},
        {"strategy": "ddp", "nproc": 2, "tp": 1, "offload": "none"},  # defaults are fine
        {"strategy": "ddp", "nproc": 2, "bucket_mb": 0.25},
        {"strategy": "cp", "nproc": 2, "bucket_mb": 0.25},
        {"strategy": "ddp+pp", "nproc": 4, "pp": 2, "bucket_mb": 0.25},
        {"strategy": "fsdp", "nproc": 2, "prefetch": 2},
        {"strategy": "fsdp+pp", "nproc": 4, "pp": 2, "prefetch": 0},
    ],
)
def test_an_option_the_strategy_uses_is_accepted(overrides: dict) -> None:
    load_config(None, overrides)


def test_a_resume_under_another_strategy_drops_the_source_strategys_options() -> None:
    source = {"strategy": "fsdp", "nproc": 2, "reshard_after_forward": False, "lr": 0.01}
    config = load_config(None, {"strategy": "ddp"}, base=source)
    assert config.reshard_after_forward is True and config.lr == 0.01
    kept = load_config(None, {"strategy": "fsdp+tp", "nproc": 4, "tp": 2}, base=source)
    assert kept.reshard_after_forward is False  # fsdp+tp uses it too
    with pytest.raises(DistlabError, match="is not used by strategy 'ddp'"):
        load_config(None, {"strategy": "ddp", "reshard_after_forward": False}, base=source)


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--strategy", "ddp", "--nproc", "2", "--tp", "2"], "--tp 2 is not used by strategy"),
        (["--strategy", "ddp", "--offload", "params"], "--offload params is not used"),
        (["--strategy", "fsdp", "--schedule", "gpipe"], "--schedule gpipe is not used"),
        (["--strategy", "ddp", "--microbatches", "4"], "--microbatches 4 is not used"),
        (["--strategy", "fsdp", "--sequence-parallel"], "--sequence-parallel is not used"),
        (["--strategy", "zero3", "--no-reshard-after-forward"], "--no-reshard-after-forward"),
        (["--strategy", "fsdp", "--bucket-mb", "1"], "--bucket-mb 1.0 is not used"),
        (["--strategy", "zero3", "--prefetch", "2"], "--prefetch 2 is not used"),
    ],
)
def test_unused_flags_on_the_command_line(args: list[str], fragment: str) -> None:
    result = run_main("distlab.launch", *args, "--launcher", "local", "--no-wandb")
    assert_one_line_error(result, fragment)


def test_verify_refuses_to_compare_single_with_itself() -> None:
    result = run_main("distlab.verify", "--strategy", "single", "--nproc", "1")
    assert_one_line_error(result, "compares a strategy with 'single'")


@pytest.mark.parametrize(
    ("strategy", "nproc", "optimizer", "fields", "param_atol"),
    [
        ("ddp", 2, "adamw", {}, 1e-5),
        ("zero3", 2, "adamw", {}, 1e-5),
        ("tp", 2, "sgd", {}, 1e-5),
        ("tp", 2, "adamw", {}, 1e-4),
        ("pp", 2, "adamw", {}, 1e-4),
        ("fsdp+tp+pp", 8, "adamw", {"dp": 2, "tp": 2, "pp": 2}, 1e-4),
    ],
)
def test_one_tolerance_per_strategy_and_optimizer(
    strategy: str, nproc: int, optimizer: str, fields: dict, param_atol: float
) -> None:
    held_to = tolerance(parity_config(strategy, nproc, optimizer, **fields))
    assert held_to.loss_rtol == 1e-5
    assert held_to.param_atol == param_atol


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "zero2", "tp", "fsdp+tp+pp"])
def test_bf16_tolerance_is_the_unit_roundoff_for_every_strategy(strategy: str) -> None:
    """bf16 runs share one derived tolerance (``distlab.report.parity.bf16_tolerance``)."""
    fields = {"dp": 2, "tp": 2, "pp": 2} if strategy == "fsdp+tp+pp" else {}
    sgd = tolerance(parity_config(strategy, nproc(strategy), "sgd", precision="bf16", **fields))
    adamw = tolerance(parity_config(strategy, nproc(strategy), "adamw", precision="bf16", **fields))
    assert sgd.loss_rtol == adamw.loss_rtol == 2**-8
    # SGD: u x the summed lr (0.5 x (0.5 + 1 + 1 + 0.775 + 0.325) = 1.8) with gradients clipped to 1
    assert sgd.param_atol == pytest.approx(2**-8 * 1.8)
    # AdamW: twice the farthest AdamW can move a weight, 1.165 x the summed lr (3e-3 x 3.6)
    assert adamw.param_atol == pytest.approx(2 * 1.1650 * 3e-3 * 3.6, rel=1e-4)
