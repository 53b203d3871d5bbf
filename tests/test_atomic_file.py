"""``distlab.atomic_file``: a file is replaced whole or not at all."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from distlab.atomic_file import write_text_atomically


@given(old=st.text(), new=st.text())
def test_the_file_holds_the_new_text_and_nothing_else_is_left(old: str, new: str) -> None:
    with tempfile.TemporaryDirectory() as directory:
        file = Path(directory) / "deeper" / "state.json"  # the directory is made
        write_text_atomically(file, old)
        write_text_atomically(file, new)
        assert file.read_bytes() == new.encode()  # bytes: reading text would turn "\r" into "\n"
        assert [p.name for p in file.parent.iterdir()] == ["state.json"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    file = tmp_path / "cache.json"
    write_text_atomically(file, "old")
    with pytest.raises(UnicodeEncodeError):
        write_text_atomically(file, "half \ud800")  # a lone surrogate has no UTF-8 encoding
    assert file.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["cache.json"]
