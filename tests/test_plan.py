"""The planner (``distlab.plan``): shapes, layouts, memory, step time, calibration, the command.

Everything here is arithmetic on dataclasses (no ranks, no torch work), so the file runs
in seconds: the shapes against the lab's model, the ZeRO paper's model-state figures,
the layout checks and the lab strategy each layout maps to, the memory model against
the lab's own theory, physical properties of the step-time model, a calibration that
recovers known constants, and the command's JSON, picture and one-line errors.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distlab.__main__ import COMMANDS
from distlab.__main__ import main as distlab_main
from distlab.cli import run_cli
from distlab.config import Config
from distlab.errors import DistlabError
from distlab.measure.step_memory import CATEGORIES
from distlab.measure.timeline import CATEGORIES as TIME_CATEGORIES
from distlab.model import PRESETS, count_parameters, flops_per_token
from distlab.plan import calibrate, hardware, memory, replay, runs, search, step_time
from distlab.plan.__main__ import main
from distlab.plan.layout import Layout, check, lab_strategy
from distlab.plan.published import LLAMA3_405B_SHAPE_8K, PUBLISHED_RUNS, ZERO_PAPER
from distlab.plan.shape import ModelShape, from_parameter_count, from_preset, with_seq_len
from distlab.strategies import registry
from distlab.theory import activations as theory_activations
from distlab.theory import memory as theory_memory

SRC = Path(__file__).resolve().parents[1] / "src"
H100 = hardware.GPUS["h100-sxm"]
CPU_LIKE = hardware.Device(
    name="cpu-like",
    peak_flops={"fp32": 1e11, "bf16": 1e11},
    memory_bytes=16e9,
    memory_bandwidth=5e9,
    intra_node=hardware.Link(bandwidth=2e9, latency=80e-6),
    inter_node=hardware.Link(bandwidth=2e9, latency=80e-6),
    gpus_per_node=2,
    matmul_efficiency=0.5,
    matmul_overhead_s=40e-6,
    overlaps_comm=False,
    cores=2,
    oversubscription_exponent=1.3,
)
"""A two-core machine built by hand (``cpu_device`` would probe this one): ranks beyond
its cores share them, and communication does not hide under compute."""
SMALL = from_preset("small")


# --- Shapes ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_shape_reproduces_the_lab_model(name):
    """A preset's shape counts the lab model's parameters and FLOPs per token exactly."""
    config = PRESETS[name]
    shape = from_preset(name)
    assert shape.parameters() == count_parameters(config)
    assert shape.flops_per_token() == flops_per_token(config, config.block_size)
    half = from_preset(name, seq_len=config.block_size // 2)
    assert half.flops_per_token() == flops_per_token(config, config.block_size // 2)


def test_unknown_preset_is_a_one_line_error():
    """An unknown preset raises DistlabError listing the presets."""
    with pytest.raises(DistlabError, match="gpt2"):
        from_preset("nosuch")


def test_llama3_405b_shape_has_405b_parameters():
    """Llama 3 405B's published shape (GQA, SwiGLU, no biases) counts 405e9 parameters to 1%."""
    published = LLAMA3_405B_SHAPE_8K
    assert (published.layers, published.hidden, published.heads, published.kv_heads) == (
        126,
        16384,
        128,
        8,
    )
    assert (published.ffn_hidden, published.vocab, published.swiglu) == (53248, 128000, True)
    shape = ModelShape(
        name="llama3-405b",
        layers=published.layers,
        hidden=published.hidden,
        heads=published.heads,
        vocab=published.vocab,
        seq_len=published.seq_len,
        ffn_hidden=published.ffn_hidden,
        kv_heads=published.kv_heads,
        gated_mlp=True,
        biases=False,
    )
    assert shape.parameters() == pytest.approx(405e9, rel=0.01)


def test_megatron_shapes_match_their_printed_parameter_counts():
    """Megatron's Table 1 shapes (tied embeddings: one vocab table less) count the printed
    parameters to 3% (the 1.7B row's printed figure is rounded)."""
    megatron = [run for run in PUBLISHED_RUNS if run.parameters_billion is not None]
    assert len(megatron) >= 10
    for run in megatron:
        shape = replay.planner_shape(run)
        tied = shape.parameters() - shape.vocab * shape.hidden
        assert tied == pytest.approx(run.parameters_billion * 1e9, rel=0.03), run.name


def test_parameter_count_rule_sizes_7_5b():
    """``from_parameter_count(7.5e9)`` is within 5% with 128-wide heads and hidden/layers
    in [64, 160]."""
    shape = from_parameter_count(7.5e9, 2048, 51200)
    assert shape.parameters() == pytest.approx(7.5e9, rel=0.05)
    assert 64 <= shape.hidden / shape.layers <= 160
    assert shape.head_dim == 128 and shape.hidden % 128 == 0
    assert (shape.seq_len, shape.vocab) == (2048, 51200)


