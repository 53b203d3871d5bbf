"""Helpers for tests that run distlab's commands as a user would."""

from __future__ import annotations

import contextlib
import functools
import importlib
import io
import json
import os
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from distlab.cli import run_cli
from distlab.run.files import read_jsonl, read_pid

ROOT = Path(__file__).resolve().parents[1]
TINY_LOCAL_RUN = [
    "--launcher", "local", "--model", "tiny", "--global-batch", "8", "--no-wandb", "--quiet",
    "--no-pictures",
]  # fmt: skip
"""Launch flags of a fast run: spawned ranks, the tiny model, no W&B, no progress output, no
memory picture (``--pictures`` after them draws it)."""


def run_command(
    module: str,
    *args: str,
    timeout: float = 300,
    cwd: Path | None = None,
    unset: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
):
    """Run ``python -m module args...`` (without the variables ``unset``, with ``env`` added)
    and return the CompletedProcess (text output)."""
    kept = {k: v for k, v in os.environ.items() if k not in unset}
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**kept, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1", **(env or {})},
        cwd=cwd or ROOT,
    )


def run_main(module: str, *args: str) -> subprocess.CompletedProcess:
    """Run ``python -m module args...`` in this process: the module's ``main(argv)`` under
    ``run_cli``, as its ``__main__`` does (exit status, one-line errors), output captured.

    For checks of what a command says and exits with, where a new interpreter adds
    nothing but its seconds of imports; ``run_command`` when the process itself matters.
    """
    package = importlib.import_module(module)
    entry = f"{module}.__main__" if hasattr(package, "__path__") else module
    main = importlib.import_module(entry).main
    out, err = io.StringIO(), io.StringIO()
    code: int | str | None = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            run_cli(functools.partial(main, list(args)))
        except SystemExit as exit_:
            code = exit_.code
    return subprocess.CompletedProcess([module, *args], code, out.getvalue(), err.getvalue())


class BackgroundMain:
    """``run_main`` in a thread, for a command the test acts on while it runs (kill or stop a
    rank, watch its progress); ``poll`` and ``communicate`` as on a ``subprocess.Popen``.

    The command's output is captured the way ``run_main`` captures it: by redirecting this
    process's ``sys.stdout`` and ``sys.stderr`` until it ends, so the test itself prints nothing
    meanwhile.
    """

    def __init__(self, module: str, *args: str) -> None:
        self.args = [module, *args]
        self.result: subprocess.CompletedProcess | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=f"{module} {' '.join(args)}")
        self.thread.start()

    def _run(self) -> None:
        try:
            self.result = run_main(*self.args)
        except BaseException as exc:  # handed to the test by communicate()
            self.error = exc

    def poll(self) -> int | str | None:
        """None while the command runs, then its exit status."""
        if self.thread.is_alive():
            return None
        return self.result.returncode if self.result is not None else 1

    def communicate(self, timeout: float) -> tuple[str, str]:
        """Wait up to ``timeout`` s for the command to end; its (stdout, stderr)."""
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise subprocess.TimeoutExpired(self.args, timeout)
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result.stdout, self.result.stderr

    @property
    def returncode(self) -> int | str | None:
        return self.poll()


def rank_pids(run_dir: Path, nproc: int) -> list[int]:
    """The rank processes of a running run, whose ranks have all written their pid files."""
    pids = [read_pid(run_dir, r) for r in range(nproc)]
    assert all(pid is not None for pid in pids), f"a rank has written no pid yet: {pids}"
    return [pid for pid in pids if pid is not None]


def run_losses(run_dir: Path) -> list[float]:
    """The run's loss per step, from ``metrics.jsonl`` (asserting one line per step)."""
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(len(metrics))), "one line per step"
    return [m["loss"] for m in metrics]


def run_events(run_dir: Path) -> list[dict[str, Any]]:
    """The run's events, from ``events.jsonl``."""
    return read_jsonl(run_dir / "events.jsonl")


