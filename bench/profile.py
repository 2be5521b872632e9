"""Summarizes a py-spy raw (collapsed stacks) profile: where a server process spends its time.

    .venv/bin/py-spy record -p <server pid> -d 10 -r 200 -f raw -o export.raw --nonblocking
    .venv/bin/python -m bench.profile export.raw

Prints the functions with the most samples on top of the stack (self) and anywhere in it
(inclusive), with paths shortened to package/file.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

#: A frame's file: the last folder and the file name. The prefix is lazy, and optional
#: lazily, so the last folder is left to its group (a greedy prefix took every folder, and
#: the package was never printed).
_LOCATION = re.compile(r" \((?:.*?/)??(site-packages/)?([^/]+/)?([^/]+)\)$")


def _short(frame: str) -> str:
    return _LOCATION.sub(lambda m: f" ({m.group(2) or ''}{m.group(3)})", frame)


def summarize(lines: list[str]) -> tuple[int, Counter[str], Counter[str]]:
    """(total samples, self samples by frame, inclusive samples by frame)."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in lines:
        stack, _, count = line.rstrip().rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_short(f) for f in stack.split(";")]
        total += n
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    return total, own, inclusive


def main(argv: list[str] | None = None) -> int:
    """Prints the top frames of one raw profile."""
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("raw", type=Path)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    total, own, inclusive = summarize(args.raw.read_text().splitlines())
    print(f"{total} samples")
    for title, counter in (("self", own), ("inclusive", inclusive)):
        print(f"--- {title}")
        for frame, n in counter.most_common(args.top):
            print(f"{n / max(1, total) * 100:5.1f}%  {frame}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
