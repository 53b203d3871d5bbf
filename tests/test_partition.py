"""Properties of the pipeline split: layers to stages, stages to ranks, stage modules."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distlab.model import GPT, GPTConfig
from distlab.strategies.parallel_dims import plan_stages
from distlab.strategies.pipeline_parallel import split_model
from distlab.strategies.pipeline_schedules import bubble_fraction, stages_of_rank


@st.composite
def layers_and_stages(draw, max_layers: int = 64) -> tuple[int, int]:
    n_layer = draw(st.integers(1, max_layers))
    return n_layer, draw(st.integers(1, n_layer))


@given(layers_and_stages())
def test_every_layer_in_exactly_one_contiguous_balanced_stage(shape: tuple[int, int]) -> None:
    n_layer, n_stages = shape
    plans = plan_stages(n_layer, n_stages)
    assert [plan.index for plan in plans] == list(range(n_stages))
    # Concatenated in stage order the layers are 0..L-1: each once, contiguous, in order.
    assert [layer for plan in plans for layer in plan.layers] == list(range(n_layer))
    assert all(plan.layers.step == 1 and len(plan.layers) >= 1 for plan in plans)
    sizes = [len(plan.layers) for plan in plans]
    assert max(sizes) - min(sizes) <= 1
    assert [plan.embeddings for plan in plans] == [i == 0 for i in range(n_stages)]
    assert [plan.head for plan in plans] == [i == n_stages - 1 for i in range(n_stages)]


@given(st.integers(1, 8), st.integers(1, 4))
def test_ranks_hold_every_stage_once(pp: int, virtual: int) -> None:
    held = [stage for rank in range(pp) for stage in stages_of_rank(rank, pp, virtual)]
    assert sorted(held) == list(range(pp * virtual))
    assert stages_of_rank(0, pp, virtual)[0] == 0  # rank 0 has the embeddings


@given(st.integers(1, 8))
def test_v_placement_goes_down_and_back_up(pp: int) -> None:
    held = {rank: stages_of_rank(rank, pp, 2, "v") for rank in range(pp)}
    assert sorted(s for stages in held.values() for s in stages) == list(range(2 * pp))
    assert held[0] == [0, 2 * pp - 1]  # rank 0 has the embeddings and the head
    assert held[pp - 1] == [pp - 1, pp]  # the turn: two adjacent stages on one rank


def _meta_gpt(n_layer: int) -> GPT:
    with torch.device("meta"):
        return GPT(GPTConfig(n_layer=n_layer, n_head=2, d_model=8, block_size=4))


@pytest.mark.slow
@settings(deadline=None, max_examples=40)
@given(layers_and_stages(max_layers=12), st.integers(1, 2))
def test_stage_modules_partition_the_parameters(shape: tuple[int, int], virtual: int) -> None:
    n_layer, pp = shape
    if pp * virtual > n_layer:
        virtual = 1
    n_stages = pp * virtual
    plans = plan_stages(n_layer, n_stages)
    full = {name for name, _ in _meta_gpt(n_layer).named_parameters()}
    seen: list[str] = []
    for rank in range(pp):
        mine = [plans[i] for i in stages_of_rank(rank, pp, virtual)]
        rank_model, stage_modules = split_model(_meta_gpt(n_layer), mine)
        rank_names = {name for name, _ in rank_model.named_parameters()}
        stage_names = [{n for n, _ in m.named_parameters()} for m in stage_modules]
        # The rank's model holds exactly its stages' parameters, under the plain names.
        assert rank_names == set().union(*stage_names)
        for plan, names in zip(mine, stage_names, strict=True):
            blocks = {int(n.split(".")[1]) for n in names if n.startswith("blocks.")}
            assert blocks == set(plan.layers)
            assert ("wte.weight" in names) == plan.embeddings == ("wpe.weight" in names)
            assert ("lm_head.weight" in names) == plan.head == ("ln_f.weight" in names)
            seen.extend(names)
    assert sorted(seen) == sorted(full)  # every parameter in exactly one stage


def test_plan_rejects_more_stages_than_layers() -> None:
    with pytest.raises(ValueError):
        plan_stages(4, 5)


def test_bubble_theory() -> None:
    assert bubble_fraction("1f1b", 1, 8) == 0
    assert bubble_fraction("gpipe", 4, 4) == pytest.approx(3 / 7)
    assert bubble_fraction("1f1b", 4, 16) == pytest.approx(3 / 19)
    # v = 2 stages per rank: (p - 1) / (v m + p - 1)
    assert bubble_fraction("interleaved-1f1b", 4, 8) == pytest.approx(3 / 19)
    assert bubble_fraction("looped-bfs", 4, 8) == pytest.approx(3 / 19)
    # with f = b = w: ZB-H1 on v chunks and DualPipeV, (p - 1) / (3 v m + p - 1) and
    # (p - 1) / (3 m + p - 1); ZB-V none
    assert bubble_fraction("interleaved-zb", 4, 8) == pytest.approx(3 / 51)
    assert bubble_fraction("dualpipev", 4, 8) == pytest.approx(3 / 27)
    assert bubble_fraction("zbv", 4, 8) == 0
