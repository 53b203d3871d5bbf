"""Config loading: YAML + CLI precedence and one-line errors naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from distlab.config import Config, grad_accum_steps, model_label, model_shape
from distlab.errors import DistlabError
from distlab.model import PRESETS, count_parameters
from distlab.report.sweep import load_sweep
from distlab.strategies.resolve import load_config


def test_defaults_are_valid() -> None:
    config = load_config()
    assert config == Config()


def test_yaml_then_cli_precedence(tmp_path: Path) -> None:
    file = tmp_path / "run.yaml"
    file.write_text("strategy: ddp\nnproc: 2\nsteps: 7\nlr: 0.01\n")
    config = load_config(str(file), {"steps": "9"})
    assert (config.strategy, config.nproc, config.steps, config.lr) == ("ddp", 2, 9, 0.01)


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"strategy": "nope"}, "unknown strategy 'nope'"),
        ({"nproc": 0}, "nproc must be >= 1"),
        ({"strategy": "ddp", "nproc": 3}, "not divisible by the data-parallel size 3"),
        ({"strategy": "single", "nproc": 2}, "exactly 1 rank"),
        ({"optimizer": "adam"}, "optimizer must be one of"),
        ({"steps": "many"}, "config field 'steps' expects int"),
        ({"model": "huge"}, "unknown model preset 'huge'"),
        ({"seq_len": 4096}, "seq_len must be between 1"),
        ({"micro_batch": 5}, "micro_batch 5 does not divide"),
        ({"precision": "fp8"}, "precision must be one of"),
        ({"track_time": "some"}, "track_time must be one of sample, every, off"),
        ({"profile": True, "track_time": "off"}, "use it with --track-time sample or every"),
        ({"lr": -1}, "lr must be a positive number"),
        ({"colour": "red"}, "unknown config field 'colour'"),
        ({"hidden": 100, "heads": 3}, "hidden 100 is not divisible by heads 3"),
        ({"vocab": 100}, "vocab must be >= 256"),
        ({"layers": 0}, "layers must be >= 1"),
        ({"strategy": "ddp", "bucket_mb": 0}, "bucket_mb must be a positive number of MiB"),
        ({"strategy": "fsdp", "prefetch": -1}, "prefetch must be >= 0 blocks"),
        ({"layers": 2, "seq_len": 4096, "model": "tiny", "hidden": 32}, None),
        ({"strategy": "tp", "nproc": 4, "heads": 6, "hidden": 48}, "the model has 6 heads"),
    ],
)
def test_invalid_values_raise_one_line_errors(overrides: dict, fragment: str | None) -> None:
    if fragment is None:  # valid: a shape of one's own takes its context from --seq-len
        load_config(None, overrides)
        return
    with pytest.raises(DistlabError) as error:
        load_config(None, overrides)
    assert fragment in str(error.value)
    assert "\n" not in str(error.value)


def test_a_model_shape_replaces_the_presets() -> None:
    """--layers/--hidden/--heads/--vocab reshape the preset; the context is --seq-len."""
    config = load_config(
        None,
        {"model": "gpt2", "layers": 32, "hidden": 4096, "heads": 32, "vocab": 32000,
         "seq_len": 4096},
    )  # fmt: skip
    shape = model_shape(config)
    assert (shape.n_layer, shape.d_model, shape.n_head) == (32, 4096, 32)
    assert (shape.vocab_size, shape.block_size) == (32000, 4096)
    assert count_parameters(shape) == 6_723_084_288  # a 7B-class GPT-2-style model
    assert model_label(config) == (
        "gpt2 reshaped: 32 layers x 4096, 32 heads, vocab 32000, context 4096"
    )
    assert model_shape(load_config(None, {"model": "gpt2"})) is PRESETS["gpt2"]
    with pytest.raises(DistlabError, match="context length 1024"):
        load_config(None, {"model": "gpt2", "seq_len": 4096})  # a preset keeps its context


def test_bad_yaml_file(tmp_path: Path) -> None:
    file = tmp_path / "bad.yaml"
    file.write_text("- just\n- a list\n")
    with pytest.raises(DistlabError, match="must hold a mapping"):
        load_config(str(file))
    with pytest.raises(DistlabError, match="config file not found"):
        load_config(str(tmp_path / "missing.yaml"))


def test_grad_accumulation_steps() -> None:
    config = load_config(
        None, {"strategy": "ddp", "nproc": 2, "global_batch": 16, "micro_batch": 2}
    )
    assert grad_accum_steps(config, 2) == 4


@pytest.mark.parametrize(
    "name", sorted(Path(__file__).parents[1].joinpath("configs").glob("*.yaml"))
)
def test_shipped_configs_load(name: Path) -> None:
    """Run configs load as a Config; sweep files (with a matrix) load as a sweep."""
    if "matrix" in yaml.safe_load(name.read_text()):
        load_sweep(str(name))
    else:
        load_config(str(name))
