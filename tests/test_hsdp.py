"""hsdp: FSDP2 on a (replicate, shard) mesh trains what ``single`` trains, sends what the
theory says, holds 1/S of the model state, and refuses impossible degrees in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tests.helpers import (
    TINY_LOCAL_RUN,
    assert_counted_matches_theory,
    assert_one_line_error,
    assert_resume_continues,
    run_main,
)

from distlab.errors import DistlabError
from distlab.model import PRESETS, count_parameters
from distlab.report.parity import _run_name, _run_once, compare, parity_config
from distlab.strategies import registry
from distlab.strategies.resolve import load_config
from distlab.theory.comm import predict_comm

pytestmark = pytest.mark.slow  # the whole file: most tests train on 4 real ranks

MESHES = [(2, 1, 2), (2, 2, 1), (4, 2, 2)]
"""(nproc, R, S): sharded only, replicated only, and both."""


def hsdp_config(nproc: int, replicate: int, shard: int, optimizer: str = "adamw", **fields):
    """The parity config of hsdp on an R x S mesh."""
    return parity_config("hsdp", nproc, optimizer, dp_replicate=replicate, dp_shard=shard, **fields)


# --- Degrees and refusals ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("nproc", "flags", "expected"),
    [
        (2, {}, (1, 2)),
        (3, {}, (1, 3)),
        (4, {}, (2, 2)),
        (6, {}, (2, 3)),
        (4, {"dp_shard": 4}, (1, 4)),
        (8, {"dp_replicate": 4}, (4, 2)),
        (4, {"dp_replicate": 4, "dp_shard": 1}, (4, 1)),
    ],
)
def test_degrees_and_their_defaults(nproc: int, flags: dict, expected: tuple) -> None:
    config = load_config(None, {"strategy": "hsdp", "nproc": nproc, "global_batch": 48, **flags})
    dims = registry.get("hsdp").dims(config)
    assert (dims.replicate, dims.shard) == expected
    assert dims.dp == nproc  # every rank trains its own rows of the batch


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"dp_replicate": 2, "dp_shard": 4}, "--dp-replicate 2 x --dp-shard 4 = 8 ranks, but"),
        ({"dp_replicate": 0}, "--dp-replicate must be >= 1 (got 0)"),
        ({"dp_shard": -2}, "--dp-shard must be >= 1 (got -2)"),
        ({"dp_shard": 3}, "--nproc 4 is not divisible by --dp-shard 3"),
        ({"offload": "params"}, "--offload params is not used by strategy 'hsdp'"),
        ({"global_batch": 6}, "global_batch 6 is not divisible by the data-parallel size 4"),
    ],
)
def test_impossible_configs_are_refused(flags: dict, message: str) -> None:
    with pytest.raises(DistlabError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, {"strategy": "hsdp", "nproc": 4, **flags})


def test_the_mesh_flags_are_refused_by_other_strategies() -> None:
    with pytest.raises(DistlabError, match="--dp-shard 2 is not used by strategy 'fsdp'"):
        load_config(None, {"strategy": "fsdp", "nproc": 2, "dp_shard": 2})


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--strategy", "hsdp", "--dp-replicate", "3", "--dp-shard", "2"], "= 6 ranks, but"),
        (["--strategy", "ddp", "--dp-replicate", "2"], "--dp-replicate 2 is not used by"),
    ],
)
def test_bad_degrees_on_the_command_line(args: list[str], fragment: str) -> None:
    result = run_main("distlab.launch", *args, "--nproc", "4", *TINY_LOCAL_RUN)
    assert_one_line_error(result, fragment)


# --- Theory ------------------------------------------------------------------------------


def test_theory_is_fsdp_over_the_shards_plus_the_replicas_all_reduce() -> None:
    """R x S: fsdp on S ranks, plus an all-reduce of the 4P'/S gradient shard over R."""
    hsdp = predict_comm(hsdp_config(4, 2, 2))
    fsdp = predict_comm(parity_config("fsdp", 2, "adamw", global_batch=4))
    assert hsdp.kinds["all_gather"] == fsdp.kinds["all_gather"]
    assert hsdp.kinds["reduce_scatter"] == fsdp.kinds["reduce_scatter"]
    shard_bytes = fsdp.kinds["reduce_scatter"] / 2
    # + the loss mean over 4 ranks instead of 2 (same 4 bytes)
    assert hsdp.kinds["all_reduce"] == fsdp.kinds["all_reduce"] + shard_bytes
    # rank 0's model state is fsdp's over S = 2, tensor by tensor with FSDP2's padding
    fsdp_config = parity_config("fsdp", 2, "adamw", global_batch=4)
    state = registry.get("hsdp").predicted_state_bytes(hsdp_config(4, 2, 2), 0)
    assert state == registry.get("fsdp").predicted_state_bytes(fsdp_config, 0)
    assert state.total >= 16 * count_parameters(PRESETS["tiny"]) // 2  # AdamW fp32: 16 B/param


