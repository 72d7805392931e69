"""The test bed's rpm machines: Debian machines that also carry Debian's dnf 4.14, rpm 4.18
and createrepo-c, with an rpm database of their own and a local rpm repository, so the
dnf driver runs a real dnf (docs/dnf-on-debian.md says what was checked and why each
setting below is needed). Standard library only: machines.py imports it.

- The image: the machines' rootfs plus the rpm packages (a second cached rootfs), and
  `DOCKERFILE` on top of the apt machine's image: dnf's repository directory, a release
  version, the `local` plugin (a broken extra repository) turned off, the rpm database in
  /var/lib/rpm for every user, and `lab-system`, a stub rpm that tells rpm that Debian's
  /bin/sh exists (rpm's scriptlets require it; dpkg's files are invisible to rpm).
- The repository: ROOT/rpm under the apt repository's HTTP server (machines/apt/rpm,
  served as http://ADDR/rpm), bind-mounted read-write into the rpm machines at
  /srv/lab-rpm. `RpmRepo` builds the packages with rpmbuild and indexes them with
  createrepo_c INSIDE a machine (the lab host needs neither), through `run`, a function
  that runs a shell script there as root.
"""

from __future__ import annotations

import fnmatch
import shlex
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

EXTRA_PACKAGES = "dnf,rpm,dnf-plugins-core,createrepo-c"
MOUNT = "/srv/lab-rpm"  # where the repository directory appears inside an rpm machine
PREFIX = "rpm"  # rpm machines are rpm1, rpm2...
ADDRESS_BASE = 200  # rpmN listens on NET.(200+N), beside the apt machines' NET.N

LAB_SYSTEM_SPEC = """\
Name: lab-system
Version: 1
Release: 1
Summary: What dpkg installed, as rpm sees it
License: MIT
BuildArch: noarch
Provides: /bin/sh
%description
Debian's /bin/sh belongs to dpkg, which rpm cannot see: rpm scriptlets require it.
%files
"""

DOCKERFILE = """FROM {base}
COPY lab-system.spec /tmp/lab-system.spec
RUN mkdir -p /etc/yum.repos.d /etc/dnf/plugins/needs-restarting.d /etc/rpm {mount} \\
 && echo 12 > /etc/dnf/vars/releasever \\
 && sed -i '0,/^enabled/s/^enabled.*/enabled = 0/' /etc/dnf/plugins/local.conf \\
 && printf '%%_dbpath /var/lib/rpm\\n' > /etc/rpm/macros \\
 && rpmbuild -bb --quiet --define '_topdir /tmp/rb' /tmp/lab-system.spec \\
 && rpm -i /tmp/rb/RPMS/noarch/lab-system-1-1.noarch.rpm \\
 && rm -rf /tmp/rb /tmp/lab-system.spec
"""

# Appended to the machines' init script (runs as root before systemd on every boot).
INIT = """\
if [ -d /etc/yum.repos.d ]; then
    printf '[lab]\\nname=patchd lab\\nbaseurl=%s/rpm\\ngpgcheck=0\\nmetadata_expire=0\\n' \\
        "$LAB_APT_URL" > /etc/yum.repos.d/lab.repo
    [ -e {mount}/repodata/repomd.xml ] || createrepo_c -q {mount}
fi
""".replace("{mount}", MOUNT)


def dockerfile(base: str) -> str:
    return DOCKERFILE.format(base=base, mount=MOUNT)


@dataclass(frozen=True)
class Rpm:
    name: str
    version: str  # rpm's EVR as dnf prints it: VERSION-RELEASE


