"""Atomic, rotating, sharded checkpoints inside a run dir, and loading them back safely.

A checkpoint is written by every rank into ``checkpoints/.tmp-step_NNNNNN`` and
renamed to ``checkpoints/step_NNNNNN`` by rank 0 only after every rank has
finished writing and every file is fsync'ed, so a crash during a save (of a
process, or of the OS) leaves the previous checkpoints intact. NNNNNN is the
number of completed steps, i.e. the step a resume runs next. The commit
protocol, step by step, is ``save_checkpoint``'s docstring; old checkpoints
are rotated out only after the new one is durable, through a ``.trash-`` name.

Inside a checkpoint:

- the strategy's state, written by ``TrainStep.save_checkpoint``. Torch-native
  strategies write DCP (``torch.distributed.checkpoint``): model and optimizer
  state under the plain model's parameter names (FQNs), each rank writing the
  shards it holds, so it loads into any strategy at any world size. Only
  tensors go in: DCP pickles non-tensor values and unpickles them on load, so
  the learning-rate schedule is not saved but derived from the step.
- ``rng_rankR.pt``: rank R's random-number generator states, a dict of tensors
  (loaded with ``weights_only=True``).
- ``meta.json``: the step, the strategy and world size that wrote it, and its
  format (``dcp`` or the strategy's own, e.g. DeepSpeed's), written last.

Loading runs nothing from a checkpoint: before the launcher resumes and before
any rank loads, ``verify_checkpoint`` checks every file of the checkpoint dir
(``distlab.safe_unpickle``: exact-name allow-lists, no tensor bytes read).
DCP's ``.metadata`` is read with the same unpickler, and a planner refuses any
non-tensor entry. docs/fault_tolerance.md lists what each format may contain.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from distlab import durable
from distlab.distributed import RankContext
from distlab.errors import DistlabError
from distlab.safe_unpickle import Refused, allow_list, load_pickle, scan_torch_file

if TYPE_CHECKING:
    from torch import nn

    from distlab.strategies.base import TrainStep

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


SaveHook = Callable[[str], None]
"""Called with a stage name (``distlab.config.SAVE_STAGES``) at each crash point of a save."""


def save_checkpoint(
    train_step: TrainStep,
    run_dir: Path,
    next_step: int,
    ctx: RankContext,
    meta: dict,
    keep: int,
    on_stage: SaveHook | None = None,
) -> Path:
    """Write a checkpoint after ``next_step`` completed steps on every rank, then commit it durably.

    The protocol (every rank calls this; barriers separate the phases):

    1. rank 0 makes ``checkpoints/`` (fsync'ed in the run dir when new) and an
       empty ``.tmp-step_N``;
    2. every rank writes its strategy state (DCP, DeepSpeed's or fairscale's
       files) and its RNG file into ``.tmp-step_N``;
    3. every rank fsyncs every file and directory in ``.tmp-step_N``
       (``durable.fsync_tree``);
    4. rank 0 writes ``meta.json`` (fsync'ed), fsyncs ``.tmp-step_N`` again
       (the new entry), renames it to ``step_N`` and fsyncs ``checkpoints/``:
       from here on ``step_N`` is committed, also across a power loss;
    5. rank 0 rotates: each checkpoint older than the newest ``keep`` is
       renamed to ``.trash-step_K`` (``checkpoints/`` fsync'ed), then deleted.

    If ``step_N`` is already committed (only possible when a run repeats a step
    it had already saved), it is kept and the new copy discarded: the same step
    holds the same state, and a committed checkpoint is never replaced.

    ``on_stage`` is called with the name of each crash point as the save passes
    it (fault injection, ``distlab.train.fire_fault``): ``save`` (this rank's
    strategy state written, RNG file not), ``save-mid-shard`` (its RNG file half
    written), and on rank 0 ``save-before-rename``, ``save-after-rename`` and
    ``save-rotation`` (the first old checkpoint moved to trash, not deleted).
    """
    stage = on_stage or (lambda name: None)
    root = checkpoint_dir(run_dir)
    final = root / f"step_{next_step:06d}"
    staging = root / f"{STAGING_PREFIX}step_{next_step:06d}"
    if ctx.is_main:
        durable.make_dirs(root)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
    dist.barrier()
    train_step.save_checkpoint(staging)
    stage("save")
    durable.write_file(
        staging / RNG_FILE.format(rank=ctx.rank),
        _serialize(rng_state(ctx)),
        fsync=False,  # step 3 does it, with the strategy's files
        midway=lambda: stage("save-mid-shard"),
    )
    dist.barrier()
    # Every rank fsyncs all files, not only its own: which rank wrote which file
    # is DCP's and DeepSpeed's business, and on a file system shared by several
    # machines only the machine that wrote a file can flush it. On one machine
    # the repeated fsyncs of clean files cost a few microseconds each.
    durable.fsync_tree(staging)
    dist.barrier()
    if ctx.is_main:
        fmt = DCP_FORMAT if (staging / DCP_METADATA_FILE).is_file() else meta["strategy"]
        full_meta = {
            **meta,
            "next_step": next_step,
            "world_size": ctx.world_size,
            "format": fmt,
            "saved_at": time.time(),
        }
        durable.write_file(staging / META_FILE, json.dumps(full_meta, indent=2).encode())
        commit_checkpoint(staging, final, keep, stage)
    dist.barrier()
    return final


def commit_checkpoint(staging: Path, final: Path, keep: int, stage: SaveHook) -> None:
    """Rank 0's part of a save, once every file in ``staging`` is written and fsync'ed.

    fsync ``staging`` (its entries, ``meta.json`` included), rename it to
    ``final``, fsync the parent, then rotate the old checkpoints out
    (``rotate_checkpoints``). An already committed ``final`` is kept and
    ``staging`` discarded (see ``save_checkpoint``).
    """
    durable.fsync_dir(staging)
    stage("save-before-rename")
    if (final / META_FILE).is_file():
        shutil.rmtree(staging)  # never committed: nothing refers to it
        durable.fsync_dir(final.parent)
    else:
        if final.exists():  # a step dir without meta.json: never committed, safe to drop
            durable.remove_tree(final, final.with_name(TRASH_PREFIX + final.name))
        durable.rename(staging, final)
    stage("save-after-rename")
    rotate_checkpoints(final.parent.parent, keep, stage)


def rotate_checkpoints(run_dir: Path, keep: int, stage: SaveHook | None = None) -> None:
    """Remove all but the newest ``keep`` committed checkpoints, each via a ``.trash-`` name.

    Each old ``step_K`` is renamed to ``.trash-step_K`` and the parent fsync'ed
    before its files are deleted, so a crash never leaves a half-deleted
    ``step_K`` that still has its ``meta.json``. ``stage("save-rotation")`` runs
    after the first one is moved (fault injection).
    """
    for index, old in enumerate(complete_checkpoints(run_dir)[:-keep]):
        hook = (lambda: stage("save-rotation")) if stage is not None and index == 0 else None
        durable.remove_tree(old, old.with_name(TRASH_PREFIX + old.name), after_move=hook)


def _serialize(state: dict[str, torch.Tensor]) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


# --- meta.json ------------------------------------------------------------------------


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


# --- RNG ------------------------------------------------------------------------------


def rng_state(ctx: RankContext) -> dict[str, torch.Tensor]:
    """This rank's generator states as tensors."""
    state = {"cpu": torch.get_rng_state()}
    if ctx.device_type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(ctx.device)
    return state


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


# --- The learning-rate schedule ---------------------------------------------------------


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


# --- DCP: save and load model + optimizer state, tensors only ---------------------------


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
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    verify_checkpoint(directory)  # every file, before DCP reads any (restarts come here too)
    # The template: this rank's tensors (shards), with the optimizer state initialised.
    model_state, optim_state = get_state_dict(model, optimizer)
    state = _tensor_state(model_state, optim_state)
    try:
        dcp.load(
            state,
            checkpoint_id=directory,
            storage_reader=SafeFileSystemReader(directory),
            planner=_tensor_only_load_planner(),
        )
    except DistlabError:
        raise
    except Exception as exc:  # noqa: BLE001 - DCP wraps per-rank failures in its own types
        raise DistlabError(
            f"checkpoint {directory} cannot be loaded into this model: {_first_line(exc)}"
        ) from None
    set_state_dict(
        model,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict={
            "state": state["optim"]["state"],
            "param_groups": optim_state["param_groups"],
        },
    )


def _tensor_state(model_state: dict, optim_state: dict) -> dict[str, Any]:
    return {"model": model_state, "optim": {"state": optim_state["state"]}}


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    interesting = [line for line in lines if "Error" in line or "key" in line.lower()]
    return ((interesting or lines or [type(exc).__name__])[0])[:300]


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


def read_dcp_metadata(directory: Path):
    """DCP's ``.metadata`` of a checkpoint, read safely; one-line error if unreadable."""
    return _read_metadata_file(directory / DCP_METADATA_FILE)


def _read_metadata_file(file: Path):
    from torch.distributed.checkpoint.metadata import Metadata

    try:
        with file.open("rb") as stream:
            metadata = load_pickle(stream, allow_list("dcp-metadata"))
    except FileNotFoundError:
        raise DistlabError(f"checkpoint {file.parent} is corrupt (no DCP {file.name})") from None
    except Refused as exc:
        raise _refused(file.parent, file, exc) from None
    except Exception as exc:  # noqa: BLE001 - a damaged pickle raises many types
        raise DistlabError(
            f"checkpoint {file.parent} is corrupt ({file.name}: {_first_line(exc)})"
        ) from None
    if type(metadata) is not Metadata:
        raise DistlabError(f"checkpoint {file.parent} is corrupt ({file.name} is not DCP metadata)")
    return metadata


def _safe_reader_class():
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class _SafeFileSystemReader(FileSystemReader):
        """A FileSystemReader whose metadata is read with distlab's safe unpickler."""

        def read_metadata(self, *args: Any, **kwargs: Any):
            metadata = _read_metadata_file(Path(self._get_metadata_path(kwargs.get("rank"))))
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return _SafeFileSystemReader


def SafeFileSystemReader(directory: Path):  # noqa: N802 - reads like the class it returns
    """A DCP storage reader that reads ``.metadata`` with the safe unpickler."""
    return _safe_reader_class()(directory)


# --- Checking every file before anything reads it -------------------------------------

DEEPSPEED_TAG = "deepspeed"
"""The sub-directory DeepSpeed writes into (``deepspeed_zero.CHECKPOINT_TAG``)."""
NOT_READ = {
    "latest": "DeepSpeed's tag file: distlab passes the tag, so DeepSpeed never reads it",
    "zero_to_fp32.py": "a script DeepSpeed copies in; distlab never runs it",
    "zero_to_torch.py": "a script DeepSpeed copies in; distlab never runs it",
}
"""Files DeepSpeed writes that no load path opens."""


def _refused(directory: Path, file: Path, reason: object) -> DistlabError:
    name = file.relative_to(directory).as_posix() if file.is_relative_to(directory) else file
    return DistlabError(
        f"checkpoint {directory} refused: {name} {reason} "
        "(loading runs nothing from a checkpoint: it holds only tensors and plain data)"
    )


def check_torch_file(directory: Path, file: Path, kind: str = "tensors") -> Any:
    """Scan one ``torch.save`` file of a checkpoint with the ``kind`` allow-list; one-line errors.

    Returns its content with tensors on the meta device (no tensor bytes read).
    """
    try:
        return scan_torch_file(file, allow_list(kind))
    except Refused as exc:
        raise _refused(directory, file, exc) from None
    except FileNotFoundError:
        raise DistlabError(f"checkpoint {directory} is corrupt ({file.name} is missing)") from None
    except Exception as exc:  # noqa: BLE001 - a damaged pickle raises many types
        rel = file.relative_to(directory).as_posix()
        raise DistlabError(
            f"checkpoint {directory} is corrupt ({rel}: {_first_line(exc)})"
        ) from None


def check_checkpoint_files(directory: Path, metadata: Any = None) -> None:
    """Check every file of a checkpoint dir, whatever its format, without running any of it.

    ``meta.json`` is JSON; DCP's ``.metadata`` goes through the metadata allow-list
    and every tensor item of its ``*.distcp`` files through the tensor one;
    DeepSpeed's ``deepspeed/*.pt`` through DeepSpeed's; every other ``*.pt``
    (RNG states, fairscale's files) through the tensor one. DeepSpeed's
    ``latest`` and its scripts are never opened by a load; any other file is refused.
    """
    if (directory / DCP_METADATA_FILE).is_file():
        _check_dcp_files(directory, metadata or read_dcp_metadata(directory))
    for file in sorted(directory.rglob("*")):
        if file.is_dir() and not file.is_symlink():
            continue
        rel = file.relative_to(directory).as_posix()
        if rel in (META_FILE, DCP_METADATA_FILE) or rel in NOT_READ:
            continue
        if "/" not in rel and rel.endswith(".distcp") and (directory / DCP_METADATA_FILE).is_file():
            continue  # its items were checked through .metadata
        if rel.endswith(".pt") and file.is_file() and not file.is_symlink():
            in_tag = rel.startswith(DEEPSPEED_TAG + "/") and rel.count("/") == 1
            check_torch_file(directory, file, "deepspeed" if in_tag else "tensors")
            continue
        raise _refused(directory, file, "is not a file distlab or its libraries write")


def _check_dcp_files(directory: Path, metadata: Any) -> None:
    """Every tensor item a DCP load reads: inside the dir, untransformed, a safe torch.save."""
    items = (getattr(metadata, "storage_data", None) or {}).values()
    for info in items:
        name = info.relative_path
        if not isinstance(name, str) or "/" in name or not name.endswith(".distcp"):
            raise _refused(directory, directory / DCP_METADATA_FILE, f"points at {name!r}")
        if info.transform_descriptors:
            raise _refused(directory, directory / name, "holds transformed items")
    for name in sorted({info.relative_path for info in items}):
        file = directory / name
        if not file.is_file() or file.is_symlink():
            raise DistlabError(f"checkpoint {directory} is corrupt ({name} is missing)")
        data = file.read_bytes()
        for info in items:
            if info.relative_path != name:
                continue
            end = info.offset + info.length
            if len(data) < end:
                raise DistlabError(
                    f"checkpoint {directory} is corrupt ({name} is {len(data)} of {end} bytes)"
                )
            try:
                scan_torch_file(data[info.offset : end], allow_list("tensors"))
            except Refused as exc:
                raise _refused(directory, file, f"at byte {info.offset} {exc}") from None
            except Exception as exc:  # noqa: BLE001 - a damaged item raises many types
                raise DistlabError(
                    f"checkpoint {directory} is corrupt ({name}: {_first_line(exc)})"
                ) from None


def verify_checkpoint(directory: Path) -> dict[str, Any]:
    """Check a checkpoint before anything loads it; return its meta. One-line errors.

    Run by the launcher before a resume starts ranks and by every rank before it
    loads (so restarts from a run's own checkpoints are checked too). Every file
    is checked (``check_checkpoint_files``); for DCP checkpoints also: every
    entry the model and optimizer need is a tensor, and every data file is there
    at its full length.
    """
    meta = read_meta(directory)
    if meta["format"] != DCP_FORMAT:
        check_checkpoint_files(directory)
        return meta
    metadata = read_dcp_metadata(directory)
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    entries = getattr(metadata, "state_dict_metadata", None)
    if not isinstance(entries, dict) or not any(k.startswith("model.") for k in entries):
        raise DistlabError(f"checkpoint {directory} is corrupt (it holds no model weights)")
    for key, entry in entries.items():
        if key.startswith(("model.", "optim.state.")) and not isinstance(
            entry, TensorStorageMetadata
        ):
            raise DistlabError(
                f"checkpoint {directory} holds a non-tensor entry '{key}'; "
                "distlab loads tensors only"
            )
    check_checkpoint_files(directory, metadata)
    return meta


def describe_checkpoint(directory: Path) -> str:
    """``run/checkpoints/step_000004`` shortened for messages."""
    return os.path.join(directory.parent.parent.name, directory.parent.name, directory.name)
