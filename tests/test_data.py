"""Data: the global batch is a pure function of (data, seed, step, batch, seq_len)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distlab.data import global_batch, load_tokens, prepare_tokens, rank_slice, resolve_files
from distlab.errors import DistlabError

TOKENS = torch.arange(5000, dtype=torch.int64).remainder(256).to(torch.uint8)


@settings(max_examples=50, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    step=st.integers(0, 10**6),
    per_rank=st.integers(1, 4),
    dp=st.sampled_from([1, 2, 4, 8]),
    seq_len=st.integers(1, 64),
)
def test_rank_slices_reassemble_the_global_batch(seed, step, per_rank, dp, seq_len) -> None:
    batch = global_batch(TOKENS, seed, step, per_rank * dp, seq_len)
    slices = [rank_slice(batch, rank, dp) for rank in range(dp)]
    assert torch.equal(torch.cat([s[0] for s in slices]), batch[0])
    assert torch.equal(torch.cat([s[1] for s in slices]), batch[1])


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**31), step=st.integers(0, 10**6), batch=st.integers(1, 16))
def test_batches_are_deterministic_and_shifted(seed, step, batch) -> None:
    inputs, targets = global_batch(TOKENS, seed, step, batch, 16)
    again = global_batch(TOKENS, seed, step, batch, 16)
    assert torch.equal(inputs, again[0]) and torch.equal(targets, again[1])
    assert inputs.shape == (batch, 16) and inputs.dtype == torch.int64
    assert torch.equal(inputs[:, 1:], targets[:, :-1])


def test_different_steps_give_different_batches() -> None:
    first = global_batch(TOKENS, 0, 0, 8, 16)[0]
    second = global_batch(TOKENS, 0, 1, 8, 16)[0]
    assert not torch.equal(first, second)


def test_default_corpus_is_tokenised_and_cached(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("DISTLAB_CACHE", str(tmp_path))
    token_file = prepare_tokens(None)
    tokens = load_tokens(token_file)
    assert tokens.dtype == torch.uint8 and tokens.numel() > 100_000
    assert prepare_tokens(None) == token_file  # cached


def test_user_text_file(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("DISTLAB_CACHE", str(tmp_path / "cache"))
    text = tmp_path / "corpus.txt"
    text.write_text("héllo\nworld\n" * 10)
    tokens = load_tokens(prepare_tokens(str(text)))
    assert bytes(tokens.tolist()) == text.read_bytes()


def test_missing_data_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(DistlabError, match="matches no file"):
        resolve_files(str(tmp_path / "nothing*.txt"))


def test_too_little_data() -> None:
    with pytest.raises(DistlabError, match="too few"):
        global_batch(TOKENS[:10], 0, 0, 2, 16)
