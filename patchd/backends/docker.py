"""Docker Engine backend (`type = "docker"`): patches containers by recreating them.

A target is a container, identified by its NAME (stable across a recreate). One patch:

- prepare (called by the engine before a run's first target starts): asks the registry
  about every distinct image reference of the run at once, in parallel.
- check_update: the registry's manifest digest for the container's configured image
  reference (`Config.Image`, e.g. `registry:5000/app:stable`, or the `patchd.image` label
  of a replacement patchd made) against the `RepoDigests` entry of that repository on the
  image the container runs; one query per reference per run (`docker_images`). Never
  pulls. A container that others share the network namespace of (`network_mode:
  container:NAME`) is refused here, before anything is touched: its replacement would
  get a namespace of its own and cut them off.
- snapshot: pull `repository@digest` (once per digest, however many containers need
  it) and make the replacement's create request, then stop the container and rename it
  `NAME.patchd-RUN` (it and its image stay). A registry that is slow or down costs no
  downtime: nothing is stopped until the new version is on the engine.
- apply: create a container under the original name with the old one's user-set
  configuration (`docker_recreate`) from `repository@digest` and start it. No local tag
  is moved to create it, so patches of one reference (threads, processes, backends on
  one engine) neither race nor wait for each other; the configured reference is kept in
  the `patchd.image` label, and the version shown is the pulled image's digest.
- verify: the container's own HEALTHCHECK, or else running without a restart for
  `stable_for`.
- commit: once the replacement still runs, remove the renamed container and move the
  local tag to the new image (as `docker pull` would); the old image is kept for the
  group's `snapshot.keep` (the one key for it) and removed by `release` when no
  container uses it and it has no tag.
- rollback: from any partial state, put the renamed container back under its name and
  start it. A container is never removed unless the old one is there to replace it.
  While the engine cannot be reached it is tried again, up to `rollback_timeout`
  (`docker_rollback`).

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
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from typing import Any, ClassVar, NoReturn

from pydantic import BaseModel

from patchd import faults, poll
from patchd.backends.base import (
    NotRunning,
    Retained,
    RollbackFailed,
    Snapshot,
    StepFailed,
    Target,
    TransientError,
    Update,
)
from patchd.backends.docker_config import DockerConfig, DockerSelect
from patchd.backends.docker_engine import Engine, message, transient
from patchd.backends.docker_images import Images
from patchd.backends.docker_recreate import (
    CreateRequest,
    configured_ref,
    create_request,
    parse_ref,
    repo_digests,
)
from patchd.backends.docker_rollback import release_image, restore, stop
from patchd.config.schema import HealthModel, PatchModel, SnapshotModel

ENABLE_LABEL = "patchd.enable"
DEPENDS_LABEL = "patchd.depends_on"
SNAPSHOT_INFIX = ".patchd-"
_SNAPSHOT_NAME = re.compile(r"\.patchd-[A-Za-z0-9_.-]+$")
_SELECTABLE = ("running", "restarting")
_ROLLBACK_MAX_DELAY = 2.0  # seconds between rollback attempts while the engine is away
_PREPARE_WORKERS = 8


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
        self.images = Images(self.engine)
        # target id -> (ref, digest, containers in its network namespace) that prepare
        # learned: the target's next check_update uses it once (one registry query per
        # reference and one container listing per run).
        self._prepared: dict[str, tuple[str, str, list[str]]] = {}
        # The update check_update last found per target: snapshot pulls it before it
        # stops anything (the engine calls check_update just before, in one thread).
        self._wanted: dict[str, Update] = {}
        # name -> ((old id, source), create request) that snapshot made before the stop.
        self._ready: dict[str, tuple[tuple[str, str], CreateRequest]] = {}

    @property
    def api(self) -> Any:
        return self.engine.api

    def ping(self) -> None:
        self.engine.ping(f"docker {self.config.url}")

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

    def prepare(self, targets: Sequence[Target], pins: Mapping[str, str]) -> None:
        """Ask the registry about every reference of a run at once, and start pulling
        the new versions (an optimisation: each target's check_update still asks for
        itself what is not known, and its snapshot waits for its pull)."""

        def ref_of(target: Target) -> tuple[str, str, dict[str, Any]] | None:
            try:
                attrs = self.engine.container(target.id)
            except Exception:
                return None  # the target's own check reports it
            ref = configured_ref((attrs or {}).get("Config") or {})
            if not attrs or ref in pins or ref.startswith("sha256:") or parse_ref(ref).digest:
                return None
            return target.id, ref, attrs

        if not targets:
            return
        workers = min(_PREPARE_WORKERS, len(targets))
        with ThreadPoolExecutor(workers, thread_name_prefix="patchd-prepare") as pool:
            found = [r for r in pool.map(ref_of, targets) if r is not None]
            listing = pool.submit(self.api.containers, all=True)
            digests = self.images.checks.prefetch(ref for _, ref, _ in found)
            listed = listing.result()
        wanted = set()
        for target_id, ref, attrs in found:
            if ref in digests:
                sharing = self.engine.sharing_network(attrs, listed)
                self._prepared[target_id] = (ref, digests[ref], sharing)
                wanted.add(f"{parse_ref(ref).repository}@{digests[ref]}")
        self.images.pull_in_background(wanted)

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
                raise NotRunning(
                    f"{target.name} is {status}: patchd patches running containers only"
                )
            ref = configured_ref(attrs["Config"])
            parsed = parse_ref(ref)
            if parsed.digest is not None or ref.startswith("sha256:"):
                return None  # pinned to one version by its own configuration
            running = repo_digests(image or {}, parsed.repository)
            prepared = self._prepared.pop(target.id, None)
            if prepared is not None and prepared[0] != ref:
                prepared = None  # recreated from another image since
            available = pins.get(ref)
            if available is None:
                available = prepared[1] if prepared else self.images.checks.get(ref)
            if available in running:
                return None
            sharing = prepared[2] if prepared else self.engine.sharing_network(attrs)
            if sharing:
                raise StepFailed(
                    f"{target.name} is not patched: {', '.join(sharing)} run in its network"
                    f" namespace (network_mode container:{target.name}), and a recreated"
                    " container gets a namespace of its own, which would cut them off;"
                    " nothing was changed"
                )
            # An image that was built or imported here has no registry digest: the
            # registry's version is then taken to differ, and the id stands for it.
            current = running[0] if running else str(attrs["Image"])
            update = Update(ref=ref, current=current, available=available)
            self._wanted[target.id] = update
            return update

    def describe(self, target: Target) -> Mapping[str, str]:
        with self.engine.step(f"describing {target.name}"):
            attrs, image = self._running(target)
        ref = configured_ref(attrs["Config"])
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
            ref = configured_ref(attrs["Config"])
            if attrs["Name"].lstrip("/") == name:
                self._prepare_replacement(attrs, ref)
            progress.changed = True
            if (attrs.get("State") or {}).get("Running"):
                stop(self.api, attrs)
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

    def _prepare_replacement(self, attrs: Mapping[str, Any], ref: str) -> None:
        """Before the container is stopped: pull the version check_update found and make
        the create request, so that only create and start fall between stop and start."""
        name = str(attrs["Name"]).lstrip("/")
        update = self._wanted.get(name)
        if update is None or update.ref != ref:
            return  # not found by this process: apply pulls it
        source = f"{parse_ref(ref).repository}@{update.available}"
        try:
            request = self._request(name, str(attrs["Id"]), ref, source)
        except StepFailed as err:
            # Nothing is changed yet: the engine tries again, then fails the target.
            raise TransientError(f"{name} was not stopped: {err}") from err
        self._ready[name] = ((str(attrs["Id"]), source), request)

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
        source = f"{ref.repository}@{update.available}"
        with self.engine.step(f"apply to {name}") as progress:
            ready = self._ready.pop(name, None)
            if ready is not None and ready[0] == (old_id, source):
                request = ready[1]  # made by snapshot before the stop: no downtime spent
            else:
                request = self._request(name, old_id, update.ref, source)
            taken = self.engine.container(name)
            if taken is not None and taken["Id"] != old_id:
                raise StepFailed(f"{name}: a container {taken['Id'][:12]} already has the name")
            progress.changed = True
            # From repository@digest: the engine resolves it to the image pulled, and to
            # nothing else, so no check of the created container's image is needed.
            created = self.api.create_container_from_config(request.body, name=name)
            new_id = created["Id"]
            faults.hit("docker.after_create")
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

    def _request(self, name: str, old_id: str, ref: str, source: str) -> CreateRequest:
        """The create request of `name`'s replacement, with `source` on the engine."""
        old = self.engine.container(old_id)
        if old is None:
            raise StepFailed(f"{name}: the snapshotted container {old_id[:12]} is gone")
        image = self.engine.image(old["Image"])
        if image is None:
            raise StepFailed(f"{name}: the old image {old['Image']} is gone")
        self.images.pulls.get(source)  # on the engine already, unless after a restart
        config = image.get("Config") or {}
        bridge_disabled = self._bridge_disabled(old)
        return create_request(old, config, ref, image=source, bridge_disabled=bridge_disabled)

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
            ref = configured_ref(new["Config"])
            parsed = parse_ref(ref)
            if parsed.digest is None and not ref.startswith("sha256:"):
                # What `docker pull` would have done; apply left the tag where it was.
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
        if image_id:
            with self.engine.step(f"releasing image {image_id}"):
                release_image(self.engine, str(image_id))

    # --- rollback -----------------------------------------------------------------------

    def rollback(self, target: Target, snapshot: Snapshot) -> None:
        name = snapshot.data.get("container", target.id)
        # Rollback is idempotent: while the engine cannot be reached (it restarts, say)
        # it is tried again, up to rollback_timeout, rather than leaving the target to a
        # person.
        timeout = self.config.rollback_timeout.total_seconds()
        last: list[Exception] = []  # the transient error of the last attempt

        def attempt() -> bool | None:
            try:
                restore(self.engine, snapshot, timeout)
                return True
            except RollbackFailed:
                raise
            except Exception as err:
                if not transient(err):
                    raise RollbackFailed(f"rollback of {name}: {message(err)}") from err
                last[:] = [err]
                return None

        def expired() -> NoReturn:
            raise RollbackFailed(f"rollback of {name}: {message(last[-1])}") from last[-1]

        clock = self.engine.clock
        every = poll.backoff(1.0, _ROLLBACK_MAX_DELAY)
        poll.until(attempt, clock.deadline(timeout), expired, every, clock)
