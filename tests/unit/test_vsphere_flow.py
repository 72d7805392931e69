"""The vSphere flow's task wait, decided once for VMs and hosts: a task that outlives
`task_timeout` is cancelled.

vcsim finishes every task at once, so it cannot show a task that hangs: here the
session's connection is stubbed (a property collector that answers "running" forever,
the same stub test_vsphere_units uses for task waits) and the flow's clock is fake, so
the 10-minute timeout passes without sleeping.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from pyVmomi import vim

from patchd.backends.vsphere import VSphereBackend
from patchd.backends.vsphere.collector import TaskTimeout
from patchd.backends.vsphere.flow import Flow
from tests.unit.test_poll import FakeClock
from tests.unit.test_vsphere_units import TaskCollector, _config


def _backend(tmp_path: Path, collector: Any) -> tuple[VSphereBackend, list[tuple[str, bool]]]:
    backend = VSphereBackend("vc", _config(tmp_path, task_timeout="10m"))
    session = backend.session
    session._current = lambda: (SimpleNamespace(propertyCollector=collector), 1)  # type: ignore[method-assign]
    calls: list[tuple[str, bool]] = []
    real = session.call

    def call(what: str, work: Any, *, mutating: bool = False) -> Any:
        calls.append((what, mutating))
        if what.startswith("cancelling "):
            return None  # the stub task has no vCenter behind it to cancel
        return real(what, work, mutating=mutating)

    session.call = call  # type: ignore[method-assign]
    return backend, calls


@pytest.mark.parametrize("kind", ["vms", "hosts"])
def test_a_task_that_times_out_is_cancelled(tmp_path: Path, kind: str) -> None:
    backend, calls = _backend(tmp_path, TaskCollector("running"))
    flow: Flow[Any] = getattr(backend, kind)
    fake = FakeClock()
    flow.clock = fake.clock
    with pytest.raises(TaskTimeout, match="not finished after 600s"):
        flow.task("creating snapshot s of web", lambda content: vim.Task("task-1"))
    assert calls[0] == ("creating snapshot s of web", True)
    assert calls[-1] == ("cancelling creating snapshot s of web", True)
    assert fake.now == 700.0  # 100 + 600: the fake clock, not the real one, ran out


@pytest.mark.parametrize("kind", ["vms", "hosts"])
def test_a_task_that_finishes_is_not_cancelled(tmp_path: Path, kind: str) -> None:
    backend, calls = _backend(tmp_path, TaskCollector("running", "success", result="done"))
    flow: Flow[Any] = getattr(backend, kind)
    flow.clock = FakeClock().clock
    assert flow.task("powering on web", lambda content: vim.Task("task-1")) == "done"
    assert [what for what, _ in calls] == ["powering on web", "powering on web"]
