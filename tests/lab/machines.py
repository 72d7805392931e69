#!/usr/bin/env python3
"""The test bed's Debian machines: systemd and sshd booted in containers, plus a local apt
repository they install from. Standard library only: lab.sh runs it with any python3.

    machines.py up LAB_DIR       build (or reuse) and start everything; writes LAB_DIR/machines/env
    machines.py down LAB_DIR     stop the machines, their engine and the apt server
    machines.py status LAB_DIR   one line per part; exit 0 only if all are up

The machines run on a SECOND private dockerd with overlay2 storage: vfs (the lab's first
engine) copies the 200 MB rootfs per container and starts them about twice as slowly, and
a separate engine leaves the Docker backend's tests and outage drills (`lab.sh stop
docker`) untouched. Each machine shares this host's network namespace (`--network host`)
and owns one loopback address: its sshd listens only there, on port 22. A reboot inside
ends the container and `--restart always` boots it again; the init wrapper gives every
boot a fresh /proc/sys/kernel/random/boot_id (the kernel's is shared by all containers).

The rootfs (mmdebstrap, ~70 s) is cached as a tarball in PATCHD_LAB_CACHE (default
/var/cache/patchd-lab), shared by every lab dir on the host; its file name carries a hash
of the recipe, so a changed recipe builds a new one.

Beside them run the rpm machines (rpm1...; tests/lab/rpmlab.py): the same Debian with
Debian's dnf, rpm and createrepo-c, a second image variant whose rootfs is cached too, so
only its first build costs an mmdebstrap; they install from an rpm repository served by
the apt repository's server at /rpm.

Environment:
  PATCHD_LAB_MACHINES      how many machines (default 4)
  PATCHD_LAB_RPM_MACHINES  how many rpm machines (default 2; 0 when PATCHD_LAB_MACHINES=0);
                           rpmN listens on NET.(200+N)
  PATCHD_LAB_MACHINE_NET   the first three octets of their addresses (default 127.0.10):
                           machine N listens on NET.N. Two labs on one host need two nets.
  PATCHD_LAB_CACHE         where the rootfs tarball is kept (default /var/cache/patchd-lab,
                           or ~/.cache/patchd-lab when that is not writable)
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import rpmlab  # noqa: E402 (the lab's own module, beside this file)

SUITE = "bookworm"
PACKAGES = "openssh-server,systemd,systemd-sysv,dbus,python3,python3-venv,sudo"
RECIPE_VERSION = "1"  # bump to rebuild every cached rootfs
ENGINE_TIMEOUT = 120
BOOT_TIMEOUT = 120
SSH_PORT = 22
MACHINE_PREFIX = "machine"

INIT = (
    r"""#!/bin/sh
# patchd lab: runs before systemd on every boot of a machine (the container's entrypoint).
set -eu
# A fresh boot id per boot: the kernel's is the host's, shared and unchanged by a restart.
cat /proc/sys/kernel/random/uuid > /run/lab-boot-id
mount --bind /run/lab-boot-id /proc/sys/kernel/random/boot_id
# sshd listens only on this machine's own loopback address (the network is the host's).
printf 'ListenAddress %s\n' "$LAB_MACHINE_ADDR" > /etc/ssh/sshd_config.d/00-lab-listen.conf
# Host keys made by the lab (so it can write known_hosts before the first boot); a key
# changed inside the machine stays changed until the next boot.
for key in /lab/ssh_host_*; do
    [ -e "$key" ] || continue
    install -m 0600 "$key" "/etc/ssh/$(basename "$key")"
done
chmod 0644 /etc/ssh/ssh_host_*.pub
for user in root patchd nosudo; do
    home=$(getent passwd "$user" | cut -d: -f6)
    install -d -m 0700 -o "$user" -g "$user" "$home/.ssh"
    install -m 0600 -o "$user" -g "$user" /lab/authorized_keys "$home/.ssh/authorized_keys"
done
printf 'deb [trusted=yes] %s/main ./\ndeb [trusted=yes] %s/security ./\n' \
    "$LAB_APT_URL" "$LAB_APT_URL" > /etc/apt/sources.list.d/lab.list