# --- The ZeRO paper's model states ----------------------------------------------------


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_state_bytes_reproduce_the_zero_paper(stage):
    """Mixed-precision model states of a 7.5B model on 64 GPUs give the ZeRO paper's
    120 / 31.4 / 16.6 / 1.9 GB per stage to 2%."""
    paper = ZERO_PAPER
    assert memory.STATE_BYTES["mixed"] == (
        paper.param_bytes,
        paper.grad_bytes,
        paper.optimizer_bytes_per_param,
    )
    shape = from_parameter_count(paper.parameters, 2048, 51200)
    assert shape.parameters() == pytest.approx(paper.parameters, rel=0.01)
    state = memory.state_bytes(shape, Layout(dp=paper.gpus, zero=stage), "mixed")
    assert set(state) == {"params", "grads", "optimizer"}
    gb = sum(state.values()) / shape.parameters() * paper.parameters / 1e9
    assert gb == pytest.approx(paper.gb_per_stage[stage], rel=0.02)
    assert replay.zero_paper_state_gb(stage) == pytest.approx(gb)


# --- Layouts --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("preset", "seq_len", "layout", "gpus", "flag", "fragment"),
    [
        ("gpt2", None, Layout(dp=3), 8, "--dp 3", "--gpus is 8"),
        ("gpt2", None, Layout(dp=1, tp=8), 8, "--tp 8", "12 heads"),
        ("gpt2", 100, Layout(dp=1, cp=8), 8, "--cp 8", "got 100"),
        ("tiny", None, Layout(dp=1, pp=8), 8, "--pp 8", "4 layers"),
        ("gpt2", None, Layout(dp=4, ep=2), 4, "--ep 2", "0 experts"),
        ("gpt2", None, Layout(dp=8, microbatches=4), 8, "--global-batch", "micro-batches"),
    ],
)
def test_check_refuses_impossible_layouts(preset, seq_len, layout, gpus, flag, fragment):
    """``check`` refuses a layout that cannot run, naming the flag to change."""
    shape = with_seq_len(from_preset(preset), seq_len)
    with pytest.raises(DistlabError) as error:
        check(layout, shape, gpus, global_batch=16)
    assert flag in str(error.value) and fragment in str(error.value), str(error.value)


def test_check_accepts_a_valid_layout():
    """A layout whose degrees fit the model and GPUs comes back unchanged."""
    layout = Layout(dp=2, tp=4, pp=2, zero=1, microbatches=4)
    assert check(layout, from_preset("gpt2"), 16, global_batch=16) is layout


@settings(max_examples=15, deadline=None)
@given(
    gpus=st.integers(min_value=1, max_value=64),
    global_batch=st.sampled_from([1, 2, 4, 8, 16, 32, 64, 128]),
)
def test_candidate_layouts_all_use_the_gpus_and_pass_check(gpus, global_batch):
    """Every candidate layout uses exactly the GPUs asked for and passes ``check``."""
    shape = from_preset("gpt2")
    layouts = search.candidate_layouts(shape, gpus, global_batch, H100, {})
    if global_batch % gpus == 0:
        assert Layout(dp=gpus) in layouts  # plain data parallelism always qualifies
    for layout in layouts:
        assert layout.gpus == gpus
        assert layout.tp <= H100.gpus_per_node
        check(layout, shape, gpus, global_batch)


def test_tensor_parallelism_stays_within_a_node():
    """No candidate has tp beyond the GPUs of a node; a larger node admits tp 12 on gpt2."""
    shape = from_preset("gpt2")
    layouts = search.candidate_layouts(shape, 24, 24, H100, {})
    assert max(layout.tp for layout in layouts) == 6
    big_node = dataclasses.replace(H100, gpus_per_node=16)
    assert max(lay.tp for lay in search.candidate_layouts(shape, 24, 24, big_node, {})) == 12


def test_cpu_candidates_are_the_lab_runnable_ones():
    """On a CPU the search offers exactly the layouts a lab strategy can run and measure."""
    as_gpus = dataclasses.replace(CPU_LIKE, cores=0)  # the same machine, not a CPU
    # (GPUs also get sequence parallelism under tensor parallelism: compare without it)
    on_gpus = search.candidate_layouts(SMALL, 4, 16, as_gpus, {"sequence_parallel": False})
    on_cpu = search.candidate_layouts(SMALL, 4, 16, CPU_LIKE, {})
    assert on_cpu == [layout for layout in on_gpus if lab_strategy(layout) is not None]
    assert len(on_cpu) < len(on_gpus)


