"""Data: the global batch is a pure function of (data, seed, step, batch, seq_len)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.helpers import TINY_LOCAL_RUN, assert_one_line_error, run_main

from distlab.corpus import resolve_corpus
from distlab.data import (
    VALIDATION_SHARE,
    document_key,
    global_batch,
    load_tokens,
    prepare_tokens,
    rank_slice,
    split_documents,
    validation_batch,
    validation_file,
)
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
    assert tokens.dtype == np.uint8 and tokens.size > 100_000
    assert prepare_tokens(None) == token_file  # cached


def test_user_text_file(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("DISTLAB_CACHE", str(tmp_path / "cache"))
    text = tmp_path / "corpus.txt"
    text.write_text("héllo\nworld\n" * 10)
    tokens = load_tokens(prepare_tokens(str(text)))
    assert bytes(tokens.tolist()) == text.read_bytes()


def test_missing_data_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(DistlabError, match="matches no file"):
        resolve_corpus(str(tmp_path / "nothing*.txt"))


def test_too_little_data() -> None:
    with pytest.raises(DistlabError, match="too few"):
        global_batch(TOKENS[:10], 0, 0, 2, 16)


documents = st.lists(st.text(max_size=64), min_size=2, max_size=12)


@settings(max_examples=60, deadline=None)
@given(texts=documents, order=st.randoms(use_true_random=False))
def test_validation_split_depends_on_the_documents_alone(texts: list[str], order) -> None:
    """The split partitions the documents, holds out at least the share (never all), and is
    a function of the documents' contents: shuffling the corpus holds out the same texts."""
    keys = [document_key(text) for text in texts]
    train, held = split_documents(keys)
    assert sorted(train + held) == list(range(len(texts))) and train and held
    assert train == sorted(train) and held == sorted(held)  # corpus order within each split
    total = sum(size for _, size in keys)
    assert sum(keys[i][1] for i in held) >= VALIDATION_SHARE * total or len(train) == 1
    shuffled = list(range(len(texts)))
    order.shuffle(shuffled)
    _, held_again = split_documents([keys[i] for i in shuffled])
    assert sorted(texts[shuffled[i]] for i in held_again) == sorted(texts[i] for i in held)


def test_held_out_run_splits_and_a_plain_run_keeps_the_whole_corpus(
    tmp_path: Path, monkeypatch
) -> None:
    """With --eval-every the run trains on the training documents only; without, on every
    document, as before the split existed (same token file, same batches)."""
    monkeypatch.setenv("DISTLAB_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    texts = [f"document {i}: ".encode() + bytes([65 + i % 26]) * (50 + 7 * i) for i in range(30)]
    for i, text in enumerate(texts):
        (corpus / f"{i:02d}.txt").write_bytes(text)
    whole = load_tokens(prepare_tokens(str(corpus)))
    assert bytes(whole.tolist()) == b"".join(texts)
    train_file = prepare_tokens(str(corpus), held_out=True)
    train, val = load_tokens(train_file), load_tokens(validation_file(train_file))
    assert train.size + val.size == whole.size
    assert val.size >= VALIDATION_SHARE * whole.size
    assert bytes(val.tolist()) not in bytes(train.tolist())


def test_validation_batches_ignore_the_seed() -> None:
    assert torch.equal(validation_batch(TOKENS, 3, 4, 16)[0], global_batch(TOKENS, 0, 3, 4, 16)[0])


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (["--eval-every", "2", "--data", "ONE_FILE"], "the data is one document"),
        (["--eval-every", "-1"], "eval_every must be >= 0"),
        (["--eval-every", "2", "--eval-batches", "0"], "eval_batches must be >= 1"),
        (["--eval-every", "2", "--ft", "live"], "not supported with --ft live"),
    ],
)
def test_bad_evaluation_input_is_one_line_exit_2(
    tmp_path: Path, monkeypatch, flags: list[str], fragment: str
) -> None:
    monkeypatch.setenv("DISTLAB_CACHE", str(tmp_path / "cache"))
    one_file = tmp_path / "one.txt"
    one_file.write_text("just one document\n" * 100)
    flags = [str(one_file) if flag == "ONE_FILE" else flag for flag in flags]
    result = run_main(
        "distlab.launch", *TINY_LOCAL_RUN, "--strategy", "ddp", "--nproc", "2", *flags,
        "--run-dir", str(tmp_path / "run"),
    )  # fmt: skip
    assert_one_line_error(result, fragment)
