"""Unpickling checkpoint files without running anything the file names.

The unpickler, its allow-lists (each entry justified) and the ``torch.save``
archive scan.

The threat: a checkpoint dir comes from somewhere else (a colleague, a
download, a shared disk) and ``--resume`` loads it. A pickle is a small
program: its GLOBAL and STACK_GLOBAL opcodes name any ``module.name`` and its
REDUCE opcode calls it, so ``pickle.load`` of a crafted file runs
``builtins.open``, ``os.system`` or anything else it names. DCP reads its
``.metadata`` with ``pickle.load`` and DeepSpeed reads its files with
``torch.load(weights_only=False)``, so distlab checks every pickle in a
checkpoint with this module before any of them is read.

``SafeUnpickler`` admits an explicit allow-list: exact (module, qualified
name) pairs, each resolved once from a fixed table to the object itself. A name
from the file is only ever looked up in that table: it is never imported,
never walked attribute by attribute (``torch.distributed.checkpoint.filesystem``
+ ``io.FileIO`` is not ``FileIO``, it is refused), and anything else is refused
with ``module.name`` in the message. Each entry also says what the pickle may
do with it: call it (REDUCE), create an instance (NEWOBJ), fill an instance's
attributes (BUILD), or only pass it as a value; everything else is refused, so
an admitted class cannot be used to set attributes on itself either.

``scan_torch_file`` checks a ``torch.save`` zip archive the same way: only the
records ``torch.save`` writes, ``data.pkl`` through ``SafeUnpickler``, each
tensor's storage a typed-storage reference whose bytes exist in the archive
(tensors are rebuilt on the meta device: no tensor bytes are read). A file
that is not such an archive is refused (torch would read it as a legacy
pickle stream). Out of scope: a file swapped between the check and the load
(whoever can write the checkpoint dir while a run reads it owns the run anyway).
"""

from __future__ import annotations

import functools
import importlib
import io
import pickle
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch

VALUE, CALL, NEW, BUILD = 1, 2, 4, 8
"""What a pickle may do with an allowed object: use it as a value (always),
call it (REDUCE), create an instance with ``cls.__new__`` (NEWOBJ), set the
attributes of an instance of it (BUILD)."""


class Refused(pickle.UnpicklingError):
    """The pickle names or does something outside the allow-list; ``str`` says what."""


@dataclass(frozen=True)
class Allowed:
    """One resolved allow-list entry."""

    obj: Any
    what: str
    uses: int
    check_args: Callable[[tuple], bool] | None = None


AllowList = dict[tuple[str, str], Allowed]


def resolve(table: Iterable[tuple[str, str, int]]) -> AllowList:
    """(module, name, uses) rows -> the objects. Names are single identifiers of our table."""
    allowed: AllowList = {}
    for module, name, uses in table:
        if not name.isidentifier():
            raise ValueError(f"allow-list entries are plain names, not {name!r}")
        obj = getattr(importlib.import_module(module), name)
        allowed[(module, name)] = Allowed(obj, f"{module}.{name}", uses | VALUE)
    return allowed


# --- The allow-lists: every entry was seen in a checkpoint distlab wrote ---------------------
# (recorded find_class calls while loading checkpoints of single, ddp, fsdp, tp, pp, fsdp+tp,
# zero1/2/3, zero2 with --offload optimizer, fairscale-oss and -sdp; see docs/fault_tolerance.md)

TENSOR_TABLE = [
    # torch.save of a tensor: REDUCE _rebuild_tensor_v2(storage, offset, size, stride,
    # requires_grad, backward_hooks); it views a storage, nothing else.
    ("torch._utils", "_rebuild_tensor_v2", CALL),
    # _rebuild_tensor_v2's backward_hooks argument (always empty), state dicts (with their
    # ``_metadata`` attribute: BUILD).
    ("collections", "OrderedDict", CALL | BUILD),
    # Storage types: markers of a storage's dtype inside a persistent id, never called.
    # float32: weights and optimizer state (bf16 runs keep fp32 state); uint8: RNG states.
    ("torch", "FloatStorage", VALUE),
    ("torch", "ByteStorage", VALUE),
]
"""RNG files, DCP's tensor items (``*.distcp``), fairscale's ``model.pt`` and ``optimizer.pt``."""

