"""Property-collector helpers: every read of vCenter state goes through here.

Owns:
- `retrieve`: `RetrievePropertiesEx` with only the named properties, following
  continuation tokens with `ContinueRetrievePropertiesEx` (real vCenter pages large
  results; vcsim never does, so this loop is unit-tested with a stub collector);
- `view_spec`: a filter over a ContainerView, so a whole inventory is read in one call
  instead of one round trip per object and attribute;
- `read`: a few properties of given objects (a missing property is simply absent: reading
  an unset property by attribute crashes vcsim's handler, and costs a round trip each);
- `wait_for_task`: polls a task's `info.state`, `info.error` and `info.result` only, with a
  timeout. pyVim's WaitForTask reads the whole `info`, whose `entity` field vcsim 0.24.2
  cannot serialize after a snapshot revert or remove.

A `NotAuthenticated` fault in a missing property (how vcsim answers a retrieve without a
session) is raised as the fault, so the session logs in again.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

from patchd import poll
from patchd.backends.vsphere.connection import fault_text, vmomi

PAGE_SIZE = 1000
_POLL_START = 0.05
_POLL_MAX = 1.0


@dataclass(frozen=True)
class Found:
    """One object and the properties that were present for it."""

    obj: Any
    props: Mapping[str, Any]

    @property
    def moid(self) -> str:
        return str(self.obj._moId)

    def get(self, path: str, default: Any = None) -> Any:
        return self.props.get(path, default)


class TaskFailed(Exception):
    """A vCenter task ended in error; `fault` is its MethodFault (or None)."""

    def __init__(self, what: str, fault: Any) -> None:
        super().__init__(f"{what}: {fault_text(fault) if fault is not None else 'failed'}")
        self.fault = fault


class TaskTimeout(Exception):
    """A vCenter task did not finish in time; it may still finish later."""


def _pc() -> Any:
    _, vmodl = vmomi()

    return vmodl.query.PropertyCollector


def _raise_auth_faults(content: Any) -> None:
    vim, _ = vmomi()

    for missing in getattr(content, "missingSet", None) or []:
        fault = getattr(missing, "fault", None)
        if isinstance(fault, vim.fault.NotAuthenticated):
            raise fault


def _found(content: Any) -> Found:
    _raise_auth_faults(content)
    props = {prop.name: prop.val for prop in content.propSet or []}
    return Found(content.obj, props)


def retrieve(collector: Any, specs: list[Any], page_size: int = PAGE_SIZE) -> list[Found]:
    """All objects the filter specs match, page by page until no token is left."""
    options = _pc().RetrieveOptions(maxObjects=page_size)
    result = collector.RetrievePropertiesEx(specs, options)
    found: list[Found] = []
    while result is not None:
        found.extend(_found(content) for content in result.objects or [])
        token = getattr(result, "token", None)
        if not token:
            break
        result = collector.ContinueRetrievePropertiesEx(token)
    return found


def view_spec(view: Any, props: Mapping[Any, Iterable[str]], extra: Iterable[Any] = ()) -> Any:
    """A filter spec over everything in a ContainerView (and the objects in `extra`)."""
    pc = _pc()
    traverse = pc.TraversalSpec(name="view", path="view", skip=False, type=type(view))
    objects = [pc.ObjectSpec(obj=view, skip=True, selectSet=[traverse])]
    objects.extend(pc.ObjectSpec(obj=obj, skip=False) for obj in extra)
    return pc.FilterSpec(
        objectSet=objects,
        propSet=[pc.PropertySpec(type=kind, pathSet=list(paths)) for kind, paths in props.items()],
    )


def read(collector: Any, objects: Iterable[Any], props: Mapping[Any, Iterable[str]]) -> list[Found]:
    """The named properties of the given objects (types as keys of `props`)."""
    pc = _pc()
    spec = pc.FilterSpec(
        objectSet=[pc.ObjectSpec(obj=obj, skip=False) for obj in objects],
        propSet=[pc.PropertySpec(type=kind, pathSet=list(paths)) for kind, paths in props.items()],
    )
    if not spec.objectSet:
        return []
    return retrieve(collector, [spec])


def read_one(collector: Any, obj: Any, paths: Iterable[str]) -> Found:
    """The named properties of one object; raises the fault when the object is gone."""
    found = read(collector, [obj], {type(obj): paths})
    if not found:
        _, vmodl = vmomi()

        raise vmodl.fault.ManagedObjectNotFound(obj=obj)
    return found[0]


def wait_for_task(
    collector: Any,
    task: Any,
    what: str,
    timeout: float,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> Any:
    """Wait for `task` through the collector; its `info.result` on success.

    Raises TaskFailed when it ends in error and TaskTimeout when `timeout` passes first.
    """
    last = ""

    def finished() -> tuple[Any] | None:
        nonlocal last
        info = read_one(collector, task, ("info.state", "info.error", "info.result"))
        last = str(info.get("info.state", ""))
        if last == "success":
            return (info.get("info.result"),)  # a tuple: a task may succeed with None
        if last == "error":
            raise TaskFailed(what, info.get("info.error"))
        return None

    def expired() -> NoReturn:
        raise TaskTimeout(f"{what}: not finished after {timeout:g}s (state {last or '?'})")

    wait = poll.Clock(clock, sleep)
    every = poll.backoff(_POLL_START, _POLL_MAX)
    return poll.until(finished, wait.deadline(timeout), expired, every, wait)[0]
