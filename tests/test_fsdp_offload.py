"""fsdp --offload params: FSDP2's CPU offload, checked, applied, and training like single.

On a CPU-only machine the offloaded state stays where it was (host memory), but
FSDP2 runs its offload code path: the policy, the shard copies before the
all-gather and after the reduce-scatter, the optimizer step on the host shards.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tests.helpers import assert_resume_continues
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy

from distlab.distributed import RankContext
from distlab.errors import DistlabError
from distlab.model import build_model
from distlab.optim import build_optimizer, implementation
from distlab.report.parity import compare, parity_config
from distlab.strategies.fully_shard import apply_fsdp, offload_policy
from distlab.strategies.resolve import load_config

pytestmark = pytest.mark.slow  # the whole file: real runs with offloaded state


def test_fsdp_accepts_params_and_explains_why_not_optimizer() -> None:
    assert load_config(None, {"strategy": "fsdp", "nproc": 2, "offload": "params"}).offload == (
        "params"
    )
    with pytest.raises(DistlabError) as error:
        load_config(None, {"strategy": "fsdp", "nproc": 2, "offload": "optimizer"})
    message = str(error.value)
    assert "offloads parameters, gradients and optimizer state together" in message
    assert "--offload params" in message and "\n" not in message
    with pytest.raises(DistlabError, match="offload must be one of none, params for fsdp"):
        load_config(None, {"strategy": "fsdp", "nproc": 2, "offload": "disk"})


@pytest.mark.parametrize(
    ("overrides", "strategy"),
    [
        ({"strategy": "fsdp+tp", "nproc": 4, "tp": 2}, "fsdp+tp"),
        ({"strategy": "fsdp+pp", "nproc": 4, "pp": 2}, "fsdp+pp"),
        ({"strategy": "ddp", "nproc": 2}, "ddp"),
    ],
)
def test_other_strategies_refuse_fsdp_offload(overrides: dict, strategy: str) -> None:
    with pytest.raises(DistlabError) as error:
        load_config(None, {**overrides, "offload": "params"})
    assert str(error.value).startswith(f"--offload params is not used by strategy '{strategy}'")
    assert "fsdp, zero1, zero2, zero3" in str(error.value)


def test_offload_policy_per_device() -> None:
    assert offload_policy("params", "cpu") == CPUOffloadPolicy(pin_memory=False)
    assert offload_policy("params", "cuda") == CPUOffloadPolicy(pin_memory=True)
    assert not isinstance(offload_policy("none", "cpu"), CPUOffloadPolicy)


def test_every_unit_offloads_and_the_optimizer_runs_foreach(one_rank: RankContext) -> None:
    model = build_model("tiny", 0)
    mesh = init_device_mesh("cpu", (1,))
    sharded = apply_fsdp(model, mesh, True, "fp32", offload_policy("params", "cpu"))
    units = [sharded, *model.blocks.values()]
    for unit in units:  # FSDP2 keeps no public getter for a unit's policy
        group = unit._get_fsdp_state()._fsdp_param_group
        assert isinstance(group.offload_policy, CPUOffloadPolicy)
        assert all(param.offload_to_cpu for param in group.fsdp_params)
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    sharded(tokens).float().mean().backward()
    params = list(model.parameters())
    assert all(p.device.type == "cpu" and p.grad.device.type == "cpu" for p in params)
    assert implementation(params) == {"foreach": True}
    config = load_config(None, {"strategy": "fsdp", "nproc": 1, "offload": "params"})
    build_optimizer([params], config).step()


@pytest.mark.parametrize(
    ("optimizer", "fields"),
    [("sgd", {}), ("adamw", {}), ("sgd", {"micro_batch": 2}), ("adamw", {"precision": "bf16"})],
    ids=["sgd", "adamw", "sgd-micro-batch", "adamw-bf16"],
)
def test_offload_parity(optimizer: str, fields: dict, parity_workdir: Path) -> None:
    config = parity_config("fsdp", 2, optimizer, offload="params", **fields)
    report = compare(config, parity_workdir)
    assert report.passed, (report.rel_diffs, report.max_param_diff)
    assert report.losses[-1] < report.losses[0]


def test_offloaded_run_resumes_like_the_uninterrupted_one(tmp_path: Path) -> None:
    """A DCP checkpoint of host-resident shards: resumed at step 2, the losses continue."""
    assert_resume_continues(tmp_path, "--strategy", "fsdp", "--nproc", "2", "--offload", "params")
