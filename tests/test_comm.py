"""Communication accounting: the counting process group against theory and the kernel's TCP bytes.

The multi-rank checks run one 2-rank job (``distlab.comm_check``) on the tiny
model: for ddp, fsdp, tp and pp the bytes the counter saw per steady-state step
must equal the prediction of ``distlab.theory`` (to 1 %), and the bytes each
rank's loopback TCP sockets acknowledged must match the counter's wire-byte
estimate (gloo's algorithms) to within a few percent of protocol headers.
Raw collectives check the wire model itself, one type at a time.
"""

from __future__ import annotations

import importlib.util
import shutil

import pytest

from distlab.measure.counter import CommCounter, KindTotals, interval_union
from distlab.measure.process_group import BACKEND, backend_for, is_counting
from distlab.measure.tcp import parse_ss
from distlab.measure.wire import binomial_children, wire_bytes

needs_ss = pytest.mark.skipif(shutil.which("ss") is None, reason="needs iproute2's ss")


# --- Unit checks ----------------------------------------------------------------------


def test_wire_model_follows_gloo_algorithms():
    mib = 2**20
    assert wire_bytes("all_reduce", mib, 2) == mib  # ring: 2 (N-1)/N
    assert wire_bytes("all_reduce", mib, 4) == 1.5 * mib
    assert wire_bytes("all_gather", 4 * mib, 4) == 3 * mib  # (N-1)/N of the output
    assert wire_bytes("reduce_scatter", mib, 4) == 1.5 * mib  # gloo: an all-reduce
    assert wire_bytes("send", mib, 2) == mib
    assert wire_bytes("recv", mib, 2) == 0
    assert wire_bytes("all_reduce", mib, 1) == 0
    # binomial broadcast tree: the ranks together send the buffer N-1 times
    for n in (2, 3, 4, 5, 8):
        assert sum(binomial_children(r, n) for r in range(n)) == n - 1
    assert [binomial_children(r, 4) for r in range(4)] == [2, 1, 0, 0]
    assert wire_bytes("broadcast", mib, 4, relative_rank=0) == 2 * mib


def test_interval_union_counts_overlaps_once():
    assert interval_union([]) == 0
    assert interval_union([(0, 1), (0.5, 2), (3, 4)]) == pytest.approx(3.0)
    assert interval_union([(2, 3), (0, 1)]) == pytest.approx(2.0)


def test_counter_reports_deltas_per_step():
    counter = CommCounter(timing=False)
    counter.record("all_reduce", "g[2]", 100, 100.0)
    counter.begin_step()
    counter.record("all_reduce", "g[2]", 40, 40.0)
    counter.record("all_gather", "h[2]", 80, 40.0)
    counter.record("all_gather", "h[2]", 80, 40.0)
    stats = counter.end_step()
    assert stats.kinds["all_reduce"] == KindTotals(1, 40, 40.0)
    assert stats.kinds["all_gather"] == KindTotals(2, 160, 80.0)
    assert stats.bytes == 200 and stats.calls == 3 and stats.wire_bytes == 120
    assert set(stats.groups) == {"g[2]", "h[2]"}
    metrics = stats.to_metrics()
    assert metrics["comm/bytes"] == 200
    assert metrics["comm/all_gather/calls"] == 2
    assert "comm/time_s" not in metrics  # timing off
    assert counter.totals().bytes == 300


def test_parse_ss_sums_one_pid_and_skips_excluded_ports():
    output = (
        '0 0 127.0.0.1:5000 127.0.0.1:6000 users:(("python",pid=42,fd=3))\n'
        "\t cubic bytes_sent:120 bytes_acked:100 bytes_received:50 segs_out:3\n"
        '0 0 127.0.0.1:5001 127.0.0.1:29500 users:(("python",pid=42,fd=4))\n'
        "\t cubic bytes_acked:999 bytes_received:999\n"
        '0 0 127.0.0.1:5002 127.0.0.1:6001 users:(("python",pid=43,fd=3))\n'
        "\t cubic bytes_acked:7 bytes_received:7\n"
    )
    got = parse_ss(output, 42, exclude_ports=[29500])
    assert (got.sent, got.received, got.sockets) == (100, 50, 1)


# --- Multi-rank checks (one 2-rank job) ------------------------------------------------

