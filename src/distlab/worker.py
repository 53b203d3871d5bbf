"""The entry point of one rank process: join the group, train, report failures."""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path
from typing import Any

from distlab.config import Config
from distlab.distributed import init_rank, shutdown
from distlab.errors import DistlabError
from distlab.train import train


def run_rank(
    rank: int,
    world_size: int,
    init_method: str,
    config_dict: dict[str, Any],
    token_file: str,
    run_dir: str,
    errors: Any,
) -> None:
    """Run one rank; on failure put a one-line reason on ``errors`` and exit non-zero."""
    config = Config(**config_dict)
    try:
        ctx = init_rank(rank, world_size, init_method, config)
        train(ctx, config, Path(token_file), Path(run_dir))
        shutdown()
    except DistlabError as exc:
        errors.put((rank, str(exc)))
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
    except BaseException as exc:  # report any crash in one line, keep the traceback in a file
        log_dir = Path(run_dir) / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        log_file = log_dir / f"rank{rank}.traceback"
        log_file.write_text(traceback.format_exc())
        first_line = (str(exc).strip().splitlines() or [""])[0][:300]
        errors.put((rank, f"{type(exc).__name__}: {first_line} (traceback: {log_file})"))
        sys.stdout.flush()
        os._exit(1)
