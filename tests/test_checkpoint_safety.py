"""Loading a checkpoint runs nothing from it: planted payloads are refused before any load.

For each file format distlab reads (DCP ``.metadata``, DeepSpeed's model and
optimizer states, fairscale's model and optimizer files, RNG files) a payload
that would create a file is planted twice: plainly (``builtins.open``,
``os.system``) and through a dotted name inside a module the allow-list admits
(``torch.distributed.checkpoint.filesystem`` + ``io.FileIO``). Each payload is
first shown to be live (plain ``pickle.load`` / ``torch.load`` of it creates
its file), then ``--resume`` must refuse it: exit 2, one line naming the file
and the name, no file created, the source unchanged, no new run dir. The
ranks' own load paths (used by automatic restarts) refuse it too.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import shutil
import struct
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.helpers import assert_one_line_error, run_main

from distlab.checkpoint.layout import newest_checkpoint
from distlab.checkpoint.safe_unpickle import Refused, SafeUnpickler, allow_list, load_pickle
from distlab.checkpoint.state import load_dcp_state, restore_rng
from distlab.checkpoint.verify import check_torch_file, verify_checkpoint
from distlab.distributed import RankContext
from distlab.errors import DistlabError

TINY = [
    "--model",
    "tiny",
    "--global-batch",
    "8",
    "--steps",
    "2",
    "--launcher",
    "local",
    "--no-wandb",
    "--quiet",
]


# --- Payloads, written with pickle opcodes ------------------------------------------------


def _str(text: str) -> bytes:
    data = text.encode()
    return pickle.BINUNICODE + struct.pack("<I", len(data)) + data


def plain_payload(target: Path) -> bytes:
    """GLOBAL builtins open; open(target, 'w') (protocol 2, like torch.save)."""
    return b"\x80\x02cbuiltins\nopen\n(" + _str(str(target)) + _str("w") + b"tR."


def system_payload(target: Path) -> bytes:
    """GLOBAL os system; os.system('touch target') (pickled as posix.system)."""
    return b"\x80\x02cposix\nsystem\n(" + _str(f"touch '{target}'") + b"tR."


def dotted_payload(target: Path, module: str, name: str, args: list[str]) -> bytes:
    """STACK_GLOBAL module + dotted name (protocol 4 lets pickle walk the dots), then call it."""
    return (
        b"\x80\x04"
        + _str(module)
        + _str(name)
        + pickle.STACK_GLOBAL
        + b"("
        + b"".join(_str(a.format(target=target)) for a in args)
        + b"tR."
    )


FILEIO = ("torch.distributed.checkpoint.filesystem", "io.FileIO", ["{target}", "w"])
"""io.FileIO reached through a module DCP's metadata allow-list admits."""
SERIALIZATION_SYSTEM = ("torch", "serialization.os.system", ["touch '{target}'"])
"""os.system reached through ``torch`` (whose Size/FloatStorage are admitted)."""
UTILS_FILEIO = ("torch._utils", "torch.serialization.io.FileIO", ["{target}", "w"])
"""io.FileIO reached through ``torch._utils`` (whose _rebuild_tensor_v2 is admitted)."""


