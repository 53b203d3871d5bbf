"""The one GPT-style decoder every strategy trains.

Token + position embeddings, pre-LayerNorm blocks (causal multi-head attention
through ``scaled_dot_product_attention``, GELU MLP), a final LayerNorm and an
untied LM head. Byte-level vocabulary (256). The initial weights depend only on
the seed passed to ``build_model``, so every strategy at every world size starts
from the same model.

Module names are chosen for the parallel strategies: ``blocks`` is a
``ModuleDict`` keyed "0", "1", ... so a pipeline stage can delete the blocks it
does not own and keep the original parameter names, and the attention/MLP
linears (``q``, ``k``, ``v``, ``proj``, ``up``, ``down``) are what tensor parallelism
shards.

The ``-moe`` presets replace each block's MLP by a mixture of experts
(``distlab.moe``: router, E stacked expert MLPs, top-k dropless routing).

Generation passes a ``KVCache``: each block keeps the keys and values of the
tokens already seen, so a new token costs one position's work. Training never
passes one, and its path through the code is the one without it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from distlab.moe import Experts, MoE

VOCAB_SIZE = 256


@dataclass(frozen=True)
class GPTConfig:
    """Shape of the transformer."""

    n_layer: int
    n_head: int
    d_model: int
    block_size: int
    vocab_size: int = VOCAB_SIZE
    n_expert: int = 0
    """Experts per MoE layer; 0 = the dense MLP."""
    top_k: int = 2
    """Experts each token is routed to (MoE only)."""
    aux_coef: float = 0.01
    """Weight of the load-balancing loss in the training objective (MoE only)."""


PRESETS: dict[str, GPTConfig] = {
    # ~0.14M parameters: the test model; 4 layers so 4 pipeline stages fit.
    "tiny": GPTConfig(n_layer=4, n_head=4, d_model=48, block_size=32),
    # ~1.7M parameters: the CPU default, a few steps per second on 2 cores.
    "small": GPTConfig(n_layer=8, n_head=4, d_model=128, block_size=128),
    # GPT-2 small's shape (12 x 768, 1024 context): 85M parameters with bytes as tokens.
    "gpt2": GPTConfig(n_layer=12, n_head=12, d_model=768, block_size=1024),
    # tiny's and small's shapes with a mixture of experts (top-2) in every block.
    "tiny-moe": GPTConfig(n_layer=4, n_head=4, d_model=48, block_size=32, n_expert=4),
    "small-moe": GPTConfig(n_layer=8, n_head=4, d_model=128, block_size=128, n_expert=8),
}


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal scaled-dot-product attention over (batch, heads, seq, head_dim) tensors."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention of the newest ``q.shape[2]`` positions to all ``k.shape[2]`` cached ones.

    Query i sits at position past + i, so it sees the keys up to there: the
    causal mask of the full sequence, cut to the new rows. (The prompt's first
    pass, with no past, is the training path's call: the same logits, bitwise.)
    """
    new, total = q.shape[2], k.shape[2]
    if new == total:  # nothing cached before (a prompt): the full forward's own call
        return causal_attention(q, k, v)
    positions = torch.arange(total - new, total, device=q.device)
    visible = torch.arange(total, device=q.device)[None, :] <= positions[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=visible)


class LayerCache:
    """One block's keys and values of the positions seen so far, (batch, heads, seq, head_dim)."""

    def __init__(self) -> None:
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new positions' keys and values; return all of them."""
        if self.keys is not None:
            k, v = torch.cat([self.keys, k], dim=2), torch.cat([self.values, v], dim=2)
        self.keys, self.values = k, v
        return k, v


class KVCache:
    """Every block's ``LayerCache``, for generating one token after another."""

    def __init__(self, n_layer: int) -> None:
        self.layers = [LayerCache() for _ in range(n_layer)]

    def __len__(self) -> int:
        """Positions cached so far."""
        keys = self.layers[0].keys
        return 0 if keys is None else keys.shape[2]


