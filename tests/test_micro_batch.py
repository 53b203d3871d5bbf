"""``--micro-batch auto``: the search, the candidates, the cache, and the command end to end."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from tests.helpers import TINY_LOCAL_RUN, assert_one_line_error, run_main

from distlab.config_checks import parse_bytes
from distlab.errors import DistlabError
from distlab.launch.micro_batch import candidates, largest_fitting, wants_auto
from distlab.strategies.resolve import load_config


@given(
    st.lists(st.integers(1, 512), min_size=1, max_size=40, unique=True).map(sorted),
    st.integers(0, 600),
)
def test_largest_fitting_is_the_largest_size_under_the_limit(sizes: list[int], limit: int):
    probed: list[int] = []

    def fits(size: int) -> bool:
        probed.append(size)
        return size <= limit

    expected = max((s for s in sizes if s <= limit), default=None)
    assert largest_fitting(sizes, fits) == expected
    assert len(probed) <= math.ceil(math.log2(len(sizes) + 1))  # a binary search
    assert len(set(probed)) == len(probed)  # no size probed twice


def test_candidates_are_the_sizes_the_strategy_accepts():
    ddp = load_config(None, {"strategy": "ddp", "nproc": 2, "global_batch": 24})
    assert candidates(ddp) == [1, 2, 3, 4, 6, 12]
    # A pipeline of 2 stages needs at least 2 microbatches: the whole local batch is out.
    pp = load_config(None, {"strategy": "pp", "nproc": 2, "global_batch": 8, "model": "tiny"})
    assert candidates(pp) == [1, 2, 4]


def test_auto_is_the_default_only_on_a_gpu():
    cpu = load_config(None, {"device": "cpu"})
    assert not wants_auto(cpu)
    assert wants_auto(load_config(None, {"device": "cpu", "micro_batch": "auto"}))
    assert not wants_auto(load_config(None, {"device": "cpu", "micro_batch": 4}))


@pytest.mark.parametrize(
    ("text", "expected"),
    [("512MB", 512 * 10**6), ("20GiB", 20 * 2**30), ("1.5 kib", 1536), ("4096", 4096)],
)
def test_memory_budget_sizes(text: str, expected: int):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"memory_budget": "12XB"}, "is not a size"),
        ({"memory_budget": "0GiB"}, "is not a size"),
        ({"micro_batch": "big"}, "expects a number or auto"),
        (
            {"strategy": "pp", "nproc": 2, "micro_batch": "auto", "microbatches": 4},
            "give only one",
        ),
    ],
)
def test_bad_values_are_one_line_errors(overrides: dict, fragment: str):
    with pytest.raises(DistlabError, match=fragment):
        load_config(None, overrides)


@pytest.mark.slow
def test_auto_probes_once_then_reads_the_cache(tmp_path: Path, monkeypatch):
    """A CPU run with --micro-batch auto: probes, picks the whole local batch under a roomy
    budget, records it in the run's config; the second run reads the cache; a budget that
    nothing fits in is a one-line error that says what would make it fit."""
    monkeypatch.setenv("DISTLAB_CACHE", str(tmp_path / "cache"))
    flags = [
        *TINY_LOCAL_RUN, "--strategy", "ddp", "--nproc", "2", "--steps", "2",
        "--micro-batch", "auto", "--memory-budget", "16GiB",
    ]  # fmt: skip
    flags.remove("--quiet")
    first = run_main("distlab.launch", *flags, "--run-dir", str(tmp_path / "a"))
    assert first.returncode == 0, first.stderr
    assert "micro-batch auto: probing" in first.stdout
    assert "micro-batch auto: 4 (cached in" in first.stdout
    saved = yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())
    assert saved["micro_batch"] == 4

    second = run_main("distlab.launch", *flags, "--run-dir", str(tmp_path / "b"))
    assert second.returncode == 0, second.stderr
    assert "probing" not in second.stdout
    assert "micro-batch auto: 4 (cached for cpu" in second.stdout

    flags[flags.index("16GiB")] = "1MB"
    tight = run_main("distlab.launch", *flags, "--run-dir", str(tmp_path / "c"))
    assert_one_line_error(tight, "does not fit in 1.0 MiB per rank")
    assert "more ranks, a sharded strategy" in tight.stderr
    assert not (tmp_path / "c").exists()
