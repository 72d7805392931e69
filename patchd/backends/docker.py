"""Docker Engine backend (`type = "docker"`): patches containers by recreating them.

A target is a container, identified by its NAME (stable across a recreate). One patch:

- check_update: the registry's manifest digest for the container's configured image
  reference (`Config.Image`, e.g. `registry:5000/app:stable`) against the `RepoDigests`
  entry of that repository on the image the container runs. Never pulls.
- snapshot: stop the container and rename it `NAME.patchd-RUN` (it and its image stay).
- apply: pull `repository@digest`, tag it locally as the configured reference, create a
  container under the original name with the old one's user-set configuration
  (`docker_recreate`) from that reference, put the tag back where it was, and start the
  container. Creating from the reference rather than from `repository@digest` keeps
  `Config.Image` as configured, so the new container inspects identical to the old one
  except for the image (and tools that read `Config.Image`, such as compose, keep
  working). Tag, create and tag-back happen under a per-reference lock, and the created
  container's image id is checked against the pulled one, so concurrent patches of one
  reference never pick up each other's version; the local tag moves for good only at
  commit, so a rollback has no tag to undo.
- verify: the container's own HEALTHCHECK, or else running without a restart for
  `stable_for`.
- commit: once the replacement still runs, remove the renamed container and move the
  local tag to the new image; the old image is kept for the group's `snapshot.keep` (the
  one key for it; `rollback_retention` is refused with that hint) and removed by
  `release` when no container uses it and it has no tag.
- rollback: from any partial state, put the renamed container back under its name and
  start it. A container is never removed unless the old one is there to replace it.
  While the engine cannot be reached it is tried again, up to `rollback_timeout`.

Containers are selected only while running or restarting, and are checked again just
before their patch: a stopped container cannot be verified, and starting it is not
patchd's to decide. `--rm` containers are refused at snapshot (stopping would delete
them).

Known limit: a renamed container with restart policy `always` is started again if the
Docker daemon itself restarts during the patch (the engine's rule for that policy); the
next rollback or commit settles it.
"""

from __future__ import annotations

import fnmatch
import re
import threading
import time
from collections.abc import Mapping, Sequence
from contextlib import suppress
from datetime import timedelta
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, Field, FilePath, field_validator, model_validator

from patchd import faults
from patchd.backends.base import (
    Retained,
    RollbackFailed,
    Snapshot,
    StepFailed,
    Target,
    Update,
)
from patchd.backends.docker_engine import Engine, message, not_found, status_code, transient
from patchd.backends.docker_recreate import create_request, parse_ref, repo_digests
from patchd.config.schema import HealthModel, PatchModel, SnapshotModel
from patchd.config.types import STRICT, Duration

_SCHEMES = ("unix://", "tcp://", "ssh://")
ENABLE_LABEL = "patchd.enable"
DEPENDS_LABEL = "patchd.depends_on"
SNAPSHOT_INFIX = ".patchd-"
_SNAPSHOT_NAME = re.compile(r"\.patchd-[A-Za-z0-9_.-]+$")
_SELECTABLE = ("running", "restarting")
_ROLLBACK_MAX_DELAY = 2.0  # seconds between rollback attempts while the engine is away
_DEFAULT_STOP = 10  # seconds; the engine's default stop timeout


class DockerConfig(BaseModel):
    """`[backends.NAME]` keys for `type = "docker"`."""

    model_config = STRICT

    url: str = "unix:///var/run/docker.sock"
    timeout: Duration = timedelta(seconds=60)
    tls_ca: FilePath | None = None
    tls_cert: FilePath | None = None
    tls_key: FilePath | None = None
    # Replaced by the group's snapshot.keep; only parsed to be refused with that hint.
    rollback_retention: Duration | None = None
    # How long a rollback waits for the restored container to be healthy again, and
    # keeps trying an engine that cannot be reached.
    rollback_timeout: Duration = timedelta(minutes=5)

    @field_validator("url")
    @classmethod
    def _scheme(cls, value: str) -> str:
        if not value.startswith(_SCHEMES) or value in _SCHEMES:
            raise ValueError(f"expected a unix://, tcp:// or ssh:// URL, got {value!r}")
        return value

    @field_validator("rollback_retention")
    @classmethod
    def _retention(cls, value: timedelta | None) -> timedelta | None:
        if value is not None:
            raise ValueError("replaced by groups.NAME.snapshot.keep (set per group)")
        return value

    @model_validator(mode="after")
    def _tls(self) -> DockerConfig:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be given together")
        uses_tls = any(p is not None for p in (self.tls_ca, self.tls_cert))
        if uses_tls and not self.url.startswith("tcp://"):
            raise ValueError("TLS files apply only to a tcp:// url")
        return self

    @property
    def tls_files(self) -> tuple[Path | None, Path | None, Path | None]:
        return self.tls_ca, self.tls_cert, self.tls_key


