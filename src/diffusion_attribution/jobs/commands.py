"""Run the project's entry points (train.py, attribute.py, evaluate.py) as subprocesses, for the
reproduction pipelines in scripts/reproduce/: printed before they run, timed, optionally pinned to a
thread count, logged to a file, or skipped when their result already exists (a rerun resumes)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path


def run_project_command(
    args: list[str],
    root: Path,
    threads: int | None = None,
    log_file: Path | None = None,
    done: Path | None = None,
) -> float:
    """`python <args>` in `root` (the repository root, where the entry points are); returns its wall
    time in seconds (0 when skipped because `done` exists). With `log_file` the output goes there and a
    failure exits with its last lines."""
    if done is not None and done.exists():
        print(f"(reusing {done})", flush=True)
        return 0.0
    started = time.perf_counter()
    print("$ python", " ".join(args), flush=True)
    env = dict(os.environ)
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    if log_file is None:
        subprocess.run([sys.executable, *args], cwd=root, env=env, check=True)
        return time.perf_counter() - started
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "w") as handle:
        result = subprocess.run(
            [sys.executable, *args], cwd=root, env=env, stdout=handle, stderr=subprocess.STDOUT
        )
    if result.returncode != 0:
        tail = log_file.read_text().splitlines()[-25:]
        raise SystemExit(f"Failed ({result.returncode}): {' '.join(args)}\n" + "\n".join(tail))
    return time.perf_counter() - started
