"""Starting rank processes cheaply: forked from a server that has already imported torch.

A fresh interpreter per rank (multiprocessing's ``spawn``) imports torch and
distlab's training stack again in every rank before it can train: seconds per
rank, and on a machine with fewer cores than ranks those imports queue up.
Instead the local launcher (and ``distlab.comm_check``) start ranks from
multiprocessing's ``forkserver``: one server process, started by the first
launch of this process, imports those modules once (``PRELOAD``); every rank
is then forked from it. A rank is still a real, separate process (its own
interpreter state, its own gloo connections, its own pid to kill), created
in milliseconds with everything imported. The server lives as long as the
process that started it (a test session, a sweep), so the next launch pays
nothing for it at all.

Two things a forked rank does not get from the launcher, and how it gets them:

- the launcher's *current* environment: the server was started with the
  environment of the first launch (``DISTLAB_CACHE`` may have changed since),
  so each rank is handed ``os.environ`` and applies it first
  (``distlab.train.rank.run_rank``);
- libraries of strategies the server did not preload: DeepSpeed, fairscale
  and the compiler are preloaded when the first launch needs them
  (``rank_context``), else imported by the rank that uses them. A process that
  will launch many kinds of run (a test session) names them all up front.

What the server imported is frozen out of the garbage collector's view last
(``distlab.launch.frozen_heap``): a rank's full collection would otherwise walk,
and copy page by page, the whole inherited heap.

Threads: the server imports modules and runs nothing else, so no thread pool
exists to be inherited half-copied by a fork.
"""

from __future__ import annotations

import argparse
import importlib.util
import multiprocessing
import os
from collections.abc import Iterable
from multiprocessing import forkserver
from multiprocessing.context import BaseContext

PRELOAD = (
    "torch",
    "torch.distributed",
    "torch.distributed.fsdp",
    "torch.distributed.tensor.parallel",
    "torch.distributed.checkpoint",
    "torch.distributed.pipelining",
    "distlab.train.rank",
    "distlab.measure.step_tracker",
)
"""Modules every rank needs, imported once by the server (the step tracker too: a rank
imports it only at its first tracked step, which most runs have). Pipelining and the
tracker import torch's compiler front end, ``torch._dynamo``; DDP's constructor and FSDP2's
hooks import it before any rank's first step anyway, so leaving them out does not bring
the first step sooner (measured: docs/fault_tolerance.md, "Measurements")."""
DEEPSPEED = ("deepspeed", "deepspeed.runtime.zero.muon.muon_optimizer")
"""DeepSpeed, and the Muon optimizer its engine imports on every start: that module applies
``torch.compile`` at import and so imports inductor, 3 s of every rank, once in the server."""
FAIRSCALE = ("fairscale",)
LIBRARIES = {
    "zero1": DEEPSPEED,
    "zero2": DEEPSPEED,
    "zero3": DEEPSPEED,
    "fairscale-oss": FAIRSCALE,
    "fairscale-sdp": FAIRSCALE,
}
"""A strategy's own heavy library, preloaded when a launch that starts the server needs it."""
COMPILER = ("torch._inductor.compile_fx",)
"""What ``--compile``'s first ``torch.compile`` imports (inductor: seconds a rank)."""
LIVE = ("distlab.train.live",)
"""``--ft live``'s replica code and torchft (with OpenTelemetry: about 0.5 s a replica,
which a replica restarted alone would otherwise spend before it can heal)."""

FROZEN_HEAP = "distlab.launch.frozen_heap"
"""Imported last: hides the server's imports from the ranks' garbage collections."""

_preload: set[str] = set()


def rank_context(
    strategies: Iterable[str] = (), compile: bool = False, live: bool = False
) -> BaseContext:
    """The multiprocessing context ranks are started in (``forkserver``), with ``PRELOAD``,
    the libraries of ``strategies``, for ``compile`` the compiler and for ``live`` torchft
    preloaded if this call is the one that starts the server (a missing library is left
    out)."""
    _preload.update(PRELOAD)
    for name in strategies:
        modules = LIBRARIES.get(name, ())
        if modules and importlib.util.find_spec(modules[0]) is not None:
            _preload.update(modules)
    if compile:
        _preload.update(COMPILER)
    if live and importlib.util.find_spec("torchft") is not None:
        _preload.update(LIVE)
        # torchft's Rust logger reads this once, at import: in the server, before it forks
        os.environ.setdefault("RUST_LOG", "warn")  # (every quorum is logged at info)
    context = multiprocessing.get_context("forkserver")
    # Only the first start reads the list: later launches reuse the running server. The
    # heap is frozen after every other import, so the ranks' collections skip all of it.
    context.set_forkserver_preload([*sorted(_preload), FROZEN_HEAP])
    return context


def start_early(argv: list[str]) -> None:
    """Start the rank server now if ``argv`` (the launch command's) trains on local ranks.

    Called by ``python -m distlab.launch`` before it imports torch itself: the server
    imports its modules while this process imports its own, on another core, so the
    ranks fork the moment the launcher is ready instead of after a second import.
    Anything else (``--launcher ray``, a launcher set in ``--config``, ``--dry-run``)
    leaves the server to the first launch, as before; the libraries of DeepSpeed and
    fairscale are then imported by their ranks (their environment is not set yet here).
    """
    peek = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    peek.add_argument("--launcher")
    peek.add_argument("--ft")
    for flag in ("--dry-run", "--list", "--help", "-h"):
        peek.add_argument(flag, action="store_true")
    known, _ = peek.parse_known_args(argv)
    if known.launcher == "local" and not (known.dry_run or known.list or known.help or known.h):
        rank_context(live=known.ft == "live")
        forkserver.ensure_running()
