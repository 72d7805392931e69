#!/usr/bin/env python3
"""Figure 4: the idle daemon's cost, its start to READY=1, and a reload.

Starts `.venv/bin/patchd daemon -c CONFIG` with three backends configured: the test bed's
Docker engine, the test bed's vcsim (plain HTTP: protocol = "http", insecure = true,
password_file) and an ssh backend of 12 machines (documentation addresses, a throwaway
key: the idle daemon never logs in; SSH and the apt driver are imported only when a
check or patch runs), one group on each, and one window that next opens 6 hours from
now, so no window is open during the run. The script binds its own NOTIFY_SOCKET (as systemd would,
without WATCHDOG_USEC), then:

- start -> READY=1: from just before the process is spawned to the READY=1 datagram,
  the median of --starts daemons (the last one goes on to be measured idle); target
  < 1.5 s. Most of it is imports: patchd, then pyVmomi when the vSphere backend is
  first pinged (the Docker backend pings a local engine without its SDK, which is
  loaded on the first real call) (`--pyspy RAW` profiles one more start, see below);
- --idle seconds (default 60) idle, measured from READY=1:
  - CPU: the sum over the threads of /proc/PID/task/*/schedstat (ns on CPU), and
    utime+stime of /proc/PID/stat (clock ticks) as a cross-check; target < 0.1 s;
  - wake-ups: each thread's voluntary + involuntary context switches over the window.
    A thread blocked without a timeout (a lock, a read, select with no timeout) has
    none; a polling loop has one per tick. Target: no polling loop, read here as no
    thread waking more than once per 10 s (<= 6 in 60 s). Each thread is shown with the
    system call it sits in (/proc/PID/task/TID/syscall, x86_64 numbers) and, from
    `strace -f -p PID` attached for --strace-seconds AFTER the measured window (ptrace
    would disturb the figures; skipped when strace is missing), the calls it made;
  - peak RSS: VmHWM of /proc/PID/status at the end (covers the start), target <= 60 MB;
- reload: SIGHUP -> the READY=1 after RELOADING=1, --reloads times, median (target
  < 200 ms);
- SIGTERM, and the exit status must be 0.

    .venv/bin/python bench/idle.py [--idle 60] [--starts 3] [--reloads 5]
        [--strace-seconds 10] [--pyspy START.raw] [--keep-lab]

--pyspy RAW starts one more daemon under `py-spy record --idle` until READY=1 and
writes its profile (then: .venv/bin/python bench/pyspy_top.py RAW --filter patchd/).

Prints one line per figure, each as a ratio of its budget with the raw numbers, and
one line per daemon thread. Exit status 0 if all targets are met and the daemon exited
0, 1 if not. Everything it made (a temporary directory with the config, the state, the
logs and the notify socket) is removed at the end; the test bed is stopped again if
this script started it.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib

# The tests' config builder (benchlib put the repository on sys.path).
from tests.conftest import write_config

TICK = os.sysconf("SC_CLK_TCK")
SYSCALLS = {  # x86_64 numbers of the calls an idle thread may sit in
    0: "read",
    7: "poll",
    23: "select",
    61: "wait4",
    202: "futex",
    232: "epoll_wait",
    270: "pselect6",
    271: "ppoll",
    281: "epoll_pwait",
    230: "clock_nanosleep",
    35: "nanosleep",
    45: "recvfrom",
    43: "accept",
    288: "accept4",
}


def ssh_key(workdir: Path) -> Path:
    """A throwaway ed25519 key for the ssh backend (the idle daemon never logs in)."""
    key = workdir / "id_ed25519"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "patchd-bench", "-f", str(key)],
        check=True,
    )
    return key


def idle_config(workdir: Path, env: dict[str, str]) -> Path:
    """Docker, vSphere and ssh backends, no window open for hours."""
    password = workdir / "vcenter.password"
    password.write_text(env.get("PATCHD_LAB_VCSIM_PASSWORD", "pass") + "\n")
    password.chmod(0o600)  # patchd refuses a secret every user can read
    opens = datetime.now(UTC) + timedelta(hours=6)
    return write_config(
        workdir / "patchd.toml",
        {
            "daemon": {
                "state_dir": workdir / "state",
                "metrics_address": f"127.0.0.1:{benchlib.free_port()}",
                "log_format": "json",
                "log_level": "info",
            },
            "windows": {"later": {"cron": f"{opens.minute} {opens.hour} * * *", "duration": "1h"}},
            "backends": {
                "lab-docker": {"type": "docker", "url": env["PATCHD_LAB_DOCKER_HOST"]},
                "lab-vcenter": {
                    "type": "vsphere",
                    "host": env["PATCHD_LAB_VCSIM_HOST"],
                    "port": int(env["PATCHD_LAB_VCSIM_PORT"]),
                    "protocol": "http",
                    "insecure": True,
                    "username": env.get("PATCHD_LAB_VCSIM_USER", "user"),
                    "password_file": password,
                },
                # Machines at documentation addresses: an idle daemon never connects;
                # its start loads the key (the backend's check), nothing more.
                "lab-ssh": {
                    "type": "ssh",
                    "hosts": [{"name": f"m{i}", "address": f"192.0.2.{i}"} for i in range(1, 13)],
                    "ssh": {
                        "identity_file": ssh_key(workdir),
                        "known_hosts": workdir / "known_hosts",
                    },
                },
            },
            "groups": {
                "containers": {
                    "backend": "lab-docker",
                    "window": "later",
                    "select": {"labels": {"patchd.bench": "idle"}},
                },
                "vms": {"backend": "lab-vcenter", "window": "later", "select": {"names": ["*"]}},
                "machines": {"backend": "lab-ssh", "window": "later", "max_concurrency": 6},
            },
        },
    )


class Notify:
    """The NOTIFY_SOCKET a service manager would bind; remembers every datagram."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.log: list[tuple[float, str]] = []

    def wait_for(self, line: str, timeout: float) -> float:
        """perf_counter() when a datagram holding `line` arrives."""
        deadline = time.perf_counter() + timeout
        while True:
            left = deadline - time.perf_counter()
            if left <= 0:
                raise SystemExit(f"bench: no {line} within {timeout:g} s; got {self.log}")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            at = time.perf_counter()
            text = data.decode(errors="replace")
            self.log.append((at, text))
            if line in text.split("\n"):
                return at

    def drain(self) -> int:
        self.sock.setblocking(False)
        count = 0
        try:
            while True:
                self.log.append((time.perf_counter(), self.sock.recv(65536).decode()))
                count += 1
        except BlockingIOError:
            pass
        finally:
            self.sock.setblocking(True)
        return count


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime, stime (all threads, dead ones too)


