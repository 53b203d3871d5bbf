"""Degrees and settings of tp / pp / compositions: resolution and one-line errors."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distlab.errors import DistlabError
from distlab.strategies import registry
from distlab.strategies.pipeline_settings import resolve_microbatches
from distlab.strategies.resolve import load_config


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        # Shapes tensor parallelism cannot split.
        ({"strategy": "tp", "nproc": 3, "model": "tiny"}, "n_head divisible by 3"),
        ({"strategy": "fsdp+tp", "nproc": 6, "tp": 3, "model": "tiny"}, "n_head divisible by 3"),
        (
            {"strategy": "tp", "nproc": 2, "sequence_parallel": True, "seq_len": 31},
            "seq_len divisible by 2",
        ),
        # Pipeline settings.
        ({"strategy": "pp", "nproc": 8, "model": "tiny"}, "only 4 layers"),
        (
            {"strategy": "pp", "nproc": 4, "model": "tiny", "schedule": "interleaved-1f1b"},
            "8 pipeline stages (2 per rank",
        ),
        ({"strategy": "pp", "nproc": 4, "microbatches": 2}, "at least as many microbatches"),
        ({"strategy": "pp", "nproc": 2, "microbatches": 3}, "does not divide the local batch"),
        ({"strategy": "pp", "nproc": 2, "schedule": "zigzag"}, "unknown pipeline schedule"),
        (
            {"strategy": "pp", "nproc": 2, "micro_batch": 2, "microbatches": 4},
            "--micro-batch 2 x --microbatches 4",
        ),
        # Degrees.
        ({"strategy": "fsdp+tp+pp", "nproc": 8, "dp": 1, "tp": 2, "pp": 2}, "multiply to nproc"),
        ({"strategy": "fsdp+tp", "nproc": 6, "tp": 4}, "not divisible by --tp 4"),
        ({"strategy": "tp", "nproc": 4, "tp": 2}, "--tp must equal --nproc"),
        ({"strategy": "pp", "nproc": 2, "tp": 2}, "--tp 2 is not used by strategy 'pp'"),
        ({"strategy": "fsdp+tp", "nproc": 4, "pp": 2}, "--pp 2 is not used by strategy"),
        ({"strategy": "pp", "nproc": 2, "dp": 2}, "--dp 2 is not used by strategy 'pp'"),
        ({"strategy": "fsdp+tp", "nproc": 4}, "needs --tp >= 2"),
        ({"strategy": "ddp+pp", "nproc": 4, "pp": 2, "sequence_parallel": True}, "tp, fsdp+tp"),
        (
            {"strategy": "fsdp+tp", "nproc": 4, "tp": 2, "global_batch": 3},
            "data-parallel size 2",
        ),
    ],
)
def test_invalid_settings_raise_one_line_errors(overrides: dict, fragment: str) -> None:
    with pytest.raises(DistlabError) as error:
        load_config(None, overrides)
    assert fragment in str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("overrides", "dp", "tp", "pp"),
    [
        ({"strategy": "tp", "nproc": 4}, 1, 4, 1),  # tp defaults to nproc
        ({"strategy": "pp", "nproc": 4}, 1, 1, 4),  # pp defaults to nproc
        ({"strategy": "fsdp+tp", "nproc": 4, "tp": 2}, 2, 2, 1),
        ({"strategy": "ddp+pp", "nproc": 4, "pp": 2}, 2, 1, 2),
        ({"strategy": "fsdp+pp", "nproc": 8, "pp": 4}, 2, 1, 4),
        ({"strategy": "fsdp+tp+pp", "nproc": 8, "tp": 2, "pp": 2, "model": "tiny"}, 2, 2, 2),
        ({"strategy": "fsdp+tp+pp", "nproc": 8, "dp": 2, "tp": 2, "pp": 2}, 2, 2, 2),
    ],
)
def test_degrees(overrides: dict, dp: int, tp: int, pp: int) -> None:
    config = load_config(None, overrides)
    strategy = registry.get(config.strategy)
    dims = strategy.dims(config)
    assert (dims.dp, dims.tp, dims.pp) == (dp, tp, pp)
    assert strategy.data_parallel_size(config) == dp


def test_default_microbatches_are_two_per_stage_and_divide_the_local_batch() -> None:
    config = load_config(None, {"strategy": "pp", "nproc": 4, "global_batch": 16})
    assert resolve_microbatches(config, registry.get("pp").dims(config)) == 8
    config = load_config(None, {"strategy": "fsdp+pp", "nproc": 4, "pp": 2, "global_batch": 12})
    assert resolve_microbatches(config, registry.get("fsdp+pp").dims(config)) == 3
    config = load_config(None, {"strategy": "pp", "nproc": 2, "global_batch": 8, "micro_batch": 2})
    assert resolve_microbatches(config, registry.get("pp").dims(config)) == 4


def test_predicted_bytes_split_the_model() -> None:
    """Rank 0 of tp/pp holds about 1/degree of the model (plus what is replicated)."""
    full = load_config(None, {"model": "tiny"})
    single = registry.get("single").predicted_state_bytes(full, 139_296).params
    for overrides, lower, upper in [
        ({"strategy": "tp", "nproc": 2}, 0.5, 0.55),
        ({"strategy": "pp", "nproc": 2}, 0.4, 0.6),
        ({"strategy": "fsdp+tp+pp", "nproc": 8, "tp": 2, "pp": 2}, 0.12, 0.14),
    ]:
        config = load_config(None, {"model": "tiny", **overrides})
        params = registry.get(config.strategy).predicted_state_bytes(config, 0).params
        assert lower * single <= params <= upper * single, (overrides, params / single)


MESH_NAMES = ("pp", "dp_replicate", "dp_shard", "cp", "tp", "ep")
DEGREES = ("dp", "cp", "tp", "pp")


@settings(max_examples=150, deadline=None)
@given(
    strategy=st.sampled_from(registry.names()),
    degrees=st.fixed_dictionaries({d: st.sampled_from([1, 2, 4]) for d in DEGREES}),
)
def test_every_valid_layout_names_a_mesh_whose_product_is_nproc(
    strategy: str, degrees: dict[str, int]
) -> None:
    """Whatever degrees a strategy accepts, the mesh it declares (``Strategy.mesh_dims``:
    torchtitan's dp_replicate, dp_shard, cp, tp, pp, then ep within the data-parallel ranks)
    multiplies to ``--nproc``, in mesh order."""
    nproc = math.prod(degrees.values())
    parts = strategy.split("+")
    fields = {d: v for d, v in degrees.items() if d in parts or (d == "dp" and len(parts) > 1)}
    model = "tiny-moe" if strategy == "ep" else "small"
    try:
        config = load_config(None, {"strategy": strategy, "nproc": nproc, "model": model, **fields})
    except DistlabError:
        return  # not a layout this strategy runs
    mesh = registry.get(strategy).mesh_dims(config)
    assert math.prod(d for name, d in mesh.items() if name != "ep") == nproc, mesh
    assert list(mesh) == [name for name in MESH_NAMES if name in mesh]
    assert all(degree > 1 for degree in mesh.values())