def with_data_pkl(original: bytes, data_pkl: bytes) -> bytes:
    """The torch.save zip archive ``original`` with its data.pkl replaced."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(original)) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            body = data_pkl if info.filename.endswith("/data.pkl") else src.read(info)
            dst.writestr(info, body)
    return out.getvalue()


def plant(file: Path, payload) -> None:
    """Replace ``file`` (DCP .metadata: a raw pickle; else a torch.save archive) by ``payload``."""
    if file.name == ".metadata":
        file.write_bytes(payload)
    else:
        file.write_bytes(with_data_pkl(file.read_bytes(), payload))


def assert_live(file: Path, make, tmp_path: Path) -> None:
    """The payload really runs when loaded the unsafe way (so refusing it means something)."""
    probe_target = tmp_path / "probe-created"
    probe = tmp_path / "probe" / file.name
    probe.parent.mkdir()
    shutil.copy(file, probe)
    plant(probe, make(probe_target))
    try:
        if file.name == ".metadata":
            pickle.loads(probe.read_bytes())
        else:
            torch.load(probe, weights_only=False)
    except Exception:  # noqa: BLE001 - the payload's return value need not be a checkpoint
        pass
    assert probe_target.exists(), "the payload is not live"
    probe_target.unlink()
    shutil.rmtree(probe.parent)


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# --- Source checkpoints, built once --------------------------------------------------------


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory):
    """Run dirs by name, each run on first use (zero2's first use compiles DeepSpeed's ops)."""
    root = tmp_path_factory.mktemp("safety-sources")
    made: dict[str, Path] = {}
    commands = {
        "ddp": ["--strategy", "ddp", "--nproc", "2"],
        "zero2": ["--strategy", "zero2", "--nproc", "2"],
        "zero2-bf16": ["--strategy", "zero2", "--nproc", "2", "--precision", "bf16"],
        "fairscale": ["--strategy", "fairscale-oss", "--nproc", "2"],
    }

    def get(name: str) -> Path:
        if name not in made:
            run_dir = root / name
            result = run_main("distlab.launch", *TINY, *commands[name], "--run-dir", str(run_dir))
            assert result.returncode == 0, result.stderr
            made[name] = run_dir
        return made[name]

    return get


CASES = {
    # id: (source run, file in the checkpoint, plain payload, name it names, dotted payload)
    "dcp-metadata": ("ddp", ".metadata", plain_payload, FILEIO),
    "deepspeed-model-states": (
        "zero2",
        "deepspeed/mp_rank_00_model_states.pt",
        system_payload,
        SERIALIZATION_SYSTEM,
    ),
    "deepspeed-optim-states": (
        "zero2",
        "deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt",
        plain_payload,
        UTILS_FILEIO,
    ),
    "fairscale-model": ("fairscale", "model.pt", plain_payload, SERIALIZATION_SYSTEM),
    "fairscale-optimizer": ("fairscale", "optimizer.pt", system_payload, UTILS_FILEIO),
    "rng": ("ddp", "rng_rank1.pt", plain_payload, SERIALIZATION_SYSTEM),
}
REFUSED_NAME = {plain_payload: "builtins.open", system_payload: "posix.system"}


def _payload(case: str, dotted: bool):
    _, _, plain, (module, name, args) = CASES[case]
    if dotted:
        return (lambda target: dotted_payload(target, module, name, args)), f"{module}.{name}"
    return plain, REFUSED_NAME[plain]


def poisoned_copy(sources, tmp_path: Path, case: str, dotted: bool):
    """A copy of the case's source run with the payload planted; (run, checkpoint, file, name)."""
    source, rel, *_ = CASES[case]
    run = tmp_path / "source-run"
    shutil.copytree(sources(source), run)
    checkpoint = newest_checkpoint(run)
    make, name = _payload(case, dotted)
    file = checkpoint / rel
    assert_live(file, make, tmp_path)
    plant(file, make(tmp_path / "CREATED"))
    return run, checkpoint, rel, name


@pytest.mark.slow
@pytest.mark.parametrize("dotted", [False, True], ids=["plain", "dotted"])
@pytest.mark.parametrize("case", list(CASES))
def test_resume_refuses_payload(sources, tmp_path: Path, case: str, dotted: bool) -> None:
    run, checkpoint, rel, name = poisoned_copy(sources, tmp_path, case, dotted)
    before = tree_digest(run)
    siblings = sorted(os.listdir(tmp_path))
    target = tmp_path / "resumed"
    result = run_main(
        "distlab.launch",
        "--resume",
        str(run),
        "--steps",
        "3",
        "--launcher",
        "local",
        "--no-wandb",
        "--quiet",
        "--run-dir",
        str(target),
    )
    assert_one_line_error(result, f"checkpoint {checkpoint} refused: {rel} names {name}")
    assert not (tmp_path / "CREATED").exists(), "the payload ran"
    assert tree_digest(run) == before, "the source run was changed"
    assert not target.exists(), "a run dir was created"
    assert sorted(os.listdir(tmp_path)) == siblings


# --- The ranks' load paths (automatic restarts do not pass the launcher's check) -------------


