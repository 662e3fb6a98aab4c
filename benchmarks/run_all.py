"""Run every ``benchmarks/bench_*.py`` in turn; ``make bench`` calls this.

Usage::

    python benchmarks/run_all.py [-k SUBSTRING] [OPTIONS FOR EVERY SCRIPT ...]

Each script runs in its own process with this interpreter, from the repository
root, so that JAX's compilation caches and thread pools do not leak from one
benchmark into the next. Options this runner does not know (for example
``--repeats 3``) are passed on to every script. The exit status is 1 when any
script failed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import BENCH_DIR, REPO  # noqa: E402


def discover(pattern: str = "") -> list[Path]:
    """The benchmark scripts in this folder whose file name contains ``pattern``, sorted."""
    return sorted(p for p in BENCH_DIR.glob("bench_*.py") if pattern in p.name)


def main(argv: list[str] | None = None) -> int:
    """Run the selected benchmarks; return 0 if all succeeded, else 1."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-k", dest="pattern", default="", help="only scripts whose name has this")
    args, extra = parser.parse_known_args(argv)
    scripts = discover(args.pattern)
    if not scripts:
        print(f"no benchmarks/bench_*.py matches {args.pattern!r}", file=sys.stderr)
        return 1
    outcomes = []
    for script in scripts:
        command = [sys.executable, str(script.relative_to(REPO)), *extra]
        print(f"==> {' '.join(command)}", flush=True)
        start = time.perf_counter()
        status = subprocess.run(command, cwd=REPO).returncode
        outcomes.append((script.name, status, time.perf_counter() - start))
    print("\nbenchmark                  status   seconds")
    for name, status, seconds in outcomes:
        print(f"{name:26s} {'ok' if status == 0 else f'FAILED ({status})':8s} {seconds:8.1f}")
    return 0 if all(status == 0 for _, status, _ in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
