"""Security properties end to end, against the real Docker engine, registry and vcsim.

1. The vCenter password is in nothing patchd writes. A distinctive password is planted in
   a `password_file`; `patchd daemon` patches a Docker group and a vSphere group and fails
   a third whose vCenter refuses the login; the patch command and a health command print
   the password (as a site tool that reads it might); a reload is refused for a config
   that echoes it; then `patchd run`, `plan`, `status` and `history` run. The daemon's
   stdout and stderr, the metrics page, every byte of the state directory and every
   command's output are searched for it, and each place it was put is checked to hold
   `***` instead, so the test fails if a scenario stops reaching the secret.
2. A `password_file` a shared group can read is a `config_warning` log event of the daemon
   (tests/unit/test_secret_files.py covers refusing and warning in `check-config`).
3. Target names with shell metacharacters reach `patch.command` (through `{name}`) and
   `health.command` (through PATCHD_TARGET_NAME) byte for byte, and nothing runs them.

vcsim 0.24.2 accepts any non-empty user name and password, so the refused login needs a
stand-in: `RefusingProxy` forwards every request to the real simulator but answers Login
with a SOAP fault quoting the whole request, password included, the worst a server can do.
"""

from __future__ import annotations

import grp
import http.client
import json
import os
import signal
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import pytest
from pyVim.task import WaitForTask

from tests.conftest import wait_until, write_config
from tests.integration.conftest import VcsimProcess
from tests.integration.daemon_helpers import Daemon, scrape
from tests.integration.daemon_helpers import run_patchd as patchd
from tests.integration.docker_fleet import Fleet, free_port
from tests.integration.vsphere_lab import Sim, fleet, start

Factory = Callable[..., VcsimProcess]

_FAULT = """<?xml version="1.0" encoding="UTF-8"?>
<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/"
 xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><soapenv:Body><soapenv:Fault>
<faultcode>ServerFaultCode</faultcode><faultstring>login rejected: {echo}</faultstring>
<detail><SystemErrorFault xmlns="urn:vim25" xsi:type="SystemError"><reason>{echo}</reason>
</SystemErrorFault></detail></soapenv:Fault></soapenv:Body></soapenv:Envelope>"""


class RefusingProxy:
    """A vCenter that refuses every login, quoting the request (see the module docstring)."""

    def __init__(self, host: str, port: int) -> None:
        upstream = (host, port)
        self.refused = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                self.forward()

            def do_POST(self) -> None:
                self.forward()

            def forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers: list[tuple[str, str]]
                if b"<Login " in body or b"<Login>" in body:
                    proxy.refused += 1
                    data = _FAULT.format(echo=escape(body.decode())).encode()
                    status, headers = 500, [("Content-Type", "text/xml; charset=utf-8")]
                else:
                    conn = http.client.HTTPConnection(*upstream, timeout=10)
                    sent = {
                        k: v
                        for k, v in self.headers.items()
                        if k.lower() not in ("host", "content-length", "connection")
                    }
                    conn.request(self.command, self.path, body=body or None, headers=sent)
                    response = conn.getresponse()
                    data, status = response.read(), response.status
                    headers = [
                        (k, v)
                        for k, v in response.getheaders()
                        if k.lower() in ("content-type", "set-cookie")
                    ]
                    conn.close()
                self.send_response(status)
                for key, value in headers:
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def sims(vcsim_factory: Factory, tmp_path: Path) -> Iterator[Callable[..., Sim]]:
    started: list[Sim] = []

    def make(**kw: Any) -> Sim:
        sim = start(vcsim_factory, tmp_path, **kw)
        started.append(sim)
        return sim

    yield make
    for sim in started:
        sim.close()


def vsphere_backend(host: str, port: int, password_file: Path) -> dict[str, Any]:
    return {
        "type": "vsphere",
        "host": host,
        "port": port,
        "protocol": "http",
        "insecure": True,
        "username": "user",
        "password_file": password_file,
        "retries": 0,
        "timeout": "10s",
    }


ALWAYS = {"cron": "*/5 * * * *", "duration": "5m"}  # a window open at every instant


# A site tool that reads the vCenter password, as one that logs in itself would, and
# prints it: on success (its output is logged) and on failure (its output is the error).
ECHO_PASSWORD = (
    "import sys; pw = open(sys.argv[1]).read().strip();"
    " print(f'{sys.argv[2]}: vcenter login user/{pw} used');"
    " sys.exit(1 if sys.argv[2] == sys.argv[3] else 0)"
)