@pytest.mark.parametrize(
    ("layout", "moe", "expected"),
    [
        (Layout(dp=1), False, ("single", {})),
        (Layout(dp=2), False, ("ddp", {})),
        (Layout(dp=2, zero=1), False, ("zero1", {})),
        (Layout(dp=2, zero=2), False, ("zero2", {})),
        (Layout(dp=4, zero=3), False, ("fsdp", {})),
        (Layout(dp=2, tp=2, zero=3), False, ("fsdp+tp", {"tp": 2})),
        (Layout(dp=2, cp=2, tp=2, zero=3), False, ("fsdp+cp+tp", {"cp": 2, "tp": 2})),
        (Layout(dp=2, tp=2, pp=2, zero=3), False, ("fsdp+tp+pp", {"tp": 2, "pp": 2})),
        (Layout(dp=1, pp=2), False, ("pp", {})),
        (Layout(dp=1, tp=2), False, ("tp", {})),
        (Layout(dp=1, cp=2), False, ("cp", {})),
        (Layout(dp=2, pp=2), False, ("ddp+pp", {"pp": 2})),
        (Layout(dp=4, ep=2), True, ("ep", {"ep": 2})),
        (
            Layout(dp=4, zero=3, replicas=2, strategy="hsdp"),
            False,
            ("hsdp", {"dp_replicate": 2, "dp_shard": 2}),
        ),
        (Layout(dp=2, tp=2), False, None),  # DDP x TP: no lab strategy
        (Layout(dp=1, zero=3), False, None),
        (Layout(dp=2, cp=2, zero=1), False, None),
        (Layout(dp=2, tp=2, zero=3), True, None),  # MoE runs only under ep, ddp, fsdp
        (Layout(dp=4, ep=2, zero=3), True, None),
    ],
)
def test_lab_strategy_maps_layouts_to_registered_strategies(layout, moe, expected):
    """``lab_strategy`` names the lab strategy (and flags) that runs a layout, or None."""
    got = lab_strategy(layout, moe=moe)
    assert got == expected
    if got is not None:
        assert got[0] in registry.names()


# --- Memory ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("layout", "precision", "config"),
    [
        (
            Layout(dp=2),
            "fp32",
            Config(strategy="ddp", nproc=2, model="small", global_batch=16, micro_batch=8),
        ),
        (
            Layout(dp=4, zero=3),
            "bf16",
            Config(
                strategy="fsdp",
                nproc=4,
                model="small",
                global_batch=16,
                micro_batch=4,
                precision="bf16",
            ),
        ),
        (
            Layout(dp=2, zero=1, ac="full"),
            "fp32",
            Config(
                strategy="zero1", nproc=2, model="small", global_batch=16, micro_batch=8, ac="full"
            ),
        ),
        (
            Layout(dp=1, pp=2, microbatches=4),
            "fp32",
            Config(
                strategy="pp",
                nproc=2,
                model="small",
                global_batch=16,
                pp=2,
                schedule="1f1b",
                microbatches=4,
            ),
        ),
        (
            Layout(dp=2, tp=2, zero=3),
            "fp32",
            Config(
                strategy="fsdp+tp", nproc=4, model="small", global_batch=16, micro_batch=8, tp=2
            ),
        ),
    ],
)
def test_memory_of_lab_layouts_is_the_lab_theory(layout, precision, config):
    """Where the lab runs a layout, the planner's memory is ``theory.memory.predict_peak``."""
    estimate = memory.memory_per_gpu(SMALL, layout, 16, precision)
    assert estimate.source == "lab theory"
    assert estimate.by_category == dict(theory_memory.predict_peak(config).by_category)
    assert estimate.to_dict()["total"] == sum(estimate.by_category.values())


@pytest.mark.parametrize(
    ("shape", "layout", "precision"),
    [
        (SMALL, Layout(dp=2, tp=2), "fp32"),  # no lab strategy
        (SMALL, Layout(dp=2), "mixed"),  # the lab has no mixed precision
        (dataclasses.replace(SMALL, name="other", hidden=256), Layout(dp=2), "fp32"),
    ],
)
def test_memory_outside_the_lab_is_the_planners_accounting(shape, layout, precision):
    """Layouts, precisions and shapes the lab cannot run get the planner's own accounting."""
    estimate = memory.memory_per_gpu(shape, layout, 16, precision)
    assert estimate.source == "planner"
    assert estimate == memory.planner_memory(shape, layout, 16, precision)
    assert list(estimate.by_category) == list(CATEGORIES)


@pytest.mark.parametrize(
    "layout",
    [
        Layout(dp=2),
        Layout(dp=4, zero=3),
        Layout(dp=1, pp=2, microbatches=4),
        Layout(dp=2, tp=2, zero=3),
    ],
    ids=lambda layout: layout.label(),
)
def test_planner_memory_agrees_with_the_lab_theory(layout):
    """The planner's own accounting is within 15% of the lab's theory on the small model."""
    planner = memory.planner_memory(SMALL, layout, 16, "fp32").total
    lab = memory.memory_per_gpu(SMALL, layout, 16, "fp32")
    assert lab.source == "lab theory"
    assert planner == pytest.approx(lab.total, rel=0.15)