AttentionFunction = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``attention(q, k, v) -> output``, all (batch, heads, seq, head_dim)."""


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with separate q, k, v and output projections.

    ``attention`` computes softmax(q k^T) v from the projected heads; it is an
    attribute so a strategy can replace it (context parallelism attends the
    local queries to the keys of the whole sequence, gathered from other ranks).
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.attention: AttentionFunction = causal_attention
        self.n_head = config.n_head
        self.head_dim = config.d_model // config.n_head
        self.q = nn.Linear(config.d_model, config.d_model)
        self.k = nn.Linear(config.d_model, config.d_model)
        self.v = nn.Linear(config.d_model, config.d_model)
        self.proj = nn.Linear(config.d_model, config.d_model)

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        batch, seq, _ = x.shape
        # -1 heads: under tensor parallelism each rank holds n_head / tp of them.
        q, k, v = (
            layer(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)
            for layer in (self.q, self.k, self.v)
        )
        y = self.attention(q, k, v) if cache is None else cached_attention(q, *cache.extend(k, v))
        return self.proj(y.transpose(1, 2).reshape(batch, seq, -1))


class MLP(nn.Module):
    """Position-wise feed-forward: d -> 4d -> GELU -> d."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.up = nn.Linear(config.d_model, 4 * config.d_model)
        self.down = nn.Linear(4 * config.d_model, config.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.d_model)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.d_model)
        self.mlp = (
            MoE(config.d_model, config.n_expert, config.top_k, config.aux_coef)
            if config.n_expert
            else MLP(config)
        )

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        # training calls the attention with one input, as tensor parallelism's input plan
        # (one layout per positional input) expects; only generation passes a cache
        attended = self.attn(self.ln_1(x)) if cache is None else self.attn(self.ln_1(x), cache)
        x = x + attended
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Decoder-only transformer mapping token ids (B, T) to logits (B, T, vocab).

    Every submodule tolerates being removed (set to None / deleted from
    ``blocks``), which is how a pipeline stage keeps only its own layers.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.wte: nn.Embedding | None = nn.Embedding(config.vocab_size, config.d_model)
        self.wpe: nn.Embedding | None = nn.Embedding(config.block_size, config.d_model)
        self.blocks = nn.ModuleDict({str(i): Block(config) for i in range(config.n_layer)})
        self.ln_f: nn.LayerNorm | None = nn.LayerNorm(config.d_model)
        self.lm_head: nn.Linear | None = nn.Linear(config.d_model, config.vocab_size, bias=False)

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Logits of ``tokens``; ``positions``: each column's position in the sequence
        (default 0, 1, ...; context parallelism passes those of the tokens a rank holds).

        With ``cache`` (generation, whole model only): ``tokens`` follow the cached
        positions, whose keys and values are reused; theirs are added to the cache.
        """
        x = tokens
        if self.wte is not None:
            if positions is None:
                start = 0 if cache is None else len(cache)
                positions = torch.arange(start, start + tokens.shape[1], device=tokens.device)
            x = self.wte(tokens) + self.wpe(positions)
        if cache is None:
            for block in self.blocks.values():
                x = block(x)
        else:
            for block, layer_cache in zip(self.blocks.values(), cache.layers, strict=True):
                x = block(x, layer_cache)
        if self.ln_f is not None:
            x = self.ln_f(x)
        if self.lm_head is not None:
            x = self.lm_head(x)
        return x


def _init_weights(module: nn.Module, n_layer: int) -> None:
    """GPT-2 initialisation: N(0, 0.02), residual projections scaled by 1/sqrt(2L)."""
    residual_std = 0.02 / (2 * n_layer) ** 0.5
    for name, sub in module.named_modules():
        if isinstance(sub, nn.Linear):
            std = residual_std if name.endswith(("proj", "down")) else 0.02
            nn.init.normal_(sub.weight, mean=0.0, std=std)
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)
        elif isinstance(sub, nn.Embedding):
            nn.init.normal_(sub.weight, mean=0.0, std=0.02)
        elif isinstance(sub, Experts):
            sub.init_weights(0.02, residual_std)


def build_model(preset: str | GPTConfig, seed: int) -> GPT:
    """Build the model on CPU with weights that depend only on ``seed``."""
    config = PRESETS[preset] if isinstance(preset, str) else preset
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = GPT(config)
    _init_weights(model, config.n_layer)
    torch.random.set_rng_state(generator_state)
    return model


def count_parameters(config: GPTConfig) -> int:
    """Total parameters of the full model."""
    d, layers, vocab = config.d_model, config.n_layer, config.vocab_size
    mlp = (d * 4 * d + 4 * d) + (4 * d * d + d)
    if config.n_expert:  # router (no bias) + E expert MLPs
        mlp = d * config.n_expert + config.n_expert * mlp
    per_block = 2 * 2 * d + 4 * (d * d + d) + mlp
    return vocab * d + config.block_size * d + layers * per_block + 2 * d + d * vocab


def flops_per_token(config: GPTConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 N (matmul weights, forward + backward) + attention.

    N counts the parameters that take part in matrix multiplies (everything but
    the embedding lookups and the norms/biases, which are negligible). The
    attention term 12 * L * d * T is the QK^T and AV matmuls, forward and
    backward, as in the PaLM paper's MFU definition (no causal discount).
    MoE: N counts the *active* parameters, the router and k of the E expert
    MLPs each token runs through.
    """
    d, layers = config.d_model, config.n_layer
    mlp = config.top_k * 8 * d * d + d * config.n_expert if config.n_expert else 8 * d * d
    matmul_params = layers * (4 * d * d + mlp) + d * config.vocab_size
    return 6.0 * matmul_params + 12.0 * layers * d * seq_len