"""
    + rpmlab.INIT
    + """exec /sbin/init
"""
)

DOCKERFILE = """FROM {base}
COPY lab-init /usr/local/sbin/lab-init
RUN chmod 0755 /usr/local/sbin/lab-init \\
 && rm -f /etc/ssh/ssh_host_* /etc/apt/sources.list \\
 && rm -rf /etc/apt/sources.list.d/* /var/lib/apt/lists/* \\
 && useradd -m -s /bin/bash patchd && useradd -m -s /bin/bash nosudo \\
 && printf 'patchd ALL=(ALL) NOPASSWD: ALL\\n' > /etc/sudoers.d/patchd \\
 && chmod 0440 /etc/sudoers.d/patchd \\
 && printf 'PasswordAuthentication no\\nUseDNS no\\n' > /etc/ssh/sshd_config.d/10-lab.conf \\
 && systemctl mask apt-daily.timer apt-daily-upgrade.timer console-getty.service \\
      getty@tty1.service systemd-remount-fs.service
"""


def log(msg: str) -> None:
    print(f"lab: machines: {msg}", file=sys.stderr, flush=True)


class Failed(Exception):
    """A part of the bed could not start; the message names it and the log to read."""


class Bed:
    """Paths and names of one lab's machines, derived from the lab dir."""

    def __init__(self, lab_dir: Path) -> None:
        self.lab = lab_dir
        self.dir = lab_dir / "machines"
        lab_id = hashlib.sha256(str(lab_dir).encode()).hexdigest()[:10]
        # unix socket paths must stay short: the engine's run dir lives in /tmp.
        self.run = Path(f"/tmp/pdm-{lab_id}")
        self.data = self.dir / "docker"
        self.sock = self.run / "d.sock"
        self.pidfile = self.dir / "dockerd.pid"
        self.dockerd_log = self.dir / "dockerd.log"
        self.namespace = f"patchd-machines-{lab_id}"
        self.cgroup = f"patchd-machines-{lab_id}"
        self.cache = _cache_dir()
        self.count = int(os.environ.get("PATCHD_LAB_MACHINES") or 4)
        rpm_default = "2" if self.count else "0"
        self.rpm_count = int(os.environ.get("PATCHD_LAB_RPM_MACHINES") or rpm_default)
        self.net = os.environ.get("PATCHD_LAB_MACHINE_NET") or "127.0.10"
        self.keys = self.dir / "keys"
        self.known_hosts = self.dir / "known_hosts"
        self.repo = self.dir / "apt"
        self.rpm_repo = self.repo / "rpm"
        self.apt_pid = self.dir / "apt.pid"
        self.apt_addr = self.dir / "apt.addr"
        self.apt_log = self.dir / "apt.log"
        self.env_file = self.dir / "env"

    # --- names ---------------------------------------------------------------------
    def apt_names(self) -> list[str]:
        return [f"{MACHINE_PREFIX}{i}" for i in range(1, self.count + 1)]

    def rpm_names(self) -> list[str]:
        return [f"{rpmlab.PREFIX}{i}" for i in range(1, self.rpm_count + 1)]

    def names(self) -> list[str]:
        return self.apt_names() + self.rpm_names()

    def address(self, name: str) -> str:
        if name.startswith(rpmlab.PREFIX):
            return f"{self.net}.{rpmlab.ADDRESS_BASE + int(name.removeprefix(rpmlab.PREFIX))}"
        return f"{self.net}.{int(name.removeprefix(MACHINE_PREFIX))}"

    def docker(
        self, *args: str, check: bool = True, **kw: object
    ) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}
        env.update(DOCKER_CONFIG=str(self.dir / "cli"), DOCKER_BUILDKIT="0")
        cmd = ["docker", "-H", f"unix://{self.sock}", *args]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, **kw)  # type: ignore[call-overload]
        if check and proc.returncode:
            raise Failed(f"`docker {' '.join(args[:3])}` failed: {proc.stderr.strip()[-800:]}")
        return proc  # type: ignore[no-any-return]

    # --- the engine ----------------------------------------------------------------
    def engine_pid(self) -> int | None:
        return _our_pid(self.pidfile, str(self.data))

    def ping(self) -> bool:
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(2)
                s.connect(str(self.sock))
                s.sendall(b"GET /_ping HTTP/1.0\r\nHost: d\r\n\r\n")
                return s.recv(4096).endswith(b"OK")
        except OSError:
            return False

    def start_engine(self) -> None:
        if self.engine_pid() and self.ping():
            log(f"dockerd (overlay2): reusing pid {self.engine_pid()}")
            return
        self.stop_engine()
        for d in (self.data, self.run, self.dir / "cli"):
            d.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        with open(self.dockerd_log, "a") as out:
            proc = subprocess.Popen(
                [
                    "dockerd",
                    "--data-root",
                    str(self.data),
                    "--exec-root",
                    str(self.run / "x"),
                    "-H",
                    f"unix://{self.sock}",
                    "--pidfile",
                    str(self.pidfile),
                    "--iptables=false",
                    "--ip6tables=false",
                    "--bridge=none",
                    "--storage-driver=overlay2",
                    "--containerd-namespace",
                    self.namespace,
                    "--containerd-plugins-namespace",
                    f"{self.namespace}-plugins",
                    "--cgroup-parent",
                    f"/{self.cgroup}",
                    "--shutdown-timeout",
                    "5",
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
            )
        deadline = time.monotonic() + ENGINE_TIMEOUT
        while not self.ping():
            if proc.poll() is not None:
                raise Failed(f"dockerd exited during start; see {self.dockerd_log}")
            if time.monotonic() > deadline:
                proc.terminate()
                raise Failed(f"dockerd did not answer in {ENGINE_TIMEOUT}s; see {self.dockerd_log}")
            time.sleep(0.1)
        log(f"dockerd (overlay2): pid {proc.pid} ready in {time.monotonic() - t0:.1f}s")

    def stop_engine(self) -> None:
        pid = self.engine_pid()
        if pid and self.ping():
            ids = self.docker("ps", "-aq", check=False).stdout.split()
            if ids:
                self.docker("rm", "-f", *ids, check=False)
        if pid:
            _stop_pid(pid)
            log(f"dockerd (overlay2): stopped pid {pid}")
        containerd = _our_pid(
            self.run / "x/containerd/containerd.pid", str(self.run / "x/containerd/containerd.toml")
        )
        if containerd:
            _stop_pid(containerd)
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit() and self.namespace in _cmdline(int(proc.name)):
                with contextlib.suppress(OSError):
                    os.kill(int(proc.name), signal.SIGKILL)
        _kill_cgroup(self.cgroup)
        _unmount_under(self.data, self.run)
        if not self.engine_pid():
            shutil.rmtree(self.run / "x", ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            self.sock.unlink()

    # --- images --------------------------------------------------------------------
    def rootfs(self, packages: str = PACKAGES) -> Path:
        key = hashlib.sha256(f"{RECIPE_VERSION} {SUITE} {packages}".encode()).hexdigest()[:12]
        tarball = self.cache / f"debian-{SUITE}-machine-{key}.tar"
        if tarball.exists():
            return tarball
        self.cache.mkdir(parents=True, exist_ok=True)
        with open(self.cache / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another lab may be building the same one
            if tarball.exists():
                return tarball
            sources = Path("/etc/apt/sources.list.d/debian.sources")
            if not sources.exists():
                sources = Path("/etc/apt/sources.list")
            partial = tarball.with_suffix(".partial")
            build_log = self.cache / f"{tarball.stem}.log"
            log(f"building the rootfs {tarball} with mmdebstrap (about 70 s)")
            t0 = time.monotonic()
            with open(sources) as stdin, open(build_log, "w") as out:
                rc = subprocess.call(
                    [
                        "mmdebstrap",
                        "--variant=minbase",
                        "--format=tar",
                        f"--include={packages}",
                        SUITE,
                        str(partial),
                        "-",
                    ],
                    stdin=stdin,
                    stdout=out,
                    stderr=out,
                )
            if rc:
                partial.unlink(missing_ok=True)
                raise Failed(f"mmdebstrap failed (exit {rc}); see {build_log}")
            partial.rename(tarball)
            log(f"rootfs built in {time.monotonic() - t0:.0f}s")
        return tarball

    def image(self, packages: str = PACKAGES) -> str:
        tarball = self.rootfs(packages)
        base = f"patchd-lab/debian-rootfs:{tarball.stem.rsplit('-', 1)[-1]}"
        if self.docker("image", "inspect", base, check=False).returncode:
            t0 = time.monotonic()
            self.docker("import", str(tarball), base)
            log(f"imported {base} in {time.monotonic() - t0:.1f}s")
        dockerfile = DOCKERFILE.format(base=base)
        return self.build("debian-machine", dockerfile, {"lab-init": INIT})

    def rpm_image(self) -> str:
        """The apt machine's recipe on a rootfs with dnf and rpm, plus rpmlab's layer."""
        t0 = time.monotonic()
        machine = self.image(f"{PACKAGES},{rpmlab.EXTRA_PACKAGES}")
        image = self.build(
            "debian-rpm-machine",
            rpmlab.dockerfile(machine),
            {"lab-system.spec": rpmlab.LAB_SYSTEM_SPEC},
        )
        log(f"rpm machine image {image} ready in {time.monotonic() - t0:.1f}s")
        return image

    def build(self, name: str, dockerfile: str, files: dict[str, str]) -> str:
        """An image built once per recipe: its tag is the hash of the Dockerfile and files."""
        recipe = dockerfile + "".join(files[k] for k in sorted(files))
        image = f"patchd-lab/{name}:{hashlib.sha256(recipe.encode()).hexdigest()[:12]}"
        if self.docker("image", "inspect", image, check=False).returncode:
            ctx = self.dir / "build"
            shutil.rmtree(ctx, ignore_errors=True)
            ctx.mkdir(parents=True)
            (ctx / "Dockerfile").write_text(dockerfile)
            for file, text in files.items():
                (ctx / file).write_text(text)
            self.docker("build", "--network", "none", "-t", image, str(ctx))
        return image

    # --- keys ----------------------------------------------------------------------
    def make_keys(self) -> None:
        self.keys.mkdir(parents=True, exist_ok=True)
        client = self.keys / "id_ed25519"
        if not client.exists():
            _keygen(client, "patchd-lab")
        lines = []
        for name in self.names():
            d = self.keys / name
            d.mkdir(exist_ok=True)
            shutil.copy(f"{client}.pub", d / "authorized_keys")
            host_key = d / "ssh_host_ed25519_key"
            if not host_key.exists():
                _keygen(host_key, name)
            kind, blob = (host_key.with_suffix(".pub")).read_text().split()[:2]
            lines.append(f"{self.address(name)} {kind} {blob}\n")
        self.known_hosts.write_text("".join(lines))

    # --- the apt repository ----------------------------------------------------------
    def start_apt(self) -> str:
        pid = _our_pid(self.apt_pid, str(self.repo))
        if pid and self.apt_addr.exists():
            return self.apt_addr.read_text().strip()
        for suite in ("main", "security"):
            (self.repo / suite).mkdir(parents=True, exist_ok=True)
        sys.path.insert(0, str(HERE))
        import aptrepo

        aptrepo.AptRepo(self.repo, "").index_all()
        self.apt_addr.unlink(missing_ok=True)
        with open(self.apt_log, "a") as out:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    str(HERE / "aptrepo.py"),
                    "serve",
                    str(self.repo),
                    str(self.apt_addr),
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
            )
        self.apt_pid.write_text(f"{proc.pid}\n")
        deadline = time.monotonic() + 20
        while not self.apt_addr.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise Failed(f"the apt repository server did not start; see {self.apt_log}")
            time.sleep(0.05)
        addr = self.apt_addr.read_text().strip()
        log(f"apt repository: pid {proc.pid} on http://{addr}")
        return addr

    # --- machines ------------------------------------------------------------------
    def start_machines(self, images: dict[str, str], apt_addr: str) -> None:
        """Start every machine not running yet; `images`: name -> image."""
        running = set(self.docker("ps", "--format", "{{.Names}}").stdout.split())
        for name, image in images.items():
            if name in running:
                continue
            extra = []
            if name.startswith(rpmlab.PREFIX):
                self.rpm_repo.mkdir(parents=True, exist_ok=True)
                extra = ["-v", f"{self.rpm_repo}:{rpmlab.MOUNT}"]
            self.docker("rm", "-f", name, check=False)
            addr = self.address(name)
            if _port_open(addr, SSH_PORT):
                raise Failed(
                    f"{addr}:{SSH_PORT} is already taken (another lab?): "
                    "set PATCHD_LAB_MACHINE_NET to a free 127.x.y"
                )
            self.docker(
                "run",
                "-d",
                "--name",
                name,
                "--restart",
                "always",
                "--cap-add=ALL",
                "--cap-drop=SYS_RESOURCE",
                "--security-opt",
                "seccomp=unconfined",
                "--cgroupns=host",
                "-v",
                "/sys/fs/cgroup:/sys/fs/cgroup:rw",
                "--tmpfs",
                "/run",
                "--tmpfs",
                "/run/lock",
                "--tmpfs",
                "/tmp",
                "-t",
                "--network",
                "host",
                "-e",
                "container=docker",
                "-e",
                f"LAB_MACHINE_ADDR={addr}",
                "-e",
                f"LAB_APT_URL=http://{apt_addr}",
                "-v",
                f"{self.keys / name}:/lab:ro",
                "--stop-signal",
                "SIGRTMIN+3",
                *extra,
                "--entrypoint",
                "/usr/local/sbin/lab-init",
                image,
            )

    def wait_ssh(self) -> None:
        deadline = time.monotonic() + BOOT_TIMEOUT
        for name in self.names():
            addr = self.address(name)
            while not _ssh_banner(addr, SSH_PORT):
                if time.monotonic() > deadline:
                    tail = self.docker("logs", "--tail", "30", name, check=False).stdout
                    raise Failed(
                        f"{name}: no sshd on {addr}:{SSH_PORT} after {BOOT_TIMEOUT}s\n{tail}"
                    )
                time.sleep(0.2)

    def write_env(self, apt_addr: str) -> None:
        values = {
            "PATCHD_LAB_MACHINES_DOCKER_HOST": f"unix://{self.sock}",
            "PATCHD_LAB_MACHINE_NAMES": " ".join(self.apt_names()),
            "PATCHD_LAB_MACHINE_ADDRESSES": " ".join(self.address(n) for n in self.apt_names()),
            "PATCHD_LAB_RPM_MACHINE_NAMES": " ".join(self.rpm_names()),
            "PATCHD_LAB_RPM_MACHINE_ADDRESSES": " ".join(self.address(n) for n in self.rpm_names()),
            "PATCHD_LAB_RPM_DIR": str(self.rpm_repo),
            "PATCHD_LAB_MACHINE_SSH_PORT": str(SSH_PORT),
            "PATCHD_LAB_MACHINE_KEY": str(self.keys / "id_ed25519"),
            "PATCHD_LAB_MACHINE_KNOWN_HOSTS": str(self.known_hosts),
            "PATCHD_LAB_APT_DIR": str(self.repo),
            "PATCHD_LAB_APT_URL": f"http://{apt_addr}",
        }
        self.env_file.write_text("".join(f"export {k}='{v}'\n" for k, v in values.items()))

    def up(self) -> None:
        if self.count == 0 and self.rpm_count == 0:
            log("PATCHD_LAB_MACHINES=0: no machines")
            self.env_file.unlink(missing_ok=True)
            return
        t0 = time.monotonic()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.make_keys()
        apt_addr = self.start_apt()
        self.start_engine()
        images = dict.fromkeys(self.apt_names(), self.image())
        if self.rpm_count:
            images.update(dict.fromkeys(self.rpm_names(), self.rpm_image()))
        self.start_machines(images, apt_addr)
        self.wait_ssh()
        self.write_env(apt_addr)
        rpm = f" and {self.rpm_count} rpm machines" if self.rpm_count else ""
        log(
            f"{self.count} machines on {self.net}.1-{self.count}{rpm}"
            f" up in {time.monotonic() - t0:.1f}s"
        )

    def down(self) -> None:
        self.env_file.unlink(missing_ok=True)
        if self.data.exists() or self.engine_pid():
            self.stop_engine()
        pid = _our_pid(self.apt_pid, str(self.repo))
        if pid:
            _stop_pid(pid)
            log(f"apt repository: stopped pid {pid}")
        self.apt_pid.unlink(missing_ok=True)
        self.apt_addr.unlink(missing_ok=True)

    def status(self) -> bool:
        ok = True
        pid = self.engine_pid()
        if self.count + self.rpm_count == 0 and not pid:
            return True
        up = bool(pid) and self.ping()
        print(f"{'machines':<9} {'up' if up else 'down':<5} pid {pid or '-':<8} unix://{self.sock}")
        ok &= up
        for name in self.names():
            alive = up and _ssh_banner(self.address(name), SSH_PORT)
            print(f"{name:<9} {'up' if alive else 'down':<5} {'':12} ssh://{self.address(name)}")
            ok &= alive
        apt = _our_pid(self.apt_pid, str(self.repo))
        addr = self.apt_addr.read_text().strip() if self.apt_addr.exists() else "-"
        print(f"{'apt':<9} {'up' if apt else 'down':<5} pid {apt or '-':<8} http://{addr}")
        return ok and bool(apt)


# --- small helpers -----------------------------------------------------------------


def _cache_dir() -> Path:
    """PATCHD_LAB_CACHE, else /var/cache/patchd-lab, else (not root) ~/.cache/patchd-lab."""
    if os.environ.get("PATCHD_LAB_CACHE"):
        return Path(os.environ["PATCHD_LAB_CACHE"])
    system = Path("/var/cache/patchd-lab")
    if os.access(system if system.exists() else system.parent, os.W_OK):
        return system
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "patchd-lab"


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _our_pid(pidfile: Path, arg: str) -> int | None:
    """The pid in `pidfile` if that process lives and has `arg` among its arguments."""
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if _alive(pid) and arg in _cmdline(pid) else None


def _stop_pid(pid: int, timeout: float = 15) -> None:
    with contextlib.suppress(OSError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _alive(pid):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def _kill_cgroup(name: str) -> None:
    roots = [Path("/sys/fs/cgroup") / name, *Path("/sys/fs/cgroup").glob(f"*/{name}")]
    for root in roots:
        for procs in root.rglob("cgroup.procs"):
            for pid in procs.read_text().split():
                with contextlib.suppress(OSError):
                    os.kill(int(pid), signal.SIGKILL)
    time.sleep(0.2)
    for root in roots:
        for d in sorted(
            (p for p in [root, *root.rglob("*")] if p.is_dir()), key=lambda p: -len(p.parts)
        ):
            with contextlib.suppress(OSError):
                d.rmdir()


def _unmount_under(*dirs: Path) -> None:
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].encode().decode("unicode_escape")
        if any(point == str(d) or point.startswith(f"{d}/") for d in dirs):
            points.append(point)
    for point in sorted(points, key=len, reverse=True):
        if subprocess.call(["umount", point], stderr=subprocess.DEVNULL):
            subprocess.call(["umount", "-l", point], stderr=subprocess.DEVNULL)


def _keygen(path: Path, comment: str) -> None:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True,
        stdin=subprocess.DEVNULL,
    )


def _port_open(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def _ssh_banner(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1) as s:
            s.settimeout(2)
            return s.recv(64).startswith(b"SSH-2.0")
    except OSError:
        return False


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[1] not in ("up", "down", "status"):
        print(__doc__, file=sys.stderr)
        return 2
    bed = Bed(Path(argv[2]).absolute())
    try:
        if argv[1] == "up":
            bed.up()
        elif argv[1] == "down":
            bed.down()
        else:
            return 0 if bed.status() else 1
    except Failed as err:
        print(f"lab.sh: machines FAILED: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