@settings(max_examples=30, deadline=None)
@given(
    rows=st.integers(min_value=1, max_value=8),
    heads=st.sampled_from([4, 8, 12]),
    head_dim=st.sampled_from([16, 64]),
    tp=st.sampled_from([1, 2, 4]),
    cp=st.sampled_from([1, 2]),
    ac=st.sampled_from(["none", "selective", "full"]),
    element=st.sampled_from([2, 4]),
)
def test_block_activations_generalise_the_lab_table(rows, heads, head_dim, tp, cp, ac, element):
    """With a 4h MLP, one key/value head per head and no gate, the planner's block
    activations are the lab's table (``theory.activations.block_activation_bytes``)."""
    hidden = heads * head_dim
    tokens = rows * 32
    shape = ModelShape(name="t", layers=2, hidden=hidden, heads=heads, vocab=64, seq_len=64)
    planner = memory.planned_block_activation_bytes(
        shape, tokens, Layout(dp=1, tp=tp, cp=cp, ac=ac), element
    )
    step = theory_activations.StepShape(
        tokens=tokens,
        layers=2,
        has_first=True,
        has_last=True,
        in_flight=1,
        outputs_in_flight=0,
        heads_in_flight=1,
        tp=tp,
        sequence_parallel=False,
        element=element,
        ac=ac,
        cp=cp,
    )
    assert planner == theory_activations.block_activation_bytes(step, heads, hidden)


# --- Step time ------------------------------------------------------------------------


def halve(device: hardware.Device, what: str) -> hardware.Device:
    """``device`` with one constant halved: memory bandwidth, matmul efficiency or links."""
    if what == "links":
        return dataclasses.replace(
            device,
            intra_node=dataclasses.replace(
                device.intra_node, bandwidth=device.intra_node.bandwidth / 2
            ),
            inter_node=dataclasses.replace(
                device.inter_node, bandwidth=device.inter_node.bandwidth / 2
            ),
        )
    return dataclasses.replace(device, **{what: getattr(device, what) / 2})


@settings(max_examples=25, deadline=None)
@given(
    data=st.data(),
    preset=st.sampled_from(["small", "gpt2"]),
    gpus=st.sampled_from([1, 2, 4, 8, 16]),
    global_batch=st.sampled_from([16, 32]),
    device=st.sampled_from([H100, CPU_LIKE]),
    precision=st.sampled_from(["fp32", "bf16", "mixed"]),
    what=st.sampled_from(["memory_bandwidth", "matmul_efficiency", "links"]),
)
def test_faster_hardware_never_slows_a_step(
    data, preset, gpus, global_batch, device, precision, what
):
    """Doubling memory bandwidth, matmul efficiency or link bandwidth never lengthens a step."""
    shape = from_preset(preset)
    layouts = search.candidate_layouts(shape, gpus, global_batch, device, {})
    layout = data.draw(st.sampled_from(layouts), label="layout")
    slow = step_time.step_time(shape, layout, global_batch, precision, halve(device, what))
    fast = step_time.step_time(shape, layout, global_batch, precision, device)
    assert fast.total_s <= slow.total_s * (1 + 1e-12), (layout.label(), fast, slow)
    if what == "links" and fast.comm_s > 0:
        assert fast.comm_s < slow.comm_s
    if what == "matmul_efficiency":
        assert fast.compute_s < slow.compute_s


def test_only_pipelines_have_a_bubble():
    """Every pipeline layout of gpt2 on 8 GPUs has a bubble; every other layout none."""
    shape = from_preset("gpt2")
    layouts = search.candidate_layouts(shape, 8, 32, H100, {})
    assert any(layout.pp > 1 for layout in layouts) and any(lay.pp == 1 for lay in layouts)
    for layout in layouts:
        bubble = step_time.step_time(shape, layout, 32, "bf16", H100).bubble_s
        assert (bubble > 0) == (layout.pp > 1), layout.label()


def test_collective_seconds_follow_ring_and_tree():
    """An all-reduce of 1 GB over 8 ranks at 1 GB/s takes the ring's 2 x 7/8 s; with a
    large latency and a tiny buffer the tree's 2 log2(8) messages win."""
    one_gb = step_time.Collective("all_reduce", "dp", 8, 1e9, 1, True)
    assert step_time.collective_seconds(one_gb, hardware.Link(1e9, 0.0)) == pytest.approx(2 * 7 / 8)
    twice = dataclasses.replace(one_gb, calls=2)
    assert step_time.collective_seconds(twice, hardware.Link(1e9, 0.0)) == pytest.approx(3.5)
    tiny = dataclasses.replace(one_gb, nbytes=1.0)
    assert step_time.collective_seconds(tiny, hardware.Link(1e9, 1e-3)) == pytest.approx(
        6e-3, rel=1e-3
    )
    gather = step_time.Collective("all_gather", "dp", 4, 1e9, 1, True)
    assert step_time.collective_seconds(gather, hardware.Link(1e9, 0.0)) == pytest.approx(0.75)
    send = step_time.Collective("send", "pp", 2, 1e9, 3, False)
    assert step_time.collective_seconds(send, hardware.Link(1e9, 1.0)) == pytest.approx(6.0)


@pytest.mark.parametrize(
    ("layout", "group", "size", "network"),
    [
        (Layout(dp=8), "dp", 8, False),
        (Layout(dp=16), "dp", 16, True),
        (Layout(dp=2, tp=8), "tp", 8, False),
        (Layout(dp=2, tp=8), "dp", 2, True),  # dp ranks are 8 apart: across nodes
        (Layout(dp=2, tp=4), "dp", 2, False),
        (Layout(dp=1, tp=8, pp=2), "pp", 2, True),
        (Layout(dp=1, tp=4, pp=2), "pp", 2, False),
    ],
)
def test_group_link_uses_the_network_beyond_a_node(layout, group, size, network):
    """A group whose ranks span more than one node (8 GPUs) crosses the network."""
    link = step_time.group_link(group, size, layout, H100)
    assert link == (H100.inter_node if network else H100.intra_node)


