"""cp and fsdp+cp: context parallelism trains what ``single`` trains, sends what the theory
says, keeps 1/cp of the activations, and refuses sequences it cannot split in one line.

Tolerance: the data-parallel one (``distlab.report.parity.tolerance``), 1e-5 relative on
every step's loss and 1e-5 absolute on every final weight, SGD and AdamW: a cp rank runs
the same ops on fewer tokens, only the attention's keys arrive by all-gather and the
gradients are averaged over more ranks, so runs differ by summation order alone
(measured: losses within 2e-7, AdamW weights within 3.9e-6).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tests.helpers import (
    TINY_LOCAL_RUN,
    assert_counted_matches_theory,
    assert_one_line_error,
    run_main,
)

from distlab.errors import DistlabError
from distlab.model import PRESETS, count_parameters
from distlab.report.parity import _run_name, _run_once, compare, parity_config
from distlab.strategies import registry
from distlab.strategies.cp_attention import held_chunks, held_positions, sequence_order
from distlab.strategies.resolve import load_config
from distlab.theory.comm import predict_comm
from distlab.theory.memory import predict_peak

pytestmark = pytest.mark.slow  # the whole file: most tests train on real ranks, up to 16

SEQ = PRESETS["tiny"].block_size
"""32 tokens: 8 chunks of 4 at cp = 4."""

# --- The split of a sequence --------------------------------------------------------------


def test_each_rank_holds_a_head_and_a_tail_chunk() -> None:
    assert [held_chunks(r, 2) for r in range(2)] == [(0, 3), (1, 2)]
    assert held_positions(8, 2, 0).tolist() == [0, 1, 6, 7]
    assert held_positions(8, 2, 1).tolist() == [2, 3, 4, 5]


@pytest.mark.parametrize("cp", [2, 3, 4])
def test_the_ranks_hold_every_position_once_with_equal_causal_work(cp: int) -> None:
    seq_len = 4 * cp
    held = [held_positions(seq_len, cp, r) for r in range(cp)]
    assert sorted(torch.cat(held).tolist()) == list(range(seq_len))
    # a query at position i attends to i + 1 keys: every rank does the same work
    assert len({int((positions + 1).sum()) for positions in held}) == 1


@pytest.mark.parametrize("cp", [2, 4])
def test_gathered_chunks_reordered_are_the_sequence(cp: int) -> None:
    """The all-gather concatenates the ranks' tokens in rank order; ``sequence_order``
    puts its 2 cp chunks back in sequence order."""
    gathered = torch.cat([held_positions(SEQ, cp, r) for r in range(cp)])
    chunks = gathered.chunk(2 * cp)
    assert torch.cat([chunks[i] for i in sequence_order(cp)]).tolist() == list(range(SEQ))


# --- Degrees and refusals -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("strategy", "nproc", "flags", "expected"),
    [
        ("cp", 2, {}, (1, 2)),
        ("cp", 4, {}, (1, 4)),
        ("cp", 4, {"cp": 2}, (2, 2)),
        ("fsdp+cp", 4, {"cp": 2}, (2, 2)),
        ("fsdp+cp", 4, {"cp": 4}, (1, 4)),
        ("fsdp+cp+tp", 8, {"cp": 2, "tp": 2}, (2, 2)),
    ],
)
def test_degrees(strategy: str, nproc: int, flags: dict, expected: tuple) -> None:
    config = load_config(None, {"strategy": strategy, "nproc": nproc, "model": "tiny", **flags})
    dims = registry.get(strategy).dims(config)
    assert (dims.dp, dims.cp) == expected
    assert dims.reducers * dims.tp == nproc  # gradients are averaged over all but tp ranks


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"strategy": "cp", "nproc": 4, "seq_len": 20}, "seq_len must be divisible by 8 (got 20)"),
        ({"strategy": "cp", "nproc": 4, "cp": 3}, "--nproc 4 is not divisible by --cp 3"),
        ({"strategy": "cp", "nproc": 1}, "strategy 'cp' needs --cp >= 2 ranks (got 1)"),
        ({"strategy": "cp", "nproc": 2, "cp": -2}, "--cp must be >= 1 (got -2)"),
        ({"strategy": "fsdp+cp", "nproc": 4}, "strategy 'fsdp+cp' needs --cp >= 2 (got 1)"),
        ({"strategy": "fsdp+cp", "nproc": 4, "cp": 3}, "--nproc 4 is not divisible by --cp 3"),
        ({"strategy": "fsdp+cp", "nproc": 4, "cp": 2, "dp": 4}, "--dp 4 x --cp 2 x --tp 1"),
        ({"strategy": "fsdp+cp+tp", "nproc": 4, "cp": 2}, "'fsdp+cp+tp' needs --tp >= 2"),
        ({"strategy": "fsdp+cp+tp", "nproc": 8, "cp": 4, "tp": 4}, "--nproc 8 is not divisible"),
        ({"strategy": "ddp", "nproc": 2, "cp": 2}, "--cp 2 is not used by strategy 'ddp'"),
        (
            {"strategy": "fsdp+cp+tp+pp", "nproc": 16, "dp": 2, "cp": 2, "tp": 2, "pp": 3},
            "--nproc 16 is not divisible by --cp 2 x --tp 2 x --pp 3",
        ),
        (
            {"strategy": "fsdp+cp+tp+pp", "nproc": 16, "dp": 3, "cp": 2, "tp": 2, "pp": 2},
            "--dp 3 x --cp 2 x --tp 2 x --pp 2 = 24 ranks, but --nproc is 16",
        ),
        ({"strategy": "fsdp+cp+pp", "nproc": 4, "cp": 2}, "'fsdp+cp+pp' needs --pp >= 2"),
        ({"strategy": "cp", "nproc": 2, "cp_attention": "tree"}, "unknown --cp-attention 'tree'"),
        ({"strategy": "cp", "nproc": 2, "compile": True}, "--compile is not supported by"),
    ],
)
def test_impossible_configs_are_refused(overrides: dict, message: str) -> None:
    with pytest.raises(DistlabError) as error:
        load_config(None, {"model": "tiny", **overrides})
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_sequence_that_does_not_split_is_refused_on_the_command_line() -> None:
    args = ["--strategy", "cp", "--nproc", "2", "--seq-len", "30", *TINY_LOCAL_RUN]
    assert_one_line_error(run_main("distlab.launch", *args), "divisible by 4 (got 30)")


# --- Theory ---------------------------------------------------------------------------------


def test_theory_adds_the_key_and_value_gathers_to_ddp() -> None:
    """cp x 2: ddp's gradient all-reduce over the 2 ranks, plus per layer 2 all-gathers and
    2 reduce-scatters of the whole sequence's keys (or values), B T d fp32 elements."""
    cp = predict_comm(parity_config("cp", 2, "adamw"))
    ddp = predict_comm(parity_config("ddp", 2, "adamw"))
    shape = PRESETS["tiny"]
    volume = 4 * 8 * SEQ * shape.d_model  # the 8 rows of the global batch, fp32
    assert cp.kinds["all_reduce"] == ddp.kinds["all_reduce"]
    assert cp.kinds["all_gather"] == cp.kinds["reduce_scatter"] == 2 * shape.n_layer * volume
    assert cp.calls["all_gather"] == 2 * shape.n_layer
    regather = predict_comm(parity_config("cp", 2, "adamw", ac="full"))
    assert regather.kinds["all_gather"] == 2 * cp.kinds["all_gather"]


