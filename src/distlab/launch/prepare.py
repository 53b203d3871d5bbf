"""Everything the launcher checks and prepares before any rank starts."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from distlab.config import Config, resolved_seq_len
from distlab.data import load_tokens, prepare_tokens
from distlab.distributed import resolve_device
from distlab.errors import DistlabError


def make_run_dir(config: Config) -> Path:
    """Create (or reuse, if empty) the run dir; one-line error if it cannot be written."""
    if config.run_dir:
        run_dir = Path(config.run_dir)
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        run_dir = Path(config.runs_root) / f"{config.strategy}-n{config.nproc}-{stamp}"
    if (run_dir / "metrics.jsonl").exists():
        raise DistlabError(
            f"run dir {run_dir} already holds a run; choose a new --run-dir (nothing was changed)"
        )
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=run_dir):
            pass
    except OSError as exc:
        raise DistlabError(
            f"run dir {run_dir} is not writable ({exc.strerror}); pass a writable --run-dir"
        ) from None
    return run_dir.resolve()


def prepare_run(config: Config) -> tuple[Path, Path]:
    """Check the device, tokenise the data and create the run dir; return (token file, run dir)."""
    device = resolve_device(config)
    if device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    token_file = prepare_tokens(config.data)
    tokens = load_tokens(token_file)
    seq_len = resolved_seq_len(config)
    if tokens.numel() < seq_len + 2:
        raise DistlabError(
            f"the data has {tokens.numel()} tokens, too few for seq_len {seq_len}; "
            "use more data or a shorter --seq-len"
        )
    return token_file, make_run_dir(config)
