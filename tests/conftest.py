"""Shared fixtures: one work dir per test session so parity references are run once, and
the two pytest workers' turns on the cores."""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import signal
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


BUILD_PID = pytest.StashKey[int]()
BUILD_PID_FILE = "cpu-adam-build.pid"
"""Where the background build's pid is kept: in this process, or beside the workers."""


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
    if worker_id(session.config) not in (None, "gw0"):
        return  # one build per session: the first worker's
    if any(item.get_closest_marker("cpu_adam") for item in session.items):
        build = subprocess.Popen(
            [sys.executable, "-c", CPU_ADAM_BUILD],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # not stopped with the session (see the docstring)
        )
        root = shared_root(session.config)
        if root is None:
            session.config.stash[BUILD_PID] = build.pid
        else:  # for the other worker's lone tests
            (root / BUILD_PID_FILE).write_text(str(build.pid))


def build_pid(config: pytest.Config) -> int | None:
    """The background build's pid (its process group's), None if none was started."""
    root = shared_root(config)
    if root is None:
        return config.stash.get(BUILD_PID, None)
    file = root / BUILD_PID_FILE
    return int(file.read_text()) if file.is_file() else None


@contextlib.contextmanager
def build_paused(pid: int | None) -> Iterator[None]:
    """Stop the background build (ninja and its compilers: the whole process group) while
    a test that needs the cores alone runs, and let it go on after. A niced compiler still
    takes the CPU whenever a rank waits: a profiled step it ran beside showed its two
    clocks 10.2% apart, the test allows 10%. Should the session be killed during such a
    test, the build stays stopped: ``ps -eo pgid,stat,cmd | grep CPUAdamBuilder`` names its
    group, ``kill -CONT -- -PGID`` lets it finish."""
    try:
        if pid is not None:
            os.killpg(pid, signal.SIGSTOP)
    except ProcessLookupError:
        pid = None  # finished (and reaped) already
    try:
        yield
    finally:
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGCONT)


def worker_id(config: pytest.Config) -> str | None:
    """This pytest-xdist worker's name (``gw0``, ``gw1``), None in a one-process session."""
    return getattr(config, "workerinput", {}).get("workerid")


def shared_root(config: pytest.Config) -> Path | None:
    """The base temp dir every worker of this session shares (their own base temp dirs are
    inside it), None in a one-process session."""
    return None if worker_id(config) is None else Path(config.option.basetemp).parent


@contextlib.contextmanager
def cores_held(root: Path, *, alone: bool) -> Iterator[None]:
    """Hold the cores for one test: shared with the other worker's test, or ``alone``.

    Two file locks under ``root``: tests share ``cores.lock``, and a test that needs the
    cores alone takes it exclusively. flock lets readers in ahead of a waiting writer, so a
    lone test first closes ``cores.gate``, which every test passes through on its way in:
    no test starts while it waits, and the one running finishes first.
    """
    with open(root / "cores.gate", "a") as gate, open(root / "cores.lock", "a") as cores:
        if alone:
            fcntl.flock(gate, fcntl.LOCK_EX)
            fcntl.flock(cores, fcntl.LOCK_EX)
        else:
            fcntl.flock(gate, fcntl.LOCK_SH)
            fcntl.flock(cores, fcntl.LOCK_SH)
            fcntl.flock(gate, fcntl.LOCK_UN)
        yield  # both released when the files close


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """Run each test, with its fixtures' set-up and tear-down, while it holds the cores
    (``@pytest.mark.alone``: exclusively) when the suite runs in two workers; a lone test
    also pauses the background build."""
    alone = item.get_closest_marker("alone") is not None
    root = shared_root(item.config)
    with contextlib.ExitStack() as held:
        if root is not None:
            held.enter_context(cores_held(root, alone=alone))
        if alone:
            held.enter_context(build_paused(build_pid(item.config)))
        return (yield)


@pytest.fixture(scope="session")
def parity_workdir(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """Run dirs of parity checks; the ``single`` reference runs, and every run made through
    ``_run_once``, are shared by all tests, in both workers (the second to ask waits for the
    first's run)."""
    root = shared_root(request.config)
    if root is None:
        return tmp_path_factory.mktemp("parity")
    workdir = root / "parity"
    workdir.mkdir(exist_ok=True)
    return workdir


@pytest.fixture(scope="session")
def compile_cache(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Path]:
    """A distlab cache dir for the session whose compile cache starts empty (``--compile`` tests).

    ``DISTLAB_CACHE`` points at it from the first test that asks until the session
    ends, so every compiled run of the session shares one inductor cache: a shape
    compiles once per session, and never from a cache left by an earlier session.
    Both workers share it, as they share the runs in ``parity_workdir``.
    The user's corpus and measured peaks are linked in, so nothing else starts cold.
    """
    shared = shared_root(request.config)
    root = tmp_path_factory.mktemp("distlab-cache") if shared is None else shared / "distlab-cache"
    with open(root.parent / "distlab-cache.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the other worker may be filling it too
        root.mkdir(exist_ok=True)
        for entry in cache_dir().iterdir() if cache_dir().is_dir() else ():
            link = root / entry.name
            if entry.name != INDUCTOR_CACHE and not link.is_symlink():
                link.symlink_to(entry)
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
