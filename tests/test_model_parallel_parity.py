"""Parity: tensor, pipeline and composed parallelism reproduce the single-process run.

Every case trains the tiny model 5 steps in fp32 (``distlab.report.parity.parity_config``)
and compares per-step global-batch losses and final weights with ``single``.

Tolerances: ``distlab.report.parity.tolerance`` (the one place that sets them, also
for ``python -m distlab.verify``): losses within 1e-5 relative for both
optimizers; final weights within 1e-5 for SGD and 1e-4 for AdamW, whose
per-element normalisation turns rounding in near-zero gradients into full-size
steps (the reasoning is in ``distlab.report.parity``'s docstring).

Each parallelism is covered with SGD and AdamW at one world size and AdamW
at the other. Interleaved 1F1B puts 2 stages on each rank, so 4 ranks need 8
layers: that case uses the ``small`` preset (8 layers) with 32-token sequences.
``tp``/``pp`` degrees are passed explicitly so the run names (and the shared
reference runs) are distinct per schedule.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from distlab.report.parity import compare, parity_config

pytestmark = pytest.mark.slow  # the whole file: tp, pp and their compositions on up to 8 real ranks

SP = {"sequence_parallel": True}
GPIPE = {"schedule": "gpipe"}
ONE_F_ONE_B = {"schedule": "1f1b"}
INTERLEAVED = {"schedule": "interleaved-1f1b"}
SMALL = {"model": "small", "seq_len": 32}


def case(strategy: str, nproc: int, optimizer: str, **fields):
    name = "-".join([strategy, str(nproc), optimizer, *(f"{k}={v}" for k, v in fields.items())])
    return pytest.param(strategy, nproc, optimizer, fields, id=name)


CASES = [
    # Tensor parallel, with and without sequence parallelism.
    case("tp", 2, "sgd", tp=2),
    case("tp", 2, "adamw", tp=2),
    case("tp", 4, "adamw", tp=4),
    case("tp", 2, "sgd", tp=2, **SP),
    case("tp", 4, "adamw", tp=4, **SP),
    # Pipeline parallel, every schedule at 2 and 4 stages.
    case("pp", 2, "sgd", pp=2, microbatches=8, **GPIPE),
    case("pp", 2, "adamw", pp=2, **GPIPE),
    case("pp", 4, "adamw", pp=4, **GPIPE),
    case("pp", 4, "sgd", pp=4, **ONE_F_ONE_B),
    case("pp", 4, "adamw", pp=4, **ONE_F_ONE_B),
    case("pp", 2, "adamw", pp=2, microbatches=2, **ONE_F_ONE_B),
    case("pp", 2, "sgd", pp=2, **INTERLEAVED),
    case("pp", 2, "adamw", pp=2, **INTERLEAVED),
    case("pp", 4, "adamw", pp=4, **INTERLEAVED, **SMALL),
    # Compositions on one (pp, dp, tp) mesh.
    case("fsdp+tp", 4, "sgd", tp=2),
    case("fsdp+tp", 4, "adamw", tp=2),
    case("ddp+pp", 4, "sgd", pp=2),
    case("ddp+pp", 4, "adamw", pp=2),
    case("fsdp+pp", 4, "sgd", pp=2),
    case("fsdp+pp", 4, "adamw", pp=2),
    case("fsdp+tp+pp", 8, "sgd", dp=2, tp=2, pp=2),
    case("fsdp+tp+pp", 8, "adamw", dp=2, tp=2, pp=2, **SP),
]


@pytest.mark.parametrize(("strategy", "nproc", "optimizer", "fields"), CASES)
def test_model_parallel_parity(
    strategy: str, nproc: int, optimizer: str, fields: dict, parity_workdir: Path
) -> None:
    config = parity_config(strategy, nproc, optimizer, **fields)
    # Run names do not include the model: keep other presets' references apart.
    workdir = parity_workdir if config.model == "tiny" else parity_workdir / config.model
    report = compare(config, workdir)
    assert report.passed, (report.rel_diffs, report.max_param_diff, report.tolerance)
    assert report.losses[-1] < report.losses[0]  # it trained
