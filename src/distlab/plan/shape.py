"""The model the planner sizes: a GPT shape from a lab preset, explicit dimensions, or a
parameter count and a shape rule.

The lab's own model (``distlab.model``) is a GPT-2 block: LayerNorm with bias, q/k/v/proj
linears with bias, a 4h GELU MLP, learned positions, an untied head. Published models
differ in details the planner needs for their parameter count and FLOPs (grouped-query
attention, a gated MLP of another width, no biases), so a shape carries those too;
for the lab's presets it reproduces ``count_parameters`` and ``flops_per_token`` exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from distlab.errors import DistlabError
from distlab.model import PRESETS, GPTConfig

HEAD_DIM = 128
"""Head width of the ``--params`` shape rule (GPT-3, Megatron and Llama all use 128)."""
HIDDEN_STEP = 256
"""The ``--params`` rule's hidden sizes are multiples of this."""


@dataclass(frozen=True)
class ModelShape:
    """Dimensions of a decoder-only transformer, enough to count its parameters and FLOPs."""

    name: str
    layers: int
    hidden: int
    heads: int
    vocab: int
    seq_len: int
    ffn_hidden: int = 0
    """MLP width; 0 means 4 x hidden."""
    kv_heads: int = 0
    """Key/value heads (grouped-query attention); 0 means one per query head."""
    gated_mlp: bool = False
    """SwiGLU-style MLP: three matrices (gate, up, down) instead of two."""
    biases: bool = True
    """Linears and norms with biases (GPT-2, the lab's model) or without (Llama)."""
    positions: int = 0
    """Rows of a learned position table (the lab's model: its context length); 0 for RoPE."""
    experts: int = 0
    """Experts per MoE layer; 0 for the dense MLP."""
    top_k: int = 2
    """Experts each token runs through (MoE only)."""
    attention: str = "flash"
    """"flash": attention never writes the s x s scores to memory (FlashAttention, torch's
    SDPA); "materialized": scores, softmax and dropout go through memory (GPT training
    before 2022, Megatron-LM 2021)."""
    vocab_parallel_loss: bool = True
    """Under tensor parallelism the loss runs over the vocabulary shards (Megatron: three
    all-reduces of one float per token) instead of gathering the logits (the lab's)."""
    fused_qkv: bool = True
    """One q/k/v matmul (Megatron, Llama) or three (the lab's model): under tensor
    parallelism, one all-reduce of the input gradient or three."""

    @property
    def ffn(self) -> int:
        """The MLP's hidden width."""
        return self.ffn_hidden or 4 * self.hidden

    @property
    def kv(self) -> int:
        """Key/value heads."""
        return self.kv_heads or self.heads

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.hidden // self.heads

    def mlp_parameters(self) -> int:
        """One (expert) MLP's parameters."""
        matrices = 3 if self.gated_mlp else 2
        bias = (self.ffn * (matrices - 1) + self.hidden) if self.biases else 0
        return matrices * self.hidden * self.ffn + bias

    def attention_parameters(self) -> int:
        """q, k, v and output projections (with biases where the model has them)."""
        d, kv_width = self.hidden, self.kv * self.head_dim
        weights = 2 * d * d + 2 * d * kv_width
        return weights + ((2 * d + 2 * kv_width) if self.biases else 0)

    def block_parameters(self) -> int:
        """One transformer block: two norms, attention, the MLP or the experts and router."""
        norms = 2 * (2 * self.hidden if self.biases else self.hidden)
        mlp = self.mlp_parameters()
        if self.experts:
            mlp = self.hidden * self.experts + self.experts * mlp
        return norms + self.attention_parameters() + mlp

    def embedding_parameters(self) -> int:
        """Token and position tables, final norm and the (untied) head."""
        norm = 2 * self.hidden if self.biases else self.hidden
        return 2 * self.vocab * self.hidden + self.positions * self.hidden + norm

    def parameters(self) -> int:
        """All parameters of the model."""
        return self.layers * self.block_parameters() + self.embedding_parameters()

    def active_matmul_parameters(self) -> int:
        """Weights one token multiplies by: attention, its k experts' MLPs and router, the head."""
        d, kv_width = self.hidden, self.kv * self.head_dim
        mlp = (3 if self.gated_mlp else 2) * d * self.ffn
        if self.experts:
            mlp = self.top_k * mlp + d * self.experts
        return self.layers * (2 * d * d + 2 * d * kv_width + mlp) + d * self.vocab

    def flops_per_token(self) -> float:
        """Model FLOPs per trained token (PaLM's MFU definition, as ``distlab.model``):
        6 N for the matmul weights plus 12 L h s for attention; no recomputation."""
        return (
            6.0 * self.active_matmul_parameters() + 12.0 * self.layers * self.hidden * self.seq_len
        )

    def describe(self) -> str:
        """One line: name, parameters, dimensions."""
        extra = f", {self.experts} experts top-{self.top_k}" if self.experts else ""
        return (
            f"{self.name}: {self.parameters() / 1e9:.3g}B parameters, {self.layers} layers x "
            f"{self.hidden} hidden, {self.heads} heads, vocab {self.vocab}, seq {self.seq_len}"
            f"{extra}"
        )


