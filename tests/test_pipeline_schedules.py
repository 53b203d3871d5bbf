"""The zero-bubble and looped pipeline schedules: parity, one-line errors, placement theory.

Parity: each of zbv, dualpipev, interleaved-zb and looped-bfs runs at 2 and 4
pipeline ranks and reproduces ``single``'s per-step losses within 1e-5
relative and its final weights within 1e-5 (SGD) or 1e-4 (AdamW),
``distlab.report.parity.tolerance`` (5 steps, fp32). These schedules hold two
stages per rank, so 4 ranks need 8 layers: those cases use the ``small``
preset with 32-token sequences, as interleaved 1F1B's do. To keep the suite's
time, each schedule runs SGD at one size and AdamW at the other (the V
schedules, whose placement moves the head and the loss to rank 0, both at 2
ranks), and one composition runs a zero-bubble schedule under FSDP.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distlab.errors import DistlabError
from distlab.report.parity import _run_name, _run_once, compare, parity_config
from distlab.strategies.pipeline_schedules import last_stage_rank
from distlab.strategies.resolve import load_config
from distlab.theory.activations import pipeline_in_flight, step_shape
from distlab.theory.comm import predict_comm
from distlab.theory.memory import nearest_moment, predict_peak
from distlab.theory.rank_layout import rank_layout
from helpers import assert_one_line_error, run_main

SMALL = {"model": "small", "seq_len": 32}
slow = pytest.mark.slow


def case(strategy: str, nproc: int, optimizer: str, schedule: str, marks=(), **fields):
    name = "-".join([strategy, str(nproc), optimizer, schedule, *fields])
    fields = {"schedule": schedule, **fields}
    return pytest.param(strategy, nproc, optimizer, fields, id=name, marks=marks)


CASES = [
    case("pp", 2, "sgd", "zbv", pp=2),
    case("pp", 2, "adamw", "zbv", pp=2),
    case("pp", 4, "sgd", "zbv", slow, pp=4, **SMALL),
    case("pp", 2, "sgd", "dualpipev", pp=2),
    case("pp", 2, "adamw", "dualpipev", pp=2),
    case("pp", 4, "adamw", "dualpipev", slow, pp=4, **SMALL),
    case("pp", 2, "sgd", "interleaved-zb", pp=2),
    case("pp", 4, "adamw", "interleaved-zb", slow, pp=4, **SMALL),
    case("pp", 2, "adamw", "looped-bfs", pp=2),
    case("pp", 4, "sgd", "looped-bfs", slow, pp=4, **SMALL),
    case("fsdp+pp", 4, "sgd", "zbv", pp=2),
]


@pytest.mark.parametrize(("strategy", "nproc", "optimizer", "fields"), CASES)
def test_schedule_parity(
    strategy: str, nproc: int, optimizer: str, fields: dict, parity_workdir: Path
) -> None:
    config = parity_config(strategy, nproc, optimizer, **fields)
    workdir = parity_workdir if config.model == "tiny" else parity_workdir / config.model
    report = compare(config, workdir)
    assert report.passed, (report.rel_diffs, report.max_param_diff, report.tolerance)
    assert report.losses[-1] < report.losses[0]  # it trained
    # Rank 0's traffic as counted is the theory's (V placement: two stages' messages, and
    # the loss broadcast leaving rank 0).
    summary = json.loads((workdir / _run_name(config) / "summary.json").read_text())
    counted, predicted = summary["comm_per_step"], summary["predicted"]["comm_per_step"]
    assert (counted["bytes"], counted["wire_bytes"]) == (
        predicted["bytes"],
        predicted["wire_bytes"],
    )


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        # Two stages per rank: 4 ranks need 8 layers.
        ({"strategy": "pp", "nproc": 4, "model": "tiny", "schedule": "zbv"}, "(2 per rank"),
        (
            {"strategy": "fsdp+pp", "nproc": 8, "pp": 4, "model": "tiny", "schedule": "dualpipev"},
            "only 4 layers",
        ),
        # V schedules need a microbatch per stage.
        (
            {"strategy": "pp", "nproc": 2, "schedule": "dualpipev", "microbatches": 2},
            "at least as many microbatches as its 4 stages",
        ),
        (
            {"strategy": "pp", "nproc": 2, "schedule": "zbv", "microbatches": 2},
            "at least as many microbatches as its 4 stages",
        ),
        (
            {"strategy": "pp", "nproc": 2, "schedule": "interleaved-zb"}
            | {"global_batch": 10, "microbatches": 5},
            "interleaved-zb needs --microbatches a multiple of",
        ),
        # A composition that cannot run it, and compile.
        (
            {"strategy": "ddp+pp", "nproc": 4, "pp": 2, "schedule": "zbv"},
            "ddp+pp cannot run --schedule zbv",
        ),
        (
            {"strategy": "pp", "nproc": 2, "schedule": "interleaved-zb", "compile": True},
            "torch does not support under --compile",
        ),
    ],
)
def test_invalid_schedule_settings_raise_one_line_errors(overrides: dict, fragment: str) -> None:
    with pytest.raises(DistlabError) as error:
        load_config(None, overrides)
    assert fragment in str(error.value)
    assert "\n" not in str(error.value)


def test_bad_schedule_exits_2_with_one_line() -> None:
    result = run_main(
        "distlab.launch", "--strategy", "pp", "--nproc", "4", "--model", "tiny",
        "--schedule", "dualpipev", "--launcher", "local", "--no-wandb",
    )  # fmt: skip
    assert_one_line_error(result, "8 pipeline stages (2 per rank with dualpipev)")


def test_v_placement_puts_the_loss_and_the_head_on_rank_0() -> None:
    config = load_config(None, {"strategy": "pp", "nproc": 2, "schedule": "zbv"})
    comm = predict_comm(config)
    looped = predict_comm(load_config(None, {"strategy": "pp", "nproc": 2, "schedule": "1f1b"}))
    assert comm is not None and looped is not None
    # Stages 0 and 3 on rank 0, both next to rank 1: twice 1F1B's m = 4 sends and receives.
    assert comm.calls["send"] == comm.calls["recv"] == 2 * looped.calls["send"] == 8
    # Rank 0 now sends the loss (the broadcast's root) instead of receiving it.
    assert last_stage_rank("zbv", 2) == 0 and last_stage_rank("1f1b", 2) == 1
    extra_sends = comm.kinds["send"] - looped.kinds["send"]
    assert comm.wire_bytes - looped.wire_bytes == extra_sends + 4  # + the 4-byte loss
    shape = step_shape(config, rank_layout(config))
    assert shape.has_first and shape.has_last
    assert (shape.outputs_in_flight, shape.heads_in_flight) == (3, 1)


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        ("gpipe", [8.0]),
        ("1f1b", [2.0]),
        ("looped-bfs", [8.0, 8.0]),
        ("interleaved-1f1b", [2.5, 2.5]),
        ("zbv", [3.0, 1.0]),  # 2p - 1 of the first stage, the head's one at a time
        ("dualpipev", [3.0, 1.0]),
    ],
)
def test_in_flight_microbatches_per_stage(schedule: str, expected: list[float]) -> None:
    assert pipeline_in_flight(schedule, 2, 8) == expected


def test_looped_bfs_peak_matches_theory(parity_workdir: Path) -> None:
    """Looped BFS runs every forward first: rank 0 peaks with all activations and no
    gradients yet (the parity run above, tracked by MemTracker; within 10%)."""
    config = parity_config("pp", 2, "adamw", pp=2, schedule="looped-bfs")
    run_dir = _run_once(config, parity_workdir / _run_name(config))
    measured = json.loads((run_dir / "summary.json").read_text())["memory_peak_by_rank"][0]
    predicted = predict_peak(config).to_dict()
    assert abs(measured["peak"] / predicted["total"] - 1) <= 0.10, (measured, predicted)
    moment = nearest_moment(predicted, measured["peak_by_category"])
    assert moment["by_category"]["grads"] == measured["peak_by_category"]["grads"] == 0
