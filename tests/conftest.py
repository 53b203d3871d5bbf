"""Shared fixtures: one work dir per test session so parity references are run once."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from distlab.config import cache_dir
from distlab.distributed import RankContext, free_port
from distlab.launch.spawn import LIBRARIES, rank_context
from distlab.strategies.regional_compile import INDUCTOR_CACHE

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# The session launches every kind of run: the rank server, started by the first launch,
# preloads DeepSpeed, fairscale and the compiler once instead of in every rank that needs them.
rank_context(LIBRARIES, compile=True)


@pytest.fixture(scope="session")
def parity_workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run dirs of parity checks; the ``single`` reference runs are shared by all tests."""
    return tmp_path_factory.mktemp("parity")


@pytest.fixture(scope="session")
def compile_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A distlab cache dir for the session whose compile cache starts empty (``--compile`` tests).

    ``DISTLAB_CACHE`` points at it from the first test that asks until the session
    ends, so every compiled run of the session shares one inductor cache: a shape
    compiles once per session, and never from a cache left by an earlier session.
    The user's corpus and measured peaks are linked in, so nothing else starts cold.
    """
    root = tmp_path_factory.mktemp("distlab-cache")
    if cache_dir().is_dir():
        for entry in cache_dir().iterdir():
            if entry.name != INDUCTOR_CACHE:
                (root / entry.name).symlink_to(entry)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DISTLAB_CACHE", str(root))
        yield root


@pytest.fixture
def one_rank():
    """A world-size-1 gloo group in this process."""
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
    )
    yield RankContext(rank=0, world_size=1, device=torch.device("cpu"))
    dist.destroy_process_group()