@pytest.mark.slow
@pytest.mark.parametrize("dotted", [False, True], ids=["plain", "dotted"])
@pytest.mark.parametrize("case", list(CASES))
def test_rank_load_paths_refuse_payload(sources, tmp_path: Path, case: str, dotted: bool) -> None:
    run, checkpoint, rel, name = poisoned_copy(sources, tmp_path, case, dotted)
    source = CASES[case][0]
    if case == "rng":
        ctx = RankContext(rank=1, world_size=2, device=torch.device("cpu"))
        load = lambda: restore_rng(checkpoint, ctx)  # noqa: E731
    elif source == "zero2":
        from distlab.strategies.deepspeed_zero import DeepSpeedTrainStep

        step = SimpleNamespace(engine=None, config=SimpleNamespace(strategy="zero2"), dp_size=2)
        load = lambda: DeepSpeedTrainStep.load_checkpoint(step, checkpoint)  # noqa: E731
    elif source == "fairscale":
        from distlab.strategies.fairscale_oss import OSSTrainStep

        step = SimpleNamespace(ctx=None, plain_model=None, optimizer=None, scheduler=None)
        load = lambda: OSSTrainStep.load_checkpoint(step, checkpoint)  # noqa: E731
    else:
        from distlab.model import build_model

        model = build_model("tiny", 0)
        optimizer = torch.optim.AdamW(model.parameters())
        load = lambda: load_dcp_state(checkpoint, model, optimizer)  # noqa: E731
    with pytest.raises(DistlabError, match="refused") as error:
        load()
    assert f"refused: {rel} names {name}" in str(error.value)
    assert not (tmp_path / "CREATED").exists(), "the payload ran"


@pytest.mark.slow  # four real runs, DeepSpeed and fairscale among them
def test_real_checkpoints_pass(sources) -> None:
    """The allow-lists admit what distlab writes (checked for every strategy in the docs)."""
    for name in ("ddp", "zero2", "zero2-bf16", "fairscale"):
        verify_checkpoint(newest_checkpoint(sources(name)))


# --- Small, fast checks of the unpickler itself -----------------------------------------


def test_dotted_name_in_allowed_module_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "created"
    module, name, args = FILEIO
    with pytest.raises(Refused, match=f"names {module}.{name}"):
        load_pickle(dotted_payload(target, module, name, args), allow_list("dcp-metadata"))
    assert not target.exists()


def test_admitted_class_cannot_be_modified() -> None:
    """BUILD on an admitted class (not an instance) would set attributes on the class itself."""
    allowed = allow_list("dcp-metadata")
    data = (
        b"\x80\x04ctorch.distributed.checkpoint.metadata\nMetadata\n"
        b"N}" + _str("__init__") + b"K\x01s\x86b."
    )
    with pytest.raises(Refused, match="sets attributes of the class"):
        load_pickle(data, allowed)


def test_value_only_entry_is_not_called() -> None:
    with pytest.raises(Refused, match="calls torch.FloatStorage"):
        load_pickle(b"\x80\x02ctorch\nFloatStorage\n)R.", allow_list("tensors"))


def test_legacy_and_torchscript_files_are_refused(tmp_path: Path) -> None:
    legacy = tmp_path / "rng_rank0.pt"
    torch.save({"cpu": torch.get_rng_state()}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(DistlabError, match="refused: rng_rank0.pt is not a torch.save zip"):
        check_torch_file(tmp_path, legacy)


# --- Property: nothing outside the allow-list is ever resolved ---------------------------

ALLOWED = allow_list("dcp-metadata")
PLAIN_TYPES = (type(None), bool, int, float, complex, str, bytes, bytearray)
CONTAINERS = (tuple, list, dict, set, frozenset)
ALLOWED_IDS = {id(e.obj) for e in ALLOWED.values()}
ALLOWED_TYPES = {e.obj for e in ALLOWED.values() if isinstance(e.obj, type)} | {torch.layout}
"""Types whose instances a load may construct: admitted classes (and the layout
_get_layout returns)."""

MODULES = sorted(
    {m for m, _ in ALLOWED}
    | {"os", "posix", "builtins", "io", "subprocess", "sys", "torch", "pickle", "collections"}
    | {"torch.serialization", "torch._utils", "pathlib", "shutil", "importlib"}
)
NAMES = sorted(
    {n for _, n in ALLOWED}
    | {"open", "system", "FileIO", "eval", "exec", "getattr", "__import__", "popen", "Popen"}
    | {"io.FileIO", "os.system", "OrderedDict.__class__", "serialization.os.system"}
    | {"Size.__class__", "Path.__init__.__globals__", "PosixPath.open", "_get_layout.__call__"}
    | {"Metadata.__class__", "load", "loads", "rmtree", "import_module"}
)
any_text = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=12)
global_names = st.tuples(
    st.one_of(st.sampled_from(MODULES), any_text),
    st.one_of(
        st.sampled_from(NAMES),
        st.lists(st.sampled_from(NAMES), min_size=2, max_size=3).map(".".join),
        any_text,
    ),
)


