#!/usr/bin/env python3
"""Summarise a py-spy `--format raw` profile (collapsed stacks): top functions by
inclusive and by self samples, as a share of all samples.

    .venv/bin/py-spy record -r 500 -f raw -o prof.raw -- .venv/bin/python bench/X.py ...
    .venv/bin/python bench/pyspy_top.py prof.raw [--top 25] [--filter patchd/]
        [--under FUNCTION]

py-spy records only threads that are running (not idle) unless given --idle, so the
shares are of CPU-busy samples. --filter keeps only frames whose file contains the
string in the inclusive list (the self list always shows every frame); --under keeps
only stacks passing through a frame whose text contains FUNCTION.
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
from pathlib import Path

REPO = str(Path(__file__).resolve().parents[1]) + "/"
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def short(frame: str) -> str:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    path = m.group("file")
    for marker in ("site-packages/", "/lib/python3", REPO):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{path}:{m.group('func')}"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("raw")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--filter", default="")
    parser.add_argument("--under", default="")
    args = parser.parse_args()
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    with open(args.raw) as fh:
        for line in fh:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack:
                continue
            n = int(count)
            frames = [f for f in stack.split(";") if f]
            if frames and frames[0].startswith("process "):
                frames = frames[1:]
            if frames and frames[0].startswith("thread "):
                frames = frames[1:]
            if args.under and not any(args.under in f for f in frames):
                continue
            total += n
            names = [short(f) for f in frames]
            for name in set(names):
                inclusive[name] += n
            if names:
                own[names[-1]] += n
    if not total:
        print("no samples", file=sys.stderr)
        return 1
    print(f"{total} samples")
    print("inclusive (share of samples with the function on the stack):")
    shown = 0
    for name, n in inclusive.most_common():
        if args.filter and args.filter not in name:
            continue
        print(f"  {100 * n / total:5.1f}%  {name}")
        shown += 1
        if shown >= args.top:
            break
    print("self (share of samples with the function on top):")
    for name, n in own.most_common(args.top):
        print(f"  {100 * n / total:5.1f}%  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
