"""Shared fixtures: one work dir per test session so parity references are run once."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
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

CPU_ADAM_BUILD = (
    "import os; os.nice(19); "
    "from deepspeed.ops.op_builder import CPUAdamBuilder; CPUAdamBuilder().load()"
)
"""What ``DeepSpeedCPUAdam`` runs first: load its C++ extension, compiling it if torch's
extension cache lacks it, at the lowest CPU priority."""


def pytest_collection_finish(session: pytest.Session) -> None:
    """Build DeepSpeed's CPU Adam extension in the background if a collected test uses it
    (``@pytest.mark.cpu_adam``).

    DeepSpeed compiles it on first use, into torch's extension cache: 72 s and 130 s of CPU
    on this 2-core machine, 110-190 s on CI's, which the one ``--offload`` test spent inside
    its rank. Started at collection, niced, the build runs on the CPU the rank-process tests
    leave idle (about a fifth of it); the test finds it built, or waits on the build's lock
    for the rest. With the extension cached it is a 6 s check. The build is left to finish
    on its own if the session ends first: one killed mid-build would leave its lock file
    behind, and every later build would wait on it.
    """
    if importlib.util.find_spec("deepspeed") is None:
        return
    if any(item.get_closest_marker("cpu_adam") for item in session.items):
        subprocess.Popen(
            [sys.executable, "-c", CPU_ADAM_BUILD],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # not stopped with the session (see the docstring)
        )


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
