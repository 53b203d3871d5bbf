"""Where a run's documents come from (``--data``), read through Hugging Face ``datasets``.

- nothing: the bundled corpus, this Python's standard-library sources (every Python
  install has them, so the lab works offline), one document per file;
- text files (a file, a directory or a glob): one document per file (the ``text``
  builder);
- structured files: parquet, JSON lines, CSV or Arrow (by extension, all of one kind):
  one document per row, its ``--data-column`` (``text`` by default);
- a directory written by ``Dataset.save_to_disk`` (or a ``DatasetDict``'s: its
  ``--data-split``): one document per row;
- a Hugging Face hub dataset name (``owner/name``): one document per row of its
  ``--data-split``, when it is in the local cache (``datasets`` runs offline unless
  ``HF_DATASETS_OFFLINE=0`` lets it reach the network).

A corpus is named by a fingerprint (the files' paths, sizes and modification times, or
the hub dataset's own fingerprint, with the column and split), which keys the token cache.
"""

from __future__ import annotations

import glob
import hashlib
import os
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distlab.errors import DistlabError

DEFAULT_CORPUS_FILES = 400
"""How many standard-library source files (sorted by path) form the default corpus."""
BUILDERS = {
    ".parquet": "parquet",
    ".jsonl": "json",
    ".json": "json",
    ".csv": "csv",
    ".arrow": "arrow",
}
"""``datasets`` builders of structured files, by extension (anything else is text)."""
READ_BATCH = 16
"""Rows read from the table at a time (a row can be a whole file)."""
SAVED_DATASET_FILES = ("dataset_info.json", "state.json", "dataset_dict.json")
"""Files by which a ``save_to_disk`` directory is known."""


