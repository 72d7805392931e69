"""patchd under a real systemd: Debian booted with systemd as PID 1 in a container on the
bed's machines engine (tests/lab/machines.py, its cached rootfs), patchd installed there
as README "Install as a service" says, and the unit of systemd/ driven with systemctl.

One machine serves every step (it boots once; the steps follow each other):
 1. install: a wheel of this checkout and a wheelhouse of its dependencies (built on the
    host once and cached next to the rootfs: the machine has no network) are copied in,
    then the README's shell block runs as written, its `pip install .` in the documented
    offline form.
 2. `systemctl enable --now patchd` returns once READY=1 came: active, a status line;
    a vSphere backend (a private vcsim on the host; the machine shares the host's
    network) logs in with the password LoadCredential delivered, and the first run patches
    a VM with a `patch.command` that probes the sandbox and a `health.command` that logs
    in over SSH to a lab machine with the key in the patchd user's home.
 3. `systemctl reload` with a good config (a new group runs, its patch fails) and with a
    broken one (same process, old config kept, `systemctl status` says why).
 4. `journalctl -p err` finds the failed patch (needs journald priorities in the log).
 5. `systemctl stop` while a target's patch command runs: it finishes and is committed.
 6. kill -9 of the daemon mid-patch: Restart= starts it again and it reconciles (reverts)
    the half-done target.
 7. a drop-in with a short WatchdogSec, the daemon SIGSTOPped: systemd kills and restarts it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from tests.integration.conftest import REPO_ROOT, Lab, VcsimProcess
from tests.integration.docker_fleet import free_port
from tests.integration.vsphere_lab import Sim, fleet, start
from tests.lab import machines
from tests.lab.bed import read_env

NAME = "patchd-systemd"
SECRET = "s3rvice-" + hashlib.sha256(str(time.time()).encode()).hexdigest()[:12]
# The unit's own image: the bed's rootfs (systemd, python3, python3-venv, openssh) WITHOUT
# the machines' pre-made `patchd` user (systemd-sysusers must create it, home
# /var/lib/patchd) and without sshd (it would listen on the host's port 22).
# The engine makes the container's mounts private; systemd sets up a unit's credentials
# ($CREDENTIALS_DIRECTORY) in a child's mount namespace and relies on / being shared, as it
# is on a real host (checked: without it LoadCredential leaves an empty root-only directory,
# even for a root service). So / is made shared before systemd starts.
DOCKERFILE = """FROM {base}
RUN printf '#!/bin/sh\\nmount --make-rshared /\\nexec /sbin/init\\n' \\
      > /usr/local/sbin/init-shared \\
 && chmod 0755 /usr/local/sbin/init-shared \\
 && rm -f /etc/apt/sources.list && rm -rf /etc/apt/sources.list.d/* /var/lib/apt/lists/* \\
 && systemctl mask ssh.service ssh.socket apt-daily.timer apt-daily-upgrade.timer \\
      console-getty.service getty@tty1.service systemd-remount-fs.service
"""
# What a patch command may and may not do inside the sandbox, written to the state dir.
PROBE = r"""#!/bin/sh
out=/var/lib/patchd/probe.txt
{
echo "user=$(id -un) home=$HOME"
for p in /var/lib/patchd/w /tmp/w /etc/patchd/w /usr/local/w /opt/w /var/log/w /root/w; do
    if touch "$p" 2>/dev/null; then echo "write $p=ok"; else echo "write $p=denied"; fi
done
if cat /etc/patchd/vsphere.password >/dev/null 2>&1; then echo "file=readable"
else echo "file=denied"; fi
echo "credential_env=${CREDENTIALS_DIRECTORY:-unset}"
echo "credential=$(sha256sum < /run/credentials/patchd.service/vsphere-password | cut -c1-16)"
if ssh -o BatchMode=yes -o ConnectTimeout=20 "root@$1" true; then echo "ssh=ok"
else echo "ssh=failed"; fi
if sudo -n true 2>/dev/null; then echo "sudo=ok"; else echo "sudo=denied"; fi
} > "$out" 2>&1
"""


def step(text: str) -> None:
    """One line per step of the test in its log (shown with -s, or on failure)."""
    print(f"\n=== systemd: {time.strftime('%H:%M:%S')} {text}", flush=True)


class Machine:
    """The booted container, driven with `docker exec`."""

    def __init__(self, bed: machines.Bed) -> None:
        self.bed = bed

    def sh(self, script: str, check: bool = True, quiet: bool = False) -> str:
        proc = self.bed.docker("exec", NAME, "bash", "-c", script, check=False, timeout=600)
        if not quiet:
            print(f"# {script}\n{(proc.stdout + proc.stderr).rstrip()}", flush=True)
        if check and proc.returncode:
            raise AssertionError(
                f"`{script}` exited {proc.returncode}:\n{proc.stdout}{proc.stderr}"
            )
        return proc.stdout

    def exists(self, path: str) -> bool:
        return "yes" in self.sh(f"test -e {path} && echo yes", check=False, quiet=True)

    def prop(self, name: str) -> str:
        return self.sh(f"systemctl show -p {name} --value patchd", quiet=True).strip()

    def events(self, *args: str) -> list[dict[str, Any]]:
        out = self.sh(f"journalctl -u patchd -o cat --no-pager {shlex.join(args)}", quiet=True)
        return [json.loads(line) for line in out.splitlines() if line.startswith("{")]

    def wait(self, check: Callable[[], Any], timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while not (value := check()):
            if time.monotonic() > deadline:
                tail = self.sh("journalctl -u patchd -n 40 --no-pager", check=False, quiet=True)
                raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{tail}")
            time.sleep(0.5)
        return value

    def put(self, path: str, text: str, mode: str = "0640", owner: str = "root:patchd") -> None:
        self.sh(
            f"umask 077; cat > {path}.new <<'EOF'\n{text}EOF\n"
            f"chown {owner} {path}.new && chmod {mode} {path}.new && mv {path}.new {path}",
            quiet=True,
        )


def _wheelhouse(cache: Path) -> Path:
    """patchd's dependencies as wheels, built once per dependency set and kept."""
    deps = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    key = hashlib.sha256(f"{sys.version_info[:2]} {deps}".encode()).hexdigest()[:12]
    house = cache / f"wheelhouse-{key}"
    if not house.exists():
        partial = cache / f"wheelhouse-{key}.partial"
        subprocess.run(["rm", "-rf", str(partial)], check=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "-q", "-w", str(partial), str(REPO_ROOT)],
            check=True,
            timeout=900,
        )
        for own in partial.glob("patchd-*.whl"):
            own.unlink()
        partial.rename(house)
    return house


@pytest.fixture(scope="module")
def machine(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Machine]:
    env_file = lab.lab_dir / "machines" / "env"
    if not env_file.exists():
        if os.environ.get("PATCHD_LAB_MACHINES") == "0":
            pytest.skip("the bed was started without machines (PATCHD_LAB_MACHINES=0)")
        pytest.fail(f"{env_file} missing: the bed's machines did not start")
    bed = machines.Bed(lab.lab_dir)
    t0 = time.monotonic()
    step("building the image and the wheels on the host")
    base = f"patchd-lab/debian-rootfs:{bed.rootfs().stem.rsplit('-', 1)[-1]}"
    if bed.docker("image", "inspect", base, check=False).returncode:
        bed.docker("import", str(bed.rootfs()), base)
    dockerfile = DOCKERFILE.format(base=base)
    image = f"patchd-lab/debian-systemd:{hashlib.sha256(dockerfile.encode()).hexdigest()[:12]}"
    work = tmp_path_factory.mktemp("systemd")
    if bed.docker("image", "inspect", image, check=False).returncode:
        (work / "ctx").mkdir()
        (work / "ctx" / "Dockerfile").write_text(dockerfile)
        bed.docker("build", "--network", "none", "-t", image, str(work / "ctx"))
    house = _wheelhouse(bed.cache)
    # The checkout as the machine sees it: systemd/, config/ and wheelhouse/ (what
    # `pip wheel -w wheelhouse .` makes: the cached dependencies plus patchd's own wheel).
    checkout = work / "patchd"
    checkout.mkdir()
    for part in ("systemd", "config"):
        shutil.copytree(REPO_ROOT / part, checkout / part)
    shutil.copytree(house, checkout / "wheelhouse")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
         "-w", str(checkout / "wheelhouse"), str(REPO_ROOT)],
        check=True,
        timeout=600,
    )  # fmt: skip

    step("booting Debian with systemd as PID 1")
    bed.docker("rm", "-f", NAME, check=False)
    bed.docker(
        "run", "-d", "--name", NAME, "--cap-add=ALL", "--cap-drop=SYS_RESOURCE",
        "--security-opt", "seccomp=unconfined", "--cgroupns=host",
        "-v", "/sys/fs/cgroup:/sys/fs/cgroup:rw", "--tmpfs", "/run", "--tmpfs", "/run/lock",
        "--tmpfs", "/tmp", "-t", "--network", "host", "-e", "container=docker",
        "--stop-signal", "SIGRTMIN+3", "--entrypoint", "/usr/local/sbin/init-shared", image,
    )  # fmt: skip
    m = Machine(bed)
    try:
        state = m.wait(
            lambda: (
                m.sh("systemctl is-system-running", check=False, quiet=True).strip()
                not in ("", "initializing", "starting")
                and m.sh("systemctl is-system-running", check=False, quiet=True).strip()
            ),
            120,
            "the machine's boot",
        )
        print(f"systemd says: {state}", flush=True)
        bed.docker("cp", str(checkout), f"{NAME}:/root/patchd")
        print(f"machine ready in {time.monotonic() - t0:.1f}s", flush=True)
        yield m
    finally:
        bed.docker("rm", "-f", NAME, check=False)


def _readme_install() -> list[str]:
    """The README's "Install as a service" shell block, as lines."""
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme.split("## Install as a service", 1)[1]
    block = section.split("```sh\n", 1)[1].split("```", 1)[0]
    return [ln for ln in block.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def _config(sim: Sim, port: int, groups: dict[str, dict[str, Any]], **more: dict[str, Any]) -> str:
    """The service's config file (`more`: further tables). Not write_config: the service
    keeps the default control socket, /run/patchd/control.sock of the machine."""
    return tomli_w.dumps(
        {
            "daemon": {"metrics_address": f"127.0.0.1:{port}", "log_format": "json"},
            "windows": {
                "always": {
                    "days": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"],
                    "start": "00:00",
                    "duration": "1d",
                }
            },
            "backends": {
                "vc": {
                    "type": "vsphere",
                    "host": sim.process.host,
                    "port": sim.process.port,
                    "protocol": sim.process.scheme,
                    "insecure": True,
                    "username": "user",
                    "credential": "vsphere-password",
                    "timeout": "20s",
                    "retries": 1,
                    "retry_backoff": "0s",
                }
            },
            "groups": groups,
            **more,
        }
    )


def _group(vm: str, command: list[str], ssh: str, version: str = "2") -> dict[str, Any]:
    # health.command: ssh as the patchd user, with the key and known_hosts in its home.
    health = ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=20", f"root@{ssh}", "true"]
    return {
        "backend": "vc",
        "window": "always",
        "select": {"names": [vm]},
        "health": {"timeout": "60s", "stable_for": "1s", "command": health},
        "patch": {"command": command, "version": version},
    }


def _outcomes(m: Machine, group: str) -> list[dict[str, Any]]:
    return [
        e
        for e in m.events()
        if e.get("event") in ("target_done", "target_failed") and e.get("group") == group
    ]


def test_patchd_under_systemd(
    machine: Machine, lab: Lab, vcsim_factory: Callable[..., VcsimProcess], tmp_path: Path
) -> None:
    t_start = time.monotonic()
    m = machine
    sim = start(vcsim_factory, tmp_path, vms=4)
    vms = sorted(sim.vms())
    fleet(sim, vms, "1")
    menv = read_env(lab.lab_dir / "machines" / "env")
    ssh_host = menv["PATCHD_LAB_MACHINE_ADDRESSES"].split()[0]
    port = free_port()

    def group(vm: str, command: list[str]) -> dict[str, Any]:
        return _group(vm, command, ssh_host)

    groups = {"probe": group(vms[0], ["/bin/sh", "/etc/patchd/probe.sh", ssh_host])}

    step("1. install as README 'Install as a service' says")
    offline = "/opt/patchd/bin/pip install --no-index --find-links wheelhouse patchd"
    for line in _readme_install():
        if line.startswith("systemctl enable --now"):
            break
        if line.strip() == "/opt/patchd/bin/pip install .":
            print(f"(offline: {line!r} -> {offline!r}, as the README says)", flush=True)
            line = offline
        m.sh(f"cd /root/patchd && {line}")
    assert m.sh("getent passwd patchd").split(":")[5] == "/var/lib/patchd"
    assert m.sh("stat -c '%U:%G %a' /etc/patchd /var/lib/patchd").split() == [
        "root:patchd", "750", "patchd:patchd", "700",
    ]  # fmt: skip
    # The site's part: the vCenter password (root 0600), ssh key and known_hosts in the
    # patchd user's home, the config.
    m.put("/etc/patchd/vsphere.password", SECRET + "\n", mode="0600", owner="root:root")
    key = Path(menv["PATCHD_LAB_MACHINE_KEY"])
    m.sh("install -d -m 0700 -o patchd -g patchd /var/lib/patchd/.ssh", quiet=True)
    m.put("/var/lib/patchd/.ssh/id_ed25519", key.read_text(), "0600", "patchd:patchd")
    m.put(
        "/var/lib/patchd/.ssh/known_hosts",
        Path(menv["PATCHD_LAB_MACHINE_KNOWN_HOSTS"]).read_text(),
        "0600",
        "patchd:patchd",
    )
    m.put("/etc/patchd/probe.sh", PROBE)
    m.put("/etc/patchd/patchd.toml", _config(sim, port, groups))
    m.sh("patchd check-config")

    step("2. systemctl enable --now patchd: active once READY=1 came")
    t0 = time.monotonic()
    m.sh("systemctl enable --now patchd")  # Type=notify: returns after READY=1 (or failure)
    print(f"start took {time.monotonic() - t0:.1f}s", flush=True)
    m.sh("systemctl status patchd --no-pager", check=False)
    assert m.prop("ActiveState") == "active" and m.prop("SubState") == "running"
    assert m.prop("StatusText"), "no STATUS= from the daemon"
    assert any(e["event"] == "started" for e in m.events())
    pid1 = m.prop("MainPID")

    step("2b. the first run: vSphere login with the credential, sandbox probe, ssh health check")
    done = m.wait(lambda: _outcomes(m, "probe"), 120, "the probe group's run")
    print(done, flush=True)
    assert done[0]["result"] == "success", done
    probe = dict(
        line.split("=", 1)
        for line in m.sh("cat /var/lib/patchd/probe.txt").splitlines()
        if line.startswith(("user", "write", "file", "credential", "ssh", "sudo"))
    )
    assert probe["user"].startswith("patchd home=/var/lib/patchd"), probe
    assert probe["write /var/lib/patchd/w"] == "ok" and probe["write /tmp/w"] == "ok", probe
    for outside in ("/etc/patchd/w", "/usr/local/w", "/opt/w", "/var/log/w", "/root/w"):
        assert probe[f"write {outside}"] == "denied", (outside, probe)
    assert probe["file"] == "denied", "the password file itself must stay root-only"
    want = hashlib.sha256((SECRET + "\n").encode()).hexdigest()[:16]
    # The credential reached the daemon (it logged in to vCenter with it); the site command
    # is not handed $CREDENTIALS_DIRECTORY (patchd/commands.py), though as the same user it
    # could read the file: the hash proves what systemd delivered.
    assert probe["credential"] == want, "LoadCredential did not deliver the password"
    assert probe["credential_env"] == "unset", probe
    assert any(e["event"] == "vsphere_login" for e in m.events()), "no vCenter login"
    assert probe["ssh"] == "ok" and probe["sudo"] == "denied", probe
    health_ssh = [
        e for e in m.events() if e.get("event") == "target_step" and e.get("group") == "probe"
    ]
    assert health_ssh, "no steps journaled for the probe target"
    assert SECRET not in m.sh("journalctl -u patchd -o cat --no-pager", quiet=True)

    # README: read commands as the service user; the journal the service made opens.
    assert "probe" in m.sh("runuser -u patchd -- patchd status")

    step("3. systemctl reload with a good config: a new group runs; its patch fails")
    groups["failing"] = group(vms[1], ["sh", "-c", "echo disk full >&2; exit 1"])
    m.put("/etc/patchd/patchd.toml", _config(sim, port, groups))
    m.sh("systemctl reload patchd")
    m.wait(lambda: any(e["event"] == "reloaded" for e in m.events()), 60, "the reload")
    failed = m.wait(lambda: _outcomes(m, "failing"), 120, "the failing group's run")
    assert failed[0]["result"] in ("rolled_back", "failed"), failed
    assert m.prop("MainPID") == pid1

    step("3b. systemctl reload with a broken config: old one kept, the status line says why")
    m.put("/etc/patchd/patchd.toml", _config(sim, port, groups, bogus={"key": 1}))
    m.sh("systemctl reload patchd")
    m.wait(lambda: any(e["event"] == "reload_failed" for e in m.events()), 60, "the refused reload")
    status = m.wait(lambda: "reload" in m.prop("StatusText") and m.prop("StatusText"), 30, "status")
    m.sh("systemctl status patchd --no-pager", check=False)
    assert "bogus" in status and "old config" in status, status
    assert m.prop("ActiveState") == "active" and m.prop("MainPID") == pid1

    step("4. journalctl -p err finds the failed patch")
    errors = m.events("-p", "err")
    print([e.get("event") for e in errors], flush=True)
    found = [e for e in errors if e.get("group") == "failing"]
    assert any(e["event"] == "target_failed" for e in found), errors
    assert "reload_failed" in [e["event"] for e in errors], errors
    assert not any(e["event"] in ("target_done", "started", "reloaded") for e in errors)

    step("5. systemctl stop drains an in-flight target")
    groups.pop("failing")
    groups["slow"] = group(
        vms[2],
        [
            "sh",
            "-c",
            "touch /var/lib/patchd/slow.started; sleep 10; touch /var/lib/patchd/slow.done",
        ],
    )
    m.put("/etc/patchd/patchd.toml", _config(sim, port, groups))
    m.sh("systemctl reload patchd")
    m.wait(lambda: m.exists("/var/lib/patchd/slow.started"), 90, "the slow patch command")
    t0 = time.monotonic()
    m.sh("systemctl stop patchd")
    print(f"stop took {time.monotonic() - t0:.1f}s", flush=True)
    assert m.prop("ActiveState") == "inactive" and m.prop("Result") == "success"
    m.sh("test -e /var/lib/patchd/slow.done")
    slow = _outcomes(m, "slow")
    assert slow and slow[-1]["result"] == "success", slow
    names = [e["event"] for e in m.events()]
    assert names.index("stopping") < max(i for i, n in enumerate(names) if n == "target_done")
    assert names[-1] == "stopped", names[-5:]

    step("6. kill -9 mid-patch: Restart= starts it again, and it reconciles the target")
    groups["crash"] = group(vms[3], ["sh", "-c", "touch /var/lib/patchd/crash.started; sleep 300"])
    m.put("/etc/patchd/patchd.toml", _config(sim, port, groups))
    m.sh("systemctl start patchd")
    m.wait(lambda: m.exists("/var/lib/patchd/crash.started"), 90, "the crash patch command")
    groups["crash"] = group(vms[3], ["true"])  # the restarted daemon's next try passes
    m.put("/etc/patchd/patchd.toml", _config(sim, port, groups))
    pid = m.prop("MainPID")
    restarts = int(m.prop("NRestarts"))
    m.sh(f"kill -9 {pid}")
    m.wait(
        lambda: int(m.prop("NRestarts")) > restarts and m.prop("ActiveState") == "active",
        90,
        "Restart=",
    )
    assert m.prop("MainPID") != pid
    # KillMode=mixed: the dead daemon's patch command went with it (no stray `sleep 300`).
    assert m.sh("pgrep -a -x sleep || true", quiet=True).strip() == ""
    reconciled = m.wait(
        lambda: [e for e in m.events() if e["event"] == "reconciled" and e.get("target") == vms[3]],
        60,
        "the reconcile",
    )
    print(reconciled, flush=True)
    assert reconciled[0]["now"] == "rolled_back", reconciled
    crash = m.wait(
        lambda: [o for o in _outcomes(m, "crash") if o["result"] == "success"], 120, "re-run"
    )
    assert crash

    step("7. watchdog: a drop-in with WatchdogSec=15s, the daemon SIGSTOPped")
    m.sh(
        "mkdir -p /etc/systemd/system/patchd.service.d && printf '[Service]\\nWatchdogSec=15s\\n'"
        " > /etc/systemd/system/patchd.service.d/watchdog.conf && systemctl daemon-reload"
        " && systemctl restart patchd"
    )
    assert m.prop("WatchdogUSec") == "15s"
    pid = m.prop("MainPID")
    restarts = int(m.prop("NRestarts"))
    time.sleep(20)  # pets at half the interval: alive past one full WatchdogSec
    assert m.prop("MainPID") == pid and m.prop("ActiveState") == "active"
    m.sh(f"kill -STOP {pid}")
    m.wait(
        lambda: int(m.prop("NRestarts")) > restarts and m.prop("ActiveState") == "active",
        120,
        "watchdog",
    )
    assert m.prop("MainPID") != pid
    m.sh("journalctl -u patchd --no-pager | grep -i watchdog", check=True)
    m.sh("systemctl stop patchd")
    print(f"test steps took {time.monotonic() - t_start:.1f}s", flush=True)