# --- Calibration ----------------------------------------------------------------------


def synthetic_runs(device: hardware.Device) -> list[runs.MeasuredRun]:
    """Runs of the small model whose measurements are the planner's predictions on ``device``."""
    layouts = [
        Layout(dp=1),
        Layout(dp=2),
        Layout(dp=2, zero=3),
        Layout(dp=1, pp=2, microbatches=4),
        Layout(dp=1, tp=2),
        Layout(dp=4),
        Layout(dp=4, zero=3),
    ]
    out = []
    for layout in layouts:
        step = step_time.step_time(SMALL, layout, 16, "fp32", device)
        out.append(
            runs.MeasuredRun(
                name=layout.label(),
                shape=SMALL,
                layout=layout,
                global_batch=16,
                precision="fp32",
                step_time_s=step.total_s,
                comm_time_s=step.comm_s,
                comm_calls=0,
                comm_wire_bytes=0,
                tokens_per_s=16 * SMALL.seq_len / step.total_s,
                peak_memory_bytes=None,
            )
        )
    return out


def test_calibration_recovers_known_constants(tmp_path):
    """Fitting runs made under known constants, from wrong ones, predicts them to 5%, and
    the written calibration reads back as the same device."""
    measured = synthetic_runs(CPU_LIKE)
    wrong = calibrate.with_constants(
        CPU_LIKE,
        matmul_efficiency=0.8,
        matmul_overhead_s=15e-6,
        bandwidth=0.7e9,
        latency=30e-6,
        oversubscription_exponent=1.0,
    )
    before = [calibrate.predicted_step(run, wrong) / run.step_time_s for run in measured]
    assert max(abs(r - 1) for r in before) > 0.2  # the starting point is really wrong
    fitted = calibrate.fit(measured, wrong)
    for run in measured:
        assert calibrate.predicted_step(run, fitted) == pytest.approx(run.step_time_s, rel=0.05)
    assert fitted.matmul_efficiency == pytest.approx(CPU_LIKE.matmul_efficiency, rel=0.2)
    assert "calibrated on 7 runs" in fitted.source
    path = tmp_path / "calibration.json"
    calibrate.write_calibration(fitted, path)
    assert hardware.device_from_file(path) == fitted
    with pytest.raises(DistlabError, match="is for cpu-like, not h100-sxm"):
        hardware.device_spec("h100-sxm", calibration=path)  # another device's constants
    h100_fit = tmp_path / "h100.json"
    calibrate.write_calibration(dataclasses.replace(fitted, name="h100-sxm"), h100_fit)
    applied = hardware.device_spec("h100-sxm", calibration=h100_fit)
    assert applied.matmul_efficiency == fitted.matmul_efficiency
    assert applied.intra_node == fitted.intra_node
    assert applied.memory_bytes == H100.memory_bytes  # the device's own memory stays


# --- Runs -----------------------------------------------------------------------------


def test_read_run_refuses_a_directory_without_a_summary(tmp_path):
    """A directory with no summary.json is not a finished run: DistlabError."""
    (tmp_path / "config.yaml").write_text("strategy: ddp\nnproc: 2\n")
    with pytest.raises(DistlabError, match="summary.json"):
        runs.read_run(tmp_path)
    (tmp_path / "summary.json").write_text('{"steps": 3}')
    with pytest.raises(DistlabError, match="no step time"):
        runs.read_run(tmp_path)  # a summary without the measurements
    (tmp_path / "summary.json").unlink()
    with pytest.raises(DistlabError, match="no finished run"):
        runs.read_runs([])
    with pytest.raises(DistlabError, match="no finished run"):
        runs.read_runs([tmp_path])  # a glob's non-run folders are skipped, but not all


def test_read_run_reads_a_pipeline_run(tmp_path):
    """A pp run's config and summary become its layout and measurements."""
    (tmp_path / "config.yaml").write_text(
        "strategy: pp\nnproc: 2\nmodel: small\nglobal_batch: 16\npp: 2\nmicrobatches: 4\n"
    )
    summary = {
        "median_step_time_s": 0.25,
        "tokens_per_s": 8192.0,
        "comm_per_step": {"calls": 16, "wire_bytes": 1000, "time_s": 0.01},
        "memory_peak_by_rank": [{"rank": 0, "peak": 12345}],
    }
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    run = runs.read_run(tmp_path)
    assert run.layout == Layout(dp=1, pp=2, microbatches=4, strategy="pp")
    assert run.shape == SMALL
    assert (run.step_time_s, run.comm_time_s, run.comm_calls) == (0.25, 0.01, 16)
    assert run.peak_memory_bytes == 12345


