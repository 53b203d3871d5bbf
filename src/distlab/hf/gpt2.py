"""distlab's GPT as Hugging Face's ``GPT2LMHeadModel``: its config and the weight names.

The two models compute the same function: same layers, heads, width, 4x MLP,
context, byte vocabulary, biases on every linear but the untied LM head, exact
GELU, LayerNorm eps 1e-5, SDPA causal attention, no dropout. Only the storage
differs: GPT-2 fuses q, k and v into one ``c_attn`` and stores its linears as
``Conv1D``, i.e. transposed (input x output).
"""

from __future__ import annotations

from typing import Any

import torch

from distlab.errors import DistlabError
from distlab.model import GPTConfig

LINEARS = {"attn.proj": "attn.c_proj", "mlp.up": "mlp.c_fc", "mlp.down": "mlp.c_proj"}
"""distlab's per-block ``nn.Linear`` -> GPT-2's ``Conv1D`` (weights transposed)."""
NORMS = ("ln_1", "ln_2")
QKV = ("attn.q", "attn.k", "attn.v")
"""Concatenated along the output dimension, in this order, into GPT-2's ``attn.c_attn``."""


def check_convertible(shape: GPTConfig) -> None:
    """A one-line error if GPT-2 cannot hold this shape (a mixture of experts)."""
    if shape.n_expert:
        raise DistlabError(
            f"the model has a mixture of experts ({shape.n_expert} per block); "
            "GPT-2 has a dense MLP, so only dense models convert"
        )


def hf_gpt2_config(shape: GPTConfig) -> Any:
    """``transformers.GPT2Config`` of distlab's GPT shape (the match: see the module doc)."""
    from transformers import GPT2Config

    return GPT2Config(**gpt2_config_fields(shape), use_cache=False, attn_implementation="sdpa")


def gpt2_config_fields(shape: GPTConfig) -> dict[str, Any]:
    """The ``GPT2Config`` fields that make GPT-2 compute distlab's GPT of ``shape``."""
    return {
        "vocab_size": shape.vocab_size,
        "n_positions": shape.block_size,
        "n_embd": shape.d_model,
        "n_layer": shape.n_layer,
        "n_head": shape.n_head,
        "activation_function": "gelu",
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "layer_norm_epsilon": 1e-5,
        "tie_word_embeddings": False,
        "bos_token_id": None,
        "eos_token_id": None,
    }


def to_gpt2_state_dict(state: dict[str, torch.Tensor], n_layer: int) -> dict[str, torch.Tensor]:
    """distlab's GPT state dict -> ``GPT2LMHeadModel``'s (contiguous: safetensors needs it)."""
    out = {
        "transformer.wte.weight": state["wte.weight"],
        "transformer.wpe.weight": state["wpe.weight"],
        "transformer.ln_f.weight": state["ln_f.weight"],
        "transformer.ln_f.bias": state["ln_f.bias"],
        "lm_head.weight": state["lm_head.weight"],
    }
    for i in range(n_layer):
        ours, theirs = f"blocks.{i}.", f"transformer.h.{i}."
        for norm in NORMS:
            for part in ("weight", "bias"):
                out[f"{theirs}{norm}.{part}"] = state[f"{ours}{norm}.{part}"]
        out[f"{theirs}attn.c_attn.weight"] = torch.cat(
            [state[f"{ours}{name}.weight"] for name in QKV]
        ).T
        out[f"{theirs}attn.c_attn.bias"] = torch.cat([state[f"{ours}{name}.bias"] for name in QKV])
        for linear, conv in LINEARS.items():
            out[f"{theirs}{conv}.weight"] = state[f"{ours}{linear}.weight"].T
            out[f"{theirs}{conv}.bias"] = state[f"{ours}{linear}.bias"]
    return {name: tensor.detach().contiguous() for name, tensor in out.items()}


def from_gpt2_state_dict(gpt2: dict[str, torch.Tensor], n_layer: int) -> dict[str, torch.Tensor]:
    """``GPT2LMHeadModel``'s state dict -> distlab's GPT's (the inverse of ``to_gpt2_state_dict``).

    A GPT-2 with tied embeddings stores no ``lm_head.weight``: the LM head is then ``wte``.
    """
    state = {
        "wte.weight": gpt2["transformer.wte.weight"],
        "wpe.weight": gpt2["transformer.wpe.weight"],
        "ln_f.weight": gpt2["transformer.ln_f.weight"],
        "ln_f.bias": gpt2["transformer.ln_f.bias"],
        "lm_head.weight": gpt2.get("lm_head.weight", gpt2["transformer.wte.weight"]),
    }
    for i in range(n_layer):
        ours, theirs = f"blocks.{i}.", f"transformer.h.{i}."
        for norm in NORMS:
            for part in ("weight", "bias"):
                state[f"{ours}{norm}.{part}"] = gpt2[f"{theirs}{norm}.{part}"]
        for name, weight, bias in zip(
            QKV,
            gpt2[f"{theirs}attn.c_attn.weight"].T.chunk(3),
            gpt2[f"{theirs}attn.c_attn.bias"].chunk(3),
            strict=True,
        ):
            state[f"{ours}{name}.weight"], state[f"{ours}{name}.bias"] = weight, bias
        for linear, conv in LINEARS.items():
            state[f"{ours}{linear}.weight"] = gpt2[f"{theirs}{conv}.weight"].T
            state[f"{ours}{linear}.bias"] = gpt2[f"{theirs}{conv}.bias"]
    return {name: tensor.contiguous() for name, tensor in state.items()}