# --- Parity with single ------------------------------------------------------------------


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize(("nproc", "replicate", "shard"), MESHES)
def test_hsdp_matches_single(
    nproc: int, replicate: int, shard: int, optimizer: str, parity_workdir: Path
) -> None:
    report = compare(hsdp_config(nproc, replicate, shard, optimizer), parity_workdir)
    assert report.passed, (report.rel_diffs, report.max_param_diff)
    assert report.losses[-1] < report.losses[0]  # it trained


def test_hsdp_with_gradient_accumulation(parity_workdir: Path) -> None:
    """Two micro-batches per rank: the gradient shards are all-reduced once, at the last."""
    report = compare(hsdp_config(4, 2, 2, "sgd", micro_batch=1), parity_workdir)
    assert report.passed, (report.rel_diffs, report.max_param_diff)


def test_each_rank_holds_one_shard_of_the_state(parity_workdir: Path) -> None:
    """R = 2, S = 2: as much as fsdp on 2 ranks (16 B/param / 2), not fsdp on 4."""
    config = hsdp_config(4, 2, 2)
    run_dir = _run_once(config, parity_workdir / _run_name(config))
    summary = json.loads((run_dir / "summary.json").read_text())
    measured = summary["model_state_bytes_per_rank"]
    predicted = summary["predicted_model_state_bytes_per_rank"]
    assert measured["params"] == predicted["params"]
    assert measured["grads"] == predicted["grads"]
    assert abs(measured["total"] / predicted["total"] - 1) <= 0.01  # AdamW's step counters


def test_a_resumed_run_continues_the_losses(tmp_path: Path) -> None:
    """A 2 x 2 run's DCP checkpoint loads into a fresh 2 x 2 mesh and training continues."""
    assert_resume_continues(
        tmp_path, "--strategy", "hsdp", "--nproc", "4", "--dp-replicate", "2", "--dp-shard", "2"
    )


# --- Communication counted by the process group ------------------------------------------

COMM_CELLS = {
    "r2s2": {"dp_replicate": 2, "dp_shard": 2},
    "r2s2-bf16-accum": {"dp_replicate": 2, "dp_shard": 2, "precision": "bf16", "micro_batch": 1},
    "r4s1": {"dp_replicate": 4, "dp_shard": 1},
    "r1s4": {"dp_replicate": 1, "dp_shard": 4},  # fsdp's 1-D mesh: no one-rank all-reduces
}


@pytest.fixture(scope="module")
def four_rank_check():
    from distlab.report.comm_check import check, summarize

    cells = [
        {"strategy": "hsdp", "model": "tiny", "global_batch": 8, **c} for c in COMM_CELLS.values()
    ]
    results = check(cells, nproc=4, steps=3, tcp=False)  # the counter's bytes alone
    return results, summarize(cells, results, 4)


@pytest.mark.parametrize("name", COMM_CELLS)
def test_counted_bytes_match_theory(four_rank_check, name: str) -> None:
    _, rows = four_rank_check
    row = rows[list(COMM_CELLS).index(name)]
    assert_counted_matches_theory(row, tcp=None)


def test_replicas_all_reduce_the_reduce_scattered_shard(four_rank_check) -> None:
    """Per step, the replicate group's all-reduce moves 1/S of what the shard group's
    reduce-scatter does: each unit's gradient shard, not the whole gradient."""
    results, _ = four_rank_check
    groups = results[0][list(COMM_CELLS).index("r2s2")]["comm"]["groups"]
    shard, replicate = groups["mesh_dp_shard[2]"], groups["mesh_dp_replicate[2]"]
    assert replicate["all_reduce"]["bytes"] * 2 == shard["reduce_scatter"]["bytes"]
    assert replicate["all_reduce"]["calls"] == shard["reduce_scatter"]["calls"]
    assert "all_gather" not in replicate  # parameters are never gathered across replicas
