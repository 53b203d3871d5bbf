"""The mixture-of-experts layer: deterministic dropless top-k routing, a balance loss that
splits over data-parallel ranks, parameter and FLOP counts, and the strategies that train it."""

from __future__ import annotations

import re

import pytest
import torch

from distlab.errors import DistlabError
from distlab.model import PRESETS, build_model, count_parameters, flops_per_token
from distlab.moe import MoE, Routing, auxiliary_loss, balance_loss, moe_layers, route
from distlab.strategies.parallel_dims import numel, parameter_shapes
from distlab.strategies.resolve import load_config


def test_ties_go_to_the_lower_expert_index() -> None:
    logits = torch.tensor([[1.0, 3.0, 3.0, 3.0], [0.0, 0.0, 0.0, 0.0]])
    routing = route(logits, top_k=2)
    assert routing.expert.tolist() == [[1, 2], [0, 1]]
    assert torch.allclose(routing.weight, torch.full((2, 2), 0.5))


def test_weights_are_the_renormalised_top_k_probabilities() -> None:
    logits = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
    routing = route(logits, top_k=2)
    probs = logits.softmax(-1)
    top = probs.gather(1, routing.expert)
    assert torch.allclose(routing.weight, top / top.sum(-1, keepdim=True))
    assert (probs.gather(1, routing.expert[:, :1]) == probs.max(-1, keepdim=True).values).all()


def test_balance_loss_is_one_when_balanced_and_higher_when_not() -> None:
    even = Routing(
        expert=torch.tensor([[0, 1], [2, 3]]),
        weight=torch.full((2, 2), 0.5),
        probs=torch.full((2, 4), 0.25),
    )
    assert float(balance_loss(even, batch=1, n_expert=4)) == pytest.approx(1.0)
    skewed = Routing(
        expert=torch.tensor([[0, 1], [0, 1]]),
        weight=torch.full((2, 2), 0.5),
        probs=torch.tensor([[0.4, 0.4, 0.1, 0.1]] * 2),
    )
    assert float(balance_loss(skewed, batch=1, n_expert=4)) == pytest.approx(1.6)


def test_balance_loss_of_a_batch_is_the_mean_of_its_halves() -> None:
    """Per-sequence: two data-parallel ranks' losses average to the whole batch's."""
    logits = torch.randn(4 * 8, 4, generator=torch.Generator().manual_seed(1))
    whole = balance_loss(route(logits, 2), batch=4, n_expert=4)
    halves = [balance_loss(route(part, 2), batch=2, n_expert=4) for part in logits.chunk(2)]
    assert float(whole) == pytest.approx(float(sum(halves) / 2), rel=1e-6)


def test_the_layer_is_dropless_and_matches_a_per_token_loop() -> None:
    torch.manual_seed(0)
    layer = MoE(d_model=8, n_expert=4, top_k=2, aux_coef=0.01)
    layer.experts.init_weights(0.5, 0.5)
    x = torch.randn(2, 5, 8)
    out = layer(x)
    assert int(layer.tokens_per_expert.sum()) == 2 * 5 * 2  # every token reached k experts
    routing = route(layer.router(x.reshape(-1, 8)), 2)
    e = layer.experts
    expected = torch.stack(
        [
            sum(
                w * (torch.nn.functional.gelu(t @ e.up_weight[i] + e.up_bias[i]) @ e.down_weight[i])
                + w * e.down_bias[i]
                for i, w in zip(routing.expert[n].tolist(), routing.weight[n], strict=True)
            )
            for n, t in enumerate(x.reshape(-1, 8))
        ]
    )
    assert torch.allclose(out.reshape(-1, 8), expected, atol=1e-5)


def test_the_model_reports_its_balance_loss_with_gradients() -> None:
    model = build_model("tiny-moe", 0)
    model(torch.randint(0, 256, (2, 32)))
    layers = moe_layers(model)
    assert len(layers) == PRESETS["tiny-moe"].n_layer
    aux = auxiliary_loss(layers)
    aux.backward()
    assert layers[0].router.weight.grad is not None
    assert auxiliary_loss(moe_layers(build_model("tiny", 0))) is None


@pytest.mark.parametrize("preset", ["tiny-moe", "small-moe"])
def test_parameter_count_and_meta_shapes(preset: str) -> None:
    shape = PRESETS[preset]
    assert numel(parameter_shapes(shape)) == count_parameters(shape)
    assert sum(p.numel() for p in build_model(preset, 0).parameters()) == count_parameters(shape)
    assert parameter_shapes(shape)["blocks.0.mlp.experts.up_weight"] == (
        shape.n_expert,
        shape.d_model,
        4 * shape.d_model,
    )


def test_flops_count_k_of_the_experts() -> None:
    """Active parameters: the router and top_k expert MLPs per token, not all E."""
    dense, moe = PRESETS["tiny"], PRESETS["tiny-moe"]
    d, layers = dense.d_model, dense.n_layer
    extra = 6.0 * layers * ((moe.top_k - 1) * 8 * d * d + d * moe.n_expert)
    assert flops_per_token(moe, 32) == pytest.approx(flops_per_token(dense, 32) + extra)


def test_dense_presets_are_unchanged() -> None:
    assert "blocks.0.mlp.up.weight" in parameter_shapes(PRESETS["tiny"])
    assert count_parameters(PRESETS["tiny"]) == 139_296


@pytest.mark.parametrize("strategy", ["tp", "pp", "fsdp+tp", "zero2", "fairscale-oss"])
def test_strategies_without_moe_support_refuse_it(strategy: str) -> None:
    with pytest.raises(
        DistlabError, match=re.escape(f"strategy '{strategy}' cannot train the mixture")
    ):
        load_config(None, {"strategy": strategy, "nproc": 2, "model": "tiny-moe"})


def test_compile_is_refused_for_moe() -> None:
    with pytest.raises(DistlabError, match="--compile cannot compile the mixture-of-experts"):
        load_config(None, {"strategy": "single", "model": "tiny-moe", "compile": True})
