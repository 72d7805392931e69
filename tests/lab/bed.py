"""The test bed's start-up, shared by the tests (tests/integration/conftest.py) and the
benchmarks (bench/benchlib.py): its directory and lab.env, `lab.sh up` when `lab.sh
status` says it does not answer, `lab.sh down` at the end only when this process started
it, and extra simulators started from its vcsim binary.

Needs nothing but the standard library: the benchmarks import it before anything else.
"""

from __future__ import annotations

import contextlib
import os
import select
import shlex
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

REPO_ROOT = Path(__file__).resolve().parents[2]
LAB_SH = REPO_ROOT / "tests" / "lab" / "lab.sh"
UP_TIMEOUT = 900  # a fresh machine installs the Debian packages and builds vcsim first
DOWN_TIMEOUT = 180
STATUS_TIMEOUT = 60


class BedError(Exception):
    """The bed cannot start, does not answer or cannot stop; the message says why."""


def lab_dir(*variables: str, default: str) -> Path:
    """The bed's directory: the first of `variables` set in the environment, else
    `default`."""
    chosen = next((os.environ[v] for v in variables if os.environ.get(v)), default)
    return Path(chosen).absolute()


def read_env(path: Path) -> dict[str, str]:
    """The values of a lab.env file (`export KEY='value'` lines)."""
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


def tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def lab_sh(*args: str, directory: Path, timeout: float) -> tuple[int, str]:
    """`lab.sh ARGS` for the bed in `directory`: its exit code and output (-1 when it
    ran out of `timeout`)."""
    env = dict(os.environ, PATCHD_LAB_DIR=str(directory))
    venv_python = REPO_ROOT / ".venv" / "bin" / "python"
    if venv_python.exists():
        env.setdefault("PATCHD_LAB_PYTHON", str(venv_python))
    try:
        done = subprocess.run(
            ["bash", str(LAB_SH), *args],
            env=env,
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as e:
        out = e.output if isinstance(e.output, str) else (e.output or b"").decode(errors="replace")
        return -1, f"{out}\n(lab.sh {' '.join(args)} timed out after {timeout:g}s)"
    return done.returncode, done.stdout


@contextlib.contextmanager
def running(
    directory: Path, keep: bool = False, note: Callable[[str], None] = lambda _: None
) -> Iterator[dict[str, str]]:
    """The lab.env values of the bed in `directory`, started first when it does not
    answer. A bed this call started is stopped at the end unless `keep`; one that was
    up already, even in part, is left running. Raises BedError."""
    env_file = directory / "lab.env"
    reason = f"{env_file} missing"
    # Services that answer already belong to someone else's bed in this directory (a
    # make target, another session): `lab.sh up` reuses them, and `lab.sh down` would
    # stop them under their owner. Such a bed is completed here, never taken down.
    others: list[str] = []
    if env_file.is_file():
        rc, out = lab_sh("status", directory=directory, timeout=STATUS_TIMEOUT)
        reason = "" if rc == 0 else f"lab.sh status: {tail(out, 5)}"
        others = [f[0] for f in (line.split() for line in out.splitlines()) if f[1:2] == ["up"]]
    started = bool(reason)
    if started:
        note(f"starting the test bed in {directory} (tests/lab/lab.sh up): {reason}")
        t0 = time.monotonic()
        rc, out = lab_sh("up", directory=directory, timeout=UP_TIMEOUT)
        if rc != 0:
            if not others:
                lab_sh("down", directory=directory, timeout=DOWN_TIMEOUT)
            raise BedError(
                f"test bed could not start ({reason}): `{LAB_SH} up` exited {rc} after "
                f"{time.monotonic() - t0:.0f}s; its output ends with:\n{tail(out)}"
            )
        note(f"test bed up in {time.monotonic() - t0:.1f} s")
    try:
        values = read_env(env_file)
    except OSError as e:
        raise BedError(f"{env_file} unreadable: {e}") from None
    yield values
    if started and others and not keep:
        note(f"test bed left running: {', '.join(others)} answered before this run started it")
    elif started and not keep:
        rc, out = lab_sh("down", directory=directory, timeout=DOWN_TIMEOUT)
        note(f"test bed down (lab.sh down exited {rc})")
        if rc != 0:
            raise BedError(f"`{LAB_SH} down` exited {rc}:\n{tail(out)}")


def start_vcsim(
    binary: str | Path, *args: str, workdir: Path, listen: str = "127.0.0.1:0", timeout: float
) -> tuple[subprocess.Popen[bytes], str]:
    """Start `binary -listen LISTEN ARGS` (its stderr in workdir/vcsim.log, TMPDIR
    workdir/tmp) and read the URL it prints: (process, url). Raises BedError, the
    process killed, when it prints none within `timeout` or exits."""
    log = workdir / "vcsim.log"
    (workdir / "tmp").mkdir(parents=True, exist_ok=True)
    with log.open("wb") as err:
        proc = subprocess.Popen(
            [str(binary), "-listen", listen, *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=err,
            env=dict(os.environ, TMPDIR=str(workdir / "tmp")),
        )
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    line = b""
    while not line.endswith(b"\n"):
        ready, _, _ = select.select([proc.stdout], [], [], max(deadline - time.monotonic(), 0))
        chunk = os.read(proc.stdout.fileno(), 4096) if ready else b""
        if not chunk:
            why = "exited" if ready else f"printed no URL in {timeout:g}s"
            stop_vcsim(proc, 0)
            raise BedError(f"vcsim {args} {why} (exit {proc.returncode}):\n{tail(log.read_text())}")
        line += chunk
    url = line.decode().strip()
    parts = urlsplit(url)
    if not (parts.hostname and parts.port):
        stop_vcsim(proc, 0)
        raise BedError(f"vcsim {args} printed {url!r}, not a URL")
    return proc, url


def stop_vcsim(proc: subprocess.Popen[bytes], timeout: float = 30) -> int:
    """SIGTERM, then SIGKILL after `timeout`; its exit code (-9 when killed)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()
    return proc.returncode
