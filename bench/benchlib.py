"""What the benchmark scripts share: the test bed, extra simulators, small helpers.

The test bed is `tests/lab/lab.sh` with its own directory: `$PATCHD_BENCH_LAB_DIR`, else
`$PATCHD_LAB_DIR`, else /tmp/patchd-lab-bench (never the tests' default /tmp/patchd-lab).
A script that finds that bed up uses it and leaves it up; one that had to start it stops
it again at the end (`lab.sh down`), unless `--keep-lab` or PATCHD_BENCH_KEEP_LAB=1.
"""

from __future__ import annotations

import contextlib
import os
import select
import shlex
import signal
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
LAB_SH = REPO / "tests" / "lab" / "lab.sh"
VENV_PY = REPO / ".venv" / "bin" / "python"
PATCHD = REPO / ".venv" / "bin" / "patchd"
DEFAULT_LAB_DIR = "/tmp/patchd-lab-bench"


def say(*parts: object) -> None:
    print(*parts, flush=True)


def note(*parts: object) -> None:
    """Progress, on stderr so that stdout holds only the figures."""
    print(*parts, file=sys.stderr, flush=True)


def lab_dir() -> Path:
    chosen = os.environ.get("PATCHD_BENCH_LAB_DIR") or os.environ.get("PATCHD_LAB_DIR")
    return Path(chosen or DEFAULT_LAB_DIR).absolute()


def _lab(command: str, directory: Path, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PATCHD_LAB_DIR=str(directory))
    if VENV_PY.exists():
        env.setdefault("PATCHD_LAB_PYTHON", str(VENV_PY))
    return subprocess.run(
        ["bash", str(LAB_SH), command],
        env=env,
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )


def read_env(path: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        words = shlex.split(line, comments=True)
        if words and words[0] == "export":
            words = words[1:]
        for word in words:
            key, sep, value = word.partition("=")
            if sep:
                values[key] = value
    return values


@contextlib.contextmanager
def lab(keep: bool = False) -> Iterator[dict[str, str]]:
    """The test bed's lab.env values; starts the bed if it does not answer."""
    directory = lab_dir()
    env_file = directory / "lab.env"
    started = False
    if not (env_file.is_file() and _lab("status", directory, 60).returncode == 0):
        note(f"bench: starting the test bed in {directory} (tests/lab/lab.sh up)")
        t0 = time.monotonic()
        proc = _lab("up", directory)
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout)
            _lab("down", directory, 120)
            raise SystemExit(f"bench: lab.sh up failed (exit {proc.returncode})")
        started = True
        note(f"bench: test bed up in {time.monotonic() - t0:.1f} s")
    try:
        yield read_env(env_file)
    finally:
        keep = keep or os.environ.get("PATCHD_BENCH_KEEP_LAB", "") not in ("", "0")
        if started and not keep:
            proc = _lab("down", directory, 180)
            note(f"bench: test bed down (lab.sh down exited {proc.returncode})")


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
    (workdir / "tmp").mkdir()
    t0 = time.monotonic()
    with (workdir / "vcsim.log").open("wb") as err:
        proc = subprocess.Popen(
            [binary, "-listen", "127.0.0.1:0", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=err,
            env=dict(os.environ, TMPDIR=str(workdir / "tmp")),
        )
    assert proc.stdout is not None
    line = b""
    try:
        deadline = time.monotonic() + timeout
        while not line.endswith(b"\n"):
            left = max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([proc.stdout], [], [], left)
            if not ready:
                raise SystemExit(f"bench: vcsim {args} printed no URL in {timeout:g} s")
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                log = (workdir / "vcsim.log").read_text()[-2000:]
                raise SystemExit(f"bench: vcsim {args} exited {proc.wait()}:\n{log}")
            line += chunk
        url = urlsplit(line.decode().strip())
        assert url.hostname and url.port, line
        sim = Vcsim(proc, url.hostname, url.port, workdir, time.monotonic() - t0)
        yield sim
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        proc.stdout.close()
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
