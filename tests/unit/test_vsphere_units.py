"""The vSphere backend's parts that need no simulator: config, collector paging, commands.

The property collector's continuation-token loop is tested here with a stub collector,
because vcsim (0.24.2) ignores `maxObjects` and never returns a token, while a real
vCenter pages large results. The stub stands in for exactly that and nothing else.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from pydantic import ValidationError
from pyVmomi import vim, vmodl

from patchd.backends import installed_types, load_plugin
from patchd.backends.base import StepFailed, TransientError
from patchd.backends.vsphere import VSphereBackend, VSphereConfig, VSphereSelect
from patchd.backends.vsphere import command as patch_command
from patchd.backends.vsphere.collector import TaskFailed, TaskTimeout, retrieve, wait_for_task
from patchd.cli import main
from tests.conftest import wait_until, write_config

# --- the property collector ---------------------------------------------------------------


def _content(moid: str, **props: Any) -> Any:
    return SimpleNamespace(
        obj=vim.VirtualMachine(moid),
        propSet=[SimpleNamespace(name=k, val=v) for k, v in props.items()],
        missingSet=[],
    )


class PagingCollector:
    """Answers like a real vCenter with more objects than `maxObjects`: pages and tokens."""

    def __init__(self, total: int) -> None:
        self.objects = [_content(f"vm-{i}", name=f"vm{i}") for i in range(total)]
        self.calls: list[tuple[str, Any]] = []
        self.page = 0

    def _page(self, start: int) -> Any:
        chunk = self.objects[start : start + self.page]
        more = start + self.page < len(self.objects)
        return SimpleNamespace(objects=chunk, token=f"t{start + self.page}" if more else None)

    def RetrievePropertiesEx(self, specs: list[Any], options: Any) -> Any:
        self.calls.append(("RetrievePropertiesEx", options.maxObjects))
        self.page = options.maxObjects
        return self._page(0)

    def ContinueRetrievePropertiesEx(self, token: str) -> Any:
        self.calls.append(("ContinueRetrievePropertiesEx", token))
        return self._page(int(token[1:]))


def test_retrieve_follows_continuation_tokens_to_the_last_page() -> None:
    collector = PagingCollector(total=2500)
    found = retrieve(collector, [object()], page_size=1000)
    assert [f.moid for f in found] == [f"vm-{i}" for i in range(2500)]
    assert found[1234].get("name") == "vm1234"
    assert collector.calls == [
        ("RetrievePropertiesEx", 1000),
        ("ContinueRetrievePropertiesEx", "t1000"),
        ("ContinueRetrievePropertiesEx", "t2000"),
    ]


def test_retrieve_single_page_and_empty_answers() -> None:
    collector = PagingCollector(total=3)
    assert len(retrieve(collector, [object()])) == 3
    assert [c[0] for c in collector.calls] == ["RetrievePropertiesEx"]

    class Empty:
        def RetrievePropertiesEx(self, specs: Any, options: Any) -> None:
            return None  # what pyVmomi gives for "no objects"

    assert retrieve(Empty(), [object()]) == []


def test_a_missing_property_for_lack_of_a_session_raises_not_authenticated() -> None:
    content = _content("vm-1")
    content.missingSet = [SimpleNamespace(path="name", fault=vim.fault.NotAuthenticated())]

    class Collector:
        def RetrievePropertiesEx(self, specs: Any, options: Any) -> Any:
            return SimpleNamespace(objects=[content], token=None)

    with pytest.raises(vim.fault.NotAuthenticated):
        retrieve(Collector(), [object()])


class TaskCollector:
    """A task whose `info.state` moves through the given states, one per read."""

    def __init__(self, *states: str, error: Any = None, result: Any = None) -> None:
        self.states = list(states)
        self.error = error
        self.result = result

    def RetrievePropertiesEx(self, specs: list[Any], options: Any) -> Any:
        state = self.states.pop(0) if len(self.states) > 1 else self.states[0]
        props = {"info.state": state}
        if state == "error":
            props["info.error"] = self.error
        if state == "success" and self.result is not None:
            props["info.result"] = self.result
        return SimpleNamespace(objects=[_content("task-1", **props)], token=None)


def test_wait_for_task_polls_state_only_and_reports_errors_and_timeouts() -> None:
    task = vim.Task("task-1")
    slept: list[float] = []
    ok = TaskCollector("queued", "running", "success", result="snapshot-7")
    assert wait_for_task(ok, task, "snap", 10, sleep=slept.append) == "snapshot-7"
    assert len(slept) == 2

    failing = TaskCollector("running", "error", error=vim.fault.InvalidState(msg="busy"))
    with pytest.raises(TaskFailed, match=r"snap: .*InvalidState: busy"):
        wait_for_task(failing, task, "snap", 10, sleep=lambda s: None)

    clock = iter([0.0, 1.0, 2.0, 3.0, 4.0, 5.0])
    with pytest.raises(TaskTimeout, match="not finished after 3s"):
        wait_for_task(
            TaskCollector("running"),
            task,
            "snap",
            3,
            sleep=lambda s: None,
            clock=lambda: next(clock),
        )


def test_missing_task_object_is_reported() -> None:
    class Gone:
        def RetrievePropertiesEx(self, specs: Any, options: Any) -> Any:
            return SimpleNamespace(objects=[], token=None)

    with pytest.raises(vmodl.fault.ManagedObjectNotFound):
        wait_for_task(Gone(), vim.Task("task-9"), "x", 1, sleep=lambda s: None)


# --- config ---------------------------------------------------------------------------------


def _config(tmp_path: Path, **changes: Any) -> dict[str, Any]:
    password = tmp_path / "pw"
    password.write_text("secret\n")
    password.chmod(0o600)  # patchd refuses a secret every user can read
    return {"host": "vc.example.com", "username": "u", "password_file": str(password), **changes}


def test_config_defaults_and_thumbprint_forms(tmp_path: Path) -> None:
    config = VSphereConfig.model_validate(_config(tmp_path))
    assert (config.port, config.protocol, config.insecure) == (443, "https", False)
    assert config.retries == 3 and config.timeout.total_seconds() == 60
    sha1 = "AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89:AB:CD:EF:01"
    assert VSphereConfig.model_validate(_config(tmp_path, thumbprint=sha1)).thumbprint == (
        sha1.replace(":", "").lower()
    )
    assert (
        VSphereConfig.model_validate(_config(tmp_path, thumbprint="ab" * 32)).thumbprint
        == "ab" * 32
    )
    with pytest.raises(ValidationError, match="SHA-1"):
        VSphereConfig.model_validate(_config(tmp_path, thumbprint="ab" * 21))
    with pytest.raises(ValidationError, match="exactly one of password_file or credential"):
        VSphereConfig.model_validate(_config(tmp_path, credential="vc"))
    with pytest.raises(ValidationError, match="ca_file or thumbprint, not both"):
        VSphereConfig.model_validate(
            _config(tmp_path, thumbprint="ab" * 20, ca_file=str(tmp_path / "pw"))
        )


def test_select_needs_a_selector_and_a_rooted_folder() -> None:
    assert VSphereSelect(names=["web-*"]).kind == "vm"
    assert VSphereSelect(kind="host", cluster="c1").kind == "host"
    assert VSphereSelect(folder="/DC0/vm/prod/").folder == "/DC0/vm/prod"
    with pytest.raises(ValidationError, match="give at least one of"):
        VSphereSelect(kind="host")
    with pytest.raises(ValidationError, match="inventory path from the root"):
        VSphereSelect(folder="DC0/vm")
    with pytest.raises(ValidationError, match='"category:tag" or "tag"'):
        VSphereSelect(tags=[":x"])


def test_backend_is_registered_and_construction_does_not_connect(tmp_path: Path) -> None:
    assert "vsphere" in installed_types()
    assert load_plugin("vsphere") is VSphereBackend
    backend = VSphereBackend("vc", _config(tmp_path, host="192.0.2.1"))  # TEST-NET: never answers
    assert backend.session.logins == 0
    backend.close()


def test_password_from_a_systemd_credential(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "vcenter").write_text("from-systemd\n")
    config = {"host": "vc", "username": "u", "credential": "vcenter"}
    backend = VSphereBackend("vc", config)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert backend.session.password() == "from-systemd"
    assert backend.session.scrub("x from-systemd y") == "x *** y"
    monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    with pytest.raises(Exception, match="CREDENTIALS_DIRECTORY is not set"):
        backend.session.password()


def test_check_config_accepts_a_vsphere_backend_and_groups(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "vc.password").write_text("pw\n")
    (tmp_path / "vc.password").chmod(0o600)
    path = write_config(
        tmp_path / "patchd.toml",
        {
            "windows": {"w": {"days": ["sat"], "duration": "4h"}},
            "backends": {
                "vc": {
                    "type": "vsphere",
                    "host": "vcenter.example.com",
                    "username": "patchd@vsphere.local",
                    "password_file": tmp_path / "vc.password",
                    "thumbprint": "AB:" * 19 + "AB",
                    "task_timeout": "45m",
                }
            },
            "groups": {
                "web": {
                    "backend": "vc",
                    "window": "w",
                    "max_concurrency": 3,
                    "select": {
                        "datacenter": "DC0",
                        "custom_attribute": {"patch-wave": "1"},
                        "tags": ["env:prod"],
                    },
                    "snapshot": {"keep": "24h", "quiesce": True},
                    "health": {"timeout": "10m", "tcp": {"port": 22}},
                    "patch": {
                        "command": ["ansible-playbook", "-l", "{name}", "patch.yml"],
                        "version": "2026-11",
                    },
                },
                "esxi": {
                    "backend": "vc",
                    "window": "w",
                    "select": {"kind": "host", "cluster": "prod-cluster"},
                    "patch": {
                        "command": ["/usr/local/bin/esxi-patch", "{hostname}"],
                        "version": "8.0u3c",
                    },
                },
            },
        },
    )
    assert main(["check-config", "-c", str(path)]) == 0
    assert capsys.readouterr().out.startswith(
        "config OK: 1 file, 1 window, 0 freezes, 1 backend, 2 groups"
    )


# --- the patch command ----------------------------------------------------------------------


VALUES = {"name": "web 1", "moid": "vm-7", "uuid": "u-1", "ip": "192.0.2.7", "hostname": "web1"}


def test_placeholders_are_filled_without_a_shell_and_other_braces_kept() -> None:
    argv = [
        "play",
        "-l",
        "{name}",
        "--extra",
        '{"host": "{ip}", "x": {1}}',
        "{moid}{uuid}",
        "{nope}",
    ]
    assert patch_command.fill(argv, VALUES, "web 1") == [
        "play", "-l", "web 1", "--extra", '{"host": "192.0.2.7", "x": {1}}', "vm-7u-1", "{nope}",
    ]  # fmt: skip
    with pytest.raises(StepFailed, match=r"uses \{ip\} but the target reports no value"):
        patch_command.fill(["ssh", "{ip}"], {**VALUES, "ip": ""}, "web 1")


def test_command_exit_code_decides_and_output_is_in_the_error(tmp_path: Path) -> None:
    patch_command.run([sys.executable, "-c", "print('fine')"], {}, 10, "t")
    with pytest.raises(StepFailed, match="exited 7: broken: PATCHD_X=1"):
        patch_command.run(
            [
                sys.executable,
                "-c",
                "import os,sys; print('broken: PATCHD_X=' + os.environ['PATCHD_X']); sys.exit(7)",
            ],
            {"PATCHD_X": "1"},
            10,
            "t",
        )
    with pytest.raises(StepFailed, match="could not run"):
        patch_command.run([str(tmp_path / "missing")], {}, 10, "t")


def test_command_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    script = (
        "import subprocess, sys, time;"
        f" p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']);"
        f" open({str(pid_file)!r}, 'w').write(str(p.pid));"
        " print('started', flush=True); time.sleep(60)"
    )
    # 3 s: the child must have started (and printed) before its timeout (the runner's own
    # test, in test_commands, gives 1 s); killed, it ends long before its 60 s sleep.
    started = time.monotonic()
    with pytest.raises(StepFailed, match="timed out after 3s: started"):
        patch_command.run([sys.executable, "-c", script], {}, 3, "t")
    assert time.monotonic() - started < 50
    child = int(pid_file.read_text())

    def gone() -> bool:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return True
        return False

    wait_until(gone, 120, f"grandchild {child} to be killed too (and reaped by init)")


# --- retries ------------------------------------------------------------------------------


def test_session_retries_transient_faults_with_backoff_but_not_uncertain_changes(
    tmp_path: Path,
) -> None:
    """Network faults cannot be injected into vcsim, so the login is stubbed here."""
    session = VSphereBackend("vc", _config(tmp_path, retries=2, retry_backoff="1s")).session
    slept: list[float] = []
    session.sleep = slept.append
    session._current = lambda: (None, 1)  # type: ignore[method-assign]
    attempts: list[int] = []

    def flaky(content: Any) -> str:
        attempts.append(1)
        if len(attempts) < 3:
            raise ConnectionResetError("connection reset by peer")
        return "ok"

    assert session.call("reading", flaky) == "ok"
    assert slept == [1.0, 2.0]

    def down(content: Any) -> str:
        raise ConnectionRefusedError("connection refused")

    with pytest.raises(TransientError, match="reading: ConnectionRefusedError"):
        session.call("reading", down)

    changes: list[int] = []

    def change(content: Any) -> str:
        changes.append(1)
        raise ConnectionResetError("reset while the request was in flight")

    with pytest.raises(ConnectionResetError):  # it may have been carried out: not repeated
        session.call("changing", change, mutating=True)
    assert changes == [1]

    busy: list[int] = []

    def busy_change(content: Any) -> str:
        busy.append(1)
        if len(busy) < 2:
            raise vim.fault.TaskInProgress()  # refused: nothing was done
        return "done"

    assert session.call("changing", busy_change, mutating=True) == "done"
