"""Where a run's checkpoints are, what they are called, and their ``meta.json``."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from distlab.errors import DistlabError

META_FILE = "meta.json"


RNG_FILE = "rng_rank{rank}.pt"


DCP_FORMAT = "dcp"


DCP_METADATA_FILE = ".metadata"


STAGING_PREFIX = ".tmp-"


TRASH_PREFIX = ".trash-"


def checkpoint_dir(run_dir: Path) -> Path:
    """Where a run's checkpoints live."""
    return run_dir / "checkpoints"


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Committed checkpoints of a run, oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if (p / META_FILE).is_file())


def newest_checkpoint(run_dir: Path) -> Path | None:
    """The newest committed checkpoint of a run, or None."""
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def remove_partial_checkpoints(run_dir: Path) -> None:
    """Delete what a killed save left behind: uncommitted ``.tmp-*`` and rotated-out ``.trash-*``.

    Neither is ever loaded (``complete_checkpoints`` sees ``step_*`` only), so
    deleting them needs no care.
    """
    root = checkpoint_dir(run_dir)
    if root.is_dir():
        for prefix in (STAGING_PREFIX, TRASH_PREFIX):
            for leftover in root.glob(prefix + "*"):
                shutil.rmtree(leftover, ignore_errors=True)


def read_meta(directory: Path) -> dict[str, Any]:
    """A checkpoint's ``meta.json``, checked; a one-line error if it is missing or corrupt."""
    file = directory / META_FILE
    try:
        meta = json.loads(file.read_text())
    except FileNotFoundError:
        raise DistlabError(f"checkpoint {directory} is incomplete: it has no {META_FILE}") from None
    except (OSError, ValueError) as exc:
        raise DistlabError(f"checkpoint {directory} is corrupt ({META_FILE}: {exc})") from None
    required = {"next_step": int, "strategy": str, "world_size": int, "format": str}
    for key, kind in required.items():
        if not isinstance(meta, dict) or not isinstance(meta.get(key), kind):
            raise DistlabError(
                f"checkpoint {directory} is corrupt ({META_FILE} lacks a valid '{key}')"
            )
    if meta["next_step"] < 0 or meta["world_size"] < 1:
        raise DistlabError(f"checkpoint {directory} is corrupt ({META_FILE} has impossible values)")
    return meta


def checkpoint_step(directory: Path) -> int:
    """The number of completed steps a checkpoint holds (the step a resume runs next)."""
    return read_meta(directory)["next_step"]


def describe_checkpoint(directory: Path) -> str:
    """``run/checkpoints/step_000004`` shortened for messages."""
    return os.path.join(directory.parent.parent.name, directory.parent.name, directory.name)
