"""Each rank's heartbeat (``logs/rankR.heartbeat``): what it does and when it last progressed.

The rank writes it (``beat``) when it starts, after every step and around every
checkpoint save; the launcher's watchdog (``distlab.launch.watchdog``) reads it.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from distlab.atomic_file import write_text_atomically
from distlab.run.files import LOGS_DIR

HEARTBEAT_FILE = "rank{rank}.heartbeat"


def heartbeat_file(run_dir: Path, rank: int) -> Path:
    """``logs/rankR.heartbeat``."""
    return Path(run_dir) / LOGS_DIR / HEARTBEAT_FILE.format(rank=rank)


def beat(run_dir: Path, rank: int, phase: str, step: int | None = None) -> None:
    """Record that this rank made progress (atomically replaced, so never read torn)."""
    file = heartbeat_file(run_dir, rank)
    record = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "phase": phase,
        "step": step,
        "t": time.time(),
    }
    write_text_atomically(file, json.dumps(record))  # makes logs/ if write_pid has not yet