class RpmRepo:
    """Publish and withdraw rpm versions. `root` is the repository directory on the lab
    host; `run(script)` runs a shell script as root in a machine that mounts it."""

    def __init__(self, root: Path, run: Callable[[str], object]) -> None:
        self.root = root
        self.run = run
        self.advisories: dict[str, str] = {}  # package name -> its <update> elements

    # --- scenarios the tests use ---------------------------------------------------------
    def good(self, name: str, version: str) -> Rpm:
        return self.publish(name, version)

    def security(self, name: str, version: str) -> Rpm:
        """A clean package named by a security advisory (updateinfo type="security")."""
        return self.publish(name, version, advisory=f"LAB-SA-{name}-{version}")

    def failing_post(self, name: str, version: str, requires: str | None = None) -> Rpm:
        """Its %post fails: rpm keeps the new version installed, dnf exits 0."""
        return self.publish(
            name,
            version,
            post=f"echo '{name} {version}: %post fails on purpose' >&2\nexit 1",
            requires=requires,
        )

    def service(self, name: str, version: str, healthy: bool = True) -> Rpm:
        """Ships NAME.service and (re)starts it; an unhealthy version's service fails at
        once, so systemd says degraded and names it."""
        start = "/bin/sleep infinity" if healthy else f"/bin/sh -c 'echo {name} broken; exit 3'"
        unit = textwrap.dedent(f"""\
            [Unit]
            Description=patchd lab service {name}
            [Service]
            ExecStart={start}
            [Install]
            WantedBy=multi-user.target
            """)
        return self.publish(
            name,
            version,
            files={f"/usr/lib/systemd/system/{name}.service": unit},
            post=(
                f"systemctl daemon-reload || true\nsystemctl enable {name}.service || true\n"
                f"systemctl restart {name}.service || true"
            ),
            preun=f"[ $1 -gt 0 ] || systemctl stop {name}.service || true",
        )

    def needing_reboot(self, name: str, version: str) -> Rpm:
        """Asks for a reboot the RHEL way: `dnf needs-restarting -r` names it (its own
        needs-restarting.d file lists it among the packages that need one, like glibc)."""
        return self.publish(
            name,
            version,
            files={f"/etc/dnf/plugins/needs-restarting.d/{name}.conf": f"{name}\n"},
        )

    # --- the repository ------------------------------------------------------------------
    def publish(
        self,
        name: str,
        version: str,
        *,
        files: dict[str, str] | None = None,
        post: str | None = None,
        preun: str | None = None,
        advisory: str | None = None,
        requires: str | None = None,
    ) -> Rpm:
        """Build NAME-VERSION-1.noarch.rpm in a machine, add it and reindex."""
        files = {f"/usr/share/{name}/version": f"{version}\n", **(files or {})}
        build = self.root / ".build"
        build.mkdir(parents=True, exist_ok=True)
        install = []
        for i, (dest, content) in enumerate(sorted(files.items())):
            (build / f"{name}-{version}.{i}").write_text(content)
            install.append(
                f"install -D -m 0644 {MOUNT}/.build/{name}-{version}.{i} %{{buildroot}}{dest}"
            )
        spec = "\n".join(
            [
                f"Name: {name}",
                f"Version: {version}",
                "Release: 1",
                f"Summary: patchd lab package {name}",
                "License: MIT",
                "BuildArch: noarch",
                *([f"Requires: {requires}"] if requires else []),
                "%description",
                f"patchd lab package {name}.",
                "%install",
                *install,
                *([f"%post\n{post}"] if post else []),
                *([f"%preun\n{preun}"] if preun else []),
                "%files",
                *sorted(files),
                "",
            ]
        )
        (build / f"{name}-{version}.spec").write_text(spec)
        if advisory:
            self.advisories[name] = self.advisories.get(name, "") + _advisory(
                advisory, name, version
            )
        self.run(
            f"rpmbuild -bb --quiet --define '_topdir /tmp/lab-rpmbuild'"
            f" {MOUNT}/.build/{shlex.quote(f'{name}-{version}.spec')} 2>/dev/null"
            f" && mv /tmp/lab-rpmbuild/RPMS/noarch/*.rpm {MOUNT}/ && {self._index()}"
        )
        return Rpm(name, f"{version}-1")

    def withdraw(self, pattern: str) -> None:
        """Remove every version of the packages whose file names match `pattern` (a glob)."""
        gone = list(self.root.glob(f"{pattern}.noarch.rpm"))
        for path in gone:
            path.unlink()
        for name in fnmatch.filter(list(self.advisories), pattern):
            del self.advisories[name]
        if gone:
            self.run(self._index())

    def _index(self) -> str:
        """createrepo_c, then the advisories as updateinfo (createrepo_c drops it)."""
        script = f"createrepo_c -q --update {MOUNT}"
        if self.advisories:
            xml = '<?xml version="1.0" encoding="UTF-8"?>\n<updates>\n'
            xml += "".join(self.advisories.values()) + "</updates>\n"
            (self.root / ".build" / "updateinfo.xml").write_text(xml)
            script += (
                f" && modifyrepo_c --mdtype=updateinfo {MOUNT}/.build/updateinfo.xml"
                f" {MOUNT}/repodata >/dev/null"
            )
        return script


def _advisory(advisory: str, name: str, version: str) -> str:
    return textwrap.dedent(f"""\
        <update from="lab@patchd" status="stable" type="security" version="2.0">
          <id>{advisory}</id>
          <title>{name} security update</title>
          <issued date="2026-12-01 00:00:00"/>
          <severity>Important</severity>
          <description>A lab security fix.</description>
          <references/>
          <pkglist><collection short="lab"><name>lab</name>
            <package name="{name}" version="{version}" release="1" epoch="0" arch="noarch">
              <filename>{name}-{version}-1.noarch.rpm</filename>
            </package>
          </collection></pkglist>
        </update>
        """)