def global_pickle(module: str, name: str, stack: bool) -> bytes:
    if stack:
        return b"\x80\x04" + _str(module) + _str(name) + pickle.STACK_GLOBAL + b"."
    return b"\x80\x04c" + module.encode() + b"\n" + name.encode() + b"\n."


@settings(max_examples=400, deadline=None)
@given(pair=global_names, stack=st.booleans())
def test_only_allowed_pairs_resolve(pair: tuple[str, str], stack: bool) -> None:
    module, name = pair
    unpickler = SafeUnpickler(io.BytesIO(b""), ALLOWED)
    entry = ALLOWED.get((module, name))
    try:
        found = unpickler.find_class(module, name)
    except Refused:
        assert entry is None
    else:
        assert entry is not None and found is entry.obj
    if "\n" in module + name and not stack:
        return  # not expressible with GLOBAL
    try:
        loaded = load_pickle(global_pickle(module, name, stack), ALLOWED)
    except Exception:  # noqa: BLE001 - refused or malformed: either way nothing resolved
        assert entry is None
    else:
        assert entry is not None and loaded is entry.obj


def _only_allowed(obj, seen: set[int]) -> None:
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if id(obj) in ALLOWED_IDS or isinstance(obj, PLAIN_TYPES):
        return
    if type(obj) in CONTAINERS:
        items = obj.items() if isinstance(obj, dict) else obj
        for item in items:
            _only_allowed(item, seen)
        return
    assert type(obj) in ALLOWED_TYPES, f"constructed a {type(obj)}"
    for value in getattr(obj, "__dict__", {}).values():
        _only_allowed(value, seen)


FRAGMENTS = [
    b"(",
    b"t",
    b")",
    b"R",
    b"b",
    b"\x81",
    b"\x92",
    b"}",
    b"]",
    b"s",
    b"u",
    b"a",
    b"e",
    b"N",
    b"\x85",
    b"\x86",
    b"0",
    b"2",
    b"\x94",
    b"h\x00",
    b"K\x01",
    b"\x88",
    b"\x93",
    b".",
    *[b"c" + m.encode() + b"\n" + n.encode() + b"\n" for m, n in ALLOWED],
    *[_str(m) + _str(n) for m, n in ALLOWED],
    b"cbuiltins\nopen\n",
    b"cposix\nsystem\n",
    _str("torch.distributed.checkpoint.filesystem") + _str("io.FileIO"),
    _str("collections") + _str("OrderedDict.__class__"),
    _str("/tmp/x") + _str("w"),
    _str("float32"),
]


@settings(max_examples=400, deadline=None)
@given(
    body=st.one_of(
        st.lists(st.sampled_from(FRAGMENTS), max_size=25).map(b"".join),
        st.binary(max_size=64),
    )
)
def test_random_pickles_construct_only_allowed_objects(body: bytes) -> None:
    try:
        loaded = load_pickle(b"\x80\x04" + body + b".", ALLOWED)
    except Exception:  # noqa: BLE001 - refused or malformed
        return
    _only_allowed(loaded, set())


@pytest.mark.parametrize("group_torn_down", [False, True], ids=["checkpoint", "group"])
def test_a_load_that_loses_its_group_is_a_fault_not_a_bad_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, group_torn_down: bool
) -> None:
    """An elastic resize destroys the process group under ranks still loading: that load
    must fail as a fault (Ray restarts the ranks), not as a bad checkpoint (never retried)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    from distlab.checkpoint import state
    from distlab.model import build_model

    def failing_load(*args, **kwargs) -> None:
        if group_torn_down:
            dist.destroy_process_group()  # what Ray's teardown does from another thread
        raise ValueError("Default process group has not been initialized")

    monkeypatch.setattr(state, "verify_checkpoint_and_metadata", lambda directory: ({}, None))
    monkeypatch.setattr(dcp, "load", failing_load)
    model = build_model("tiny", 0)
    optimizer = torch.optim.AdamW(model.parameters())
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        expected = ValueError if group_torn_down else DistlabError
        with pytest.raises(expected) as error:
            load_dcp_state(tmp_path, model, optimizer)
        assert type(error.value) is expected
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