DCP_METADATA_TABLE = [
    # DCP's own metadata dataclasses (NEWOBJ + BUILD, like any dataclass pickle).
    ("torch.distributed.checkpoint.metadata", "Metadata", NEW | BUILD),
    ("torch.distributed.checkpoint.metadata", "MetadataIndex", NEW | BUILD),
    ("torch.distributed.checkpoint.metadata", "StorageMeta", NEW | BUILD),
    ("torch.distributed.checkpoint.metadata", "TensorStorageMetadata", NEW | BUILD),
    ("torch.distributed.checkpoint.metadata", "ChunkStorageMetadata", NEW | BUILD),
    ("torch.distributed.checkpoint.metadata", "TensorProperties", NEW | BUILD),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo", NEW | BUILD),
    # TensorProperties.memory_format, an Enum: calling it looks a member up.
    ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING", CALL),
    # TensorProperties.layout: torch.serialization._get_layout("torch.strided") looks it up.
    ("torch.serialization", "_get_layout", CALL),
    # Shapes and dtype of the entries (a tuple subclass built from ints; a dtype value).
    ("torch", "Size", CALL),
    ("torch", "float32", VALUE),
    # StorageMeta.checkpoint_id: the directory it was saved to, a pure path object.
    ("pathlib", "PosixPath", CALL),
]

DEEPSPEED_TABLE = [
    *TENSOR_TABLE,
    # --precision bf16 (DeepSpeed's bf16 mode): the module's bf16 parameters, a dtype marker.
    ("torch", "BFloat16Storage", VALUE),
    # The module's param_shapes (model states): torch.Size, a tuple subclass built from ints.
    ("torch", "Size", CALL),
    # The ZeRO optimizer state: its fp16 loss scaler (fp32 runs too; NEWOBJ + BUILD),
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler", NEW | BUILD),
    # the ZeRO stage (an Enum: calling it looks a member up),
    ("deepspeed.runtime.zero.config", "ZeroStageEnum", CALL),
    # ZeRO-1/2's param_slice_mappings (a dataclass of two ints),
    ("deepspeed.utils.tensor_fragment", "fragment_address", NEW | BUILD),
    # ZeRO-3's partitions: tensors carrying attributes, rebuilt by
    # _rebuild_from_type_v2(_rebuild_tensor_v2, torch.Tensor, args, state); only that form.
    ("torch._tensor", "_rebuild_from_type_v2", CALL),
    ("torch", "Tensor", VALUE),
]


def _rebuild_from_type_args(args: tuple) -> bool:
    from torch._utils import _rebuild_tensor_v2

    return (
        len(args) == 4
        and args[0] is _rebuild_tensor_v2
        and args[1] is torch.Tensor
        and isinstance(args[2], tuple)
        and isinstance(args[3], dict)
    )


@functools.cache
def allow_list(kind: str) -> AllowList:
    """The resolved allow-list of one kind of file (resolved on first use)."""
    tables = {
        "dcp-metadata": DCP_METADATA_TABLE,
        "tensors": TENSOR_TABLE,
        "deepspeed": DEEPSPEED_TABLE,
    }
    allowed = resolve(tables[kind])
    key = ("torch._tensor", "_rebuild_from_type_v2")
    if key in allowed:
        entry = allowed[key]
        allowed[key] = Allowed(entry.obj, entry.what, entry.uses, _rebuild_from_type_args)
    return allowed


# --- The unpickler -------------------------------------------------------------------------

_u = pickle._Unpickler  # the pure-Python unpickler: its opcodes can be overridden one by one


