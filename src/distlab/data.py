"""Training data, its held-out split, and the deterministic batch of every step.

The corpus (``distlab.corpus``: the bundled standard-library sources, text files, or
a Hugging Face dataset) is a list of documents. They are tokenised by ``--tokenizer``
(``distlab.tokenizer``: raw bytes by default) into one flat array of token ids (uint8,
uint16 or uint32 as the vocabulary needs), cached on disk keyed by the corpus's
fingerprint and the tokenizer. Ranks memory-map it.

The global batch of step ``s`` is a pure function of (tokens, seed, s,
global_batch, seq_len): ``global_batch`` random windows drawn with a generator
seeded from (seed, s). Data-parallel rank r of d takes rows
``[r * B/d, (r+1) * B/d)``, so every strategy at every world size trains on the
same global batches, and a resumed run needs nothing but the step number.

A run that evaluates (``--eval-every``) holds documents out for validation
(``split_documents``): chosen by a hash of each document's text, so the split
depends on the corpus alone, never on the seed, the strategy or the world size.
It then trains on the rest, in a token file of its own; a run that does not
evaluate trains on the whole corpus, exactly as before the split existed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distlab.atomic_file import write_text_atomically
from distlab.config import cache_dir
from distlab.corpus import Documents, read_documents, resolve_corpus
from distlab.errors import DistlabError
from distlab.tokenizer import BYTES, Tokenizer, load_tokenizer, text_batches

COPY_TOKENS = 64 * 2**20
"""Tokens copied at a time from the encoded stream into the .npy file."""
VALIDATION_SHARE = 0.05
"""At least this share of the corpus's tokens is held out when a run evaluates."""
VALIDATION_SEED = 0
"""Validation batch k is drawn as training's step k with this seed, whatever ``--seed``
is: every run is evaluated on the same windows."""


def document_key(text: str) -> tuple[bytes, int]:
    """What the split knows of a document: the SHA-256 of its UTF-8 bytes, and their count."""
    data = text.encode("utf-8")
    return hashlib.sha256(data).digest(), len(data)


def split_documents(keys: list[tuple[bytes, int]]) -> tuple[list[int], list[int]]:
    """Indexes of the training and the validation documents, each in corpus order, from
    every document's ``document_key``.

    Documents are ranked by the SHA-256 of their bytes; the first in that order are held
    out until they hold ``VALIDATION_SHARE`` of the bytes (at least one document, never
    all of them). The split is the same under every tokenizer.
    """
    if len(keys) < 2:
        raise DistlabError(
            "--eval-every holds documents out for validation, but the data is one document; "
            "pass several files to --data (one document each), or leave out --eval-every"
        )
    ranked = sorted(range(len(keys)), key=lambda i: keys[i][0])
    wanted, have = VALIDATION_SHARE * sum(size for _, size in keys), 0
    held: set[int] = set()
    for index in ranked[:-1]:  # never every document: training needs one
        held.add(index)
        have += keys[index][1]
        if have >= wanted:
            break
    train = [i for i in range(len(keys)) if i not in held]
    return train, sorted(held)


def validation_file(token_file: Path) -> Path:
    """The validation split's token file beside a held-out run's training token file."""
    return token_file.with_name(token_file.name.replace("-train.npy", "-val.npy"))


def token_facts(token_file: Path) -> dict[str, Any]:
    """What a token file holds (``tokens``, ``bytes`` of text, ``vocab_size``, ``tokenizer``)."""
    return json.loads(token_file.with_suffix(".json").read_text())


def prepare_tokens(
    data: str | None,
    held_out: bool = False,
    tokenizer: str = BYTES,
    column: str = "text",
    split: str = "train",
) -> Path:
    """Tokenise the corpus once and return the path of the cached ``.npy`` token file.

    ``held_out``: split off the validation documents (``split_documents``); the file
    returned then holds the training documents, ``validation_file`` of it the others.
    ``tokenizer``: ``--tokenizer`` (``distlab.tokenizer``); a BPE is trained on the
    training documents. ``column``, ``split``: of a dataset (``distlab.corpus``). Beside
    each token file, ``token_facts`` of it.
    """
    source = resolve_corpus(data, column, split)
    root = cache_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DistlabError(
            f"cannot create the cache dir {root}: {exc} (set DISTLAB_CACHE)"
        ) from None
    corpus = source.fingerprint + ("-train" if held_out else "")
    documents: Documents | None = None
    split: tuple[set[int], set[int]] | None = None

    def read() -> Documents:  # at most once, only if something must be made
        nonlocal documents, split
        if documents is None:
            documents = read_documents(source, root / "hf")
            if held_out:  # one pass for the keys: the documents stay on disk
                train, held = split_documents([document_key(t) for t in documents.texts()])
                split = set(train), set(held)
        return documents

    def training_texts() -> Iterator[str]:
        return read().texts(split[0] if held_out else None)

    chosen = load_tokenizer(tokenizer, corpus, training_texts)
    name = f"tokens-{source.fingerprint}" + (f"-{chosen.label}" if chosen.label else "")
    token_file = root / (f"{name}-train.npy" if held_out else f"{name}.npy")
    if token_file.with_suffix(".json").exists():  # written last (_save_tokens)
        return token_file
    if held_out:
        held = read().texts(split[1])
        _save_tokens(held, len(split[1]), chosen, validation_file(token_file))
    count = len(split[0]) if held_out else len(read())
    _save_tokens(training_texts(), count, chosen, token_file)  # last: its facts mean done
    return token_file