def test_fsdp_cp_shards_the_state_over_every_rank() -> None:
    """2 replicas x 2 cp ranks: 16 N / 4 bytes, as fsdp on 4 ranks (each tensor's dim 0 padded
    to a multiple of 4); cp x 4 keeps the full 16 N, as ddp."""
    n_params = count_parameters(PRESETS["tiny"])
    config = parity_config("fsdp+cp", 4, "adamw", cp=2)
    sharded = registry.get("fsdp+cp").predicted_state_bytes(config, n_params)
    assert sharded.total == pytest.approx(16 * n_params / 4, rel=0.01)
    config = parity_config("cp", 4, "adamw")
    assert registry.get("cp").predicted_state_bytes(config, n_params).total == 16 * n_params


def test_activations_are_those_of_a_cp_th_of_the_tokens_plus_gathered_kv() -> None:
    """cp x 2 runs 8 rows x 16 tokens, as ddp x 2 runs 4 rows x 32: the same activations,
    but for the gathered keys and values (2 (cp - 1) t h fp32 per block more)."""
    cp = predict_peak(parity_config("cp", 2, "adamw")).to_dict()["moments"][0]
    ddp = predict_peak(parity_config("ddp", 2, "adamw")).to_dict()["moments"][0]
    shape = PRESETS["tiny"]
    extra = shape.n_layer * 4 * 2 * (8 * SEQ // 2) * shape.d_model
    assert cp["by_category"]["activations"] == ddp["by_category"]["activations"] + extra


# --- Parity with single ---------------------------------------------------------------------

PARITY = [
    pytest.param("cp", 2, {}, "sgd"),
    pytest.param("cp", 2, {}, "adamw"),
    pytest.param("cp", 4, {}, "sgd"),
    pytest.param("cp", 4, {}, "adamw"),
    pytest.param("fsdp+cp", 4, {"cp": 2}, "sgd"),
    pytest.param("fsdp+cp", 4, {"cp": 2}, "adamw"),
    pytest.param("fsdp+cp+tp", 4, {"cp": 2, "tp": 2}, "sgd"),
    pytest.param("cp", 4, {"cp_attention": "ring"}, "sgd"),
    pytest.param("fsdp+cp+pp", 4, {"cp": 2, "pp": 2}, "sgd"),
]
"""cp over 2 and 4 ranks (8 chunks of 4 tokens at 4), 2 replicas x 2 cp ranks under FSDP, and
2 cp ranks x 2 tp ranks (each gathers the keys and values of its 2 heads), and ring attention
over 4 ranks (3 steps around the ring), and 2 cp ranks in each of 2 pipeline stages (the
schedule passes each rank's T / cp tokens between stages), with SGD (which catches a gradient
summed instead of averaged) and, for cp and fsdp+cp, AdamW (fsdp+cp+tp's and ring's AdamW
runs, measured with ``python -m distlab.verify``, are in docs/strategies/cp.md)."""


@pytest.mark.parametrize(("strategy", "nproc", "fields", "optimizer"), PARITY)
def test_matches_single(
    strategy: str, nproc: int, fields: dict, optimizer: str, parity_workdir: Path
) -> None:
    report = compare(parity_config(strategy, nproc, optimizer, **fields), parity_workdir)
    assert report.passed, (report.rel_diffs, report.max_param_diff)
    assert report.losses[-1] < report.losses[0]  # it trained


@pytest.mark.parametrize(
    ("nproc", "optimizer", "fields"), [(2, "adamw", {}), (4, "sgd", {"cp_attention": "ring"})]
)
def test_memory_peak_and_state_match_the_theory(
    nproc: int, optimizer: str, fields: dict, parity_workdir: Path
) -> None:
    """cp x2 and ring cp x4 (reusing their parity runs): the full model state, a peak within
    10% and its activations within 15% (measured 0.974 and 0.976 of the predicted peak)."""
    config = parity_config("cp", nproc, optimizer, **fields)
    run_dir = _run_once(config, parity_workdir / _run_name(config))
    summary = json.loads((run_dir / "summary.json").read_text())
    measured = summary["model_state_bytes_per_rank"]
    predicted = summary["predicted_model_state_bytes_per_rank"]
    assert measured["params"] == predicted["params"]
    assert measured["grads"] == predicted["grads"]
    peak = summary["memory_peak_by_rank"][0]
    theory = predict_peak(config)
    assert abs(peak["peak"] / theory.total - 1) <= 0.10
    activations = theory.by_category["activations"]
    assert abs(peak["peak_by_category"]["activations"] / activations - 1) <= 0.15


# --- Communication counted by the process group ---------------------------------------------

COMM_CELLS = {
    "cp4": {"strategy": "cp"},
    # 2 replicas of 2 cp ranks; bf16 K/V; 2 micro-batches; --ac full gathers K/V again
    "cp2-dp2-bf16-accum-ac": {
        "strategy": "cp",
        "cp": 2,
        "precision": "bf16",
        "micro_batch": 2,
        "ac": "full",
    },
    "fsdp+cp": {"strategy": "fsdp+cp", "cp": 2},
    "fsdp+cp+tp": {"strategy": "fsdp+cp+tp", "cp": 2, "tp": 2},
    "cp4-ring": {"strategy": "cp", "cp_attention": "ring"},
    "fsdp+cp+pp": {"strategy": "fsdp+cp+pp", "cp": 2, "pp": 2},
}


@pytest.fixture(scope="module")
def four_rank_check():
    from distlab.report.comm_check import check, summarize

    cells = [{"model": "tiny", "global_batch": 8, **c} for c in COMM_CELLS.values()]
    return summarize(cells, check(cells, nproc=4, steps=3), 4)


@pytest.mark.parametrize("name", COMM_CELLS)
def test_counted_bytes_match_theory(four_rank_check, name: str) -> None:
    row = four_rank_check[list(COMM_CELLS).index(name)]
    # DDP's bucket rebuild after its first iteration adds one tiny broadcast.
    assert_counted_matches_theory(row)


def test_the_ring_sends_what_the_gather_and_reduce_scatter_send_on_a_ring(four_rank_check):
    """The ring passes (cp - 1)/cp of the gathered keys and values forward and of their
    gradients backward: the payload a ring all-gather and a ring reduce-scatter send. gloo's
    reduce-scatter is an all-reduce, which sends twice that, so the ring sends less."""
    rows = dict(zip(COMM_CELLS, four_rank_check, strict=True))
    gathered, ring = rows["cp4"], rows["cp4-ring"]
    moved = gathered["kinds"]["all_gather"] + gathered["kinds"]["reduce_scatter"]
    assert ring["kinds"]["send"] == ring["kinds"]["recv"] == moved * 3 / 4
    saved = gathered["kinds"]["reduce_scatter"] * 3 / 4  # gloo's 2 (N-1)/N less a ring's
    for by_gather, by_ring in zip(gathered["ranks"], ring["ranks"], strict=True):
        assert by_gather["wire"] - by_ring["wire"] == pytest.approx(saved, rel=1e-3)


# --- All four on one mesh: the 16-rank showcase -----------------------------------------------


def test_four_dimensions_on_sixteen_ranks_match_single(parity_workdir: Path) -> None:
    """fsdp+cp+tp+pp on a (pp 2, dp 2, cp 2, tp 2) mesh: 16 ranks, each holding half the
    layers, half of each layer's heads, a quarter of every sequence's tokens and a shard of
    its state; SGD losses and weights match single's, and the bytes every collective counted
    on rank 0 match the theory exactly (about 60 s on 2 cores)."""
    config = parity_config("fsdp+cp+tp+pp", 16, "sgd", dp=2, cp=2, tp=2, pp=2)
    report = compare(config, parity_workdir)
    assert report.passed, (report.rel_diffs, report.max_param_diff)
    summary = json.loads((parity_workdir / _run_name(config) / "summary.json").read_text())
    assert summary["comm_per_step"]["bytes"] == predict_comm(config).bytes
