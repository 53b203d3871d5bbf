"""The KV cache and sampling: cached logits equal the full forward's, greedy equals argmax."""

from __future__ import annotations

import pytest
import torch

from distlab.generation import Sampling, generate
from distlab.model import KVCache, build_model

CACHE_TOLERANCE = 1e-5
"""A cached step attends one query row to the cached keys through a masked SDPA call, the
full forward all rows at once with ``is_causal`` (and its matmuls have other shapes): the same
sums in another order. Measured: at most 2.1e-7 (tiny) and 5.4e-7 (small) on logits of
magnitude ~1 (docs/hugging_face.md)."""


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Decoding a tiny model token by token is latency-bound: one intra-op thread, so that a
    busy machine does not stall torch's thread pool (measured on a loaded 2-core machine:
    40 greedy tokens in 0.14 s with one thread, 7.6 s with two)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def model():
    return build_model("tiny", seed=0).eval()


@torch.no_grad()
def test_cached_logits_equal_the_full_forward(model) -> None:
    tokens = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(0))
    full = model(tokens)
    cache = KVCache(model.config.n_layer)
    prefix = model(tokens[:, :7], cache=cache)  # a prompt, then one token at a time
    steps = [model(tokens[:, i : i + 1], cache=cache) for i in range(7, 20)]
    cached = torch.cat([prefix, *steps], dim=1)
    assert len(cache) == 20
    # The prompt's pass is the plain forward's call on the same tokens: bitwise.
    assert torch.equal(prefix, model(tokens[:, :7]))
    torch.testing.assert_close(cached, full, atol=CACHE_TOLERANCE, rtol=0)


@torch.no_grad()
def test_a_model_without_a_cache_computes_what_it_did() -> None:
    # Training never passes a cache: its logits are those of the plain causal forward.
    model = build_model("tiny", seed=1)
    tokens = torch.randint(0, 256, (3, 32), generator=torch.Generator().manual_seed(1))
    x = model.wte(tokens) + model.wpe(torch.arange(32))
    for block in model.blocks.values():
        b, t, _ = x.shape
        h = block.ln_1(x)
        q, k, v = (
            layer(h).view(b, t, -1, block.attn.head_dim).transpose(1, 2)
            for layer in (block.attn.q, block.attn.k, block.attn.v)
        )
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + block.attn.proj(y.transpose(1, 2).reshape(b, t, -1))
        x = x + block.mlp(block.ln_2(x))
    assert torch.equal(model(tokens), model.lm_head(model.ln_f(x)))


@torch.no_grad()
def argmax_without_cache(model, prompt: list[int], count: int) -> list[int]:
    """Greedy decoding the plain way: the whole (cropped) context through the model each time."""
    context = list(prompt)
    for _ in range(count):
        logits = model(torch.tensor([context[-model.config.block_size :]]))[0, -1]
        context.append(int(logits.argmax()))
    return context[len(prompt) :]


def test_greedy_equals_argmax_without_cache_past_the_context_length(model) -> None:
    prompt = list(b"def main():")
    count = 40  # 11 + 40 > 32: the window slides and the cache restarts
    greedy = generate(model, prompt, count, Sampling(temperature=0))
    assert len(greedy) == count
    assert greedy == argmax_without_cache(model, prompt, count)


def test_sampling_is_deterministic_for_a_seed(model) -> None:
    prompt = list(b"import ")
    first = generate(model, prompt, 12, Sampling(temperature=1.0, seed=3))
    assert first == generate(model, prompt, 12, Sampling(temperature=1.0, seed=3))
    assert first != generate(model, prompt, 12, Sampling(temperature=1.0, seed=4))
    assert all(0 <= token < 256 for token in first)


def test_top_1_is_greedy(model) -> None:
    prompt = list(b"x = ")
    top_1 = generate(model, prompt, 10, Sampling(temperature=0.7, top_k=1, seed=5))
    assert top_1 == generate(model, prompt, 10, Sampling(temperature=0))
