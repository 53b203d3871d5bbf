"""Checking every file of a checkpoint before anything reads it (the launcher and every rank)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distlab.checkpoint.layout import DCP_FORMAT, DCP_METADATA_FILE, META_FILE, read_meta
from distlab.checkpoint.safe_unpickle import Refused, allow_list, load_pickle, scan_torch_file
from distlab.errors import DistlabError, first_line


def read_dcp_metadata(directory: Path):
    """DCP's ``.metadata`` of a checkpoint, read safely; one-line error if unreadable."""
    return read_metadata_file(directory / DCP_METADATA_FILE)


def read_metadata_file(file: Path):
    from torch.distributed.checkpoint.metadata import Metadata

    try:
        with file.open("rb") as stream:
            metadata = load_pickle(stream, allow_list("dcp-metadata"))
    except FileNotFoundError:
        raise DistlabError(f"checkpoint {file.parent} is corrupt (no DCP {file.name})") from None
    except Refused as exc:
        raise refused(file.parent, file, exc) from None
    except Exception as exc:  # noqa: BLE001 - a damaged pickle raises many types
        raise DistlabError(
            f"checkpoint {file.parent} is corrupt ({file.name}: {first_line(exc)})"
        ) from None
    if type(metadata) is not Metadata:
        raise DistlabError(f"checkpoint {file.parent} is corrupt ({file.name} is not DCP metadata)")
    return metadata


DEEPSPEED_TAG = "deepspeed"
"""The sub-directory DeepSpeed writes into (``deepspeed_zero.CHECKPOINT_TAG``)."""


NOT_READ = {
    "latest": "DeepSpeed's tag file: distlab passes the tag, so DeepSpeed never reads it",
    "zero_to_fp32.py": "a script DeepSpeed copies in; distlab never runs it",
    "zero_to_torch.py": "a script DeepSpeed copies in; distlab never runs it",
}
"""Files DeepSpeed writes that no load path opens."""


def refused(directory: Path, file: Path, reason: object) -> DistlabError:
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
        raise refused(directory, file, exc) from None
    except FileNotFoundError:
        raise DistlabError(f"checkpoint {directory} is corrupt ({file.name} is missing)") from None
    except Exception as exc:  # noqa: BLE001 - a damaged pickle raises many types
        rel = file.relative_to(directory).as_posix()
        raise DistlabError(
            f"checkpoint {directory} is corrupt ({rel}: {first_line(exc)})"
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
        raise refused(directory, file, "is not a file distlab or its libraries write")


def _check_dcp_files(directory: Path, metadata: Any) -> None:
    """Every tensor item a DCP load reads: inside the dir, untransformed, a safe torch.save."""
    items = (getattr(metadata, "storage_data", None) or {}).values()
    for info in items:
        name = info.relative_path
        if not isinstance(name, str) or "/" in name or not name.endswith(".distcp"):
            raise refused(directory, directory / DCP_METADATA_FILE, f"points at {name!r}")
        if info.transform_descriptors:
            raise refused(directory, directory / name, "holds transformed items")
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
                raise refused(directory, file, f"at byte {info.offset} {exc}") from None
            except Exception as exc:  # noqa: BLE001 - a damaged item raises many types
                raise DistlabError(
                    f"checkpoint {directory} is corrupt ({name}: {first_line(exc)})"
                ) from None


def verify_checkpoint(directory: Path) -> dict[str, Any]:
    """Check a checkpoint before anything loads it; return its meta. One-line errors.

    Run by the launcher before a resume starts ranks and by every rank before it
    loads (so restarts from a run's own checkpoints are checked too). Every file
    is checked (``check_checkpoint_files``); for DCP checkpoints also: every
    entry the model and optimizer need is a tensor, and every data file is there
    at its full length.
    """
    return verify_checkpoint_and_metadata(directory)[0]


def verify_checkpoint_and_metadata(directory: Path) -> tuple[dict[str, Any], Any]:
    """``verify_checkpoint``, also returning DCP's ``.metadata`` as it was checked (None for
    other formats). A DCP load plans with that object instead of unpickling the file a
    second time: the safe unpickler is pure Python, 0.25-0.5 s a rank even for the tiny
    model's checkpoint, and every rank of a resume pays it."""
    meta = read_meta(directory)
    if meta["format"] != DCP_FORMAT:
        check_checkpoint_files(directory)
        return meta, None
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
    return meta, metadata
