"""The run dir's file names, and reading its JSON-lines files (whole, or as they grow).

A run dir holds ``config.yaml`` (the resolved config), ``metrics.jsonl`` (one
line per optimizer step), ``events.jsonl`` (launches, starts, faults, resumes),
``summary.json``, ``wandb.json`` (the W&B run it logs to), ``logs/`` (per-rank
pid, heartbeat, traceback and error files), ``faults/`` (injected faults that
fired), ``checkpoints/``, ``ranks/`` (per rank: ``rank<r>.jsonl``, its own
figures per step, and ``memory_rank<r>.json``, the memory timeline of one
step) and ``memory_timeline.png`` (the picture of those timelines).
Every module names them through this one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
EVENTS_FILE = "events.jsonl"
SUMMARY_FILE = "summary.json"
WANDB_FILE = "wandb.json"
FINAL_WEIGHTS_FILE = "final_weights.pt"
LOGS_DIR = "logs"
FAULTS_DIR = "faults"
RANKS_DIR = "ranks"
MEMORY_TIMELINE_PNG = "memory_timeline.png"
TRACE_FILE = "trace.json"
TIME_GANTT_PNG = "time_rank_gantt.png"
PROFILE_DIR = "profile"


def memory_rank_file(run_dir: Path, rank: int) -> Path:
    """``ranks/memory_rank<r>.json``: one step of rank ``r``: its peak, split and timeline."""
    return Path(run_dir) / RANKS_DIR / f"memory_rank{rank}.json"


def read_memory_ranks(run_dir: Path) -> list[dict[str, Any]]:
    """Every rank's ``memory_rank<r>.json``, in rank order ([] if none; ValueError if corrupt)."""
    return _read_rank_files(run_dir, "memory_rank")


def time_rank_file(run_dir: Path, rank: int) -> Path:
    """``ranks/time_rank<r>.json``: rank ``r``'s time-tracked steps (``--track-time``)."""
    return Path(run_dir) / RANKS_DIR / f"time_rank{rank}.json"


def read_time_ranks(run_dir: Path) -> list[dict[str, Any]]:
    """Every rank's ``time_rank<r>.json``, in rank order ([] if none; ValueError if corrupt)."""
    return _read_rank_files(run_dir, "time_rank")


def pid_file(run_dir: Path, rank: int) -> Path:
    """``logs/rank<r>.pid``: rank ``r``'s process id, written as it starts training (to kill
    or stop it from outside)."""
    return Path(run_dir) / LOGS_DIR / f"rank{rank}.pid"


def read_pid(run_dir: Path, rank: int) -> int | None:
    """Rank ``r``'s process id from its ``pid_file``; None until it has written it."""
    file = pid_file(run_dir, rank)
    text = file.read_text().strip() if file.is_file() else ""
    return int(text) if text else None


def profile_file(run_dir: Path, rank: int) -> Path:
    """``profile/rank<r>.json``: torch.profiler's trace of rank ``r``'s last tracked step."""
    return Path(run_dir) / PROFILE_DIR / f"rank{rank}.json"


def _read_rank_files(run_dir: Path, stem: str) -> list[dict[str, Any]]:
    files = Path(run_dir, RANKS_DIR).glob(f"{stem}*.json")
    ranked = sorted(files, key=lambda file: int(file.stem.removeprefix(stem)))
    records = []
    for file in ranked:
        try:
            records.append(json.loads(file.read_text()))
        except ValueError as exc:
            raise ValueError(f"{file} is corrupt: {exc}") from None
    return records


def read_jsonl(file: Path) -> list[dict[str, Any]]:
    """Every complete line of a JSON-lines file (none if it does not exist; torn lines skipped)."""
    file = Path(file)
    if not file.is_file():
        return []
    records = []
    for line in file.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue  # a line torn by a kill
    return records


class JsonlTail:
    """The new complete lines of a JSON-lines file, read incrementally by a polling process.

    A torn last line waits for the next read. When the file is replaced or cut
    back (a restart rewinds ``metrics.jsonl``), reading starts over from its
    beginning if ``replay``, else from its current end (lines already shown).
    """

    def __init__(self, file: Path, replay: bool = True) -> None:
        self.file = file
        self.replay = replay
        self.inode: int | None = None
        self.offset = 0

    def read(self) -> list[dict[str, Any]]:
        """Every complete line written since the last read, parsed (unparsable ones skipped)."""
        try:
            stat = self.file.stat()
        except FileNotFoundError:
            return []
        if self.inode is not None and (stat.st_ino != self.inode or stat.st_size < self.offset):
            self.offset = 0 if self.replay else stat.st_size
        self.inode = stat.st_ino
        with self.file.open("rb") as stream:
            stream.seek(self.offset)
            data = stream.read()
        end = data.rfind(b"\n") + 1
        self.offset += end
        records = []
        for line in data[:end].decode(errors="replace").splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue  # a line torn by a kill
        return records
