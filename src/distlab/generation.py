"""Sampling text from the GPT, one token at a time through its KV cache.

Greedy with temperature 0, else softmax(logits / temperature) over the top-k
tokens, drawn with a generator seeded by ``seed``: the same model, prompt and
settings give the same text. Only byte tokens (ids below 256) are drawn: a model
reshaped to a larger vocabulary has ids the byte tokenizer never produces.

The context is the model's ``block_size``. While it holds prompt and output,
each new token is one cached position; once it is full, every position would
shift, so the cache restarts from the newest ``block_size`` tokens (what a
model without a cache computes on a cropped context: nanoGPT's ``generate``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from distlab.model import GPT, VOCAB_SIZE, KVCache


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen from the logits."""

    temperature: float = 1.0
    """0: the most likely token (greedy); else the softmax's temperature."""
    top_k: int | None = None
    """Draw only among the k most likely tokens; None: among all."""
    seed: int = 0
    """Seeds the draws."""


def next_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> int:
    """The token chosen from one position's byte logits (VOCAB_SIZE of them)."""
    if sampling.temperature == 0:
        return int(logits.argmax())
    scaled = logits / sampling.temperature
    if sampling.top_k is not None and sampling.top_k < scaled.numel():
        kth_largest = torch.topk(scaled, sampling.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth_largest, float("-inf"))
    probabilities = F.softmax(scaled, dim=-1)
    return int(torch.multinomial(probabilities, 1, generator=generator))


@torch.no_grad()
def generate(model: GPT, prompt: list[int], count: int, sampling: Sampling) -> list[int]:
    """``count`` token ids that follow ``prompt`` (at least one id), sampled with a KV cache."""
    context = list(prompt)
    window = model.config.block_size
    generator = torch.Generator().manual_seed(sampling.seed)
    cache = KVCache(model.config.n_layer)
    logits = model(torch.tensor([context[-window:]]), cache=cache)[0, -1]
    out: list[int] = []
    while True:
        token = next_token(logits[:VOCAB_SIZE], sampling, generator)
        out.append(token)
        context.append(token)
        if len(out) == count:
            return out
        if len(cache) < window:
            logits = model(torch.tensor([[token]]), cache=cache)[0, -1]
        else:  # the window slides: every position changes, so the cache starts again
            cache = KVCache(model.config.n_layer)
            logits = model(torch.tensor([context[-window:]]), cache=cache)[0, -1]
