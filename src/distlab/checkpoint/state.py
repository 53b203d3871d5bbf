"""Saving and loading model, optimizer, schedule and RNG state; tensors only, checked first."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from distlab.checkpoint.layout import DCP_METADATA_FILE, RNG_FILE, read_meta
from distlab.checkpoint.verify import (
    check_torch_file,
    read_metadata_file,
    verify_checkpoint_and_metadata,
)
from distlab.distributed import RankContext
from distlab.errors import DistlabError, first_line


def restore_rng(directory: Path, ctx: RankContext) -> bool:
    """Restore this rank's generators if the checkpoint was written at this world size.

    At another world size rank R is another shard of the work, so its old
    generator state means nothing; the generators then keep their seeded state.
    """
    file = directory / RNG_FILE.format(rank=ctx.rank)
    if read_meta(directory)["world_size"] != ctx.world_size or not file.is_file():
        return False
    check_torch_file(directory, file)  # before torch reads it
    try:
        state = torch.load(file, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is a corrupt checkpoint
        raise DistlabError(f"checkpoint {directory} is corrupt ({file.name}: {exc})") from None
    if not isinstance(state, dict) or not isinstance(state.get("cpu"), torch.Tensor):
        raise DistlabError(f"checkpoint {directory} is corrupt ({file.name} holds no RNG state)")
    torch.set_rng_state(state["cpu"])
    if ctx.device_type == "cuda" and isinstance(state.get("cuda"), torch.Tensor):
        torch.cuda.set_rng_state(state["cuda"], ctx.device)
    return True


def set_schedule_position(scheduler: torch.optim.lr_scheduler.LambdaLR, step: int) -> None:
    """Put a LambdaLR where it is after ``step`` optimizer steps (and set the lr to match)."""
    scheduler.last_epoch = step
    lrs = [
        base * factor(step)
        for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)
    ]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    scheduler._last_lr = lrs


def save_dcp_state(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Save model and optimizer state (FQN-keyed, sharded as they live) through DCP.

    Only tensors are written: the optimizer's param_groups (hyperparameters) come
    from the config on load and the lr from the step.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save(_tensor_state(model_state, optim_state), checkpoint_id=directory)


def load_dcp_state(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load what ``save_dcp_state`` wrote, resharded to how this model and optimizer live."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    # every file, before DCP reads any (restarts come here too)
    _, metadata = verify_checkpoint_and_metadata(directory)
    # The template: this rank's tensors (shards), with the optimizer state initialised.
    model_state, optim_state = get_state_dict(model, optimizer)
    state = _tensor_state(model_state, optim_state)
    _load_tensors(directory, state, metadata)
    set_state_dict(
        model,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict={
            "state": state["optim"]["state"],
            "param_groups": optim_state["param_groups"],
        },
    )


def load_dcp_model(directory: Path, model: nn.Module) -> None:
    """Load only the weights of a DCP checkpoint into a plain model, in this process alone.

    For export and generation: DCP reshards the shards every rank wrote into the
    whole tensors; the optimizer state is not read.
    """
    _, metadata = verify_checkpoint_and_metadata(directory)  # every file, before DCP reads any
    with warnings.catch_warnings():
        # DCP warns on every load without a process group, which is the point here.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        _load_tensors(directory, {"model": model.state_dict()}, metadata)  # in place


def _load_tensors(directory: Path, state: dict[str, Any], metadata: Any) -> None:
    """``dcp.load`` of ``state`` (in place) through the safe reader, planned with the checked
    ``metadata``; one-line errors."""
    import torch.distributed.checkpoint as dcp

    in_group = dist.is_initialized()
    try:
        dcp.load(
            state,
            checkpoint_id=directory,
            storage_reader=SafeFileSystemReader(directory, metadata),
            planner=_tensor_only_load_planner(),
        )
    except DistlabError:
        raise
    except Exception as exc:  # noqa: BLE001 - DCP wraps per-rank failures in its own types
        if _group_failed(exc, in_group):
            raise  # a fault to recover from (a peer lost mid-load), not a bad checkpoint
        raise DistlabError(
            f"checkpoint {directory} cannot be loaded into this model: {first_line(exc)}"
        ) from None


def _group_failed(exc: BaseException, in_group: bool) -> bool:
    """Whether a failed load is the process group's failure, not the checkpoint's.

    An elastic resize tears the group down under ranks still loading (Ray destroys
    it), and a lost peer breaks a collective; both must restart the ranks, which a
    ``DistlabError`` (bad input, never retried) would not.
    """
    failures = getattr(exc, "failures", {})  # DCP's CheckpointException: rank -> (exc, trace)
    causes = [exc, *(cause for cause, _ in failures.values())]
    group_gone = in_group and not dist.is_initialized()
    return group_gone or any(isinstance(c, dist.DistError) for c in causes)


def _tensor_state(model_state: dict, optim_state: dict) -> dict[str, Any]:
    return {"model": model_state, "optim": {"state": optim_state["state"]}}


def _tensor_only_load_planner():
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class TensorOnlyLoadPlanner(DefaultLoadPlanner):
        """Refuses pickled (non-tensor) entries instead of unpickling them."""

        def load_bytes(self, read_item, value) -> None:
            raise DistlabError(
                f"checkpoint entry '{read_item.dest_index.fqn}' is a pickled object; "
                "distlab loads tensors only"
            )

    return TensorOnlyLoadPlanner()


def _safe_reader_class():
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class _SafeFileSystemReader(FileSystemReader):
        """A FileSystemReader whose ``.metadata`` is the one ``verify_checkpoint`` read and
        checked (``checked``), else read with distlab's safe unpickler."""

        def __init__(self, directory: Path, checked: Any) -> None:
            super().__init__(directory)
            self.checked = checked

        def read_metadata(self, *args: Any, **kwargs: Any):
            file = Path(self._get_metadata_path(kwargs.get("rank")))
            own = self.checked is not None and file.name == DCP_METADATA_FILE
            metadata = self.checked if own else read_metadata_file(file)
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return _SafeFileSystemReader


def SafeFileSystemReader(directory: Path, checked: Any):  # noqa: N802 - reads like a class
    """A DCP storage reader that plans with the ``checked`` ``.metadata`` (else reads it with
    the safe unpickler)."""
    return _safe_reader_class()(directory, checked)
