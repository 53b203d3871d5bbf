"""The GPT: parameter counts, seed-only initialisation, FLOPs per token."""

from __future__ import annotations

import pytest
import torch

from distlab.model import PRESETS, build_model, count_parameters, flops_per_token


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_parameter_count_formula(preset: str) -> None:
    model = build_model(preset, 0)
    assert sum(p.numel() for p in model.parameters()) == count_parameters(PRESETS[preset])


def test_presets_sizes() -> None:
    assert 100_000 <= count_parameters(PRESETS["tiny"]) <= 200_000
    assert 1_000_000 <= count_parameters(PRESETS["small"]) <= 5_000_000
    assert 80e6 <= count_parameters(PRESETS["gpt2"]) <= 130e6


def test_initial_weights_depend_only_on_seed() -> None:
    torch.manual_seed(123)
    first = build_model("tiny", 7).state_dict()
    torch.manual_seed(999)
    second = build_model("tiny", 7).state_dict()
    other = build_model("tiny", 8).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not torch.equal(first["wte.weight"], other["wte.weight"])


def test_untrained_loss_is_near_uniform() -> None:
    model = build_model("tiny", 0)
    tokens = torch.randint(0, 256, (4, 32))
    logits = model(tokens)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten())
    assert abs(loss.item() - torch.log(torch.tensor(256.0)).item()) < 0.1


def test_flops_per_token_is_six_n_plus_attention() -> None:
    config = PRESETS["gpt2"]
    embeddings = (config.vocab_size + config.block_size) * config.d_model
    n_matmul = count_parameters(config) - embeddings
    attention = 12 * config.n_layer * config.d_model * 1024
    assert flops_per_token(config, 1024) == pytest.approx(6 * n_matmul + attention, rel=0.01)