def test_read_run_reads_the_time_breakdown_of_the_last_tracked_steps(tmp_path):
    """``time_breakdown_by_rank`` becomes the mean over ranks of each rank's last tracked
    step, in every category (one the entry lacks is zero); a summary without it gives None."""
    (tmp_path / "config.yaml").write_text("strategy: ddp\nnproc: 2\nmodel: small\n")
    summary = {"median_step_time_s": 0.2, "tokens_per_s": 1000.0}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    run = runs.read_run(tmp_path)
    assert run.time_by_category is None and run.tracked_step_s is None

    def entry(rank: int, step: int, wall: float, **seconds: float) -> dict:
        return {"rank": rank, "step": step, "wall_s": wall, "by_category": seconds,
                "overlapped_comm": 0.0, "comm_s": 0.0, "overlap_fraction": None}  # fmt: skip

    summary["time_breakdown_by_rank"] = [
        entry(0, 9, 0.30, compute=0.20, exposed_comm=0.06, optimizer=0.03, data=0.01),
        entry(0, 2, 9.0, compute=9.0),  # an earlier tracked step: not the last
        entry(1, 9, 0.20, compute=0.10, exposed_comm=0.08, optimizer=0.01, host=0.01),
    ]
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    run = runs.read_run(tmp_path)
    assert list(run.time_by_category) == list(TIME_CATEGORIES)
    expected = {"compute": 0.15, "exposed_comm": 0.07, "bubble": 0.0, "data": 0.005,
                "optimizer": 0.02, "host": 0.005}  # fmt: skip
    assert run.time_by_category == pytest.approx(expected)
    assert run.tracked_step_s == pytest.approx(0.25)
    summary["time_breakdown_by_rank"] = [{"rank": 0}]
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(DistlabError, match="time_breakdown_by_rank"):
        runs.read_run(tmp_path)


@pytest.mark.parametrize(
    "layout",
    [Layout(dp=2), Layout(dp=1, pp=2, microbatches=4), Layout(dp=2, zero=3), Layout(dp=1, tp=2)],
    ids=lambda layout: layout.label(),
)
def test_predicted_breakdown_maps_the_step_time_onto_the_time_labs_categories(layout):
    """compute, exposed communication, bubble and optimizer go to the lab's categories of
    those names, in the lab's order; data and host are not modelled (zero); they add up to
    the predicted step."""
    predicted = step_time.step_time(SMALL, layout, 16, "fp32", CPU_LIKE)
    breakdown = step_time.predicted_breakdown(SMALL, layout, 16, "fp32", CPU_LIKE)
    assert list(breakdown) == list(TIME_CATEGORIES)
    assert breakdown == {
        "compute": predicted.compute_s,
        "exposed_comm": predicted.exposed_comm_s,
        "bubble": predicted.bubble_s,
        "data": 0.0,
        "optimizer": predicted.optimizer_s,
        "host": 0.0,
    }
    assert set(step_time.UNMODELLED_CATEGORIES) == {"data", "host"}
    assert sum(breakdown.values()) == pytest.approx(predicted.total_s)
    assert (breakdown["bubble"] > 0) == (layout.pp > 1)
    assert (breakdown["exposed_comm"] > 0) == (layout.gpus > 1)


# --- The command ----------------------------------------------------------------------


def test_json_lists_every_layout_fitting_first_fastest_first(capsys):
    """``--json`` prints each layout's memory by category, step time and throughput,
    those that fit first, fastest first."""
    assert main(["--model", "gpt2", "--gpus", "8", "--json", "--plot", "none"]) == 0
    plans = json.loads(capsys.readouterr().out)
    assert isinstance(plans, list) and len(plans) > 10
    for plan in plans:
        mem = plan["memory_per_gpu_bytes"]
        assert set(CATEGORIES) <= set(mem)
        assert mem["total"] == sum(mem[c] for c in CATEGORIES)
        assert plan["step_time_s"] > 0
        assert plan["tokens_per_s"] == pytest.approx(16 * 1024 / plan["step_time_s"])
        assert plan["tflops_per_gpu"] > 0 and 0 < plan["mfu"] < 1
        assert math.prod(plan["degrees"][k] for k in ("dp", "tp", "pp", "cp")) == 8
    keys = [(not plan["fits"], -plan["tokens_per_s"]) for plan in plans]
    assert keys == sorted(keys)
    assert plans[0]["fits"]


def test_json_lab_strategy_is_the_one_whose_theory_gave_the_memory(capsys):
    """A layout's ``lab_strategy`` in the JSON is set exactly where the lab's theory gave
    its memory (a MoE model: only the layouts the lab runs with experts)."""
    argv = ["--model", "tiny-moe", "--gpus", "4", "--global-batch", "4", "--json"]
    assert main([*argv, "--plot", "none"]) == 0
    plans = json.loads(capsys.readouterr().out)
    assert {plan["memory_source"] for plan in plans} == {"lab theory", "planner"}
    for plan in plans:
        assert (plan["lab_strategy"] is not None) == (plan["memory_source"] == "lab theory"), plan[
            "label"
        ]