def from_preset(name: str, seq_len: int | None = None) -> ModelShape:
    """The shape of a lab preset (``distlab.model.PRESETS``)."""
    if name not in PRESETS:
        raise DistlabError(f"unknown model preset '{name}' (choose one of: {', '.join(PRESETS)})")
    return from_gpt_config(name, PRESETS[name], seq_len)


def from_gpt_config(name: str, config: GPTConfig, seq_len: int | None = None) -> ModelShape:
    """The shape of the lab's model built from ``config``."""
    return ModelShape(
        name=name,
        layers=config.n_layer,
        hidden=config.d_model,
        heads=config.n_head,
        vocab=config.vocab_size,
        seq_len=seq_len or config.block_size,
        positions=config.block_size,
        experts=config.n_expert,
        top_k=config.top_k,
        vocab_parallel_loss=False,
        fused_qkv=False,
    )


def from_parameter_count(params: float, seq_len: int, vocab: int) -> ModelShape:
    """The lab's architecture sized to about ``params`` parameters by a standard rule.

    Heads of width 128, hidden a multiple of 256, and a depth with hidden / layers
    between 64 and 160 (GPT-3's and Megatron's models sit in that band); of those the
    shape whose parameter count is closest to ``params`` to the percent, ties to the
    ratio nearest 128.
    """
    if params < 1e6:
        raise DistlabError(f"--params {params:g} is too small for the shape rule (at least 1e6)")
    best: tuple[float, float, ModelShape] | None = None
    for layers in range(1, 257):
        low = max(HIDDEN_STEP, 64 * layers // HIDDEN_STEP * HIDDEN_STEP)
        for hidden in range(low, 160 * layers + 1, HIDDEN_STEP):
            if not 64 <= hidden / layers <= 160:
                continue
            shape = ModelShape(
                name=f"{params / 1e9:.3g}B",
                layers=layers,
                hidden=hidden,
                heads=hidden // HEAD_DIM,
                vocab=vocab,
                seq_len=seq_len,
            )
            error = round(abs(shape.parameters() - params) / params, 2)  # to the percent
            key = (error, abs(hidden / layers - 128))
            if best is None or key < best[:2]:
                best = (*key, shape)
    if best is None:
        raise DistlabError(f"--params {params:g}: no shape fits the rule")
    return best[2]


def with_seq_len(shape: ModelShape, seq_len: int | None) -> ModelShape:
    """``shape`` trained on sequences of ``seq_len`` tokens (unchanged if None)."""
    return shape if seq_len is None else replace(shape, seq_len=seq_len)
