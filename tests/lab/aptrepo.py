"""The test bed's local apt repository: the API tests publish package versions with, and
its HTTP server. Standard library plus dpkg-deb and dpkg-scanpackages (dpkg-dev).

Two flat repositories under one root, which the machines list in sources.list.d:
    ROOT/main       Label: Debian,          Suite: bookworm
    ROOT/security   Label: Debian-Security, Suite: bookworm-security
apt tells a security update by that label and suite, as it does for Debian's own.

    python3 aptrepo.py serve ROOT ADDR_FILE   serve ROOT on 127.0.0.1 (a free port, written
                                              to ADDR_FILE once listening)

The server never answers 304 Not Modified: Python's http.server compares
If-Modified-Since at one-second resolution, so an index rewritten within the second of
the machine's last `apt-get update` would be missed. It also forbids caching.
"""

from __future__ import annotations

import fcntl
import hashlib
import http.server
import os
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import dataclass
from email.utils import formatdate
from pathlib import Path

SUITES = {
    "main": {"Label": "Debian", "Suite": "bookworm", "Codename": "bookworm"},
    "security": {
        "Label": "Debian-Security",
        "Suite": "bookworm-security",
        "Codename": "bookworm-security",
    },
}


@dataclass(frozen=True)
class Published:
    name: str
    version: str
    suite: str
    path: Path


class AptRepo:
    """Publish and withdraw package versions; every change rewrites that suite's index."""

    def __init__(self, root: Path, url: str) -> None:
        self.root = root
        self.url = url  # http://127.0.0.1:PORT, as the machines reach it

    # --- scenarios the tests use -------------------------------------------------------
    def good(self, name: str, version: str, suite: str = "main") -> Published:
        """A package that installs cleanly and changes nothing else."""
        return self.publish(
            name, version, suite=suite, files={f"/usr/share/{name}/version": f"{version}\n"}
        )

    def security(self, name: str, version: str) -> Published:
        """A clean package in the security suite."""
        return self.good(name, version, suite="security")

    def failing_postinst(self, name: str, version: str) -> Published:
        """Unpacks, then its postinst fails: dpkg leaves it half-configured."""
        return self.publish(
            name,
            version,
            postinst=f"echo '{name} {version}: postinst fails on purpose' >&2\nexit 1",
        )

    def service(self, name: str, version: str, healthy: bool = True) -> Published:
        """Ships `NAME.service` and (re)starts it; an unhealthy version's service fails at
        once, so `systemctl is-system-running` says degraded and lists it."""
        start = (
            "/bin/sleep infinity"
            if healthy
            else f"/bin/sh -c 'echo {name} {version} broken; exit 3'"
        )
        unit = textwrap.dedent(f"""\
            [Unit]
            Description=patchd lab service {name}
            [Service]
            ExecStart={start}
            [Install]
            WantedBy=multi-user.target
            """)
        postinst = (
            f"systemctl daemon-reload || true\nsystemctl enable {name}.service || true\n"
            f"systemctl restart {name}.service || true"
        )
        return self.publish(
            name,
            version,
            files={f"/lib/systemd/system/{name}.service": unit},
            postinst=postinst,
            prerm=f"systemctl stop {name}.service || true",
        )

    def needing_reboot(self, name: str, version: str) -> Published:
        """Asks for a reboot the Debian way (/var/run/reboot-required), like a kernel."""
        return self.publish(
            name,
            version,
            postinst=(
                f"touch /var/run/reboot-required\necho {name} >> /var/run/reboot-required.pkgs"
            ),
        )

    # --- the repository ------------------------------------------------------------
    def publish(
        self,
        name: str,
        version: str,
        *,
        suite: str = "main",
        files: dict[str, str] | None = None,
        postinst: str | None = None,
        prerm: str | None = None,
        depends: str | None = None,
    ) -> Published:
        """Build NAME_VERSION_all.deb into SUITE and reindex it."""
        suite_dir = self.root / suite
        suite_dir.mkdir(parents=True, exist_ok=True)
        path = suite_dir / f"{name}_{version}_all.deb"
        with tempfile.TemporaryDirectory() as tmp:
            pkg = Path(tmp) / "pkg"
            (pkg / "DEBIAN").mkdir(parents=True)
            control = [
                f"Package: {name}",
                f"Version: {version}",
                "Architecture: all",
                "Maintainer: patchd lab <lab@example.invalid>",
                "Section: misc",
                "Priority: optional",
                f"Description: patchd lab package {name}",
            ]
            if depends:
                control.append(f"Depends: {depends}")
            (pkg / "DEBIAN/control").write_text("\n".join(control) + "\n")
            for script_name, body in (("postinst", postinst), ("prerm", prerm)):
                if body is not None:
                    script = pkg / "DEBIAN" / script_name
                    script.write_text(f"#!/bin/sh\nset -e\n{body}\n")
                    script.chmod(0o755)
            for dest, content in (files or {}).items():
                target = pkg / dest.lstrip("/")
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(content)
            subprocess.run(
                ["dpkg-deb", "--root-owner-group", "-Zgzip", "--build", str(pkg), str(path)],
                check=True,
                capture_output=True,
            )
        self.index(suite)
        return Published(name, version, suite, path)

    def withdraw(self, name: str, version: str | None = None) -> None:
        """Remove a package (one version, or all of them) from every suite."""
        for suite in SUITES:
            pattern = f"{name}_{version or '*'}_all.deb"
            gone = list((self.root / suite).glob(pattern))
            for deb in gone:
                deb.unlink()
            if gone:
                self.index(suite)

    def index_all(self) -> None:
        for suite in SUITES:
            self.index(suite)

    def index(self, suite: str) -> None:
        """Rewrite Packages and Release (with a fresh Date) atomically, under a lock."""
        suite_dir = self.root / suite
        suite_dir.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            packages = subprocess.run(
                ["dpkg-scanpackages", "-m", ".", "/dev/null"],
                cwd=suite_dir,
                check=True,
                capture_output=True,
            ).stdout
            _atomic_write(suite_dir / "Packages", packages)
            fields = {
                "Origin": "Debian",
                **SUITES[suite],
                "Architectures": "all amd64",
                "Components": "main",
                "Date": formatdate(usegmt=True),
            }
            release = "".join(f"{k}: {v}\n" for k, v in fields.items())
            release += (
                f"SHA256:\n {hashlib.sha256(packages).hexdigest()} {len(packages)} Packages\n"
            )
            _atomic_write(suite_dir / "Release", release.encode())


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_bytes(data)
    tmp.replace(path)


class _Handler(http.server.SimpleHTTPRequestHandler):
    def send_head(self):  # type: ignore[no-untyped-def]
        del self.headers["If-Modified-Since"]  # never 304 (see the module docstring)
        return super().send_head()

    def end_headers(self) -> None:
        self.send_header("Cache-Control", "no-store")
        super().end_headers()

    def log_message(self, format: str, *args: object) -> None:
        sys.stderr.write(f"{self.address_string()} {format % args}\n")


def serve(root: Path, addr_file: Path) -> None:
    handler = lambda *a, **kw: _Handler(*a, directory=str(root), **kw)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    host, port = server.server_address[:2]
    tmp = addr_file.with_name(f".{addr_file.name}.tmp")
    tmp.write_text(f"{host}:{port}\n")
    tmp.replace(addr_file)
    server.serve_forever()


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "serve":
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    serve(Path(sys.argv[2]), Path(sys.argv[3]))
