"""``benchmarks/suite_cpu.py`` charges sampled CPU to the test its worker was running."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest
from tests.helpers import ROOT


@pytest.fixture
def suite_cpu(monkeypatch: pytest.MonkeyPatch):
    # as ``python benchmarks/suite_cpu.py`` sees it: the scripts' directory on the path
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    return importlib.import_module("suite_cpu")


def write_report_log(path: Path, phases: list[tuple[str | None, float, float, str]]) -> Path:
    lines = [
        {"$report_type": "TestReport", "worker_id": w, "start": a, "stop": b, "nodeid": n}
        for w, a, b, n in phases
    ]
    path.write_text("\n".join(json.dumps(line) for line in lines))
    return path


def process(command: str, worker: str | None, seconds: list[list[float]], comm: str = "python3"):
    return {"command": command, "comm": comm, "worker": worker, "seconds": seconds}


def test_each_second_goes_to_its_workers_test(suite_cpu, tmp_path: Path) -> None:
    log = write_report_log(
        tmp_path / "log.jsonl",
        [
            ("gw0", 100.0, 110.0, "tests/test_a.py::test_one"),
            ("gw0", 110.0, 120.0, "tests/test_a.py::test_two"),
            ("gw1", 100.0, 120.0, "tests/test_b.py::test_three"),
        ],
    )
    rank = "python3 -c from multiprocessing.forkserver import main; main(3, 5)"
    processes = [
        # a long-lived rank server of gw0: each second to the gw0 test running then
        process(rank, "gw0", [[105.0, 1.0], [115.0, 2.0]]),
        # Ray's daemon, started outside any worker: shared by the tests running then
        process("/ray/core/src/ray/raylet/raylet", None, [[105.0, 3.0]], comm="raylet"),
        # gw1's test process, a second after its test ended: still that test's
        process("python3 -c import sys;exec(eval(sys.stdin.readline()))", "gw1", [[120.5, 1.0]]),
        process("cc1plus -O3 x.cpp", "gw1", [[200.0, 4.0]], comm="cc1plus"),  # between tests
    ]
    by_test, by_kind = suite_cpu.charge(processes, suite_cpu.tests_by_worker(log), every_s=1.0)
    assert by_test == {
        "tests/test_a.py::test_one": 1.0 + 1.5,
        "tests/test_a.py::test_two": 2.0,
        "tests/test_b.py::test_three": 1.5 + 1.0,
        "(between tests)": 4.0,
    }
    assert by_kind["rank server and ranks", "tests/test_a.py"] == 3.0
    assert by_kind["Ray", "tests/test_a.py"] == by_kind["Ray", "tests/test_b.py"] == 1.5
    assert by_kind["test process", "tests/test_b.py"] == 1.0
    assert by_kind["compiler", "(between tests)"] == 4.0


@pytest.mark.slow
def test_sample_sees_a_commands_cpu_and_worker(
    suite_cpu, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A command that spends 1.2 s of CPU, started by worker 'gw7', is seen as that."""
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw7")  # what the command inherits
    out = tmp_path / "cpu.json"
    # then idle a second: a process's CPU in its last sample interval is not seen
    burn = "import time\nwhile time.process_time() < 1.2: pass\ntime.sleep(1)"
    assert suite_cpu.sample(out, [sys.executable, "-c", burn], every_s=0.2) == 0
    record = json.loads(out.read_text())
    assert record["every_s"] == 0.2
    mine = [p for p in record["processes"] if p["worker"] == "gw7"]
    # /proc counts whole clock ticks, a few of them off the process's own clock
    assert len(mine) == 1 and 1.15 <= sum(s for _, s in mine[0]["seconds"]) <= 1.3
    assert 0 < record["machine_cores_busy"] <= 1
