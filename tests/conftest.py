"""Shared fixtures: one work dir per test session so parity references are run once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from distlab.distributed import RankContext, free_port

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture(scope="session")
def parity_workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run dirs of parity checks; the ``single`` reference runs are shared by all tests."""
    return tmp_path_factory.mktemp("parity")


@pytest.fixture
def one_rank():
    """A world-size-1 gloo group in this process."""
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
    )
    yield RankContext(rank=0, world_size=1, device=torch.device("cpu"))
    dist.destroy_process_group()