def test_gpu_spec_file_is_a_device(tmp_path, capsys):
    """``--gpu-spec`` reads a device written as JSON (the H100's fields) and plans on it."""
    path = tmp_path / "h100.json"
    path.write_text(json.dumps(dataclasses.replace(H100, name="mine").to_dict()))
    assert hardware.device_from_file(path) == dataclasses.replace(H100, name="mine")
    assert main(["--model", "tiny", "--gpus", "2", "--gpu-spec", str(path), "--plot", "none"]) == 0
    assert "2 x mine" in capsys.readouterr().out


def test_plot_writes_a_png(tmp_path, capsys):
    """``--plot PATH`` draws the best layouts into a PNG file."""
    path = tmp_path / "sub" / "p.png"
    assert main(["--model", "small", "--gpus", "4", "--top", "3", "--plot", str(path)]) == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert f"picture: {path}" in out and "tokens/s" in out


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--model", "gpt2", "--gpus", "8", "--dp", "3"], "--dp 3"),
        (["--model", "gpt2", "--gpus", "8", "--tp", "8"], "12 heads"),
        (["--model", "gpt2", "--gpu", "nosuch"], "unknown GPU 'nosuch'"),
        (
            ["--layers", "4", "--hidden", "100", "--heads", "3", "--vocab", "10", "--seq-len", "8"],
            "--hidden 100 is not divisible by --heads 3",
        ),
        ([], "give the model one way"),
        (["--model", "gpt2", "--params", "1e9"], "give the model one way"),
        (["--layers", "4", "--hidden", "128"], "--heads --vocab --seq-len"),
        (["--model", "gpt2", "--gpus", "eight"], "--gpus eight"),
        (["--model", "tiny", "--gpus", "cpu", "--nproc", "0"], "--nproc 0"),
        (["--model", "tiny", "--gpus", "8", "--gpus-per-node", "0"], "--gpus-per-node 0"),
        (["--calibrate", "/nonexistent"], "no finished run"),
        (["--model", "gpt2", "--precision", "fp8"], "--precision"),
        (["--model", "gpt2", "--microbatches", "0"], "--microbatches 0"),
        (["--model", "small-moe", "--gpus", "4", "--ep", "0"], "--ep 0"),
        (["--model", "gpt2", "--seq-len", "0"], "--seq-len 0"),
        (
            ["--layers", "4", "--hidden", "128", "--heads", "0", "--vocab", "10", "--seq-len", "8"],
            "--heads 0",
        ),
        (["--model", "gpt2", "--gpu-spec", "{spec}/number.json"], "not a JSON object"),
        (["--model", "gpt2", "--gpu-spec", "{spec}/partial.json"], "memory_bytes"),
        (["--model", "gpt2", "--gpu-spec", "{spec}/none.json"], "no such file"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, fragment, tmp_path, capsys):
    """Bad input exits 2 with one ``distlab: error:`` line naming the problem."""
    (tmp_path / "number.json").write_text("5\n")
    (tmp_path / "partial.json").write_text(json.dumps({"name": "x", "peak_flops": {}}))
    argv = [arg.format(spec=tmp_path) for arg in argv]
    with pytest.raises(SystemExit) as exited:
        run_cli(partial(main, [*argv, "--plot", "none"]))
    assert exited.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("distlab: error:"), err
    assert fragment in lines[0], lines[0]


