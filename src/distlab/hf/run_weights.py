"""The weights of a run's newest committed checkpoint, whole, in this one process.

Whatever strategy and world size wrote the checkpoint: DCP checkpoints (most
strategies) are resharded by ``torch.distributed.checkpoint``; DeepSpeed's
(zero1/2/3) are consolidated by DeepSpeed's own ``zero_to_fp32``; fairscale's
already hold the full weights (``model.pt``). Every file is checked against
distlab's pickle allow-lists first (``verify_checkpoint``), as ``--resume`` does,
since DeepSpeed and DCP read theirs with pickle.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import torch

from distlab.checkpoint.layout import (
    DCP_FORMAT,
    describe_checkpoint,
    newest_checkpoint,
    read_meta,
)
from distlab.checkpoint.state import load_dcp_model
from distlab.checkpoint.verify import DEEPSPEED_TAG, verify_checkpoint
from distlab.config import model_shape
from distlab.errors import DistlabError, first_line
from distlab.model import GPT, build_model
from distlab.run.files import CONFIG_FILE
from distlab.strategies.fairscale_oss import MODEL_FILE as FAIRSCALE_MODEL_FILE
from distlab.strategies.resolve import load_config


def load_run_model(run_dir: Path) -> tuple[GPT, Path]:
    """A plain GPT (eval mode) holding the run's newest checkpoint, and that checkpoint."""
    if not run_dir.is_dir():
        raise DistlabError(f"{run_dir}: no such run dir")
    if not (run_dir / CONFIG_FILE).is_file():
        raise DistlabError(f"{run_dir} is not a run dir (it has no {CONFIG_FILE})")
    config = load_config(str(run_dir / CONFIG_FILE))
    checkpoint = newest_checkpoint(run_dir)
    if checkpoint is None:
        raise DistlabError(
            f"{run_dir} has no committed checkpoint (a run saves one at its end unless "
            "--no-final-checkpoint, and every --checkpoint-every steps)"
        )
    if not torch.cuda.is_available():
        # As the launcher does on a CPU: DeepSpeed (imported by the checks of its files)
        # would otherwise probe for accelerators and warn on stdout.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    model = build_model(model_shape(config), config.seed)
    if read_meta(checkpoint)["format"] == DCP_FORMAT:
        load_dcp_model(checkpoint, model)  # checks every file first
    else:
        verify_checkpoint(checkpoint)  # every file, before DeepSpeed or torch reads one
        state = full_weights(checkpoint)
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise DistlabError(
                f"checkpoint {describe_checkpoint(checkpoint)} does not fit the run's model: "
                f"{first_line(exc)}"
            ) from None
    return model.eval(), checkpoint


def full_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The full fp32 weights of a DeepSpeed or fairscale checkpoint (verified already)."""
    if (checkpoint / DEEPSPEED_TAG).is_dir():
        # DeepSpeed reports on stdout, which is the command's output (generate's text).
        try:
            with contextlib.redirect_stdout(sys.stderr):
                from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

                state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=DEEPSPEED_TAG)
        except Exception as exc:  # noqa: BLE001 - DeepSpeed raises many types on a bad file
            raise DistlabError(
                f"checkpoint {describe_checkpoint(checkpoint)} cannot be consolidated by "
                f"DeepSpeed: {first_line(exc)}"
            ) from None
        return dict(state)
    if (checkpoint / FAIRSCALE_MODEL_FILE).is_file():
        return torch.load(checkpoint / FAIRSCALE_MODEL_FILE, map_location="cpu", weights_only=True)
    raise DistlabError(
        f"checkpoint {describe_checkpoint(checkpoint)} is in no format distlab can read "
        "(DCP, DeepSpeed's or fairscale's)"
    )
