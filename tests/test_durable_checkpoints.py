"""Durable checkpoint commits: the fsync order of the protocol, and a crash-point harness.

The harness kills a run at each stage of a checkpoint save (``--inject-fault
RANK@STEP:STAGE``) with no restarts left, then checks what a crash there leaves
on disk: no torn ``step_*`` dir, the newest committed checkpoint verifies, and
``--resume`` from the dead run finishes with the losses of an uninterrupted run.
The same fault with one restart allowed must recover by itself and leave no
``.tmp-*``/``.trash-*`` dir. Losses after a restart at the same strategy and
world size equal the uninterrupted run's within 1e-6 (observed: bitwise).

A killed process is not an OS crash: what only fsync protects against (data
still in the page cache when the power goes) is checked by the ordering test,
which records every fsync, rename and removal of a save.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from tests.helpers import TINY_LOCAL_RUN, run_losses, run_main

from distlab.checkpoint.layout import (
    checkpoint_step,
    complete_checkpoints,
    remove_partial_checkpoints,
)
from distlab.checkpoint.save import save_checkpoint
from distlab.checkpoint.verify import verify_checkpoint
from distlab.distributed import RankContext
from distlab.errors import DistlabError
from distlab.strategies.resolve import load_config

pytestmark = pytest.mark.slow  # the whole file: runs crashed at every point of a save

RESTART_ATOL = 1e-6
STEPS = 8
RUN = [
    *TINY_LOCAL_RUN,
    "--steps",
    str(STEPS),
    "--checkpoint-every",
    "2",
    "--keep-checkpoints",
    "2",
    "--track-memory",
    "off",  # no test here reads memory; a tracked step costs ~0.4 s
]


def launch(*args: str) -> object:
    return run_main("distlab.launch", *args)


def assert_same_losses(reference: Path, run_dir: Path) -> None:
    ref, got = run_losses(reference), run_losses(run_dir)
    assert len(got) == len(ref) == STEPS
    assert max(abs(a - b) for a, b in zip(ref, got, strict=True)) <= RESTART_ATOL


def leftovers(run_dir: Path) -> list[str]:
    root = run_dir / "checkpoints"
    return sorted(p.name for p in root.iterdir() if p.name.startswith((".tmp-", ".trash-")))


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory):
    """Uninterrupted runs of RUN, each made once on first use: ``reference("ddp", 2)``."""
    root = tmp_path_factory.mktemp("reference")
    made: dict[tuple[str, int], Path] = {}

    def get(strategy: str, nproc: int) -> Path:
        if (strategy, nproc) not in made:
            run_dir = root / f"{strategy}-n{nproc}"
            # read for its losses alone: it writes no checkpoint
            result = launch(*RUN, "--checkpoint-every", "0", "--no-final-checkpoint",
                            "--strategy", strategy, "--nproc", str(nproc), "--run-dir",
                            str(run_dir))  # fmt: skip
            assert result.returncode == 0, result.stderr
            made[(strategy, nproc)] = run_dir
        return made[(strategy, nproc)]

    return get


# --- The crash-point harness ------------------------------------------------------------

# (strategy, nproc, fault, newest committed step after the crash, leftovers after the crash)
STAGES = [
    ("ddp", 2, "1@6:save", 4, [".tmp-step_000006"]),
    ("ddp", 2, "1@6:save-mid-shard", 4, [".tmp-step_000006"]),
    ("single", 1, "0@6:save-before-rename", 4, [".tmp-step_000006"]),
    ("single", 1, "0@6:save-after-rename", 6, []),
    ("single", 1, "0@6:save-rotation", 6, [".trash-step_000002"]),
    ("ddp", 2, "0@6:save-rotation", 6, [".trash-step_000002"]),
]


def stage_params():
    for strategy, nproc, fault, newest, left in STAGES:
        yield pytest.param(strategy, nproc, fault, newest, left, id=f"{strategy}-{fault}")


def assert_no_torn_checkpoint(run_dir: Path, nproc: int) -> list[Path]:
    """Every ``step_*`` dir is a whole committed checkpoint; return them, oldest first."""
    steps = sorted((run_dir / "checkpoints").glob("step_*"))
    for directory in steps:
        meta = verify_checkpoint(directory)  # raises on a torn checkpoint
        assert meta["world_size"] == nproc
        for rank in range(nproc):
            rng = torch.load(directory / f"rng_rank{rank}.pt", weights_only=True)
            assert isinstance(rng["cpu"], torch.Tensor)
    assert steps == complete_checkpoints(run_dir)
    return steps


@pytest.mark.parametrize(("strategy", "nproc", "fault", "newest", "left"), list(stage_params()))
def test_crash_point_leaves_a_resumable_run(
    tmp_path: Path, reference, strategy: str, nproc: int, fault: str, newest: int, left: list
) -> None:
    dead = tmp_path / "dead"
    args = [*RUN, "--strategy", strategy, "--nproc", str(nproc), "--inject-fault", fault]
    result = launch(*args, "--max-failures", "0", "--run-dir", str(dead))
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert f"--inject-fault {fault}" in result.stdout, result.stdout

    steps = assert_no_torn_checkpoint(dead, nproc)
    assert checkpoint_step(steps[-1]) == newest
    assert leftovers(dead) == left
    staging = dead / "checkpoints" / ".tmp-step_000006"
    if fault.endswith(":save-mid-shard"):  # rank 1's RNG file is half written
        whole = (steps[-1] / "rng_rank1.pt").stat().st_size
        assert (staging / "rng_rank1.pt").stat().st_size == whole // 2
    if fault.endswith(":save-before-rename"):  # all written, meta.json too
        assert json.loads((staging / "meta.json").read_text())["next_step"] == 6

    resumed = tmp_path / "resumed"
    result = launch("--resume", str(dead), "--run-dir", str(resumed))
    assert result.returncode == 0, result.stderr
    assert_same_losses(reference(strategy, nproc), resumed)

    recovered = tmp_path / "recovered"
    result = launch(*args, "--max-failures", "1", "--run-dir", str(recovered))
    assert result.returncode == 0, result.stderr
    assert_same_losses(reference(strategy, nproc), recovered)
    assert leftovers(recovered) == []
    assert [p.name for p in assert_no_torn_checkpoint(recovered, nproc)] == [
        "step_000006",
        "step_000008",
    ]


def test_raise_fault_is_retried_like_a_crash(tmp_path: Path, reference) -> None:
    run_dir = tmp_path / "run"
    result = launch(*RUN, "--strategy", "ddp", "--nproc", "2", "--inject-fault", "1@5:raise",
                    "--max-failures", "1", "--run-dir", str(run_dir))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert_same_losses(reference("ddp", 2), run_dir)
    fault_lines = [line for line in result.stdout.splitlines() if "distlab: fault" in line]
    assert len(fault_lines) == 1, result.stdout
    assert "InjectedFault" in fault_lines[0] and "--inject-fault 1@5:raise" in fault_lines[0]
    assert (run_dir / "faults" / "1@5-raise").is_file()
    assert "InjectedFault" in (run_dir / "logs" / "rank1.traceback").read_text()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["restarts"] == 1 and summary["lost_steps"] == 1


# --- The protocol's order, in one process ---------------------------------------------


class FakeTrainStep:
    """Writes what a strategy might: a DCP-like file and a DeepSpeed-like subdirectory."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload

    def save_checkpoint(self, directory: Path) -> None:
        (directory / "__0_0.distcp").write_bytes(self.payload)
        (directory / "global_step").mkdir()
        (directory / "global_step" / "optim_states.pt").write_bytes(self.payload)


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Every fsync (by path), rename and rmtree, in order."""
    log: list[tuple[str, str]] = []
    real_fsync, real_rename, real_rmtree = os.fsync, os.rename, shutil.rmtree

    def fsync(fd: int) -> None:
        log.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def rename(source, target) -> None:
        log.append(("rename", f"{os.fspath(source)} -> {os.fspath(target)}"))
        real_rename(source, target)

    def rmtree(path, *args, **kwargs) -> None:
        log.append(("rmtree", os.fspath(path)))
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(os, "replace", lambda *a: pytest.fail("save must not use os.replace"))
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    return log


def save(ctx: RankContext, run_dir: Path, step: int, payload: bytes, keep: int = 1) -> Path:
    meta = {"strategy": "single", "nproc": 1, "model": "tiny", "seed": 0, "steps": 8}
    return save_checkpoint(FakeTrainStep(payload), run_dir, step, ctx, meta, keep)


def index(log: list[tuple[str, str]], op: str, path: Path | str) -> int:
    """Position of the last ``(op, path)`` in the log."""
    matches = [i for i, entry in enumerate(log) if entry == (op, str(path))]
    assert matches, f"no {op} of {path} in {log}"
    return matches[-1]


def test_save_fsyncs_before_rename_and_rotates_after(
    tmp_path: Path, one_rank: RankContext, recorded: list
) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    root = run_dir / "checkpoints"
    save(one_rank, run_dir, 2, b"two")
    # checkpoints/ was new: it is fsync'ed in the run dir
    assert ("fsync", str(run_dir)) in recorded
    recorded.clear()

    final = save(one_rank, run_dir, 4, b"four")
    staging = root / ".tmp-step_000004"
    trash = root / ".trash-step_000002"
    rename = index(recorded, "rename", f"{staging} -> {final}")
    files = ["__0_0.distcp", "global_step/optim_states.pt", "rng_rank0.pt", "meta.json"]
    for name in files:
        assert index(recorded, "fsync", staging / name) < rename, name
    subdir = index(recorded, "fsync", staging / "global_step")
    assert index(recorded, "fsync", staging / "global_step" / "optim_states.pt") < subdir
    # the staging dir last (after meta.json is in it), then the rename, then the parent
    staging_synced = index(recorded, "fsync", staging)
    assert index(recorded, "fsync", staging / "meta.json") < staging_synced < rename
    parent_synced = min(
        i for i, e in enumerate(recorded) if e == ("fsync", str(root)) and i > rename
    )
    # rotation only after the commit is durable: move to trash, fsync, then delete
    to_trash = index(recorded, "rename", f"{root / 'step_000002'} -> {trash}")
    assert parent_synced < to_trash
    trash_synced = min(
        i for i, e in enumerate(recorded) if e == ("fsync", str(root)) and i > to_trash
    )
    assert trash_synced < index(recorded, "rmtree", trash)
    assert sorted(p.name for p in root.iterdir()) == ["step_000004"]
    assert (final / "__0_0.distcp").read_bytes() == b"four"


def test_committed_checkpoint_of_the_same_step_is_kept(
    tmp_path: Path, one_rank: RankContext, recorded: list
) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    first = save(one_rank, run_dir, 4, b"first", keep=2)
    saved_at = json.loads((first / "meta.json").read_text())["saved_at"]
    recorded.clear()
    again = save(one_rank, run_dir, 4, b"second", keep=2)
    assert again == first
    assert (first / "__0_0.distcp").read_bytes() == b"first"
    assert json.loads((first / "meta.json").read_text())["saved_at"] == saved_at
    assert not any(op == "rmtree" and path == str(first) for op, path in recorded)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_000004"]


def test_next_start_removes_staging_and_trash(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    for name in (".tmp-step_000006", ".trash-step_000002", "step_000004"):
        (root / name).mkdir(parents=True)
        (root / name / "x").write_text("x")
    remove_partial_checkpoints(tmp_path)
    assert [p.name for p in root.iterdir()] == ["step_000004"]


# --- Fault specs ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("0@6:boom", "must look like RANK@STEP"),
        ("1@6:save-before-rename", "only rank 0 passes stage save-before-rename"),
        ("1@6:save-rotation", "only rank 0"),
        ("0@4:save-rotation", "removes no old checkpoint"),
        ("0@5:save-mid-shard", "no checkpoint is saved after step 5"),
        ("1@8:raise", "the run has only 8 steps"),
    ],
)
def test_bad_stage_specs(spec: str, fragment: str) -> None:
    overrides = {"strategy": "ddp", "nproc": 2, "steps": 8, "checkpoint_every": 2}
    with pytest.raises(DistlabError, match=fragment):
        load_config(None, {**overrides, "inject_fault": spec})


def test_stage_specs_parse() -> None:
    overrides = {"strategy": "ddp", "nproc": 2, "steps": 8, "checkpoint_every": 2}
    specs = "1@6:save-mid-shard,0@6:save-before-rename,0@6:save-after-rename,0@6:save-rotation"
    config = load_config(None, {**overrides, "inject_fault": f"{specs},1@3:raise,1@2:save"})
    from distlab.fault_spec import fault_specs

    names = [spec.name for spec in fault_specs(config)]
    assert names == [*specs.split(","), "1@3:raise", "1@2:save"]
