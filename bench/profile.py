"""Summarise py-spy raw (collapsed-stack) profiles: where the worker processes spend time.

    python -m bench.profile FILE [FILE ...] [--top 25] [--focus process_target]

Prints the functions with the most inclusive samples (a function counted once per stack),
optionally only within stacks that pass through ``--focus``. Idle samples (py-spy records
only active threads unless --idle) are not in the file.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def _short(frame: str) -> str:
    match = _FRAME.match(frame)
    if match is None:
        return frame
    path = match.group("file")
    for marker in ("site-packages/", "/work/main/", "python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{match.group('func')} ({path})"


def stacks(lines: Iterable[str]) -> Iterable[tuple[list[str], int]]:
    """Parse ``frame;frame;... count`` lines into (frames, samples)."""
    for line in lines:
        line = line.rstrip("\n")
        if not line:
            continue
        stack, _, count = line.rpartition(" ")
        yield [_short(frame) for frame in stack.split(";")], int(count)


def summarise(paths: list[Path], focus: str | None) -> tuple[Counter[str], int]:
    """Inclusive samples per function (within ``focus`` stacks when given) and the total."""
    inclusive: Counter[str] = Counter()
    total = 0
    for path in paths:
        for frames, count in stacks(path.read_text().splitlines()):
            if focus is not None:
                at = next((i for i, f in enumerate(frames) if focus in f), None)
                if at is None:
                    continue
                frames = frames[at:]
            total += count
            for frame in set(frames):
                inclusive[frame] += count
    return inclusive, total


def main(argv: list[str] | None = None) -> int:
    """Print the top functions by inclusive share."""
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("files", type=Path, nargs="+")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--focus", help="only stacks through a frame containing this text")
    args = parser.parse_args(argv)
    inclusive, total = summarise(args.files, args.focus)
    if not total:
        print("no samples", file=sys.stderr)
        return 1
    print(f"{total} samples" + (f" through {args.focus!r}" if args.focus else ""))
    for frame, count in inclusive.most_common(args.top):
        print(f"{100 * count / total:6.1f}%  {frame}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