class DockerSelect(BaseModel):
    """A group's `select` table for Docker: every label must match, and any name glob."""

    model_config = STRICT

    labels: dict[str, str] = Field(default_factory=dict)
    names: list[str] = Field(default_factory=list)


class DockerBackend:
    """The Docker backend plugin: one `[backends.NAME]` table, one Docker engine."""

    config_model: ClassVar[type[BaseModel]] = DockerConfig
    select_model: ClassVar[type[BaseModel]] = DockerSelect

    def __init__(self, name: str, config: Any) -> None:
        self.name = name
        self.config: DockerConfig = (
            config if isinstance(config, DockerConfig) else DockerConfig.model_validate(config)
        )
        self.engine = Engine(
            self.config.url, self.config.timeout.total_seconds(), self.config.tls_files
        )
        self._lock = threading.Lock()
        self._ref_locks: dict[str, threading.Lock] = {}

    @property
    def api(self) -> Any:
        return self.engine.api

    def ping(self) -> None:
        with self.engine.step(f"docker {self.config.url}"):
            self.api.ping()

    def close(self) -> None:
        self.engine.close()

    # --- selection and update detection ------------------------------------------------

    def discover(self, select: BaseModel) -> Sequence[Target]:
        assert isinstance(select, DockerSelect)
        filters = {"label": [f"{k}={v}" for k, v in select.labels.items()]} if select.labels else {}
        with self.engine.step("listing containers"):
            listed = self.api.containers(all=True, filters=filters)
        found = []
        for item in listed:
            name = str((item.get("Names") or ["/"])[0]).lstrip("/")
            labels = {str(k): str(v) for k, v in (item.get("Labels") or {}).items()}
            if item.get("State") not in _SELECTABLE or _SNAPSHOT_NAME.search(name):
                continue
            if labels.get(ENABLE_LABEL, "").strip().lower() == "false":
                continue
            if any(labels.get(k) != v for k, v in select.labels.items()):
                continue
            if select.names and not any(fnmatch.fnmatchcase(name, p) for p in select.names):
                continue
            depends = labels.get(DEPENDS_LABEL, "")
            found.append(
                Target(
                    id=name,
                    name=name,
                    kind="container",
                    labels=labels,
                    depends_on=tuple(d.strip() for d in depends.split(",") if d.strip()),
                )
            )
        return sorted(found, key=lambda t: t.name)

    def _running(self, target: Target) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """The target's inspect and that of the image it runs (None if the image is gone)."""
        attrs = self.engine.container(target.id)
        if attrs is None:
            raise StepFailed(f"container {target.id} not found")
        return attrs, self.engine.image(attrs["Image"])

    def check_update(
        self, target: Target, pins: Mapping[str, str], patch: PatchModel | None = None
    ) -> Update | None:
        with self.engine.step(f"checking {target.name} for an update"):
            attrs, image = self._running(target)
            status = (attrs.get("State") or {}).get("Status")
            if status not in _SELECTABLE:
                # Stopped since it was selected (say, by an engine restart): patching
                # would start its replacement, and starting it is not patchd's to decide.
                raise StepFailed(
                    f"{target.name} is {status}: patchd patches running containers only"
                )
            ref = str(attrs["Config"]["Image"])
            parsed = parse_ref(ref)
            if parsed.digest is not None or ref.startswith("sha256:"):
                return None  # pinned to one version by its own configuration
            running = repo_digests(image or {}, parsed.repository)
            available = pins.get(ref)
            if available is None:
                available = str(self.api.inspect_distribution(ref)["Descriptor"]["digest"])
            if available in running:
                return None
            # An image that was built or imported here has no registry digest: the
            # registry's version is then taken to differ, and the id stands for it.
            current = running[0] if running else str(attrs["Image"])
            return Update(ref=ref, current=current, available=available)

    def describe(self, target: Target) -> Mapping[str, str]:
        with self.engine.step(f"describing {target.name}"):
            attrs, image = self._running(target)
        ref = str(attrs["Config"]["Image"])
        state = attrs.get("State") or {}
        digests = repo_digests(image or {}, parse_ref(ref).repository)
        facts = {
            "name": target.name,
            "id": str(attrs["Id"]),
            "image": ref,
            "image_id": str(attrs["Image"]),
            "digest": digests[0] if digests else "",
            "status": str(state.get("Status", "")),
            "started_at": str(state.get("StartedAt", "")),
        }
        health = state.get("Health")
        if health:
            facts["health"] = str(health.get("Status", ""))
        return facts

    # --- the patch ----------------------------------------------------------------------

    def plan_snapshot(self, target: Target, run_id: str) -> Snapshot:
        # Pure: no engine call. Whatever snapshot() learns (the old container's id) is in
        # the data it returns; rollback copes with a plan that carries none of it.
        suffix = re.sub(r"[^A-Za-z0-9_.-]", "-", run_id)
        return Snapshot(
            target.id, {"container": target.id, "old_name": f"{target.id}{SNAPSHOT_INFIX}{suffix}"}
        )

    def snapshot(self, target: Target, snapshot: Snapshot, options: SnapshotModel) -> Snapshot:
        name, old_name = snapshot.data["container"], snapshot.data["old_name"]
        with self.engine.step(f"snapshot of {name}") as progress:
            attrs = self.engine.container(old_name)  # a retry after it was taken
            if attrs is None:
                attrs = self.engine.container(name)
                if attrs is None:
                    raise StepFailed(f"container {name} not found")
                if (attrs.get("HostConfig") or {}).get("AutoRemove"):
                    raise StepFailed(
                        f"{name} was started with --rm: stopping it would delete it, so it"
                        " cannot be snapshotted; recreate it without --rm to have it patched"
                    )
            ref = str(attrs["Config"]["Image"])
            progress.changed = True
            if (attrs.get("State") or {}).get("Running"):
                self._stop(attrs)
                faults.hit("docker.after_stop")
            if attrs["Name"].lstrip("/") != old_name:
                self.api.rename(attrs["Id"], old_name)
                faults.hit("docker.after_rename")
        data = {
            **snapshot.data,
            "old_id": attrs["Id"],
            "image_id": attrs["Image"],
            "image": ref,
        }
        return Snapshot(snapshot.target_id, data)

    def _stop(self, attrs: Mapping[str, Any]) -> None:
        # Given explicitly, the container's own stop timeout also extends the HTTP
        # request's; left out, a long one would outlast the client's timeout.
        grace = (attrs.get("Config") or {}).get("StopTimeout")
        self.api.stop(attrs["Id"], timeout=_DEFAULT_STOP if grace is None else grace)

    def _ref_lock(self, ref: str) -> threading.Lock:
        with self._lock:
            return self._ref_locks.setdefault(ref, threading.Lock())

    def _bridge_disabled(self, container: Mapping[str, Any]) -> bool:
        """Whether the engine runs without its default bridge (only asked when it matters)."""
        config, host = container.get("Config") or {}, container.get("HostConfig") or {}
        if not config.get("NetworkDisabled") or host.get("NetworkMode") not in (
            "default",
            "bridge",
        ):
            return False
        return not any(n.get("Name") == "bridge" for n in self.api.networks(names=["bridge"]))

    def apply(
        self, target: Target, update: Update, snapshot: Snapshot, patch: PatchModel | None = None
    ) -> None:
        name = snapshot.data["container"]
        old_id = snapshot.data.get("old_id")
        if not old_id:
            raise StepFailed(f"{name}: the snapshot was not taken")
        ref = parse_ref(update.ref)
        with self.engine.step(f"apply to {name}") as progress:
            old = self.engine.container(old_id)
            if old is None:
                raise StepFailed(f"{name}: the snapshotted container {old_id[:12]} is gone")
            image = self.engine.image(old["Image"])
            if image is None:
                raise StepFailed(f"{name}: the old image {old['Image']} is gone")
            taken = self.engine.container(name)
            if taken is not None and taken["Id"] != old_id:
                raise StepFailed(f"{name}: a container {taken['Id'][:12]} already has the name")
            request = create_request(
                old,
                image.get("Config") or {},
                update.ref,
                bridge_disabled=self._bridge_disabled(old),
            )
            pulled = self.engine.pull(ref.repository, update.available)
            with self._ref_lock(update.ref):
                tagged = self.engine.image(update.ref)
                progress.changed = True
                self.api.tag(pulled, ref.repository, ref.tag_or_latest)
                try:
                    created = self.api.create_container_from_config(request.body, name=name)
                finally:
                    if tagged is not None and tagged["Id"] != pulled:
                        self.api.tag(tagged["Id"], ref.repository, ref.tag_or_latest)
            new_id = created["Id"]
            faults.hit("docker.after_create")
            new = self.api.inspect_container(new_id)
            if new["Image"] != pulled:
                raise StepFailed(f"{name}: created from {new['Image']}, expected {pulled}")
            for network, endpoint in request.connect:
                ipam = endpoint.get("IPAMConfig") or {}
                self.api.connect_container_to_network(
                    new_id,
                    network,
                    aliases=endpoint.get("Aliases"),
                    links=[tuple(str(li).split(":", 1)) for li in endpoint.get("Links") or []],
                    ipv4_address=ipam.get("IPv4Address"),
                    ipv6_address=ipam.get("IPv6Address"),
                    link_local_ips=ipam.get("LinkLocalIPs"),
                    driver_opt=endpoint.get("DriverOpts"),
                )
            self.api.start(new_id)
            faults.hit("docker.after_start")

    def verify(self, target: Target, update: Update, health: HealthModel) -> None:
        with self.engine.step(f"verifying {target.name}"):
            self.engine.await_healthy(
                target.id,
                health.timeout.total_seconds(),
                health.stable_for.total_seconds(),
                StepFailed,
                restarts=0,  # apply made it: any restart is a crash
            )

    def commit(self, target: Target, snapshot: Snapshot, options: SnapshotModel) -> Retained | None:
        name, old_name = snapshot.data["container"], snapshot.data["old_name"]
        old_id, image_id = snapshot.data.get("old_id"), snapshot.data.get("image_id")
        with self.engine.step(f"commit of {name}") as progress:
            # The old container goes only once its replacement is there.
            new = self.engine.container(name)
            if new is None or new["Id"] == old_id:
                raise StepFailed(f"{name}: no patched container to keep; the old one stays")
            status = (new.get("State") or {}).get("Status")
            if status != "running":
                # It passed verify and stopped since (an engine restart stops containers).
                raise StepFailed(
                    f"{name}: the patched container is {status} (not running) since it was"
                    " verified; the old one stays"
                )
            old = self.engine.container(old_name)
            if old is not None:
                if old_id and old["Id"] != old_id:
                    raise StepFailed(f"{old_name} is {old['Id'][:12]}, not {old_id[:12]}")
                progress.changed = True
                self.api.remove_container(old["Id"], force=True)
                faults.hit("docker.during_commit")
            ref = str(new["Config"]["Image"])
            parsed = parse_ref(ref)
            if parsed.digest is None:
                # What `docker pull` would have done; apply left the tag where it was.
                with self._ref_lock(ref):
                    progress.changed = True
                    self.api.tag(new["Image"], parsed.repository, parsed.tag_or_latest)
        if not image_id or new["Image"] == image_id:
            return None
        return Retained(
            data={"backend": self.name, "image_id": image_id, "image": ref, "container": name},
            keep=options.keep,
            description=f"image {self._kept_name(image_id, parsed.repository)} that {name}"
            " ran before the patch",
        )

    def _kept_name(self, image_id: str, repository: str) -> str:
        """repository@sha256:... (its tag has moved on), or the id of an image without one."""
        with suppress(Exception):  # only a name: the commit is done
            digests = repo_digests(self.engine.image(image_id) or {}, repository)
            return f"{repository}@{digests[0]}" if digests else image_id
        return image_id

    def release(self, retained: Mapping[str, Any]) -> None:
        image_id = retained.get("image_id")
        if not image_id:
            return
        with self.engine.step(f"releasing image {image_id}"):
            image = self.engine.image(image_id)
            tags = [t for t in image.get("RepoTags") or [] if t != "<none>:<none>"] if image else []
            if image is None or tags:
                return  # gone already, or someone tagged it: theirs to remove
            try:
                self.api.remove_image(image_id)
            except Exception as err:
                if not_found(err):
                    return
                if status_code(err) != 409:
                    raise
                # 409: a container (running or not) or a child image uses it: kept. Or it
                # is known by digest in several repositories, which only force removes.
                if "multiple repositories" not in message(err):
                    return
                users = self.api.containers(all=True, quiet=True, filters={"ancestor": image_id})
                if not users:
                    self.api.remove_image(image_id, force=True)

    # --- rollback -----------------------------------------------------------------------

    def rollback(self, target: Target, snapshot: Snapshot) -> None:
        name = snapshot.data.get("container", target.id)
        # Rollback is idempotent: while the engine cannot be reached (it restarts, say)
        # it is tried again, up to rollback_timeout, rather than leaving the target to a
        # person.
        deadline = time.monotonic() + self.config.rollback_timeout.total_seconds()
        attempt = 0
        while True:
            try:
                self._rollback(snapshot)
                return
            except RollbackFailed:
                raise
            except Exception as err:
                delay = min(2.0**attempt, _ROLLBACK_MAX_DELAY)
                if transient(err) and time.monotonic() + delay < deadline:
                    self.engine.sleep(delay)
                    attempt += 1
                    continue
                raise RollbackFailed(f"rollback of {name}: {message(err)}") from err

    def _rollback(self, snapshot: Snapshot) -> None:
        data = snapshot.data
        name, old_name, old_id = data["container"], data["old_name"], data.get("old_id")
        old = self.engine.container(old_name)
        current = self.engine.container(name)
        if old is not None:
            if old_id and old["Id"] != old_id:
                raise RollbackFailed(
                    f"{old_name} is container {old['Id'][:12]}, not {old_id[:12]} that patchd"
                    " renamed; nothing was changed"
                )
            if current is not None and current["Id"] != old["Id"]:
                self._stop(current)
                self.api.remove_container(current["Id"], force=True)
                faults.hit("docker.during_rollback")
            if (old.get("State") or {}).get("Running"):
                # An engine restart started it under the snapshot name (restart policy
                # always). It is renamed stopped: the engine renames a running container's
                # network sandbox too, and refuses when it has none after its restart.
                self._stop(old)
                old = {**old, "State": {**old["State"], "Running": False}}
            self.api.rename(old["Id"], name)
            restored = old
        elif current is not None and (not old_id or current["Id"] == old_id):
            # Not renamed yet (or back already). Without old_id the snapshot was never
            # reported taken, so apply never ran and `name` is still the original.
            restored = current
        else:
            where = f"container {current['Id'][:12]} is left as is" if current else "nothing is"
            raise RollbackFailed(
                f"{name}: the old container ({old_name}) is gone, so it cannot be put back;"
                f" under {name} {where}"
            )
        state = restored.get("State") or {}
        if not state.get("Running"):
            self.api.start(restored["Id"])
        try:
            self.engine.await_healthy(
                name, self.config.rollback_timeout.total_seconds(), 0.0, RollbackFailed
            )
        except RollbackFailed as err:
            raise RollbackFailed(f"{name} is back on its old image but {err}") from err
