"""What ``--precision bf16`` does to dtypes, and which optimizer kernel runs.

FSDP's bf16 is its ``MixedPrecisionPolicy``: no autocast, bf16 compute and
logits, fp32 sharded parameters and gradients; elsewhere autocast gives bf16
logits over fp32 parameters. The loss is fp32 under both.
"""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import init_device_mesh

from distlab.distributed import RankContext
from distlab.model import build_model
from distlab.optim import build_optimizer
from distlab.strategies.fully_shard import apply_fsdp
from distlab.strategies.resolve import load_config
from distlab.strategies.step_parts import activation_dtype, autocast, language_model_loss

TOKENS = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))


def test_fsdp_bf16_computes_in_bf16_and_keeps_fp32_shards(one_rank: RankContext) -> None:
    model = build_model("tiny", 0)
    sharded = apply_fsdp(model, init_device_mesh("cpu", (1,)), True, "bf16")
    with autocast("cpu", "bf16", sharded):
        assert not torch.is_autocast_enabled("cpu")  # the policy casts, autocast stays off
        logits = sharded(TOKENS)
    loss = language_model_loss(logits, TOKENS)
    assert (logits.dtype, loss.dtype) == (torch.bfloat16, torch.float32)
    assert activation_dtype(sharded, "bf16") == torch.bfloat16
    loss.backward()
    for param in model.parameters():
        assert param.dtype == param.grad.dtype == torch.float32  # reduced in fp32, sharded


def test_autocast_elsewhere_gives_bf16_logits_and_an_fp32_loss() -> None:
    model = build_model("tiny", 0)
    with autocast("cpu", "bf16", model):
        assert torch.is_autocast_enabled("cpu")
        logits = model(TOKENS)
    assert (logits.dtype, language_model_loss(logits, TOKENS).dtype) == (
        torch.bfloat16,
        torch.float32,
    )
    assert activation_dtype(model, "bf16") == torch.float32  # the residual stream stays fp32
    with autocast("cpu", "fp32", model):
        assert not torch.is_autocast_enabled("cpu")


def test_optimizers_use_the_multi_tensor_kernel_on_cpu() -> None:
    params = list(build_model("tiny", 0).parameters())
    for optimizer in ("sgd", "adamw"):
        built = build_optimizer([params], load_config(None, {"optimizer": optimizer}))
        assert built.defaults["foreach"] is True and not built.defaults["fused"]