def threads(pid: int) -> dict[int, dict[str, Any]]:
    out: dict[int, dict[str, Any]] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            status = (task / "status").read_text()
            sched = (task / "schedstat").read_text().split()
            call = (task / "syscall").read_text().split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        number = int(call[0]) if call and call[0].lstrip("-").isdigit() else -1
        out[int(task.name)] = {
            "switches": int(fields["voluntary_ctxt_switches"])
            + int(fields["nonvoluntary_ctxt_switches"]),
            "cpu_ns": int(sched[0]),
            "syscall": SYSCALLS.get(number, "running" if call[0] == "running" else str(number)),
            "timeout_arg": call[5] if number in (7, 23, 270, 271, 232, 281) else "",
        }
    return out


def strace_threads(pid: int, seconds: float, workdir: Path) -> dict[int, collections.Counter[str]]:
    """Which calls each thread makes, from strace attached for `seconds`."""
    if seconds <= 0 or shutil.which("strace") is None:
        return {}
    out = workdir / "strace.txt"
    proc = subprocess.Popen(
        ["strace", "-f", "-qq", "-e", "trace=all", "-o", str(out), "-p", str(pid)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(seconds)
    proc.send_signal(signal.SIGINT)
    proc.wait(10)
    if not out.exists():  # strace could not attach (ptrace refused): no calls to show
        return {}
    calls: dict[int, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    pattern = re.compile(r"^(\d+)\s+(?:<\.\.\. )?(\w+)(\(| resumed>)(.*)$")
    for line in out.read_text().splitlines():
        m = pattern.match(line)
        if not m or "resumed>" in m.group(3):
            continue
        name = m.group(2)
        if name in ("select", "pselect6", "poll", "ppoll", "epoll_wait", "futex"):
            timeout = re.search(r"\{tv_sec=(\d+), tv_(?:n|u)sec=(\d+)\}|, (\d+)\)", m.group(4))
            if timeout and timeout.group(3):
                name += f"(timeout {timeout.group(3)} ms)"
            elif timeout:
                name += f"(timeout {timeout.group(1)}.{timeout.group(2)[:3]} s)"
        calls[int(m.group(1))][name] += 1
    return calls


def start_daemon(
    argv: list[str], notify: Notify, log: Any, prefix: list[str] | None = None
) -> tuple[subprocess.Popen[bytes], float]:
    """Spawn the daemon (under `prefix`, e.g. py-spy); (process, seconds to READY=1)."""
    env = {k: v for k, v in os.environ.items() if k not in ("WATCHDOG_USEC", "WATCHDOG_PID")}
    env["NOTIFY_SOCKET"] = str(notify.path)
    notify.drain()
    t0 = time.perf_counter()
    proc = subprocess.Popen([*(prefix or []), *argv], env=env, stdout=log, stderr=log)
    try:
        return proc, notify.wait_for("READY=1", 60) - t0
    except BaseException:
        proc.kill()
        proc.wait()
        raise


def stop_daemon(proc: subprocess.Popen[bytes], pid: int | None = None) -> int:
    """SIGTERM (to `pid`, default the process) and its exit status."""
    os.kill(pid or proc.pid, signal.SIGTERM)
    try:
        return proc.wait(120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return -9


def profile_start(argv: list[str], notify: Notify, log: Any, raw: str) -> float:
    """One more daemon under py-spy until READY=1; its profile goes to `raw`."""
    spy = Path(sys.executable).with_name("py-spy")
    prefix = [str(spy), "record", "--idle", "-r", "1000", "-f", "raw", "-o", raw, "--"]
    proc, ready = start_daemon(argv, notify, log, prefix)
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    stop_daemon(proc, int(children[0]) if children else None)
    return ready


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--idle", type=float, default=60.0, help="seconds (default 60)")
    parser.add_argument("--starts", type=int, default=3, help="daemons started (median)")
    parser.add_argument("--reloads", type=int, default=5)
    parser.add_argument("--strace-seconds", type=float, default=10.0)
    parser.add_argument("--pyspy", metavar="RAW", help="profile one more start to READY=1")
    parser.add_argument("--keep-lab", action="store_true")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="patchd-bench-idle-"))
    proc: subprocess.Popen[bytes] | None = None
    notify: Notify | None = None
    log = (workdir / "daemon.log").open("wb")
    spied: float | None = None
    clean = False  # no error and the daemon exited 0; else the daemon's log is shown
    try:
        with benchlib.lab(keep=args.keep_lab) as env:
            config = idle_config(workdir, env)
            notify = Notify(workdir / "notify.sock")
            argv = [str(benchlib.PATCHD), "daemon", "-c", str(config)]
            starts = []
            for _ in range(max(1, args.starts) - 1):
                extra, ready = start_daemon(argv, notify, log)
                starts.append(ready)
                if stop_daemon(extra) != 0:
                    raise SystemExit(f"bench: a daemon exited {extra.returncode}; {workdir}")
            proc, ready = start_daemon(argv, notify, log)
            starts.append(ready)
            pid = proc.pid
            start = statistics.median(starts)
            start_cpu = cpu_ticks(pid) / TICK
            before, ticks0, w0 = threads(pid), cpu_ticks(pid), time.perf_counter()
            benchlib.note(
                f"bench: daemon pid {pid} READY after {ready:.3f} s; idling {args.idle:g} s"
            )
            time.sleep(args.idle)
            after, ticks1, window = threads(pid), cpu_ticks(pid), time.perf_counter() - w0
            messages = notify.drain()
            hwm = benchlib.status_kb(pid, "VmHWM") / 1024
            rss = benchlib.status_kb(pid, "VmRSS") / 1024
            calls = strace_threads(pid, args.strace_seconds, workdir)
            time.sleep(0.5)
            reloads = []
            for _ in range(args.reloads):
                notify.drain()
                sent = time.perf_counter()
                os.kill(pid, signal.SIGHUP)
                notify.wait_for("RELOADING=1", 30)
                reloads.append(notify.wait_for("READY=1", 30) - sent)
                time.sleep(0.3)
            code = stop_daemon(proc)
            proc = None
            if args.pyspy:
                spied = profile_start(argv, notify, log, args.pyspy)
            clean = code == 0
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
        if notify is not None:
            notify.sock.close()
        if not clean:
            tail = (workdir / "daemon.log").read_bytes()[-3000:].decode(errors="replace")
            sys.stderr.write(f"--- end of the daemon's log ---\n{tail}\n")
        shutil.rmtree(workdir, ignore_errors=True)

    cpu_ns = sum(a["cpu_ns"] - before.get(t, {"cpu_ns": 0})["cpu_ns"] for t, a in after.items())
    cpu_stat = (ticks1 - ticks0) / TICK
    wake = {t: a["switches"] - before.get(t, {"switches": 0})["switches"] for t, a in after.items()}
    total_wake = sum(wake.values())
    worst = max(wake.values()) if wake else 0
    allowed = max(1, int(6 * window / 60))
    polling = [t for t, n in wake.items() if n > allowed]
    reload = statistics.median(reloads) if reloads else 0.0

    targets = {
        "start": start < 1.5,
        "rss": hwm <= 60,
        "cpu": cpu_ns / 1e9 < 0.1 and cpu_stat < 0.1,
        "wake": not polling,
        "reload": reload < 0.2,
    }

    def verdict(key: str) -> str:
        return "met" if targets[key] else "MISSED"

    say = benchlib.say
    say(
        "idle: patchd daemon with a docker, a vsphere (vcsim) and an ssh backend"
        " (12 machines), no window open; "
        f"{window:.1f} s measured from READY=1; {len(after)} threads"
    )
    say(
        f"idle: start -> READY=1 = {start / 1.5:.2f}x of the 1.5 s budget ({verdict('start')})"
        f"  median {start:.3f} s of " + ", ".join(f"{s:.3f}" for s in starts) + " s; CPU "
        f"used by the measured one to get there {start_cpu:.2f} s"
    )
    say(
        f"idle: peak RSS = {hwm / 60:.2f}x of the 60 MB budget ({verdict('rss')})  VmHWM "
        f"{hwm:.1f} MB, VmRSS at the end {rss:.1f} MB"
    )
    say(
        f"idle: CPU = {cpu_ns / 1e9 / 0.1:.3f}x of the 0.1 s budget ({verdict('cpu')})  "
        f"{cpu_ns / 1e9:.4f} s in {window:.0f} s by schedstat, {cpu_stat:.2f} s by "
        f"/proc/PID/stat ticks"
    )
    say(
        f"idle: wake-ups of the busiest thread = {worst / allowed:.2f}x of the {allowed} "
        f"allowed in {window:.0f} s, i.e. no polling loop ({verdict('wake')})  "
        f"{total_wake} context switches in all, {total_wake / window:.2f}/s"
    )
    for tid in sorted(after, key=lambda t: -wake[t]):
        a = after[tid]
        where = a["syscall"] + (f" timeout-arg {a['timeout_arg']}" if a["timeout_arg"] else "")
        seen = ", ".join(
            f"{n} x{c}" for n, c in calls.get(tid, collections.Counter()).most_common(4)
        )
        main_thread = " (main)" if tid == pid else ""
        say(
            f"  thread {tid}{main_thread}: {wake[tid]} wake-ups, "
            f"{(a['cpu_ns'] - before.get(tid, {'cpu_ns': 0})['cpu_ns']) / 1e6:.1f} ms CPU; "
            f"sits in {where}; strace {args.strace_seconds:g} s: {seen or 'no calls'}"
        )
    say(
        f"idle: reload (SIGHUP -> READY=1) = {reload / 0.2:.2f}x of the 200 ms budget "
        f"({verdict('reload')})  median {reload * 1000:.0f} ms of "
        + ", ".join(f"{r * 1000:.0f}" for r in reloads)
        + " ms"
    )
    say(f"idle: sd_notify datagrams while idle: {messages}; exit status after SIGTERM: {code}")
    if spied is not None:
        say(f"idle: profiled start (py-spy --idle) READY after {spied:.3f} s: {args.pyspy}")
    return 0 if all(targets.values()) and code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