def echo(password: Path, name: str, failing: str) -> list[str]:
    """argv of a command printing the password, failing for the target `failing`."""
    return [sys.executable, "-c", ECHO_PASSWORD, str(password), name, failing]


def test_the_vsphere_password_is_in_nothing_patchd_writes(
    sims: Callable[..., Sim], f: Fleet, tmp_path: Path
) -> None:
    secret = f"Pw-{uuid.uuid4().hex}-S3cr3t"
    password = tmp_path / "vcenter.password"
    password.write_text(secret + "\n")
    # Group-readable by a group of several users: a warning, not a refusal.
    nogroup = grp.getgrnam("nogroup").gr_gid
    os.chown(password, 0, nogroup)
    password.chmod(0o640)

    sim = sims(vms=2)
    good, bad = list(sim.vms())
    fleet(sim, [good, bad], "1")
    proxy = RefusingProxy(sim.process.host, sim.process.port)

    f.publish("app-v1", "web")
    f.run("web", "web")
    f.wait_healthy(f.name("web"))
    v1 = f.digest_of(f.name("web"))
    f.publish("app-v2", "web")

    state = tmp_path / "state"
    port = free_port()
    config = tmp_path / "patchd.toml"

    def write(vc_host: str) -> None:
        write_config(
            config,
            {
                "daemon": {
                    "state_dir": state,
                    "metrics_address": f"127.0.0.1:{port}",
                    "log_format": "json",
                    "log_level": "debug",
                },
                "windows": {"always": ALWAYS},
                "backends": {
                    "docker": {"type": "docker", "url": f.docker_host, "timeout": "30s"},
                    "vc": vsphere_backend(vc_host, sim.process.port, password),
                    "vc-refusing": vsphere_backend("127.0.0.1", proxy.port, password),
                },
                "groups": {
                    "containers": {
                        "backend": "docker",
                        "window": "always",
                        "select": {"labels": {"patchd.test": f.token}},
                        "health": {
                            "timeout": "120s",
                            "stable_for": "1s",
                            "command": echo(password, "web", "web"),
                        },
                    },
                    "vms": {
                        "backend": "vc",
                        "window": "always",
                        "select": {"names": [good, bad]},
                        "max_errors": 2,
                        "health": {"timeout": "120s", "stable_for": "0s"},
                        "patch": {"command": echo(password, "{name}", bad), "version": "2"},
                    },
                    "refused": {
                        "backend": "vc-refusing",
                        "window": "always",
                        "select": {"names": ["*"]},
                        "health": {"stable_for": "0s"},  # said, so no stable_for warning
                        "patch": {"command": ["true"]},
                    },
                },
            },
        )

    write(sim.process.host)
    daemon = Daemon(config, tmp_path)
    try:

        def finished() -> dict[str, dict[str, Any]]:
            return {e["group"]: e for e in daemon.events() if e["event"] == "run_finished"}

        runs = wait_until(lambda: len(finished()) == 3 and finished(), 360, "three runs")
        metrics = scrape(port)
        # A config whose error would quote the password: the reload is refused, logged.
        write(f"{sim.process.host}/{secret}")
        daemon.proc.send_signal(signal.SIGHUP)
        wait_until(
            lambda: any(e["event"] == "reload_failed" for e in daemon.events()),
            120,
            "reload",
            give_up=daemon.exited,
        )
        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.proc.wait(120) == 0
        events = daemon.events()
        daemon.log.seek(0)
        daemon_output = daemon.log.read()
    finally:
        daemon.close()
        proxy.close()

    # What happened is what the scenario needs: each place got the password to hide.
    assert runs["containers"]["failed"] == 1 and f.digest_of(f.name("web")) == v1
    assert (runs["vms"]["succeeded"], runs["vms"]["failed"]) == (1, 1)
    assert runs["refused"]["status"] == "failed" and proxy.refused >= 1
    warnings = [e for e in events if e["event"] == "config_warning"]
    assert sorted(e["key"] for e in warnings) == [
        "backends.vc-refusing.password_file",
        "backends.vc.password_file",
    ]
    assert all(e["file"] == str(config) and "group nogroup" in e["reason"] for e in warnings)
    [reload_failed] = [e for e in events if e["event"] == "reload_failed"]
    assert any(f"{sim.process.host}/***" in line for line in reload_failed["errors"])
    echoed = [e for e in events if e["event"] == "patch_command_output"]
    assert {e["output"] for e in echoed} == {
        f"{good}: vcenter login user/*** used\n",
        f"{bad}: vcenter login user/*** used\n",
    }
    assert "login rejected" in daemon_output and '">***</password>' in daemon_output
    assert 'patchd_backend_up{backend="vc-refusing"} 0.0' in metrics
    assert 'patchd_backend_up{backend="vc"} 1.0' in metrics

    # Then the commands an operator runs, each in its own process, on the good config.
    write(sim.process.host)
    rerun = patchd("run", "vms", "-c", str(config), "--force")
    assert rerun.returncode == 1
    assert f"{bad}: rolled_back" in rerun.stdout and "user/*** used" in rerun.stdout
    outputs = [
        rerun,
        patchd("plan", "-c", str(config)),
        patchd("status", "-c", str(config)),
        patchd("history", "-c", str(config)),
        patchd("history", "-c", str(config), "--json"),
    ]
    history = json.loads(outputs[-1].stdout)
    errors = {
        (run["group"], t["target"]): t["error"] or "" for run in history for t in run["targets"]
    }
    # The journal holds the commands' output scrubbed: patch.command's and health.command's.
    assert "vcenter login user/*** used" in errors["vms", bad], errors
    assert "web: vcenter login user/*** used" in errors["containers", f.name("web")], errors
    assert any(
        "login rejected" in (run["error"] or "") for run in history if run["group"] == "refused"
    )

    journal = b"".join(p.read_bytes() for p in sorted(state.rglob("*")) if p.is_file())
    assert b"user/*** used" in journal  # SQLite keeps text as it is: this is what it holds
    places = {
        "daemon stdout/stderr": daemon_output,
        "metrics": metrics,
        **{f"`patchd {' '.join(p.args[3:])}`": p.stdout + p.stderr for p in outputs},
    }
    leaked = [where for where, text in places.items() if secret in text]
    assert not leaked, f"the password leaked into: {leaked}"
    assert secret.encode() not in journal, "the password leaked into the state directory"