STRATEGIES = ["ddp", "fsdp", "tp", "pp"]
BF16_CELLS = {
    # FSDP's bf16 policy: bf16 all-gathers, fp32 reduce-scatters; autocast tp: mixed all-reduces;
    # FSDP stages in a pipeline send bf16 activations.
    "fsdp-bf16": {"strategy": "fsdp", "precision": "bf16"},
    "tp-bf16": {"strategy": "tp", "precision": "bf16"},
    "fsdp+pp-bf16": {"strategy": "fsdp+pp", "pp": 2, "precision": "bf16"},
}
CELLS = {**{s: {"strategy": s} for s in STRATEGIES}, **BF16_CELLS}
COLLECTIVES = ["all_reduce", "all_gather", "reduce_scatter", "broadcast", "send"]
NUMEL = 2**18  # 1 MiB of fp32: protocol headers are noise next to it


@pytest.fixture(scope="module")
def two_rank_check():
    from distlab.report.comm_check import check, summarize

    cells = [{**c, "model": "tiny", "global_batch": 8} for c in CELLS.values()]
    cells += [{"collective": c, "numel": NUMEL} for c in COLLECTIVES]
    results = check(cells, nproc=2, steps=3)
    return cells, results, summarize(cells, results, 2)


def _row(rows, name):
    """The summary row of the cell ``CELLS[name]``."""
    return next(r for r in rows if CELLS[name].items() <= r["cell"].items())


@pytest.mark.parametrize("name", CELLS)
def test_counted_bytes_match_theory(two_rank_check, name):
    _, _, rows = two_rank_check
    row = _row(rows, name)
    # DDP's bucket rebuild after its first iteration adds one tiny broadcast.
    assert row["counted_over_predicted"] == pytest.approx(1.0, rel=1e-3), row
    for kind, predicted in row["predicted_kinds"].items():
        assert row["kinds"][kind] == pytest.approx(predicted, rel=1e-2), (kind, row)


def test_fsdp_bf16_gathers_half_the_bytes_and_reduces_in_fp32(two_rank_check):
    _, _, rows = two_rank_check
    fp32, bf16 = _row(rows, "fsdp")["kinds"], _row(rows, "fsdp-bf16")["kinds"]
    assert bf16["all_gather"] == fp32["all_gather"] / 2
    assert bf16["reduce_scatter"] == fp32["reduce_scatter"]


@needs_ss
@pytest.mark.parametrize("name", CELLS)
def test_tcp_bytes_match_counted_wire_bytes(two_rank_check, name):
    _, _, rows = two_rank_check
    row = _row(rows, name)
    for rank, figures in enumerate(row["ranks"]):
        # gloo adds a small header per message; pp's messages are the smallest.
        assert 0.99 <= figures["tcp_over_wire"] <= 1.05, (rank, figures)


@needs_ss
@pytest.mark.parametrize("collective", COLLECTIVES)
def test_raw_collectives_on_the_wire(two_rank_check, collective):
    cells, results, _ = two_rank_check
    index = next(i for i, c in enumerate(cells) if c.get("collective") == collective)
    payload = {"all_gather": 2 * 4 * NUMEL}.get(collective, 4 * NUMEL)
    for rank, rank_results in enumerate(results):
        result = rank_results[index]
        kinds = result["comm"]["kinds"]
        kind = "send" if collective == "send" else collective
        assert kinds[kind]["bytes"] == payload, (rank, kinds)
        expected = result["comm"]["wire_bytes"]
        if collective == "broadcast" and rank == 1:
            assert expected == 0 and result["tcp_sent"] < 1024
            continue
        assert expected > 0
        assert result["tcp_sent"] / expected == pytest.approx(1.0, abs=0.01), (rank, result)


def test_losses_are_the_same_under_counting(two_rank_check):
    """Counting changes nothing: ddp, fsdp, tp and pp start from the same loss on every rank."""
    _, results, _ = two_rank_check
    first = [r[i]["losses"][0] for r in results for i in range(len(STRATEGIES))]  # the fp32 cells
    assert max(first) - min(first) < 1e-5


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed")
def test_zero_counted_bytes_match_theory():
    """zero3 in fp32, and zero2/zero3 in DeepSpeed's bf16 mode (bf16 gathers, fp32 reductions)."""
    from distlab.report.comm_check import check, summarize

    tiny = {"model": "tiny", "global_batch": 8}
    cells = [
        {"strategy": "zero3", **tiny},
        {"strategy": "zero2", "precision": "bf16", **tiny},
        {"strategy": "zero3", "precision": "bf16", **tiny},
    ]
    rows = summarize(cells, check(cells, nproc=2, steps=3), 2)
    for row in rows:
        assert row["counted_over_predicted"] == pytest.approx(1.0, rel=1e-2), row
        for kind, predicted in row["predicted_kinds"].items():
            assert row["kinds"][kind] == pytest.approx(predicted, rel=1e-2), (kind, row)
        for figures in row["ranks"]:
            assert 0.99 <= figures["tcp_over_wire"] <= 1.05, figures
    assert rows[2]["kinds"]["all_gather"] == rows[0]["kinds"]["all_gather"] / 2


