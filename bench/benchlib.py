"""What the benchmark scripts share: the test bed, extra simulators, small helpers.

The bed's start-up is tests/lab/bed.py, the tests' own.

The test bed is `tests/lab/lab.sh` with its own directory: `$PATCHD_BENCH_LAB_DIR`, else
`$PATCHD_LAB_DIR`, else /tmp/patchd-lab-bench (never the tests' default /tmp/patchd-lab).
A script that finds that bed up uses it and leaves it up; one that had to start it stops
it again at the end (`lab.sh down`), unless `--keep-lab` or PATCHD_BENCH_KEEP_LAB=1.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.lab import bed  # noqa: E402  (the bed's start-up, shared with the tests)

VENV_PY = REPO / ".venv" / "bin" / "python"
PATCHD = REPO / ".venv" / "bin" / "patchd"
DEFAULT_LAB_DIR = "/tmp/patchd-lab-bench"


def say(*parts: object) -> None:
    print(*parts, flush=True)


def note(*parts: object) -> None:
    """Progress, on stderr so that stdout holds only the figures."""
    print(*parts, file=sys.stderr, flush=True)


def lab_dir() -> Path:
    return bed.lab_dir("PATCHD_BENCH_LAB_DIR", "PATCHD_LAB_DIR", default=DEFAULT_LAB_DIR)


@contextlib.contextmanager
def lab(keep: bool = False) -> Iterator[dict[str, str]]:
    """The test bed's lab.env values; starts the bed if it does not answer."""
    keep = keep or os.environ.get("PATCHD_BENCH_KEEP_LAB", "") not in ("", "0")
    try:
        with bed.running(lab_dir(), keep=keep, note=lambda text: note(f"bench: {text}")) as env:
            yield env
    except bed.BedError as e:
        raise SystemExit(f"bench: {e}") from None


@dataclass
class Vcsim:
    proc: subprocess.Popen[bytes]
    host: str
    port: int
    workdir: Path
    started_in: float

    def rss_mb(self) -> float:
        return status_kb(self.proc.pid, "VmRSS") / 1024


@contextlib.contextmanager
def vcsim(binary: str, *args: str, timeout: float = 300) -> Iterator[Vcsim]:
    """A vcsim of our own (`binary -listen 127.0.0.1:0 ARGS`), stopped at the end."""
    workdir = Path(tempfile.mkdtemp(prefix="patchd-bench-vcsim-"))
    t0 = time.monotonic()
    try:
        try:
            proc, url = bed.start_vcsim(binary, *args, workdir=workdir, timeout=timeout)
        except bed.BedError as e:
            raise SystemExit(f"bench: {e}") from None
        parts = urlsplit(url)
        assert parts.hostname and parts.port, url
        try:
            yield Vcsim(proc, parts.hostname, parts.port, workdir, time.monotonic() - t0)
        finally:
            bed.stop_vcsim(proc, 30)
    finally:
        subprocess.run(["rm", "-rf", "--one-file-system", str(workdir)], check=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def status_kb(pid: int, key: str) -> int:
    """A `kB` field of /proc/PID/status (VmRSS, VmHWM, ...)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def ratio_line(name: str, ratio: float, target: str | None, ok: bool, detail: str) -> str:
    """`NAME = 1.234x (target <= 1.3x: met)  DETAIL`: the figure first, raw numbers after."""
    verdict = "no target, reported" if target is None else f"target {target}: "
    if target is not None:
        verdict += "met" if ok else "MISSED"
    return f"{name} = {ratio:.3f}x ({verdict})  {detail}"
