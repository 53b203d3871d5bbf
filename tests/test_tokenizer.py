"""Tokenizers (``--tokenizer``): bytes, a byte-level BPE trained on the training documents,
a tokenizer.json; token files in the narrowest dtype, memory-mapped; the vocabulary flows
into the model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tests.helpers import TINY_LOCAL_RUN, assert_one_line_error, run_main

from distlab.data import (
    bits_per_byte,
    load_tokens,
    prepare_tokens,
    token_facts,
    validation_file,
)
from distlab.tokenizer import tokenizer_json

WORDS = "the quick brown fox jumps over the lazy dog while distributed training runs".split()


@pytest.fixture
def corpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """40 small documents of English-like text, and a cache of this test's own."""
    monkeypatch.setenv("DISTLAB_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "corpus"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for index in range(40):
        words = rng.choice(WORDS, size=300)
        (folder / f"{index:02d}.txt").write_text(" ".join(words) + "\n")
    return folder


def test_bpe_tokens_decode_to_the_corpus_and_count_its_bytes(corpus: Path) -> None:
    """A trained BPE's token file decodes back to the training documents exactly, is
    stored in uint16, and its facts give bits per byte."""
    from tokenizers import Tokenizer

    token_file = prepare_tokens(str(corpus), held_out=True, tokenizer="bpe:300")
    tokens, facts = load_tokens(token_file), token_facts(token_file)
    assert isinstance(tokens, np.memmap) and tokens.dtype == np.uint16
    assert facts["vocab_size"] == 300 and facts["tokens"] == tokens.size
    assert facts["tokens"] < facts["bytes"] / 2  # merges: several bytes per token
    cached = sorted((corpus.parent / "cache" / "tokenizers").glob("bpe300-*-train.json"))
    decoded = Tokenizer.from_file(str(cached[0])).decode(tokens.tolist())
    val = token_facts(validation_file(token_file))
    assert len(decoded.encode()) == facts["bytes"] and val["bytes"] > 0
    assert bits_per_byte(2.0, facts) == pytest.approx(
        2.0 / np.log(2) * tokens.size / facts["bytes"]
    )
    assert prepare_tokens(str(corpus), held_out=True, tokenizer="bpe:300") == token_file


def test_tokenizer_json_path_and_bytes(corpus: Path, tmp_path: Path) -> None:
    prepare_tokens(str(corpus), tokenizer="bpe:280")
    trained = next((tmp_path / "cache" / "tokenizers").glob("bpe280-*.json"))
    folder = tmp_path / "hf-tokenizer"
    folder.mkdir()
    (folder / "tokenizer.json").write_bytes(trained.read_bytes())
    assert tokenizer_json(folder) == folder / "tokenizer.json"
    by_path = load_tokens(prepare_tokens(str(corpus), tokenizer=str(folder)))
    by_bpe = load_tokens(prepare_tokens(str(corpus), tokenizer="bpe:280"))
    assert np.array_equal(by_path, by_bpe)
    raw = load_tokens(prepare_tokens(str(corpus)))
    assert raw.dtype == np.uint8 and raw.size == token_facts(prepare_tokens(str(corpus)))["bytes"]


@pytest.mark.slow
def test_bpe_run_sizes_the_model_to_the_vocabulary(corpus: Path, tmp_path: Path) -> None:
    """The vocabulary flows into the model (its embedding and head), and val_bpb counts the
    validation split's bytes, not its tokens."""
    run_dir = tmp_path / "run"
    result = run_main(
        "distlab.launch", *TINY_LOCAL_RUN, "--strategy", "ddp", "--nproc", "2", "--steps", "3",
        "--data", str(corpus), "--tokenizer", "bpe:300", "--eval-every", "3",
        "--eval-batches", "1", "--run-dir", str(run_dir),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert "vocab 300" in summary["model"]
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["val_bpb"] < last["val_loss"] / np.log(2)  # several bytes per token
    resumed = run_main(
        "distlab.launch", "--resume", str(run_dir), "--tokenizer", "bpe:400", "--steps", "4",
        "--run-dir", str(tmp_path / "resumed"),
    )  # fmt: skip
    assert_one_line_error(resumed, "more than the resumed run's model embeds (300)")
    # The run keeps its tokenizer; export writes it, generate speaks it.
    exported = run_main("distlab.export", str(run_dir), str(tmp_path / "hf"))
    assert exported.returncode == 0, exported.stderr
    kept = (run_dir / "tokenizer.json").read_bytes()
    assert (tmp_path / "hf" / "tokenizer.json").read_bytes() == kept
    from transformers import AutoTokenizer

    text = "the lazy fox"
    ids = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))(text)["input_ids"]
    assert 0 < len(ids) < len(text)  # BPE pieces, not bytes
    sampled = run_main(
        "distlab.generate", str(run_dir), "--prompt", text, "--tokens", "5", "--temperature", "0"
    )
    assert sampled.returncode == 0 and sampled.stdout.startswith(text), sampled.stderr


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (["--tokenizer", "/no/such/tokenizer.json"], "no such tokenizer.json"),
        (["--tokenizer", "bpe:100"], "the vocabulary must be a whole number above 256"),
        (["--tokenizer", "bpe:300", "--vocab", "256"], "raise --vocab or drop it"),
    ],
)
def test_bad_tokenizer_input_is_one_line_exit_2(
    corpus: Path, tmp_path: Path, flags: list[str], fragment: str
) -> None:
    result = run_main(
        "distlab.launch", *TINY_LOCAL_RUN, "--strategy", "single", "--steps", "2",
        "--data", str(corpus), *flags, "--run-dir", str(tmp_path / "run"),
    )  # fmt: skip
    assert_one_line_error(result, fragment)


def test_dry_run_describes_the_tokenizers_vocabulary() -> None:
    """No corpus needed: bpe:VOCAB asks for VOCAB tokens, and the theory's model has them."""
    result = run_main("distlab.launch", "--strategy", "fsdp", "--nproc", "4", "--dry-run",
                      "--tokenizer", "bpe:4096")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "vocab 4096" in result.stdout
