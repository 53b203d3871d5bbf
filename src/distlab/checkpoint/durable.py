"""Small helpers that make file-system changes survive an OS crash or a power loss.

A ``rename`` is atomic against a crashed *process*, but after an OS crash a
file's data, a directory's entries and a rename reach the disk only if they
were fsync'ed, in an order the kernel chooses otherwise. The rules these
helpers follow (POSIX, and what ext4/xfs need in practice):

- a file's bytes are durable after ``fsync`` of the file;
- a file's *name* (its entry in a directory, from create or rename) is durable
  after ``fsync`` of the directory that holds it;
- so publishing a directory atomically and durably means: fsync every file in
  it and every directory in it (deepest first), rename it into place, fsync
  the parent.

``distlab.checkpoint`` uses these for its commit protocol
(docs/fault_tolerance.md, "Checkpoints").
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path


def fsync_file(path: Path) -> None:
    """Flush a regular file's data and metadata to disk (it must already be closed or flushed)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (names created, renamed or removed in it) to disk."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file under ``root``, then every directory, deepest first, ``root`` last.

    For files other code wrote (DCP, DeepSpeed, fairscale): they are closed by
    the time this runs, and fsync'ing a file from another descriptor (or another
    process on the same machine) flushes the same page cache.
    """
    directories: list[Path] = []
    for parent, dirnames, filenames in os.walk(root):
        directories.append(Path(parent))
        dirnames.sort()
        for name in sorted(filenames):
            fsync_file(Path(parent) / name)
    for directory in sorted(directories, key=lambda d: len(d.parts), reverse=True):
        fsync_dir(directory)


def make_dirs(path: Path) -> None:
    """``mkdir -p`` whose new directories are durable: each is fsync'ed in its parent."""
    missing: list[Path] = []
    current = path
    while not current.exists():
        missing.append(current)
        current = current.parent
    for directory in reversed(missing):
        try:
            directory.mkdir()
        except FileExistsError:  # another process made it meanwhile
            continue
        fsync_dir(directory.parent)


def write_file(
    path: Path, data: bytes, fsync: bool = True, midway: Callable[[], None] | None = None
) -> None:
    """Write ``data`` to a new file ``path``, fsync'ed unless ``fsync`` is False.

    ``midway`` runs after the first half is written and flushed to the OS, so a
    crash there leaves a half-written file (fault injection uses this).
    """
    half = len(data) // 2 if midway is not None else len(data)
    with open(path, "wb") as stream:
        stream.write(data[:half])
        if midway is not None:
            stream.flush()
            midway()
        stream.write(data[half:])
        stream.flush()
        if fsync:
            os.fsync(stream.fileno())


def rename(source: Path, target: Path) -> None:
    """Atomically rename ``source`` to ``target`` (same directory) and make it durable.

    ``target`` must not exist: a rename over a directory would replace it.
    """
    os.rename(source, target)
    fsync_dir(target.parent)


def remove_tree(directory: Path, trash: Path, after_move: Callable[[], None] | None = None) -> None:
    """Remove ``directory`` so that no crash leaves it half deleted under its own name.

    It is first renamed to ``trash`` (a name readers ignore) and the parent
    fsync'ed; only then are its files deleted. A crash before the rename leaves
    it whole, after it only ``trash``, which the next start deletes.
    ``after_move`` runs between the two (fault injection uses this).
    """
    if trash.exists():
        shutil.rmtree(trash)
    rename(directory, trash)
    if after_move is not None:
        after_move()
    shutil.rmtree(trash, ignore_errors=True)
