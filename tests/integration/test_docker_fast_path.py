"""The Docker fast path (issue 16) against the lab's real engine and registry.

- the new version is pulled once per digest, before any container is stopped, and the
  registry is asked once per image reference per run;
- two `patchd run` processes patching containers of one image at once both succeed (no
  local tag is moved to create a replacement, so they cannot race);
- `network_mode: container:` and `volumes_from` links survive a recreate, or the target
  is refused before anything is touched;
- a container stopped after it was selected is skipped, not failed: it spends none of
  the error budget and is left stopped.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from patchd.backends.docker import DockerBackend
from patchd.config.types import Limit
from patchd.state import SqliteStore, Store
from tests.integration.docker_fleet import Fleet
from tests.integration.test_docker_backend import run
from tests.integration.test_outages import docker_config, patchd_in_background


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


def engine_events(f: Fleet, since_ns: int) -> list[dict[str, Any]]:
    """The engine's own events after `since_ns` (epoch nanoseconds), oldest first. The
    engine's `since` filter has whole-second granularity, so events of the test's own
    set-up in that second are filtered out here by their timeNano."""
    stream = f.client.api.events(since=since_ns // 10**9, until=time.time() + 0.5, decode=True)
    return [e for e in stream if e.get("timeNano", 0) > since_ns]


def net_namespace(f: Fleet, name: str) -> str:
    return f.exec(name, "readlink", "/proc/1/ns/net").strip()


def test_pull_once_before_any_stop_and_one_registry_query_per_reference(
    f: Fleet, backend: DockerBackend, store: Store
) -> None:
    f.publish("plain-v1", "a")
    f.publish("plain-v1", "b")
    names = [f.run(f"a{i}", "a").name for i in range(4)] + [f.run("b0", "b").name]
    f.wait_healthy(*names)
    da, db = f.publish("plain-v2", "a"), f.publish("plain-v2", "b")
    for repo, digest in (("a", da), ("b", db)):  # as if built elsewhere: not on the engine
        f.client.api.remove_image(f"{f.repo(repo)}@{digest}")
    # Spies around the real calls (they still reach the engine and the registry).
    queries: list[str] = []
    pulls: list[tuple[str, str]] = []
    query, pull = backend.images.checks._call, backend.engine.pull

    def counted_query(ref: str) -> str:
        queries.append(ref)
        return query(ref)

    def counted_pull(repository: str, digest: str) -> str:
        pulls.append((repository, digest))
        return pull(repository, digest)

    backend.images.checks._call = counted_query
    backend.engine.pull = counted_pull  # type: ignore[method-assign]
    since = time.time_ns()

    result = run(
        backend, store, f.select(), max_concurrency=Limit(count=5), max_errors=Limit(count=5)
    )

    assert {o.target.name: o.result for o in result.outcomes} == dict.fromkeys(names, "success")
    assert sorted(queries) == [f.ref("a"), f.ref("b")]
    assert sorted(pulls) == [(f.repo("a"), da), (f.repo("b"), db)]
    events = engine_events(f, since)
    pulled = {
        e["id"]: e["timeNano"]
        for e in events
        if e.get("Type") == "image" and e.get("Action") == "pull"
    }
    assert set(pulled) == {f"{f.repo('a')}@{da}", f"{f.repo('b')}@{db}"}, pulled
    first_stop = min(
        e["timeNano"]
        for e in events
        if e.get("Type") == "container"
        and e.get("Action") == "die"
        and e["Actor"]["Attributes"].get("name") in names
    )
    assert max(pulled.values()) < first_stop
    for name in names:
        assert f.digest_of(name) == (db if name.endswith("b0") else da)


def test_two_processes_patch_containers_of_one_image_at_once(f: Fleet, tmp_path: Path) -> None:
    f.publish("plain-v1", "g")
    names = [f.run(f"{side}{i}", "g").name for side in ("x", "y") for i in range(3)]
    f.wait_healthy(*names)
    v2 = f.publish("plain-v2", "g")
    configs = []
    for side in ("x", "y"):
        group = {
            side: {
                "backend": "lab",
                "window": "later",
                "select": {"names": [f"{f.name(side)}*"], "labels": {"patchd.test": f.token}},
                "max_concurrency": 3,
                "max_errors": 3,
                "health": {"timeout": "120s", "stable_for": "1s"},
            }
        }
        workdir = tmp_path / side
        workdir.mkdir()
        configs.append((side, docker_config(workdir, f, group)))

    runs = [patchd_in_background(config, "run", side, "--now") for side, config in configs]
    outputs = [r.communicate(timeout=600) for r in runs]

    for proc, (out, err) in zip(runs, outputs, strict=True):
        assert proc.returncode == 0, out + err
        assert "3 patched" in out, out
    for name in names:
        assert f.digest_of(name) == v2 and f.is_healthy(name), name
    # Neither process left a stray local tag: the engine's tag moved to v2 at commit.
    api = f.client.api
    assert api.inspect_image(f.ref("g"))["Id"] == api.inspect_image(f"{f.repo('g')}@{v2}")["Id"]


def test_network_namespace_provider_is_refused_and_its_sharer_is_recreated_in_it(
    f: Fleet, backend: DockerBackend, store: Store
) -> None:
    f.publish("plain-v1", "net")
    provider = f.run("provider", "net", network_mode="none", volumes=["/data"]).name
    f.wait_healthy(provider)
    sharer = f.run(
        "sharer", "net", network_mode=f"container:{provider}", volumes_from=[provider]
    ).name
    f.wait_healthy(sharer)
    f.exec(provider, "sh", "-c", "echo kept > /data/file")
    before = f.inspect(provider)
    namespace = net_namespace(f, provider)
    v2 = f.publish("plain-v2", "net")

    result = run(
        backend, store, f.select(), max_concurrency=Limit(count=2), max_errors=Limit(count=2)
    )

    outcomes = {o.target.name: o for o in result.outcomes}
    assert outcomes[provider].result == "failed"
    error = outcomes[provider].error or ""
    assert sharer in error and "network_mode container" in error and "nothing was changed" in error
    now = f.inspect(provider)
    assert (now["Id"], now["State"]["StartedAt"]) == (before["Id"], before["State"]["StartedAt"])
    assert outcomes[sharer].result == "success", outcomes[sharer]
    assert f.digest_of(sharer) == v2
    # The replacement runs in the provider's namespace and has its volumes.
    assert f.inspect(sharer)["HostConfig"]["NetworkMode"] == f"container:{before['Id']}"
    assert net_namespace(f, sharer) == namespace
    assert f.exec(sharer, "cat", "/data/file").strip() == "kept"


def test_volumes_from_survives_a_recreate_of_either_side(
    f: Fleet, backend: DockerBackend, store: Store
) -> None:
    f.publish("plain-v1", "vol")
    provider = f.run("provider", "vol", network_mode="none", volumes=["/data"]).name
    f.wait_healthy(provider)
    user = f.run("user", "vol", network_mode="none", volumes_from=[provider]).name
    f.wait_healthy(user)
    f.exec(provider, "sh", "-c", "echo one > /data/file")
    v2 = f.publish("plain-v2", "vol")

    first = run(backend, store, f.select(names=[provider]))

    assert [o.result for o in first.outcomes] == ["success"], first.outcomes
    assert f.digest_of(provider) == v2 and f.is_healthy(user)
    f.exec(provider, "sh", "-c", "echo two > /data/file")  # the new provider, same volume
    assert f.exec(user, "cat", "/data/file").strip() == "two"

    second = run(backend, store, f.select(names=[user]))

    assert [o.result for o in second.outcomes] == ["success"], second.outcomes
    assert f.digest_of(user) == v2
    f.exec(user, "sh", "-c", "echo three > /data/file")
    assert f.exec(provider, "cat", "/data/file").strip() == "three"


def test_a_container_stopped_after_selection_is_skipped_and_spends_no_budget(
    f: Fleet, backend: DockerBackend, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    f.publish("plain-v1", "stop")
    names = [f.run(f"s{i}", "stop").name for i in range(3)]
    f.wait_healthy(*names)
    v2 = f.publish("plain-v2", "stop")
    discover = backend.discover

    def discover_then_stop(select: Any) -> Any:
        found = discover(select)
        f.client.containers.get(names[1]).stop(timeout=1)  # a person stops it meanwhile
        return found

    monkeypatch.setattr(backend, "discover", discover_then_stop)
    stopped = f.inspect(names[1])["Id"]

    result = run(backend, store, f.select(), max_errors=Limit(count=1))

    assert result.status == "completed", result
    assert [o.result for o in result.outcomes] == ["success", "skipped", "success"]
    assert result.failed == 0
    error = result.outcomes[1].error or ""
    assert "skipped (not running)" in error and "is exited" in error, error
    after = f.inspect(names[1])
    assert (after["Id"], after["State"]["Status"]) == (stopped, "exited")
    assert f.digest_of(names[0]) == f.digest_of(names[2]) == v2