class SafeUnpickler(pickle._Unpickler):
    """An unpickler that resolves only ``allowed`` pairs and calls/builds only what they permit.

    ``persistent_load`` (torch's storages) is refused unless ``persistent`` handles it.
    """

    dispatch = dict(_u.dispatch)

    def __init__(
        self,
        file: IO[bytes],
        allowed: AllowList,
        persistent: Callable[[Any], Any] | None = None,
    ) -> None:
        super().__init__(file)
        self._allowed = allowed
        self._by_id = {id(entry.obj): entry for entry in allowed.values()}
        self._persistent = persistent

    def find_class(self, module: str, name: str) -> Any:
        entry = self._allowed.get((module, name))
        if entry is None:
            raise Refused(f"names {module}.{name}")
        return entry.obj

    def persistent_load(self, pid: Any) -> Any:
        if self._persistent is None:
            raise Refused("holds a persistent reference (an external object)")
        return self._persistent(pid)

    def _entry(self, obj: Any, use: int, verb: str) -> Allowed:
        entry = self._by_id.get(id(obj))
        if entry is None or entry.obj is not obj or not entry.uses & use:
            name = entry.what if entry is not None else _describe(obj)
            raise Refused(f"{verb} {name}")
        return entry

    def load_reduce(self) -> None:
        args = self.stack.pop()
        func = self.stack[-1]
        entry = self._entry(func, CALL, "calls")
        if not isinstance(args, tuple) or (entry.check_args and not entry.check_args(args)):
            raise Refused(f"calls {entry.what} with arguments it never gets")
        self.stack[-1] = func(*args)

    def load_newobj(self) -> None:
        args = self.stack.pop()
        cls = self.stack.pop()
        self._entry(cls, NEW, "creates")
        self.append(cls.__new__(cls, *args))

    def load_newobj_ex(self) -> None:
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        self._entry(cls, NEW, "creates")
        self.append(cls.__new__(cls, *args, **kwargs))

    def load_build(self) -> None:
        inst = self.stack[-2]
        if isinstance(inst, type):
            raise Refused(f"sets attributes of the class {_describe(inst)}")
        self._entry(type(inst), BUILD, "sets attributes of")
        _u.load_build(self)

    def load_inst(self) -> None:
        raise Refused("uses the INST opcode (protocol 0 instances)")

    def load_obj(self) -> None:
        raise Refused("uses the OBJ opcode (protocol 1 instances)")

    dispatch[pickle.REDUCE[0]] = load_reduce
    dispatch[pickle.NEWOBJ[0]] = load_newobj
    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex
    dispatch[pickle.BUILD[0]] = load_build
    dispatch[pickle.INST[0]] = load_inst
    dispatch[pickle.OBJ[0]] = load_obj


def _describe(obj: Any) -> str:
    if isinstance(obj, type):
        return f"{obj.__module__}.{obj.__qualname__}"
    return f"a {type(obj).__name__} object"


def load_pickle(data: bytes | IO[bytes], allowed: AllowList) -> Any:
    """Unpickle ``data`` admitting only ``allowed``; raises ``Refused`` or another error."""
    stream = io.BytesIO(data) if isinstance(data, bytes) else data
    return SafeUnpickler(stream, allowed).load()


# --- torch.save zip archives ----------------------------------------------------------------

ZIP_MAGIC = b"PK\x03\x04"
TORCH_RECORDS = {
    "data.pkl",
    "byteorder",
    "version",
    ".format_version",
    ".storage_alignment",
    ".data/version",
    ".data/serialization_id",
}
"""The records ``torch.save`` writes besides ``data/<key>`` (tensor bytes). A TorchScript
archive (``constants.pkl``, ``code/``), which ``torch.load`` would hand to ``torch.jit.load``,
is refused."""


def scan_torch_file(file: Path | bytes, allowed: AllowList) -> Any:
    """Check a ``torch.save`` file without running it; return its object with meta tensors.

    Raises ``Refused`` for anything outside ``allowed`` or not a ``torch.save`` zip archive.
    """
    data = file if isinstance(file, bytes) else Path(file).read_bytes()
    if not data.startswith(ZIP_MAGIC):
        raise Refused("is not a torch.save zip archive (a legacy pickle stream is never read)")
    try:
        reader = torch._C.PyTorchFileReader(io.BytesIO(data))
        records = list(reader.get_all_records())
    except RuntimeError:
        raise Refused("is not a readable torch.save zip archive") from None
    for name in records:
        if name not in TORCH_RECORDS and not (
            name.startswith("data/") and name[len("data/") :].isdigit()
        ):
            raise Refused(f"holds the record {name!r}, which torch.save never writes")
    if "data.pkl" not in records:
        raise Refused("has no data.pkl")

    storage_types = {
        id(e.obj): e.obj
        for e in allowed.values()
        if isinstance(e.obj, type) and issubclass(e.obj, torch.storage._LegacyStorage)
    }

    def storage(pid: Any) -> Any:
        if not (
            isinstance(pid, tuple)
            and len(pid) == 5
            and pid[0] == "storage"
            and id(pid[1]) in storage_types
            and isinstance(pid[2], str)
            and pid[2].isdigit()
            and isinstance(pid[3], str)
            and type(pid[4]) is int
            and pid[4] >= 0
        ):
            raise Refused(f"holds a persistent reference torch.save never writes: {pid!r:.80}")
        dtype = pid[1]._dtype
        nbytes = pid[4] * torch._utils._element_size(dtype)
        key = f"data/{pid[2]}"
        if key not in records or reader.get_record_size(key) < nbytes:  # type: ignore[attr-defined]
            raise Refused(f"lacks the {nbytes} bytes of its tensor {key}")
        untyped = torch.UntypedStorage(nbytes, device="meta")
        return torch.storage.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)

    pickled = bytes(reader.get_record("data.pkl"))
    return SafeUnpickler(io.BytesIO(pickled), allowed, storage).load()
