"""What the VM flow and the host flow share: one way to run a vCenter task, check for an
update, run `patch.command`, verify "healthy for `stable_for`", record the patch version
and map a failed rollback.

`Flow` holds the shared steps; `VmFlow` (vms.py) and `HostFlow` (hosts.py) supply what
differs: how a target is read, what "healthy" means, the pre-check, and the snapshot,
apply and rollback steps around these.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, NoReturn, Protocol, TypeVar

from patchd import log, poll
from patchd.backends.base import (
    JOURNALED_VERSION,
    RollbackFailed,
    Snapshot,
    StepFailed,
    Target,
    TransientError,
    Update,
)
from patchd.backends.vsphere import attributes, command
from patchd.backends.vsphere.attributes import VERSION
from patchd.backends.vsphere.collector import TaskFailed, TaskTimeout, read, wait_for_task
from patchd.backends.vsphere.config import VSphereConfig
from patchd.backends.vsphere.connection import Session, fault_text, vmomi
from patchd.backends.vsphere.steps import step
from patchd.config.schema import HealthModel, PatchModel

# The stage-pin ref of a vSphere patch level, and the version of a group without one.
REF = "patch"
UNVERSIONED = "unversioned"
PREFIX = "patchd-"
POLL = 0.5


class Gone(StepFailed):
    """The VM or host no longer exists."""


def snapshot_name(run_id: str) -> str:
    return PREFIX + re.sub(r"[^A-Za-z0-9_.:-]", "-", run_id)


def read_with_field_names(
    content: Any, obj: Any, props: Iterable[str], label: str
) -> tuple[Mapping[str, Any], dict[int, str]]:
    """One object's properties and the custom field names (key -> name), in one call.

    Raises Gone when the object no longer exists.
    """
    vim, vmodl = vmomi()
    try:
        found = read(
            content.propertyCollector,
            [obj, content.customFieldsManager],
            {type(obj): props, vim.CustomFieldsManager: ["field"]},
        )
    except vmodl.fault.ManagedObjectNotFound:
        raise Gone(f"{label} no longer exists") from None
    names: dict[int, str] = {}
    mine: Mapping[str, Any] | None = None
    for item in found:
        if isinstance(item.obj, vim.CustomFieldsManager):
            names = attributes.field_names(item.get("field"))
        elif item.moid == obj._moId:
            mine = item.props
    if mine is None or "name" not in mine:
        raise Gone(f"{label} no longer exists")
    return mine, names


class State(Protocol):
    """What both flows read of a target (VmState, HostState)."""

    @property
    def moid(self) -> str: ...
    @property
    def ref(self) -> Any: ...
    @property
    def name(self) -> str: ...
    @property
    def uuid(self) -> str: ...
    @property
    def ip(self) -> str: ...
    @property
    def hostname(self) -> str: ...
    @property
    def attributes(self) -> dict[str, str]: ...


S = TypeVar("S", bound=State)


@dataclass(frozen=True)
class Kind:
    """What tells the flows apart in reading and messages."""

    name: str  # Target.kind and the `kind` fact
    label: str  # "reading VM vm-42"
    noun: str  # how step messages name a target: "verifying web-1", "verifying host esx-1"
    vim_type: str  # the managed object type
    props: tuple[str, ...]  # the properties one read fetches


class Flow(Generic[S]):
    """The steps the VM and host flows share; subclasses read targets and judge health."""

    kind: ClassVar[Kind]

    def __init__(self, backend: str, session: Session, config: VSphereConfig) -> None:
        self.backend = backend
        self.session = session
        self.config = config
        self.log = log.get("patchd.vsphere")
        self.clock = poll.SYSTEM
        self._lock = threading.Lock()
        # (moid, snapshot name) -> version applied and not yet committed, in this process.
        self._installed: dict[tuple[str, str], str] = {}

    # --- what a flow supplies -----------------------------------------------------------

    def build(self, moid: str, ref: Any, props: Mapping[str, Any], fields: dict[int, str]) -> S:
        """The state from the properties read (`fields`: custom field key -> name)."""
        raise NotImplementedError

    def own_facts(self, state: S) -> dict[str, str]:
        """Facts only this kind has (power state, maintenance mode...)."""
        raise NotImplementedError

    def precheck(self, state: S) -> None:
        """Refuse a target patchd must not patch now (StepFailed; nothing was changed)."""
        raise NotImplementedError

    def healthy(self, target: Target, state: S) -> bool:
        """Whether a patched target is healthy now; StepFailed when it cannot become so."""
        raise NotImplementedError

    def unhealthy(self, target: Target, state: S, stable_for: float, timeout: float) -> str:
        """Why verify gave up, from the state read last."""
        raise NotImplementedError

    # --- shared steps -------------------------------------------------------------------

    def read(self, moid: str) -> S:
        """One target's state in one collector call; Gone when it no longer exists."""
        vim, _ = vmomi()

        def work(content: Any) -> S:
            ref = getattr(vim, self.kind.vim_type)(moid, self.session.stub)
            label = f"{self.kind.label} {moid}"
            props, fields = read_with_field_names(content, ref, self.kind.props, label)
            return self.build(moid, ref, props, fields)

        return self.session.call(f"reading {self.kind.label} {moid}", work)

    def facts(self, state: S) -> dict[str, str]:
        """What describe reports, and PATCHD_TARGET_<FACT> for patch.command."""
        return {
            "name": state.name,
            "moid": state.moid,
            "kind": self.kind.name,
            "uuid": state.uuid,
            "ip": state.ip,
            "hostname": state.hostname,
            **self.own_facts(state),
            "patch_version": state.attributes.get(VERSION, ""),
        }

    def describe(self, target: Target) -> Mapping[str, str]:
        with step(self.session, f"describing {target.name}"):
            return self.facts(self.read(target.id))

    def task(self, what: str, start: Callable[[Any], Any], timeout: float | None = None) -> Any:
        """Start a task with `start(content)` (a change: not retried) and wait for it.

        A task that times out is cancelled: left running, it could still change the VM or
        host after patchd has given up on it and moved on (a snapshot appearing after the
        rollback, a host entering maintenance mode after it was reported failed). The
        cancel is best effort (the task may have finished meanwhile, or not be cancelable);
        the TaskTimeout stands either way.
        """
        task = self.session.call(what, start, mutating=True)
        limit = self.config.task_timeout.total_seconds() if timeout is None else timeout
        try:
            return self.session.call(
                what,
                lambda content: wait_for_task(
                    content.propertyCollector,
                    task,
                    what,
                    limit,
                    sleep=self.clock.sleep,
                    clock=self.clock.monotonic,
                ),
            )
        except TaskTimeout:
            try:
                self.session.call(
                    f"cancelling {what}", lambda content: task.CancelTask(), mutating=True
                )
            except Exception as err:
                self.log.info("vsphere_cancel_failed", task=what, error=fault_text(err))
            raise

    def set_attribute(self, state: S, name: str, value: str) -> None:
        self.session.call(
            f"setting {name} on {state.name}",
            lambda content: attributes.set_value(content, state.ref, name, value),
            mutating=True,
        )

    def check_update(
        self, target: Target, pins: Mapping[str, str], patch: PatchModel
    ) -> Update | None:
        """`patch.version` (or the stage pin) against the recorded `patchd.patch_version`;
        without a version every run patches. A due update runs the pre-check."""
        with step(self.session, f"checking {target.name} for an update"):
            state = self.read(target.id)
        recorded = state.attributes.get(VERSION, "")
        wanted = pins.get(REF, patch.version)
        if wanted is not None and wanted == recorded:
            return None
        if patch.command is None and not patch.reboot:
            raise StepFailed(
                f"{target.name}: the group sets neither patch.command nor patch.reboot:"
                " nothing to patch with"
            )
        with step(self.session, f"pre-check of {target.name}"):
            self.precheck(state)
        return Update(ref=REF, current=recorded, available=wanted or UNVERSIONED)

    def run_patch_command(
        self, target: Target, state: S, update: Update, snapshot: str, patch: PatchModel
    ) -> None:
        """Fill `patch.command` from the target's state and run it (see command.py)."""
        assert patch.command is not None
        values = {
            "name": state.name,
            "moid": state.moid,
            "uuid": state.uuid,
            "ip": state.ip,
            "hostname": state.hostname,
        }
        argv = command.fill(patch.command, values, target.name)
        env = command.environment(
            self.facts(state),
            {
                "PATCHD_TARGET_ID": target.id,
                "PATCHD_TARGET_NAME": target.name,
                "PATCHD_TARGET_KIND": target.kind,
                "PATCHD_RUN_ID": snapshot.removeprefix(PREFIX),
                "PATCHD_PATCH_VERSION": update.available,
            },
        )
        command.run(argv, env, patch.timeout.total_seconds(), target.name)

    def installed(self, target: Target, snapshot: str, version: str) -> None:
        with self._lock:
            self._installed[(target.id, snapshot)] = version

    def verify(self, target: Target, update: Update, health: HealthModel) -> None:
        """Healthy at every read for `health.stable_for`, within `health.timeout`."""
        timeout = health.timeout.total_seconds()
        stable_for = health.stable_for.total_seconds()
        last: list[S] = []

        def good() -> bool:
            state = self.read(target.id)
            last[:] = [state]
            return self.healthy(target, state)

        def expired() -> NoReturn:
            raise StepFailed(self.unhealthy(target, last[-1], stable_for, timeout))

        with step(self.session, f"verifying {self.kind.noun}{target.name}"):
            deadline = self.clock.deadline(timeout)
            poll.steady(good, stable_for, deadline, expired, POLL, self.clock)

    def applied_version(self, target: Target, snapshot: Snapshot) -> str:
        """The version commit records: applied by this process, or (after a restart) the
        one the journal says was applied."""
        name = str(snapshot.data["name"])
        with self._lock:
            version = self._installed.get((target.id, name))
        version = version or snapshot.data.get(JOURNALED_VERSION)
        if version is None:
            raise StepFailed(
                f"{target.name}: commit of {name} without a patch applied by this process"
            )
        return str(version)

    def record_version(self, state: S, version: str) -> None:
        if version != UNVERSIONED and state.attributes.get(VERSION) != version:
            self.set_attribute(state, VERSION, version)

    def restore_version(self, state: S, snapshot: Snapshot) -> None:
        """Put back the patch version recorded before the patch (rollback)."""
        before = snapshot.data.get("version_before")
        if before is not None and state.attributes.get(VERSION, "") != before:
            self.set_attribute(state, VERSION, str(before))

    def forget(self, moid: str, snapshot: str) -> None:
        with self._lock:
            self._installed.pop((moid, snapshot), None)

    @contextmanager
    def rollback_failure(self, what: str) -> Iterator[None]:
        """Any failure inside becomes RollbackFailed(`what: cause`), scrubbed; a
        TransientError stays one (the engine tries the rollback again)."""
        try:
            yield
        except (RollbackFailed, TransientError):
            raise
        except Exception as err:
            ours = isinstance(err, StepFailed | TaskFailed | TaskTimeout)
            cause = str(err) if ours else fault_text(err)
            raise RollbackFailed(self.session.scrub(f"{what}: {cause}")) from None