def _save_tokens(texts: Iterable[str], count: int, tokenizer: Tokenizer, token_file: Path) -> None:
    """Encode the ``count`` documents a batch at a time into ``token_file`` (the corpus is
    never all in memory) and write its ``token_facts`` beside it (each atomically; the
    facts last: they mean it is whole). A progress bar on a terminal; a BPE encodes each
    batch on every core (Hugging Face ``tokenizers`` runs in parallel)."""
    from rich.progress import Progress

    raw = token_file.with_suffix(f".tmp{os.getpid()}.raw")
    tokens = text_bytes = 0
    with raw.open("wb") as out, Progress(transient=True, disable=not sys.stderr.isatty()) as bar:
        task = bar.add_task(f"tokenising into {token_file.name}", total=count)
        for batch in text_batches(texts):
            for ids in tokenizer.encode(batch):
                out.write(ids.astype(tokenizer.dtype, copy=False).tobytes())
                tokens += ids.size
            text_bytes += sum(len(text.encode("utf-8")) for text in batch)
            bar.advance(task, len(batch))
    tmp = token_file.with_suffix(f".tmp{os.getpid()}.npy")
    array = np.lib.format.open_memmap(tmp, mode="w+", dtype=tokenizer.dtype, shape=(tokens,))
    for start in range(0, tokens, COPY_TOKENS):  # the raw tokens behind an .npy header
        count_now = min(COPY_TOKENS, tokens - start)
        offset = start * array.itemsize
        array[start : start + count_now] = np.fromfile(
            raw, dtype=tokenizer.dtype, count=count_now, offset=offset
        )
    array.flush()
    del array
    raw.unlink()
    os.replace(tmp, token_file)
    facts = {
        "tokens": tokens,
        "bytes": text_bytes,
        "vocab_size": tokenizer.vocab_size,
        "tokenizer": tokenizer.spec,
        "tokenizer_file": None if tokenizer.file is None else str(tokenizer.file),
    }
    write_text_atomically(token_file.with_suffix(".json"), json.dumps(facts) + "\n")


def load_tokens(token_file: Path) -> np.ndarray:
    """A cached token file, memory-mapped: a batch reads only its windows' pages, so a
    corpus larger than memory trains with flat memory (copy-on-write: never written)."""
    return np.load(token_file, mmap_mode="c")


def global_batch(
    tokens: np.ndarray | torch.Tensor, seed: int, step: int, batch: int, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets (``batch`` x ``seq_len`` int64) of optimizer step ``step``."""
    windows = len(tokens) - seq_len - 1
    if windows < 1:
        raise DistlabError(
            f"the corpus has {len(tokens)} tokens, too few for seq_len {seq_len}; "
            "use more data or a shorter --seq-len"
        )
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, windows, (batch,), generator=generator)
    offsets = starts[:, None] + torch.arange(seq_len + 1)[None, :]
    if isinstance(tokens, torch.Tensor):  # e.g. a trace's stand-in corpus, under fake tensors
        rows = tokens[offsets].long()
    else:  # a memory-mapped token file: numpy reads just the windows' pages
        rows = torch.from_numpy(tokens[offsets.numpy()].astype(np.int64))
    return rows[:, :-1], rows[:, 1:]


def validation_batch(
    tokens: np.ndarray | torch.Tensor, index: int, batch: int, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validation batch ``index`` (of the validation split's ``tokens``): the same for
    every run of a corpus, whatever its seed."""
    return global_batch(tokens, VALIDATION_SEED, index, batch, seq_len)


def bits_per_byte(loss: float, facts: dict[str, Any]) -> float:
    """A mean loss in nats per token as bits per byte of the text the tokens encode
    (``facts``: ``token_facts`` of the split): comparable across tokenizers."""
    return loss / math.log(2) * facts["tokens"] / facts["bytes"]


def rank_slice(
    batch: tuple[torch.Tensor, torch.Tensor], dp_rank: int, dp_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The contiguous rows of the global batch that data-parallel rank ``dp_rank`` trains on."""
    inputs, targets = batch
    per_rank = inputs.shape[0] // dp_size
    rows = slice(dp_rank * per_rank, (dp_rank + 1) * per_rank)
    return inputs[rows], targets[rows]