@dataclass(frozen=True)
class Corpus:
    """A resolved ``--data``: what to read, and the fingerprint its tokens are cached by."""

    data: str | None
    column: str
    split: str
    files: tuple[Path, ...] = ()
    """Local files (empty for a hub dataset or a saved dataset directory)."""
    kind: str = "text"
    """text, a structured builder (parquet, json, csv, arrow), saved, or hub."""

    @property
    def fingerprint(self) -> str:
        """What the token cache is keyed by (the text corpus's as before other kinds)."""
        digest = hashlib.sha256()
        files = list(self.files)
        if self.kind == "saved":
            files = sorted(f for f in Path(self.data).rglob("*") if f.is_file())
        for f in files:
            stat = f.stat()
            digest.update(f"{f.resolve()}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
        if self.kind != "text":
            digest.update(f"{self.kind}|{self.data}|{self.column}|{self.split}".encode())
        return digest.hexdigest()[:16]


def default_corpus_files() -> list[Path]:
    """The bundled corpus: the first source files of this Python's standard library."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.glob("*.py") if p.is_file())
    files += sorted(p for p in stdlib.glob("*/*.py") if p.is_file() and "test" not in p.parts)
    if not files:
        raise DistlabError(f"no standard-library sources under {stdlib}; pass --data PATH")
    return files[:DEFAULT_CORPUS_FILES]


def resolve_files(data: str) -> list[Path]:
    """Expand a local ``--data`` (a file, a directory or a glob) into a sorted list of files
    ([] when it names none)."""
    path = Path(data).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file())
    return sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())


def resolve_corpus(data: str | None, column: str = "text", split: str = "train") -> Corpus:
    """What ``--data`` names (see the module docstring); a one-line error if nothing."""
    if data is None:
        return Corpus(None, column, split, tuple(default_corpus_files()))
    path = Path(data).expanduser()
    if path.is_dir() and any((path / name).is_file() for name in SAVED_DATASET_FILES):
        return Corpus(str(path), column, split, kind="saved")
    files = resolve_files(data)
    if files:
        kinds = {BUILDERS.get(f.suffix.lower(), "text") for f in files}
        if len(kinds) > 1:
            raise DistlabError(
                f"--data {data} mixes kinds of files ({', '.join(sorted(kinds))}); "
                "point it at files of one kind"
            )
        return Corpus(data, column, split, tuple(files), kinds.pop())
    if "/" in data and not path.is_absolute() and not any(c in data for c in "*?["):
        return Corpus(data, column, split, kind="hub")
    raise DistlabError(f"data not found: '{data}' matches no file (pass an existing --data)")


class Documents:
    """A corpus's documents, read in order from a ``datasets`` table (Arrow, memory-mapped
    from ``datasets``' cache), a few at a time: the corpus is never all in memory."""

    def __init__(self, rows: Any, column: str) -> None:
        self.rows, self.column = rows, column

    def __len__(self) -> int:
        return len(self.rows)

    def texts(self, keep: set[int] | None = None) -> Iterator[str]:
        """Each document's text in corpus order (only those whose index is in ``keep``)."""
        index = 0
        for batch in self.rows.iter(batch_size=READ_BATCH):
            for text in batch[self.column]:
                if keep is None or index in keep:
                    yield "" if text is None else str(text)
                index += 1


def read_documents(corpus: Corpus, hf_cache: Path) -> Documents:
    """The corpus's documents (a file's text, or a row's column), in its order."""
    import datasets

    datasets.logging.set_verbosity_error()
    if corpus.kind == "text":
        datasets.disable_progress_bars()
        rows = _load(
            corpus,
            lambda: datasets.load_dataset(
                "text",
                data_files=[str(f) for f in corpus.files],
                sample_by="document",
                split="train",
                cache_dir=str(hf_cache),
                encoding_errors="replace",
            ),
        )
        return Documents(rows, "text")
    if corpus.kind == "saved":
        rows = _load(corpus, lambda: datasets.load_from_disk(corpus.data))
    elif corpus.kind == "hub":
        rows = _load(corpus, lambda: datasets.load_dataset(corpus.data, cache_dir=str(hf_cache)))
    else:
        rows = _load(
            corpus,
            lambda: datasets.load_dataset(
                corpus.kind, data_files=[str(f) for f in corpus.files], cache_dir=str(hf_cache)
            ),
        )
    return _column(corpus, _split(corpus, rows))


def _load(corpus: Corpus, load: Any) -> Any:
    """``load()`` offline unless ``HF_DATASETS_OFFLINE=0``, its failure one line (``datasets``
    raises many types)."""
    from datasets import config

    # datasets reads the variable once, when first imported: a process that imported it
    # earlier (a notebook, a test) would otherwise wait out network timeouts on a bad name
    online = os.environ.get("HF_DATASETS_OFFLINE", "1").strip().upper() in ("0", "FALSE", "NO")
    was = config.HF_HUB_OFFLINE
    config.HF_HUB_OFFLINE = not online
    try:
        return load()
    except Exception as exc:  # noqa: BLE001 - any failure to read is the same to the user
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        if "corresponds to no data" in reason:  # datasets' words for a file without rows
            raise DistlabError(f"--data {corpus.data} has no rows: nothing to train on") from None
        if corpus.kind == "hub":
            raise DistlabError(
                f"--data {corpus.data}: not a local path, and not a Hugging Face dataset in "
                f"the local cache or reachable ({reason}); download it first, or set "
                "HF_DATASETS_OFFLINE=0 where the network is there"
            ) from None
        raise DistlabError(f"could not read --data {corpus.data}: {reason}") from None
    finally:
        config.HF_HUB_OFFLINE = was


def _split(corpus: Corpus, rows: Any) -> Any:
    """The ``--data-split`` of a ``DatasetDict`` (a plain ``Dataset`` is its only split)."""
    if not hasattr(rows, "keys"):
        return rows
    if corpus.split not in rows:
        raise DistlabError(
            f"--data-split {corpus.split}: {corpus.data} has no such split "
            f"(its splits: {', '.join(rows.keys())})"
        )
    return rows[corpus.split]


def _column(corpus: Corpus, rows: Any) -> Documents:
    """The ``--data-column`` of the rows as documents; one line if it is missing or empty."""
    if corpus.column not in rows.column_names:
        raise DistlabError(
            f"--data-column {corpus.column}: {corpus.data} has no such column "
            f"(its columns: {', '.join(rows.column_names)})"
        )
    if len(rows) == 0:
        raise DistlabError(f"--data {corpus.data} has no rows: nothing to train on")
    return Documents(rows, corpus.column)
