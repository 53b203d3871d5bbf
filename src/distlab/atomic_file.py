"""Writing a small file so that a reader sees the old contents or the new, never half.

The text goes to a temporary file beside the target (named by this process's pid, so
writers in several processes never share one) and ``os.replace`` puts it in place: a
rename within one directory is atomic on POSIX. The watchdog reading a heartbeat, a
rank reading a cache another rank writes, a resumed run reading its metrics: none can
catch a torn file, and a writer killed mid-write leaves the target as it was.
"""

from __future__ import annotations

import os
from pathlib import Path


def write_text_atomically(file: Path, text: str) -> None:
    """Replace ``file`` by ``text`` in one step; make its directory if it is missing."""
    temporary = file.with_name(f".{file.name}.{os.getpid()}.tmp")
    try:
        try:
            temporary.write_text(text)
        except FileNotFoundError:
            file.parent.mkdir(parents=True, exist_ok=True)
            temporary.write_text(text)
        os.replace(temporary, file)
    except BaseException:  # a failed write leaves the old file and no temporary behind
        temporary.unlink(missing_ok=True)
        raise
