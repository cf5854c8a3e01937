"""Start-up of the command line: ``robench --help`` and ``robench eval --help`` against an earlier revision.

Start-up is the imports, so each sample is a fresh interpreter; both trees are timed in
alternation in the same loop, so a busy machine slows them alike.

    python bench/bench_startup.py --against 6c6cfa9 --repeats 10
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
COMMANDS = (["--help"], ["eval", "--help"])


def checkout(revision: str, into: Path) -> Path:
    """The package of ``revision``, exported from git (no install needed: it runs from its folder)."""
    archive = subprocess.run(["git", "-C", str(HERE), "archive", revision, "robench"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def seconds(tree: Path, args: list[str]) -> float:
    code = f"import sys; sys.argv = ['robench', *{args!r}]; from robench.cli import main; main()"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], cwd=tree, check=False, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", default="6c6cfa9", help="git revision to compare with")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        old = checkout(args.against, Path(tmp))
        for command in COMMANDS:
            times: dict[str, list[float]] = {"now": [], args.against: []}
            for _ in range(args.repeats):
                times["now"].append(seconds(HERE, command))
                times[args.against].append(seconds(old, command))
            now, before = statistics.median(times["now"]), statistics.median(times[args.against])
            print(f"robench {' '.join(command):<12} median of {args.repeats}: {before:.2f} s at {args.against}, "
                  f"{now:.2f} s now ({before / now:.1f}x faster)")


if __name__ == "__main__":
    main()
