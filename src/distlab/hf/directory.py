"""An exported model directory, as ``transformers`` reads a GPT-2: written and read back.

``config.json`` (GPT-2's fields for distlab's shape), ``model.safetensors`` (the
weights under GPT-2's names) and the byte tokenizer's files. Weights go through
safetensors both ways: a file of raw tensors and a JSON header, nothing that
runs on load (never a pickle).
"""

from __future__ import annotations

import json
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distlab.errors import DistlabError
from distlab.hf.gpt2 import (
    check_convertible,
    from_gpt2_state_dict,
    gpt2_config_fields,
    to_gpt2_state_dict,
)
from distlab.hf.tokenizer import write_tokenizer
from distlab.model import GPTConfig

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
SAME_FUNCTION = {"activation_function": "gelu", "layer_norm_epsilon": 1e-5}
"""GPT-2 settings a directory must have to compute distlab's GPT (GPT-2's own checkpoints
use the tanh-approximated ``gelu_new``: the same weights would give other logits)."""


def require_libraries() -> None:
    """A one-line error if safetensors or tokenizers (the ``bench`` extra) is not installed."""
    missing = [name for name in ("safetensors", "tokenizers") if find_spec(name) is None]
    if missing:
        raise DistlabError(
            f"{' and '.join(missing)} not installed: pip install 'distlab[bench]' "
            "(Hugging Face directories need them)"
        )


def write_directory(
    out: Path,
    shape: GPTConfig,
    state: dict[str, torch.Tensor],
    run_tokenizer: Path | None = None,
) -> list[Path]:
    """Write distlab GPT weights ``state`` of ``shape`` as a GPT-2 directory, with the run's
    tokenizer (``run_tokenizer``; None: raw bytes); the files written."""
    require_libraries()
    from safetensors.torch import save_file

    check_convertible(shape)
    out.mkdir(parents=True, exist_ok=True)
    # config.json by hand (no transformers needed to export): GPT2Config's defaults
    # fill every field not given, exactly as they do for hf_gpt2_config.
    settings = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "dtype": "float32"}
    settings.update(gpt2_config_fields(shape), use_cache=True)  # for transformers' generate
    (out / CONFIG_FILE).write_text(json.dumps(settings, indent=2) + "\n")
    weights = {k: v.float() for k, v in to_gpt2_state_dict(state, shape.n_layer).items()}
    save_file(weights, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    write_tokenizer(out, shape.block_size, run_tokenizer)
    return sorted(out.iterdir())


def read_shape(directory: Path) -> GPTConfig:
    """The distlab shape of a GPT-2 directory's ``config.json``; one-line errors if it has
    none, if its files are missing, or if GPT-2 computes another function with it."""
    require_libraries()
    if not directory.is_dir():
        raise DistlabError(f"{directory}: no such model directory")
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (directory / name).is_file():
            raise DistlabError(f"{directory} holds no {name} (a GPT-2 directory has both)")
    try:
        settings: dict[str, Any] = json.loads((directory / CONFIG_FILE).read_text())
        if settings.get("model_type") != "gpt2":
            raise ValueError(f"model_type is {settings.get('model_type')!r}, not 'gpt2'")
        for key, value in SAME_FUNCTION.items():
            if settings.get(key, value) != value:
                raise ValueError(f"{key} is {settings[key]!r}; distlab's GPT has {value!r}")
        if settings.get("n_inner") not in (None, 4 * settings["n_embd"]):
            raise ValueError(f"n_inner is {settings['n_inner']}, not 4 x n_embd")
        return GPTConfig(
            n_layer=int(settings["n_layer"]),
            n_head=int(settings["n_head"]),
            d_model=int(settings["n_embd"]),
            block_size=int(settings["n_positions"]),
            vocab_size=int(settings["vocab_size"]),
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DistlabError(
            f"{directory / CONFIG_FILE} is not a GPT-2 config distlab can use: {exc}"
        ) from None


def load_directory(model: nn.Module, directory: Path) -> None:
    """Put a GPT-2 directory's weights into distlab's ``model`` (of the same shape)."""
    shape = read_shape(directory)  # safetensors is there once this returns
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if shape != model.config:
        raise DistlabError(
            f"{directory} holds {describe(shape)}; the model is {describe(model.config)}"
        )
    try:
        gpt2 = load_file(str(directory / WEIGHTS_FILE))
        state = from_gpt2_state_dict(gpt2, shape.n_layer)
        with torch.no_grad():
            model.load_state_dict(state)
    except KeyError as exc:
        raise DistlabError(f"{directory / WEIGHTS_FILE} lacks the GPT-2 tensor {exc}") from None
    except (SafetensorError, RuntimeError, OSError) as exc:
        message = str(exc).strip().splitlines()[-1]
        raise DistlabError(f"{directory / WEIGHTS_FILE} cannot be loaded: {message}") from None


def describe(shape: GPTConfig) -> str:
    """A shape in one phrase, as messages name it."""
    experts = f", {shape.n_expert} experts per block" if shape.n_expert else ""
    return (
        f"{shape.n_layer} layers x {shape.d_model}, {shape.n_head} heads, "
        f"vocab {shape.vocab_size}, context {shape.block_size}{experts}"
    )