def test_is_counting_false_without_a_group():
    assert is_counting() is False
    assert backend_for("cuda") == "nccl"
    assert backend_for("cpu", count=False) == "gloo"
    assert backend_for("cpu") == BACKEND


# --- Theory ---------------------------------------------------------------------------


def test_pipeline_bubble_formula():
    from distlab.strategies.resolve import load_config
    from distlab.theory import pipeline_bubble

    config = load_config(None, {"strategy": "pp", "nproc": 4, "microbatches": 8})
    assert pipeline_bubble(config) == pytest.approx(3 / 11)
    interleaved = load_config(
        None, {"strategy": "pp", "nproc": 2, "microbatches": 4, "schedule": "interleaved-1f1b"}
    )
    assert pipeline_bubble(interleaved) == pytest.approx(1 / 9)
    assert pipeline_bubble(load_config(None, {"strategy": "ddp", "nproc": 2})) is None


def test_predictions_for_every_valid_strategy():
    from distlab.errors import DistlabError
    from distlab.strategies import registry
    from distlab.strategies.resolve import load_config
    from distlab.theory import predict

    predicted = {}
    for name in registry.names():
        for nproc in (1, 2, 4):
            try:
                config = load_config(None, {"strategy": name, "nproc": nproc})
            except DistlabError:
                continue
            result = predict(config)
            assert result["model_state_bytes_per_rank"]["total"] > 0
            if result["comm_per_step"] is not None:
                predicted[(name, nproc)] = result["comm_per_step"]["bytes"]
    assert predicted[("single", 1)] == 0
    # the ZeRO ladder on gloo: zero1/2 add an all-gather to DDP's all-reduce; fsdp gathers twice
    assert predicted[("ddp", 2)] < predicted[("zero1", 2)] < predicted[("fsdp", 2)]


def test_every_data_parallel_flavour_has_its_facts_and_its_communication():
    """Each flavour a strategy declares has a row of facts and, data parallelism or not, a
    communication part; what a flavour splits follows ZeRO's ladder (parameters only with
    gradients, gradients only with optimizer state)."""
    from distlab.strategies import registry
    from distlab.strategies.data_parallel import FLAVOUR_FACTS, DataParallel
    from distlab.theory.comm_data_parallel import DATA_PARALLEL_COMM

    declared = {registry.get(name).data_parallel for name in registry.names()}
    assert declared == set(DataParallel)
    assert set(FLAVOUR_FACTS) == set(DataParallel)
    assert set(DATA_PARALLEL_COMM) == set(DataParallel) - {DataParallel.NONE}
    for flavour in DataParallel:
        assert flavour.shards_gradients or not flavour.shards_parameters, flavour
        assert flavour.shards_optimizer_state or not flavour.shards_gradients, flavour


@pytest.mark.parametrize(
    ("strategy", "gradients"),
    [("fsdp", "reduce_scatter"), ("fsdp+tp", "reduce_scatter"), ("zero1", "all_reduce"),
     ("zero3", "reduce_scatter")],
)  # fmt: skip
def test_bf16_predictions_gather_two_bytes_and_reduce_four(strategy, gradients):
    """FSDP's policy and DeepSpeed's bf16 mode: parameters (fsdp+tp: and logits) gathered in
    bf16, half the fp32 bytes; gradients reduced in fp32, the same bytes."""
    from distlab.strategies.resolve import load_config
    from distlab.theory.comm import predict_comm

    settings = {"strategy": strategy, "nproc": 4, **({"tp": 2} if "tp" in strategy else {})}
    fp32 = predict_comm(load_config(None, settings)).kinds
    bf16 = predict_comm(load_config(None, {**settings, "precision": "bf16"})).kinds
    assert bf16["all_gather"] == fp32["all_gather"] / 2
    assert bf16[gradients] == fp32[gradients]
