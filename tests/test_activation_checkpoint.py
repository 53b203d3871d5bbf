"""``--ac full|selective``: less saved activation memory, the same gradients, the same names.

The parity runs hold each strategy with activation checkpointing to the ``single``
run without it (``distlab.report.parity.reference_config`` drops ``ac``), at the
usual tolerances: recomputation runs the same ops on the same inputs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distlab.errors import DistlabError
from distlab.measure.step_memory import HeldTensors
from distlab.measure.step_tracker import StepMemoryTracker
from distlab.model import build_model
from distlab.report.parity import compare, parity_config
from distlab.strategies.activation_checkpoint import apply_ac
from distlab.strategies.resolve import load_config

pytestmark = pytest.mark.slow  # the whole file: real runs with and without checkpointing


def activations_and_grads(mode: str) -> tuple[int, dict[str, torch.Tensor], list[str]]:
    """Peak activation bytes of a forward and backward, the gradients and the state-dict keys."""
    model = build_model("tiny", seed=0)
    apply_ac(model, mode)
    tokens = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))

    tracker = StepMemoryTracker(HeldTensors(modules=[model]), torch.device("cpu"))
    with tracker:
        model(tokens).float().square().mean().backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    return tracker.result().peak_by_category["activations"], grads, list(model.state_dict())


def test_checkpointing_saves_less_and_computes_the_same_gradients() -> None:
    none_bytes, none_grads, none_keys = activations_and_grads("none")
    full_bytes, full_grads, full_keys = activations_and_grads("full")
    selective_bytes, selective_grads, selective_keys = activations_and_grads("selective")
    # full keeps only each block's input; selective keeps the matmul and attention outputs too.
    assert full_bytes < selective_bytes < none_bytes
    for grads in (full_grads, selective_grads):
        assert all(torch.equal(grads[name], none_grads[name]) for name in none_grads)
    # Names stay the plain GPT's: checkpoints load across --ac modes.
    assert full_keys == none_keys == selective_keys


def test_ac_mode_is_checked_and_zero3_refuses_selective() -> None:
    with pytest.raises(DistlabError, match="ac must be one of none, full, selective"):
        load_config(overrides={"ac": "some"})
    with pytest.raises(DistlabError, match="--ac selective is not supported by strategy 'zero3'"):
        load_config(overrides={"strategy": "zero3", "nproc": 2, "ac": "selective"})
    assert load_config(overrides={"strategy": "zero3", "nproc": 2, "ac": "full"}).ac == "full"


AC_RUNS = [
    ("single", 1, "sgd", "full", {}),
    ("single", 1, "adamw", "selective", {}),
    ("ddp", 2, "sgd", "selective", {}),
    ("fsdp", 2, "adamw", "full", {}),
    ("fsdp", 2, "sgd", "selective", {"micro_batch": 2}),
    ("tp", 2, "sgd", "selective", {"tp": 2}),
    ("pp", 2, "sgd", "full", {"pp": 2}),
    ("zero2", 2, "sgd", "selective", {}),
    ("zero3", 2, "adamw", "full", {}),
]
"""(strategy, nproc, optimizer, ac, fields): each strategy family with one mode, both
modes and both optimizers covered, tensor parallelism's checkpointed collectives included."""


@pytest.mark.parametrize(("strategy", "nproc", "optimizer", "ac", "fields"), AC_RUNS)
def test_checkpointed_run_matches_single_without_ac(
    strategy: str, nproc: int, optimizer: str, ac: str, fields: dict, parity_workdir: Path
) -> None:
    report = compare(parity_config(strategy, nproc, optimizer, ac=ac, **fields), parity_workdir)
    assert report.passed, (report.rel_diffs, report.max_param_diff)
    assert report.losses[-1] < report.losses[0]  # it trained


def test_checkpointed_and_compiled_run_matches_single(
    compile_cache: Path, parity_workdir: Path
) -> None:
    """``--ac selective --compile``: the checkpoint is traced into each block's graph."""
    config = parity_config("fsdp", 2, "sgd", ac="selective", compile=True)
    report = compare(config, parity_workdir)
    assert report.passed, (report.rel_diffs, report.max_param_diff)