# --- names with shell metacharacters ----------------------------------------------------

ODD_NAME = "web; touch pwned-1 $(touch pwned-2) `touch pwned-3` | & > x {uuid} '\" * ~ é"

RECORD = (
    "import json, os, sys; open(os.environ['OUT'], 'a').write(json.dumps({'argv': sys.argv[1:],"
    " 'env': os.environ.get('PATCHD_TARGET_NAME')}) + '\\n')"
)


def record(*args: str) -> list[str]:
    """argv of a command appending its arguments and PATCHD_TARGET_NAME to $OUT."""
    return [sys.executable, "-c", RECORD, *args]


def test_a_vm_named_with_shell_metacharacters_reaches_commands_intact(
    sims: Callable[..., Sim], tmp_path: Path
) -> None:
    sim = sims(vms=1)
    [original] = list(sim.vms())
    fleet(sim, [original], "1")
    WaitForTask(sim.vm(original).Rename_Task(newName=ODD_NAME))
    assert list(sim.vms()) == [ODD_NAME]
    password = tmp_path / "vcenter.password"
    password.write_text("pass\n")
    password.chmod(0o600)
    work = tmp_path / "cwd"  # where a shell would have created pwned-*
    work.mkdir()
    out = tmp_path / "calls.jsonl"
    config = tmp_path / "patchd.toml"
    write_config(
        config,
        {
            "daemon": {"state_dir": tmp_path / "state"},
            "windows": {"w": ALWAYS},
            "backends": {"vc": vsphere_backend(sim.process.host, sim.process.port, password)},
            "groups": {
                "odd": {
                    "backend": "vc",
                    "window": "w",
                    "select": {"names": ["web;*"]},
                    "health": {"timeout": "120s", "stable_for": "0s", "command": record("health")},
                    "patch": {
                        "command": record("{name}", "x{name}y", "{moid}"),
                        "version": "2",
                    },
                }
            },
        },
    )
    run = patchd("run", "odd", "-c", str(config), "--force", cwd=work, env={"OUT": str(out)})
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.startswith(f"[1/1] {ODD_NAME}: success")
    moid = sim.vm(ODD_NAME)._moId
    calls = [json.loads(line) for line in out.read_text().splitlines()]
    assert calls == [
        {"argv": [ODD_NAME, f"x{ODD_NAME}y", moid], "env": ODD_NAME},
        {"argv": ["health"], "env": ODD_NAME},
    ]
    assert list(work.iterdir()) == [] and not list(tmp_path.glob("pwned*"))
    assert sim.attr(sim.vm(ODD_NAME), "patchd.patch_version") == "2"