def assert_one_line_error(result, fragment: str) -> None:
    """The command failed with exit 2 and one ``distlab: error:`` line mentioning ``fragment``."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("distlab: error:"), lines[0]
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.stdout + result.stderr


def wandb_offline_runs(run_dir: Path) -> list[Path]:
    """The run dir's offline W&B runs (``wandb/offline-run-*/run-ID.wandb``)."""
    return sorted((Path(run_dir) / "wandb").glob("offline-run-*/run-*.wandb"))


def wandb_records(file: Path) -> Iterator[Any]:
    """The records of an offline ``.wandb`` file, as W&B's own protobuf ``Record``s.

    The file is W&B's transaction log: a 7-byte header (``:W&B``, magic, version),
    then 32 KiB blocks of chunks, each with a 7-byte header (CRC32, length, type:
    1 full, 2 first, 3 middle, 4 last), as in LevelDB's log format. wandb 0.31
    has no Python reader for it any more (the writer is its Go core).
    """
    from wandb.proto import wandb_internal_pb2

    data = file.read_bytes()
    ident, _magic, _version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B", ident
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pos += 7
        if kind == 0 and length == 0:
            pos += left - 7
            continue
        chunk = data[pos : pos + length]
        pos += length
        if kind in (1, 2):
            pending = chunk
        elif kind in (3, 4):
            pending += chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def wandb_history(file: Path) -> list[dict[str, Any]]:
    """The history rows of an offline W&B run: ``{key: value, ..., "_step": step}``."""
    rows = []
    for record in wandb_records(file):
        if record.WhichOneof("record_type") == "history":
            row = {
                item.key or "/".join(item.nested_key): json.loads(item.value_json)
                for item in record.history.item
            }
            row["_step"] = record.history.step.num
            rows.append(row)
    return rows


def wandb_run_record(file: Path) -> Any:
    """The offline W&B run's ``RunRecord`` (id, branch point, ...)."""
    return next(r.run for r in wandb_records(file) if r.WhichOneof("record_type") == "run")


def assert_resume_continues(tmp_path: Path, *flags: str, atol: float = 1e-6) -> None:
    """A 4-step local run with ``flags``, resumed from its step-2 checkpoint in a new run dir,
    logs the uninterrupted run's losses for steps 2 and 3 (within ``atol``).

    Both runs read for their losses and the step-2 checkpoint alone: no memory tracking (a
    tracked step runs every op through torch's tracker) and no final checkpoint (the resumed
    run inherits both settings).
    """
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    result = run_main(
        "distlab.launch", *TINY_LOCAL_RUN, *flags, "--steps", "4", "--checkpoint-every", "2",
        "--track-memory", "off", "--no-final-checkpoint", "--run-dir", str(full),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    checkpoint = full / "checkpoints" / "step_000002"
    result = run_main(
        "distlab.launch", "--resume", str(checkpoint), "--launcher", "local",
        "--run-dir", str(resumed),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr

    reference, continued = run_losses(full), run_losses(resumed)
    assert len(continued) == 4
    for a, b in zip(reference[2:], continued[2:], strict=True):
        assert abs(a - b) <= atol, (reference, continued)


def assert_counted_matches_theory(
    row: dict[str, Any], rel: float = 1e-3, tcp: tuple[float, float] | None = (0.99, 1.05)
) -> None:
    """A ``distlab.report.comm_check.summarize`` row: the bytes counted at the process group
    equal the theory's (total within ``rel``, each collective within 1% or ``rel`` if
    tighter), the number of calls exactly, and, unless ``tcp`` is None, the kernel's TCP
    bytes of every rank lie within ``tcp`` of the counted wire bytes."""
    assert abs(row["counted_over_predicted"] - 1) <= rel, row
    kind_rel = min(rel, 1e-2)
    for kind, predicted in row["predicted_kinds"].items():
        assert abs(row["kinds"][kind] - predicted) <= kind_rel * predicted, (kind, row)
    for kind, calls in row["predicted_calls"].items():
        assert row["calls"][kind] == calls, (kind, row)
    if tcp is not None:
        for figures in row["ranks"]:
            assert tcp[0] <= figures["tcp_over_wire"] <= tcp[1], figures
