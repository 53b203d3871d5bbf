"""Tokenizers: raw UTF-8 bytes, a byte-level BPE trained on the corpus, or a Hugging Face one.

``--tokenizer`` names one:

- ``bytes`` (the default): token = byte value, 256 tokens, nothing to train or load;
- ``bpe:VOCAB``: a byte-level BPE of VOCAB tokens trained with Hugging Face
  ``tokenizers`` on the run's training documents (the held-out ones never: their loss
  would flatter), cached by corpus and vocabulary size;
- a path to a ``tokenizer.json``, or to a Hugging Face tokenizer directory holding one.

Every tokenizer here starts from bytes (a byte-level BPE's alphabet is the 256 byte
values), so any text can be encoded, and bits per byte compare across them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from distlab.config import cache_dir
from distlab.errors import DistlabError

BYTES = "bytes"
BYTE_VOCAB = 256
BPE_PREFIX = "bpe:"
TOKENIZER_FILE = "tokenizer.json"
TEXT_BATCH = 1000
"""Documents per batch fed to the BPE trainer and the encoder (a progress bar's step)..."""
TEXT_BATCH_CHARS = 64 * 2**20
"""... or fewer, once they hold this many characters (a document can be a whole file)."""


@dataclass(frozen=True)
class Tokenizer:
    """A loaded tokenizer: what token files are named after, and how text becomes ids."""

    spec: str
    """``--tokenizer`` as given (``bytes``, ``bpe:4096``, a path)."""
    label: str
    """What token files are named after ("" for bytes: the names from before tokenizers)."""
    vocab_size: int
    model: Any = None
    """The Hugging Face ``tokenizers.Tokenizer`` (None for bytes)."""
    file: Path | None = None
    """Its ``tokenizer.json`` (None for bytes): a run keeps a copy, which ``distlab export``
    and ``distlab generate`` use."""

    @property
    def dtype(self) -> type[np.unsignedinteger]:
        """The narrowest unsigned type that holds every id (token files are stored in it)."""
        if self.vocab_size <= 2**8:
            return np.uint8
        return np.uint16 if self.vocab_size <= 2**16 else np.uint32

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        """Each text's token ids, in this tokenizer's ``dtype``."""
        if self.model is None:
            return [np.frombuffer(text.encode("utf-8"), dtype=np.uint8) for text in texts]
        encoded = self.model.encode_batch(texts, add_special_tokens=False)
        return [np.asarray(e.ids, dtype=self.dtype) for e in encoded]


def check_tokenizer_spec(spec: str) -> None:
    """One-line error unless ``spec`` names a tokenizer (a path is checked to exist)."""
    if spec == BYTES:
        return
    if spec.startswith(BPE_PREFIX):
        vocab = spec.removeprefix(BPE_PREFIX)
        if not vocab.isdigit() or not BYTE_VOCAB < int(vocab) <= 2**32:
            raise DistlabError(
                f"--tokenizer {spec}: the vocabulary must be a whole number above {BYTE_VOCAB} "
                "(the byte alphabet) and at most 2^32, e.g. bpe:4096"
            )
        return
    if not tokenizer_json(Path(spec)).is_file():
        raise DistlabError(
            f"--tokenizer {spec}: no such tokenizer.json or Hugging Face tokenizer directory "
            f"(choose bytes, bpe:VOCAB, or an existing path)"
        )


def declared_vocab(spec: str) -> int:
    """The vocabulary ``spec`` asks for, without a corpus: 256 for bytes, VOCAB for
    ``bpe:VOCAB`` (a small corpus may train fewer), a tokenizer file's own size."""
    check_tokenizer_spec(spec)
    if spec == BYTES:
        return BYTE_VOCAB
    if spec.startswith(BPE_PREFIX):
        return int(spec.removeprefix(BPE_PREFIX))
    return _from_file(spec, "", tokenizer_json(Path(spec))).vocab_size


def tokenizer_json(path: Path) -> Path:
    """The ``tokenizer.json`` a path names (the file itself, or the one in a directory)."""
    path = path.expanduser()
    return path / TOKENIZER_FILE if path.is_dir() else path


def load_tokenizer(
    spec: str, corpus: str, training_texts: Callable[[], Iterable[str]]
) -> Tokenizer:
    """The tokenizer ``spec`` names, for the corpus fingerprinted ``corpus``.

    ``training_texts``: the training documents, read only when a BPE must be trained
    (a cached one is loaded instead).
    """
    check_tokenizer_spec(spec)
    if spec == BYTES:
        return Tokenizer(spec, "", BYTE_VOCAB)

    if spec.startswith(BPE_PREFIX):
        vocab = int(spec.removeprefix(BPE_PREFIX))
        file = cache_dir() / "tokenizers" / f"bpe{vocab}-{corpus}.json"
        if not file.is_file():
            train_bpe(training_texts(), vocab, file)
        return _from_file(spec, f"bpe{vocab}", file)
    file = tokenizer_json(Path(spec))
    digest = hashlib.sha256(file.read_bytes()).hexdigest()[:12]
    return _from_file(spec, f"tok{digest}", file)


def _from_file(spec: str, label: str, file: Path) -> Tokenizer:
    """The tokenizer saved in ``file``; one line if it is not one."""
    from tokenizers import Tokenizer as HFTokenizer

    try:
        model = HFTokenizer.from_file(str(file))
    except Exception as exc:  # noqa: BLE001 - tokenizers raises its own Exception type
        raise DistlabError(f"--tokenizer {spec}: {file} is not a tokenizer ({exc})") from None
    size = model.get_vocab_size(with_added_tokens=True)
    return Tokenizer(spec, label, size, model, file.resolve())


def train_bpe(texts: Iterable[str], vocab: int, file: Path) -> None:
    """Train a byte-level BPE of ``vocab`` tokens on ``texts``; save it to ``file``."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    model = HFTokenizer(models.BPE())
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte: any text encodes
        show_progress=False,
    )
    model.train_from_iterator(text_batches(texts), trainer=trainer)
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_suffix(".tmp")
    model.save(str(tmp))
    tmp.replace(file)


def text_batches(texts: Iterable[str]) -> Iterator[list[str]]:
    """The texts in batches of at most ``TEXT_BATCH`` documents or ``TEXT_BATCH_CHARS``
    characters (what the encoder and the BPE trainer take at a time)."""
    batch: list[str] = []
    size = 0
    for text in texts:
        batch.append(text)
        size += len(text)
        if len(batch) >= TEXT_BATCH or size >= TEXT_BATCH_CHARS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch
