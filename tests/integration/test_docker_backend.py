"""The Docker backend against the lab's real engine and registry, driven by the real engine.

Fleets of containers with varied configurations are patched through `run_group`; every
assertion reads the engine's real state back (inspect, exec, image store).
"""

from __future__ import annotations

import copy
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import docker
import pytest
from docker.types import LogConfig, Mount, Ulimit
from pydantic import ValidationError

from patchd.backends.base import RollbackFailed, StepFailed, Target
from patchd.backends.docker import DockerBackend, DockerSelect
from patchd.backends.docker_recreate import REF_LABEL, configured_ref, create_request
from patchd.config.schema import HealthModel, SnapshotModel
from patchd.config.settings import Group
from patchd.config.types import Limit
from patchd.engine import NullObserver, RunRequest, RunResult, run_group
from patchd.state import SqliteStore, Store
from tests.integration.conftest import Lab
from tests.integration.docker_fleet import (
    SECOND,
    TEST_LABEL,
    VARIANTS,
    Fleet,
    build_variants,
    free_port,
)

# --- fixtures and helpers -------------------------------------------------------------


@pytest.fixture
def backend(f: Fleet) -> Iterator[DockerBackend]:
    the_backend = f.backend()
    yield the_backend
    the_backend.close()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    the_store = SqliteStore(tmp_path / "state.db")
    yield the_store
    the_store.close()


class Recorder(NullObserver):
    """Every transition, in the order the engine reported them."""

    def __init__(self) -> None:
        self.steps: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    def step(self, run_id: str, group: Group, target: Target, state: str, **fields: Any) -> None:
        with self._lock:
            self.steps.append((target.name, state))

    def index(self, name: str, state: str) -> int:
        return self.steps.index((name, state))


def run(
    backend: DockerBackend,
    store: Store,
    select: DockerSelect,
    *,
    observer: NullObserver | None = None,
    pins: dict[str, str] | None = None,
    **changes: Any,
) -> RunResult:
    fields: dict[str, Any] = {
        "name": "docker",
        "backend": "lab",
        "window": "w",
        "select": select,
        "after": None,
        "soak": timedelta(0),
        "max_concurrency": Limit(count=1),
        "max_errors": Limit(count=1),
        "snapshot": SnapshotModel(),
        "health": HealthModel(timeout=timedelta(seconds=120), stable_for=timedelta(seconds=1)),
    }
    fields.update(changes)
    return run_group(
        RunRequest(
            run_id=f"r{uuid.uuid4().hex[:8]}",
            group=Group(**fields),
            backend=backend,
            store=store,
            clock=lambda: datetime.now(UTC),
            may_start=lambda now: True,
            observer=observer or NullObserver(),
            pins=pins or {},
        )
    )


# What legitimately differs between a container and its replacement: the engine's
# per-container identity and runtime state (id, creation time, state, the files it keeps
# per container, its layer directories, its network sandbox and addresses), the image id,
# and what Path/Args derive from the image's Cmd/Entrypoint (Config carries the cause).
RUNTIME_KEYS = (
    "Id",
    "Created",
    "State",
    "Image",
    "Path",
    "Args",
    "ResolvConfPath",
    "HostnamePath",
    "HostsPath",
    "LogPath",
    "GraphDriver",
    "ExecIDs",
)


def user_view(attrs: dict[str, Any], image_config: dict[str, Any]) -> dict[str, Any]:
    """An inspected container without its runtime state and without what its image set."""
    view = copy.deepcopy(attrs)
    short = attrs["Id"][:12]
    for key in RUNTIME_KEYS:
        view.pop(key, None)
    config = view["Config"]
    # A replacement runs repository@digest and keeps the configured reference in a label.
    config["Image"] = configured_ref(config)
    config.get("Labels", {}).pop(REF_LABEL, None)
    if config.get("Hostname") == short:  # engine-made, not user-set
        config.pop("Hostname")
    image_env = set(image_config.get("Env") or [])
    config["Env"] = sorted(e for e in config.get("Env") or [] if e not in image_env)
    image_labels = image_config.get("Labels") or {}
    config["Labels"] = {
        k: v for k, v in (config.get("Labels") or {}).items() if image_labels.get(k) != v
    }
    for key in ("Cmd", "Entrypoint", "WorkingDir", "User", "Healthcheck", "StopSignal"):
        if config.get(key) == image_config.get(key):
            config[key] = None
    exposed = set(config.get("ExposedPorts") or {}) - set(image_config.get("ExposedPorts") or {})
    config["ExposedPorts"] = sorted(exposed)
    # The engine lists mounts from a map: in no fixed order.
    view["Mounts"] = sorted(view.get("Mounts") or [], key=lambda m: m["Destination"])
    networks = view.pop("NetworkSettings")["Networks"] or {}
    view["Networks"] = {
        name: {
            # the engine adds the container's short id as an alias (API < 1.45)
            "Aliases": sorted(a for a in ep.get("Aliases") or [] if a != short),
            "IPAMConfig": ep.get("IPAMConfig"),
            "Links": ep.get("Links"),
            "DriverOpts": ep.get("DriverOpts"),
        }
        for name, ep in networks.items()
    }
    return view


def image_config(client: docker.DockerClient, image_id: str) -> dict[str, Any]:
    return dict(client.api.inspect_image(image_id)["Config"])


def started(f: Fleet, name: str) -> tuple[str, str]:
    attrs = f.inspect(name)
    return attrs["Id"], attrs["State"]["StartedAt"]


def target(backend: DockerBackend, f: Fleet, short: str) -> Target:
    found = {t.name: t for t in backend.discover(f.select())}
    return found[f.name(short)]


# --- the varied fleet ---------------------------------------------------------------

KEEP_ME = "keep-me\n"


def build_fleet(f: Fleet, tmp_path: Path, dependencies: bool = True) -> list[str]:
    """Seven selected containers with varied configurations, plus two never to be touched.

    With `dependencies`, api depends on db, and plain on api. Returns the selected names.
    """
    client = f.client
    f.publish("app-v1", "app")
    f.publish("plain-v1", "plain")
    front, back = f.network("front"), f.network("back")
    data = f.volume("data")
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "settings").write_text("from-host\n")
    f.run(
        "env",
        "app",
        environment={"USER_VAR": "x", "APP_COLOR": "red"},
        labels={"team": "a", "app.kind": "custom"},
        command=["sh", "-c", "touch /tmp/ok; exec sleep 86400"],
        restart_policy={"Name": "unless-stopped"},
    )
    f.run(
        "entry",
        "app",
        entrypoint=["sh", "-c"],
        command=["touch /tmp/ok; exec sleep 86400"],
        user="nobody",
        working_dir="/tmp",
        hostname="custom-host",
        domainname="example.test",
        extra_hosts={"db.internal": "10.1.2.3"},
        cap_drop=["NET_RAW"],
        cap_add=["SYS_NICE"],
    )
    f.run(
        "db",
        "app",
        volumes={data.name: {"bind": "/data", "mode": "rw"}},
        restart_policy={"Name": "on-failure", "MaximumRetryCount": 3},
        mem_limit="64m",
        cpu_shares=512,
        cpu_period=100000,
        cpu_quota=50000,
        log_config=LogConfig(type="json-file", config={"max-size": "1m", "max-file": "2"}),
        tmpfs={"/run/cache": "size=1m"},
        ulimits=[Ulimit(name="nofile", soft=1024, hard=2048)],
    )
    f.run(
        "files",
        "app",
        volumes={str(conf): {"bind": "/conf", "mode": "ro"}},
        mounts=[Mount(target="/conf2", source=str(conf), type="bind", read_only=True)],
        security_opt=["no-new-privileges"],
        pids_limit=100,
    )
    api_name = f.name("api")
    endpoint = client.api.create_endpoint_config(aliases=["api", "api-v"])
    api = f.run(
        "api",
        "app",
        start=False,
        network=front.name,
        networking_config={front.name: endpoint},
        ports={"8080/tcp": ("127.0.0.1", free_port())},
        labels={"patchd.depends_on": f.name("db")} if dependencies else {},
    )
    back.connect(api, aliases=["api-back"])
    api.start()
    f.run(
        "hc",
        "app",
        healthcheck={
            "test": ["CMD-SHELL", "test -f /tmp/ok && test -d /tmp"],
            "interval": SECOND,
            "timeout": 30 * SECOND,  # a limit for a loaded machine
            "retries": 2,
        },
    )
    # Stop signal and timeout are only in the low-level API.
    f.pull("plain")
    created = client.api.create_container(
        f.ref("plain"),
        name=f.name("plain"),
        stop_signal="SIGINT",
        stop_timeout=7,
        labels={
            **f.labels,
            **({"patchd.depends_on": f"{api_name}, {f.name('nowhere')}"} if dependencies else {}),
        },
        host_config=client.api.create_host_config(init=True, network_mode="none"),
    )
    client.api.start(created["Id"])
    f.run("disabled", "app", labels={"patchd.enable": "false"})
    f.run("other", "app", labels={TEST_LABEL: "someone-else"})
    names = [f.name(s) for s in ("api", "db", "entry", "env", "files", "hc", "plain")]
    f.exec(f.name("db"), "sh", "-c", f"printf '{KEEP_ME}' > /data/file")
    return names


def test_discover_selects_by_labels_and_names_and_reads_dependencies(
    f: Fleet, backend: DockerBackend, tmp_path: Path
) -> None:
    names = build_fleet(f, tmp_path)
    found = backend.discover(f.select())
    assert [t.name for t in found] == sorted(names)  # never disabled, other; by name
    assert all(t.id == t.name and t.kind == "container" for t in found)
    deps = {t.name: t.depends_on for t in found}
    assert deps[f.name("api")] == (f.name("db"),)
    assert deps[f.name("plain")] == (f.name("api"), f.name("nowhere"))
    by_glob = backend.discover(f.select(names=[f"{f.token}-e*", "*-hc"]))
    assert [t.name for t in by_glob] == [f.name("entry"), f.name("env"), f.name("hc")]
    by_label = backend.discover(f.select(labels={"team": "a"}))
    assert [t.name for t in by_label] == [f.name("env")]
    # A stopped container, or one patchd renamed as a snapshot, is not a target.
    f.client.api.stop(f.name("files"))
    f.client.api.rename(f.name("hc"), f"{f.name('hc')}.patchd-r1")
    assert f.name("files") not in [t.name for t in backend.discover(f.select())]
    assert [t.name for t in backend.discover(f.select(names=["*hc*"]))] == []


def test_fleet_update_keeps_every_user_setting(
    f: Fleet, backend: DockerBackend, store: Store, tmp_path: Path, images: dict[str, str]
) -> None:
    names = build_fleet(f, tmp_path)
    before = {n: f.inspect(n) for n in names}
    bystanders = {n: started(f, n) for n in (f.name("disabled"), f.name("other"))}
    app2, plain2 = f.publish("app-v2", "app"), f.publish("plain-v2", "plain")
    observer = Recorder()

    result = run(backend, store, f.select(), observer=observer, max_concurrency=Limit(count=3))

    assert result.status == "completed", result
    assert {o.target.name: o.result for o in result.outcomes} == dict.fromkeys(names, "success")
    client = f.client
    for name in names:
        old, new = before[name], f.inspect(name)
        plain = name == f.name("plain")
        v1, v2 = ("plain-v1", "plain-v2") if plain else ("app-v1", "app-v2")
        assert new["Id"] != old["Id"]
        assert new["Image"] == images[v2] and old["Image"] == images[v1]
        assert f.digest_of(name) == (plain2 if plain else app2)
        # Configured as before (no local tag was moved to create it): the reference in
        # the label, the exact version in Config.Image.
        repo = "plain" if plain else "app"
        assert configured_ref(new["Config"]) == old["Config"]["Image"] == f.ref(repo)
        assert new["Config"]["Image"] == f"{f.repo(repo)}@{plain2 if plain else app2}"
        assert new["State"]["Running"]
        assert user_view(new, image_config(client, images[v2])) == user_view(
            old, image_config(client, images[v1])
        ), name
        # Values that came from the image now come from the new image.
        env = dict(e.split("=", 1) for e in new["Config"]["Env"])
        if plain:
            assert env["PLAIN_VERSION"] == "2"
            assert new["Config"]["Labels"]["plain.version"] == "2"
        else:
            assert env["APP_VERSION"] == "2"
            assert new["Config"]["Labels"]["app.version"] == "2"
            assert "8002/tcp" in new["Config"]["ExposedPorts"]
            assert "8001/tcp" not in new["Config"]["ExposedPorts"]
        if name not in (f.name("env"), f.name("entry")):
            assert new["Config"]["Cmd"] == VARIANTS[v2]["Cmd"]
        if name != f.name("entry"):
            assert new["Config"]["WorkingDir"] == VARIANTS[v2]["WorkingDir"]
        if name not in (f.name("hc"), f.name("plain")):
            assert new["Config"]["Healthcheck"] == VARIANTS[v2]["Healthcheck"]
    # ...and what the creator set is kept although the image sets it too.
    env_box = f.inspect(f.name("env"))["Config"]
    assert "APP_COLOR=red" in env_box["Env"] and env_box["Labels"]["app.kind"] == "custom"
    entry = f.inspect(f.name("entry"))["Config"]
    assert (entry["WorkingDir"], entry["User"], entry["Hostname"]) == (
        "/tmp",
        "nobody",
        "custom-host",
    )
    hc = f.inspect(f.name("hc"))["Config"]["Healthcheck"]
    assert hc["Test"] == ["CMD-SHELL", "test -f /tmp/ok && test -d /tmp"]
    # Data stays: the named volume and the bind mounts.
    assert f.exec(f.name("db"), "cat", "/data/file") == KEEP_ME
    assert f.exec(f.name("files"), "cat", "/conf/settings", "/conf2/settings") == "from-host\n" * 2
    # Dependencies: a target starts only once what it depends on is committed.
    assert observer.index(f.name("db"), "committed") < observer.index(f.name("api"), "snapshotting")
    assert observer.index(f.name("api"), "committed") < observer.index(
        f.name("plain"), "snapshotting"
    )
    # The engine's tag follows the patch (as a pull would have moved it).
    assert client.api.inspect_image(f.ref("app"))["Id"] == images["app-v2"]
    assert client.api.inspect_image(f.ref("plain"))["Id"] == images["plain-v2"]
    # Never touched; nothing left behind; the old image is retained for release.
    assert {n: started(f, n) for n in bystanders} == bystanders
    assert f.leftovers() == []
    kept = {o.retained.data["image_id"] for o in result.outcomes if o.retained}
    assert kept == {images["app-v1"], images["plain-v1"]}


def test_broken_update_rolls_the_whole_fleet_back(
    f: Fleet, backend: DockerBackend, store: Store, tmp_path: Path, images: dict[str, str]
) -> None:
    names = build_fleet(f, tmp_path, dependencies=False)
    before = {n: f.inspect(n) for n in names}
    f.publish("app-v2-broken", "app")
    f.publish("plain-v2-broken", "plain")

    result = run(
        backend,
        store,
        f.select(),
        max_concurrency=Limit(count=4),
        max_errors=Limit(percent=100),
    )

    outcomes = {o.target.name: o for o in result.outcomes}
    assert set(outcomes) == set(names)
    # A version that failed its verification is quarantined for the group: targets that
    # had not started it yet are skipped, naming the quarantine; the others roll back.
    for name, o in outcomes.items():
        assert o.result in ("rolled_back", "skipped"), (name, o.result, o.error)
        if o.result == "skipped":
            assert "quarantined" in (o.error or ""), (name, o.error)
    assert any(o.result == "rolled_back" for o in outcomes.values())
    if outcomes[f.name("hc")].result == "rolled_back":
        assert "unhealthy" in (outcomes[f.name("hc")].error or "")
    for name in names:
        old, now = before[name], f.inspect(name)
        assert now["Id"] == old["Id"]  # the very same container, under its own name
        assert now["Name"] == old["Name"]
        assert now["Image"] == old["Image"]
        assert f.is_healthy(name), name
        assert user_view(now, {}) == user_view(old, {})
    assert f.exec(f.name("db"), "cat", "/data/file") == KEEP_ME
    assert f.leftovers() == []
    # The local tag is back on the image the containers run.
    assert f.client.api.inspect_image(f.ref("app"))["Id"] == images["app-v1"]


def test_error_budget_of_one_leaves_the_rest_untouched(
    f: Fleet, backend: DockerBackend, store: Store, images: dict[str, str]
) -> None:
    f.publish("app-v1", "app")
    names = [f.run(f"n{i}", "app").name for i in range(4)]
    f.wait_healthy(*names)
    before = {n: started(f, n) for n in names}
    f.publish("app-v2-broken", "app")

    result = run(backend, store, f.select(), max_concurrency=Limit(count=1))

    assert result.status == "halted"
    assert [o.result for o in result.outcomes] == ["rolled_back", "pending", "pending", "pending"]
    first = f.inspect(names[0])
    assert first["Id"] == before[names[0]][0] and first["Image"] == images["app-v1"]
    assert f.is_healthy(names[0])
    for name in names[1:]:  # never stopped: same container, same start
        assert started(f, name) == before[name]
        assert f.inspect(name)["Image"] == images["app-v1"]
    assert f.leftovers() == []


def test_promotion_pin_installs_the_verified_digest_not_the_moved_tag(
    f: Fleet, backend: DockerBackend, store: Store, images: dict[str, str]
) -> None:
    f.publish("app-v1", "app")
    name = f.run("prod", "app").name
    v2 = f.publish("app-v2", "app")  # what staging verified
    v3 = f.publish("app-v3", "app")  # the tag moved on since
    t = target(backend, f, "prod")
    ref = f.ref("app")
    latest = backend.check_update(t, {})
    assert latest is not None and latest.available == v3
    pinned = backend.check_update(t, {ref: v2})
    assert pinned is not None and pinned.available == v2 and pinned.ref == ref

    result = run(backend, store, f.select(), pins={ref: v2})

    assert [o.result for o in result.outcomes] == ["success"]
    assert result.verified == {ref: v2}
    assert f.digest_of(name) == v2 and f.inspect(name)["Image"] == images["app-v2"]
    assert configured_ref(f.inspect(name)["Config"]) == ref
    assert backend.check_update(t, {ref: v2}) is None


def test_check_update_never_pulls_and_apply_does(
    f: Fleet, backend: DockerBackend, store: Store, lab: Lab
) -> None:
    f.publish("app-v1", "app")
    f.run("c", "app")
    fresh = build_variants(f.client, lab.base_image, {f"{f.token}-v9": VARIANTS["app-v3"]})
    digest = f.publish(fresh[f"{f.token}-v9"], "app")
    f.client.api.remove_image(fresh[f"{f.token}-v9"], force=True)  # only the registry has it
    update = backend.check_update(target(backend, f, "c"), {})
    assert update is not None and update.available == digest
    with pytest.raises(docker.errors.ImageNotFound):
        f.client.api.inspect_image(f"{f.repo('app')}@{digest}")

    assert [o.result for o in run(backend, store, f.select()).outcomes] == ["success"]
    assert f.digest_of(f.name("c")) == digest


def test_release_removes_the_old_image_only_when_nothing_uses_it(
    f: Fleet, backend: DockerBackend, lab: Lab
) -> None:
    # An image of its own, known by the registry tag only (as a pulled image is).
    own = build_variants(f.client, lab.base_image, {f"{f.token}-v1": VARIANTS["app-v1"]})
    old_image = own[f"{f.token}-v1"]
    published = f.publish(old_image, "app")
    mirrored = f.publish(old_image, "mirror")
    f.client.api.pull(f.repo("mirror"), tag=mirrored)  # known by digest in two repositories
    f.run("c", "app")
    f.client.api.remove_image(f"patchd-test/img:{f.token}-v1")  # now only repo:stable
    f.run("user", "app", labels={TEST_LABEL: "not-selected"}, start=False)
    f.publish("app-v2", "app")
    t = target(backend, f, "c")
    update = backend.check_update(t, {})
    assert update is not None
    snap = backend.snapshot(t, backend.plan_snapshot(t, "ret1"), SnapshotModel())
    backend.apply(t, update, snap)
    backend.verify(t, update, f.health)
    # The group's snapshot.keep is how long the old image is kept (issue 15: it was
    # ignored for rollback_retention, while the metric showed snapshot.keep).
    retained = backend.commit(t, snap, SnapshotModel(keep=timedelta(minutes=10)))

    assert retained is not None
    assert retained.keep == timedelta(minutes=10)
    # Named as plan and history name versions: its tag has moved to the new image.
    assert retained.description == (
        f"image {f.repo('app')}@{published} that {t.name} ran before the patch"
    )
    assert retained.data["image_id"] == old_image and retained.data["backend"] == "lab"
    assert f.leftovers() == []
    assert len(f.client.api.inspect_image(old_image)["RepoDigests"]) == 2
    backend.release(retained.data)  # a stopped container still uses it: kept
    assert f.client.api.inspect_image(old_image)["Id"] == old_image
    f.client.api.remove_container(f.name("user"))
    backend.release(retained.data)
    with pytest.raises(docker.errors.ImageNotFound):
        f.client.api.inspect_image(old_image)
    backend.release(retained.data)  # idempotent


def test_rollback_retention_is_refused_for_snapshot_keep(f: Fleet) -> None:
    with pytest.raises(ValidationError, match=r"replaced by groups\.NAME\.snapshot\.keep"):
        f.backend(rollback_retention="36h")


# --- rollback from every partial state ------------------------------------------------


def _one(f: Fleet, backend: DockerBackend) -> tuple[Target, str, str]:
    f.publish("app-v1", "app")
    name = f.run("c", "app").name  # healthy or not yet: rollback waits for healthy
    f.publish("app-v2", "app")
    return target(backend, f, "c"), name, f.inspect(name)["Id"]


def _assert_restored(f: Fleet, name: str, old_id: str, images: dict[str, str]) -> None:
    now = f.inspect(name)
    assert now["Id"] == old_id and now["Image"] == images["app-v1"]
    assert f.is_healthy(name)
    assert f.leftovers() == []
    assert [c["Names"][0] for c in f.client.api.containers(all=True, filters={"name": name})] == [
        f"/{name}"
    ]


def test_rollback_after_stop_before_rename(
    f: Fleet, backend: DockerBackend, images: dict[str, str]
) -> None:
    t, name, old_id = _one(f, backend)
    planned = backend.plan_snapshot(t, "crash1")
    f.client.api.stop(name)  # the crash came between stop and rename
    backend.rollback(t, planned)
    _assert_restored(f, name, old_id, images)


def test_rollback_after_rename_before_create(
    f: Fleet, backend: DockerBackend, images: dict[str, str]
) -> None:
    t, name, old_id = _one(f, backend)
    planned = backend.plan_snapshot(t, "crash2")
    backend.snapshot(t, planned, SnapshotModel())
    assert not f.exists(name)
    backend.rollback(t, planned)  # only the planned data was journaled
    _assert_restored(f, name, old_id, images)
    backend.rollback(t, planned)
    _assert_restored(f, name, old_id, images)


def test_rollback_after_create_before_start(
    f: Fleet, backend: DockerBackend, images: dict[str, str]
) -> None:
    t, name, old_id = _one(f, backend)
    snap = backend.snapshot(t, backend.plan_snapshot(t, "crash3"), SnapshotModel())
    # apply's create, without its start
    old = f.client.api.inspect_container(old_id)
    request = create_request(old, image_config(f.client, old["Image"]), f.ref("app"))
    new_id = f.client.api.create_container_from_config(request.body, name=name)["Id"]
    backend.rollback(t, snap)
    _assert_restored(f, name, old_id, images)
    assert not f.exists(new_id)


