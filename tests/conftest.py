"""Shared fixtures: one work dir per test session so parity references are run once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture(scope="session")
def parity_workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run dirs of parity checks; the ``single`` reference runs are shared by all tests."""
    return tmp_path_factory.mktemp("parity")
