"""The tensor-parallel plan that runs is the plan the theory reads (``tp_plan``).

``apply_tp`` is applied to the GPT on 4 fake ranks (one process, fake tensors): every
parameter's DTensor placement must be the split ``tp_plan.shard_dim`` names, and its
local shape the one ``tp_local_shapes`` predicts for rank 0.
"""

from __future__ import annotations

import pytest
from torch.distributed.tensor import DTensor, Replicate, Shard

from distlab.config import Config, model_shape
from distlab.model import GPT
from distlab.strategies.parallel_dims import ParallelDims, parameter_shapes, tp_local_shapes
from distlab.strategies.tp_plan import BLOCK_PLAN, TOP_PLAN, Split, apply_tp, shard_dim
from distlab.train.fake_ranks import fake_ranks

TP = 4


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["plain", "sp"])
def test_applied_placements_are_the_planned_splits(sequence_parallel: bool) -> None:
    shape = model_shape(Config(model="tiny"))
    predicted = tp_local_shapes(parameter_shapes(shape), TP)
    with fake_ranks(TP) as ctx:
        mesh = ParallelDims(dp=1, tp=TP, pp=1).build_mesh(ctx.device_type, sharded=False)
        model = apply_tp(GPT(shape), mesh["tp"], sequence_parallel)
        params = dict(model.named_parameters())
        assert params.keys() == predicted.keys()
        for name, param in params.items():
            assert isinstance(param, DTensor), name
            dim = shard_dim(name)
            assert param.placements == ((Shard(dim),) if dim is not None else (Replicate(),)), name
            assert tuple(param.to_local().shape) == predicted[name], name


def test_every_split_kind_is_in_the_plan() -> None:
    # The plan names column- and row-parallel linears, a row-split embedding and
    # replicated modules: a plan that lost one kind would not be Megatron's layout.
    kinds = set(BLOCK_PLAN.values()) | set(TOP_PLAN.values())
    assert kinds == set(Split)
    assert shard_dim("wte.weight") == 0 and shard_dim("wpe.weight") is None
    assert shard_dim("blocks.0.attn.proj.weight") == 1
    assert shard_dim("blocks.0.attn.proj.bias") is None
    assert shard_dim("blocks.0.mlp.up.bias") == 0
    assert shard_dim("blocks.0.mlp.router.weight") is None  # not in the plan: whole