def test_rollback_never_deletes_the_new_container_when_the_old_one_is_gone(
    f: Fleet, backend: DockerBackend
) -> None:
    t, name, old_id = _one(f, backend)
    update = backend.check_update(t, {})
    assert update is not None
    snap = backend.snapshot(t, backend.plan_snapshot(t, "gone"), SnapshotModel())
    backend.apply(t, update, snap)
    new_id = f.inspect(name)["Id"]
    f.client.api.remove_container(old_id)  # someone removed the snapshot
    with pytest.raises(RollbackFailed, match="gone"):
        backend.rollback(t, snap)
    assert f.inspect(name)["Id"] == new_id and f.inspect(name)["State"]["Running"]
    with pytest.raises(RollbackFailed):  # the same however often it is tried
        backend.rollback(t, snap)
    assert f.inspect(name)["Id"] == new_id


def test_commit_without_a_replacement_keeps_the_old_container(
    f: Fleet, backend: DockerBackend, images: dict[str, str]
) -> None:
    t, name, old_id = _one(f, backend)
    snap = backend.snapshot(t, backend.plan_snapshot(t, "early"), SnapshotModel())
    with pytest.raises(StepFailed, match="old one stays"):
        backend.commit(t, snap, SnapshotModel())  # apply never ran
    assert f.exists(old_id)
    backend.rollback(t, snap)
    _assert_restored(f, name, old_id, images)


def test_anonymous_volumes_keep_their_data(f: Fleet, backend: DockerBackend, store: Store) -> None:
    f.publish("vol-v1", "vol")  # the image declares VOLUME /state
    name = f.run("anon", "vol", volumes=["/cache"]).name  # and the creator -v /cache
    f.wait_healthy(name)
    f.exec(name, "sh", "-c", "echo cached > /cache/file; echo kept > /state/file")
    volumes = {m["Destination"]: m["Name"] for m in f.inspect(name)["Mounts"]}
    assert set(volumes) == {"/cache", "/state"}
    f.publish("vol-v2", "vol")
    result = run(backend, store, f.select())
    assert [o.result for o in result.outcomes] == ["success"], result
    assert f.exec(name, "cat", "/cache/file", "/state/file") == "cached\nkept\n"
    new = f.inspect(name)
    assert {m["Destination"]: m["Name"] for m in new["Mounts"]} == volumes
    assert sorted(m["Target"] for m in new["HostConfig"]["Mounts"]) == ["/cache", "/state"]


def test_auto_remove_container_is_refused_and_kept(f: Fleet, backend: DockerBackend) -> None:
    f.publish("app-v1", "app")
    name = f.run("rm", "app", auto_remove=True).name
    f.publish("app-v2", "app")
    t = target(backend, f, "rm")
    planned = backend.plan_snapshot(t, "rm1")
    with pytest.raises(StepFailed, match="--rm"):
        backend.snapshot(t, planned, SnapshotModel())
    backend.rollback(t, planned)
    assert f.inspect(name)["State"]["Running"]


def test_verify_fails_fast_on_an_exiting_container(f: Fleet, backend: DockerBackend) -> None:
    f.publish("plain-v1", "plain")
    f.run("p", "plain")
    f.publish("plain-v2-broken", "plain")
    t = target(backend, f, "p")
    update = backend.check_update(t, {})
    assert update is not None
    snap = backend.snapshot(t, backend.plan_snapshot(t, "fast"), SnapshotModel())
    backend.apply(t, update, snap)
    slow = HealthModel(timeout=timedelta(seconds=600), stable_for=timedelta(seconds=300))
    began = time.monotonic()
    with pytest.raises(StepFailed, match="exited"):
        backend.verify(t, update, slow)
    assert time.monotonic() - began < 300  # it noticed the exit, it did not wait stable_for
    backend.rollback(t, snap)
    assert f.is_healthy(f.name("p"))
