"""``--data`` beyond text files: parquet, JSON lines, CSV, a save_to_disk directory, a hub
name; one document per row of ``--data-column``; bad input in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.helpers import TINY_LOCAL_RUN, assert_one_line_error, run_main

from distlab.corpus import read_documents, resolve_corpus
from distlab.data import load_tokens, prepare_tokens
from distlab.errors import DistlabError

ROWS = {"body": [f"row {i}: " + "words and more words " * 20 for i in range(12)]}


@pytest.fixture
def rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The 12 rows as a ``datasets.Dataset``, with a cache of this test's own."""
    import datasets

    monkeypatch.setenv("DISTLAB_CACHE", str(tmp_path / "cache"))
    return datasets.Dataset.from_dict(ROWS)


@pytest.mark.parametrize("kind", ["parquet", "jsonl", "csv", "saved", "saved-dict"])
def test_every_kind_reads_one_document_per_row(rows, tmp_path: Path, kind: str) -> None:
    import datasets

    target = tmp_path / f"data.{kind}"
    if kind == "parquet":
        rows.to_parquet(str(target))
    elif kind == "jsonl":
        rows.to_json(str(target), lines=True)
    elif kind == "csv":
        rows.to_csv(str(target), index=False)
    elif kind == "saved":
        rows.save_to_disk(str(target))
    else:
        datasets.DatasetDict({"train": rows, "validation": rows.select(range(2))}).save_to_disk(
            str(target)
        )
    split = "validation" if kind == "saved-dict" else "train"
    corpus = resolve_corpus(str(target), column="body", split=split)
    documents = list(read_documents(corpus, tmp_path / "hf").texts())
    assert documents == ROWS["body"][: 2 if kind == "saved-dict" else 12]
    tokens = load_tokens(prepare_tokens(str(target), column="body", split=split))
    assert bytes(tokens.tolist()) == "".join(documents).encode()


def test_bad_dataset_input_is_one_line(rows, tmp_path: Path) -> None:
    import datasets

    rows.to_parquet(str(tmp_path / "data.parquet"))
    with pytest.raises(DistlabError, match=r"no such column \(its columns: body\)"):
        prepare_tokens(str(tmp_path / "data.parquet"))
    empty = datasets.Features({"text": datasets.Value("string")})
    datasets.Dataset.from_dict({"text": []}, features=empty).to_parquet(
        str(tmp_path / "empty.parquet")
    )
    with pytest.raises(DistlabError, match="has no rows"):
        prepare_tokens(str(tmp_path / "empty.parquet"))
    (tmp_path / "mixed").mkdir()
    rows.to_csv(str(tmp_path / "mixed" / "a.csv"))
    (tmp_path / "mixed" / "b.txt").write_text("text")
    with pytest.raises(DistlabError, match="mixes kinds of files"):
        resolve_corpus(str(tmp_path / "mixed"))
    datasets.DatasetDict({"train": rows}).save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(DistlabError, match=r"no such split \(its splits: train\)"):
        prepare_tokens(str(tmp_path / "dict"), column="body", split="test")


def test_unreachable_hub_name_is_one_line_exit_2(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("DISTLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    result = run_main(
        "distlab.launch", *TINY_LOCAL_RUN, "--strategy", "single", "--steps", "1",
        "--data", "no-such-owner/no-such-dataset", "--run-dir", str(tmp_path / "run"),
    )  # fmt: skip
    assert_one_line_error(result, "not a local path, and not a Hugging Face dataset")
