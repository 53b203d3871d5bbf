"""A rank's memory does not grow with the corpus: 200 MB against 2 GB of text.

    python benchmarks/corpus_memory.py                    # 200 MB and 2 GB, 5 steps each
    python benchmarks/corpus_memory.py --sizes-mb 100,1000 --workdir /tmp/corpora

Writes each corpus (files of 10 MB of random words, deterministic from the seed) unless
the work dir has it, then trains the tiny model for a few steps on it (``single``,
``--launcher local``) while this script samples the rank's peak resident memory
(``VmHWM`` of ``/proc/PID/status``, the kernel's high-water mark, independent of
distlab's own memory tracking, which counts tensors). The launcher's peak while it
tokenises (its ``ru_maxrss``) is printed too: tokenising holds the corpus in memory,
training does not (the ranks memory-map the token file).
"""

from __future__ import annotations

import argparse
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

FILE_MB = 10
WORDS = (
    "the of and to in is that for it as with was on be by this are from at or an which "
    "have not but all were when we there can their one has more if will each about how "
    "gradient shard rank batch tensor pipeline stage replica optimizer memory"
).split()


def write_corpus(folder: Path, megabytes: int, seed: int = 0) -> Path:
    """``megabytes`` of random words in files of ``FILE_MB`` MB (kept if already there)."""
    done = folder / ".complete"
    if done.exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    vocabulary = np.array([w + " " for w in WORDS])
    for index in range(megabytes // FILE_MB):
        words = rng.choice(vocabulary, size=FILE_MB * 2**20 // 5)  # ~5 bytes a word
        (folder / f"part{index:05d}.txt").write_text("".join(words))
    done.touch()
    return folder


def peak_rss_of_rank(run_dir: Path, process: subprocess.Popen) -> int:
    """Poll rank 0's ``VmHWM`` until the run ends; the largest value seen, in bytes."""
    pid_file, peak = run_dir / "logs" / "rank0.pid", 0
    while process.poll() is None:
        try:
            status = Path(f"/proc/{int(pid_file.read_text())}/status").read_text()
            line = next(x for x in status.splitlines() if x.startswith("VmHWM:"))
            peak = max(peak, int(line.split()[1]) * 1024)
        except (OSError, ValueError, StopIteration):
            pass
        time.sleep(0.1)
    return peak


def train(corpus: Path, run_dir: Path, steps: int) -> tuple[int, float]:
    """Train on ``corpus``; rank 0's peak RSS (bytes) and the launch's wall time (s)."""
    command = [
        sys.executable, "-m", "distlab.launch", "--launcher", "local", "--strategy", "single",
        "--model", "tiny", "--steps", str(steps), "--data", str(corpus), "--no-wandb",
        "--quiet", "--no-pictures", "--no-final-checkpoint", "--track-memory", "off",
        "--run-dir", str(run_dir),
    ]  # fmt: skip
    shutil.rmtree(run_dir, ignore_errors=True)  # a run measured again starts afresh
    started = time.time()
    process = subprocess.Popen(command)
    peak: list[int] = []
    watcher = threading.Thread(target=lambda: peak.append(peak_rss_of_rank(run_dir, process)))
    watcher.start()
    if process.wait() != 0:
        raise SystemExit(f"training on {corpus} failed")
    watcher.join()
    return peak[0], time.time() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mb", default="200,2000", help="comma-separated corpus sizes")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--workdir", help="keep the corpora here (default: a temporary dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="distlab-corpora-") as tmp:
        root = Path(args.workdir or tmp)
        print("| corpus | text | rank 0 peak RSS | launch wall time |")
        print("|---:|---:|---:|---:|")
        for megabytes in map(int, args.sizes_mb.split(",")):
            corpus = write_corpus(root / f"corpus-{megabytes}mb", megabytes)
            peak, wall = train(corpus, root / f"run-{megabytes}mb", args.steps)
            tokens = sum(p.stat().st_size for p in corpus.glob("*.txt"))
            print(
                f"| {megabytes:,} MB | {tokens / 2**20:,.0f} MiB | {peak / 2**20:,.0f} MiB | "
                f"{wall:.0f} s |",
                flush=True,
            )
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    print(f"\nlargest launcher (tokenising) peak RSS: {children / 2**20:,.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