@pytest.mark.slow
def test_command_line_error_has_no_traceback():
    """``python -m distlab.plan`` with bad degrees exits 2 with one line and no traceback."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
    }
    result = subprocess.run(
        [sys.executable, "-m", "distlab.plan", "--model", "gpt2", "--gpus", "8", "--tp", "8"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("distlab: error:"), result.stderr
    assert "12 heads" in lines[0]
    assert "Traceback" not in result.stdout + result.stderr


# --- Matmul rates, sequence parallelism, materialized attention, published runs ---------


def test_matmul_rates_fit_recovers_efficiency_and_overhead(tmp_path, capsys):
    """Rates made by a known matmul model are fitted back (directly and through
    ``--calibrate FILE.json --gpu``), from constants that start far off."""
    truth = dataclasses.replace(H100, matmul_efficiency=0.6, matmul_overhead_s=30e-6)
    rows = [
        {
            "dtype": "bf16",
            "m": m,
            "k": d,
            "n": d * f,
            "tflops": 2
            * m
            * d
            * d
            * f
            / step_time.matmul_seconds(truth, "bf16", m, d * f, d)
            / 1e12,
        }
        for m in (2048, 16384)
        for d in (128, 512, 2048, 8192)
        for f in (1, 4)
    ]
    fitted = calibrate.fit_matmul_rates(rows, H100)
    assert fitted.matmul_efficiency == pytest.approx(0.6, rel=0.02)
    assert fitted.matmul_overhead_s == pytest.approx(30e-6, rel=0.05)
    source = tmp_path / "rates.json"
    source.write_text(json.dumps({"rows": rows}))
    target = tmp_path / "h100.json"
    main(["--calibrate", str(source), "--gpu", "h100-sxm", "--calibration", str(target)])
    assert hardware.device_from_file(target).matmul_efficiency == pytest.approx(0.6, rel=0.02)
    with pytest.raises(DistlabError, match="no bf16 or fp32 rows"):
        calibrate.fit_matmul_rates([{"dtype": "int8", "m": 1, "n": 1, "k": 1, "tflops": 1}], H100)


def test_sequence_parallelism_splits_the_replicated_activations():
    """With sequence parallelism the norms' and residuals' 4 t h of a block shrink to
    4 t h / tp, and it needs tensor parallelism."""
    gpt2 = from_preset("gpt2")
    plain = Layout(dp=2, tp=4, zero=1)
    sp = dataclasses.replace(plain, sequence_parallel=True)
    tokens, element = 4096, 2
    saved = memory.planned_block_activation_bytes(gpt2, tokens, plain, element)
    split = memory.planned_block_activation_bytes(gpt2, tokens, sp, element)
    assert saved - split == element * 4 * tokens * gpt2.hidden * 3 // 4
    with pytest.raises(DistlabError, match="--sequence-parallel needs --tp"):
        check(Layout(dp=8, sequence_parallel=True), gpt2, 8, 64)


def test_materialized_attention_costs_time_and_memory():
    """Attention whose scores go through memory is slower and keeps 5 a s^2 bytes per
    sequence per block (fp16) more than flash attention."""
    flash = from_preset("gpt2")
    scores = dataclasses.replace(flash, attention="materialized")
    layout = Layout(dp=8)
    assert (
        step_time.step_time(scores, layout, 64, "bf16", H100).total_s
        > step_time.step_time(flash, layout, 64, "bf16", H100).total_s
    )
    tokens = 8 * flash.seq_len
    extra = memory.planned_block_activation_bytes(scores, tokens, layout, 2) - (
        memory.planned_block_activation_bytes(flash, tokens, layout, 2)
    )
    assert extra == 5 * flash.heads * tokens * flash.seq_len


def test_lab_command_runs_the_layout_in_the_lab():
    """The launch command printed for a pick names the strategy, ranks and settings that
    the lab's own parser turns back into the planned Config."""
    command = search.lab_command(SMALL, Layout(dp=2, tp=2, zero=3), 16, "fp32")
    assert command.startswith("python -m distlab.launch ")
    assert "--strategy fsdp+tp" in command and "--nproc 4" in command and "--tp 2" in command
    assert search.lab_command(SMALL, Layout(dp=2, tp=2, zero=0), 16, "fp32") is None


def test_cpu_search_tries_every_rank_count(capsys):
    """On this machine, without --nproc, the search covers 1 to 2 x cores ranks and only
    layouts a lab strategy runs; the calibration file in docs is a valid device."""
    calibration = (
        Path(__file__).resolve().parents[1] / "docs/measurements/plan_calibration_cpu.json"
    )
    main(
        ["--model", "tiny", "--global-batch", "8", "--gpus", "cpu", "--json", "--plot", "none"]
        + ["--calibration", str(calibration)]
    )
    plans = json.loads(capsys.readouterr().out)
    device = hardware.device_spec("cpu", calibration=calibration)
    counts = {math.prod(p["degrees"][d] for d in ("dp", "tp", "pp", "cp")) for p in plans}
    assert counts == set(range(1, 2 * device.cores + 1))
    assert all(p["lab_strategy"] for p in plans)


@pytest.mark.parametrize("run", PUBLISHED_RUNS, ids=lambda run: run.name)
def test_published_throughput_within_25_percent(run):
    """Each published run's TFLOP/s per GPU, predicted from the inputs its paper states,
    is within 25% of the paper's figure (docs/planner.md's table)."""
    _, tflops = replay.replay(run)
    assert tflops / run.achieved_tflops_per_gpu == pytest.approx(1, abs=0.25)


def test_distlab_plan_is_a_command_of_the_one_entry_point(capsys):
    """``distlab plan ...`` (the console script's dispatcher) runs the planner."""
    assert "plan" in COMMANDS
    with pytest.raises(SystemExit) as exit_info:
        distlab_main(["plan", "--model", "tiny", "--gpus", "2", "--json", "--plot", "none"])
    assert exit_info.value.code == 0
    assert json.loads(capsys.readouterr().out)[0]["degrees"]["dp"] in (1, 2)


@pytest.mark.parametrize(
    ("strategy", "zero"),
    [("ddp", 0), ("zero1", 1), ("fairscale-oss", 1), ("zero2", 2), ("fairscale-sdp", 2)]
    + [("zero3", 3), ("fsdp", 3), ("hsdp", 3), ("ep", 0), ("tp", 0)],
)
def test_a_measured_run_gets_the_zero_stage_its_flavour_splits(strategy: str, zero: int) -> None:
    """The planner reads a lab run as the ZeRO stage whose split its data-parallel flavour
    makes: fairscale's OSS shards the optimizer state (stage 1), with ShardedDataParallel
    the gradients too (stage 2)."""
    from distlab.strategies import registry

    assert registry.get(strategy).data_parallel.zero_stage == zero
