"""distlab's tokenizer as Hugging Face ``tokenizers`` files: raw bytes, token id = byte value.

distlab trains on the bytes of UTF-8 text, one token per byte. The ``tokenizers``
library's byte-level pieces map each byte to one printable character (GPT-2's
byte-to-unicode table); a BPE model with no merges and the vocabulary
``character of byte b -> b`` then encodes text to exactly its UTF-8 bytes, and
the byte-level decoder turns ids back into bytes (invalid UTF-8 becomes U+FFFD).
No normalizer (text is not NFC-folded), no splitting, no special tokens.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

from distlab.tokenizer import TOKENIZER_FILE

TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
"""What ``AutoTokenizer.from_pretrained`` reads: the fast tokenizer's class and settings."""


def byte_characters() -> list[str]:
    """The character that stands for each byte value in byte-level pieces (GPT-2's table).

    Printable bytes stand for themselves; the others (control characters, space,
    and a few Latin-1 ones) for 256 + their rank among them.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    others = [value for value in range(256) if value not in printable]
    characters = {value: chr(value) for value in printable}
    characters.update({value: chr(256 + rank) for rank, value in enumerate(others)})
    return [characters[value] for value in range(256)]


def byte_tokenizer():
    """A ``tokenizers.Tokenizer`` whose ids are the UTF-8 bytes of the text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {character: value for value, character in enumerate(byte_characters())}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def write_tokenizer(directory: Path, context: int, run_tokenizer: Path | None = None) -> None:
    """``tokenizer.json`` and ``tokenizer_config.json`` for ``AutoTokenizer`` (``context``:
    the model's context length, the tokenizer's ``model_max_length``): the run's own
    ``run_tokenizer`` (``--tokenizer`` bpe or a file), else the byte tokenizer."""
    if run_tokenizer is not None:
        shutil.copyfile(run_tokenizer, directory / TOKENIZER_FILE)
    else:
        byte_tokenizer().save(str(directory / TOKENIZER_FILE))
    settings = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": context,
        "clean_up_tokenization_spaces": False,
    }
    (directory / TOKENIZER_CONFIG_FILE).write_text(json.dumps(settings, indent=2) + "\n")


def run_tokenizer_file(run_dir: Path) -> Path | None:
    """The tokenizer a run trained with, kept in its run dir (None: raw bytes)."""
    file = run_dir / TOKENIZER_FILE
    return file if file.is_file() else None


def run_codec(run_dir: Path) -> tuple[Callable[[str], list[int]], Callable[[list[int]], str]]:
    """How a run turns text into ids and back: its own tokenizer, kept in its run dir, or
    raw UTF-8 bytes (token id = byte value; invalid UTF-8 decodes to U+FFFD)."""
    file = run_tokenizer_file(run_dir)
    if file is None:
        return (
            lambda text: list(text.encode("utf-8")),
            lambda ids: bytes(ids).decode("utf-8", errors="replace"),
        )
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(file))
    return (
        lambda text: tokenizer.encode(text, add_special_tokens=False).ids,
        tokenizer.decode,
    )
