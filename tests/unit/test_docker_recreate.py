"""The Docker backend's pure parts: image references, the replacement's create request,
and that constructing a backend connects to nothing (no engine needed here)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from patchd.backends.base import Target, TransientError
from patchd.backends.docker import DockerBackend, DockerConfig, DockerSelect
from patchd.backends.docker_recreate import (
    canonical_repository,
    create_request,
    parse_ref,
    repo_digests,
    user_config,
)

ID = "0123456789ab" + "c" * 52
IMAGE = {
    "Env": ["PATH=/bin", "APP=1"],
    "Labels": {"app.version": "1", "vendor": "x"},
    "Cmd": ["serve"],
    "Entrypoint": ["/entry"],
    "WorkingDir": "/srv",
    "User": "app",
    "ExposedPorts": {"80/tcp": {}},
    "Volumes": {"/state": {}},
    "StopSignal": "SIGQUIT",
    "Healthcheck": {"Test": ["CMD", "check"], "Interval": 10**9, "Retries": 3},
    "OnBuild": ["RUN x"],
}


def inherited_only() -> dict[str, Any]:
    """A container's Config as the engine merges it when its creator set nothing."""
    return {
        "Hostname": ID[:12],
        "Image": "reg:5000/app:stable",
        **{k: v for k, v in IMAGE.items() if k != "OnBuild"},
    }


@pytest.mark.parametrize(
    ("ref", "repository", "tag", "digest"),
    [
        ("nginx", "nginx", None, None),
        ("nginx:1.25", "nginx", "1.25", None),
        ("reg:5000/team/app:stable", "reg:5000/team/app", "stable", None),
        ("reg:5000/app", "reg:5000/app", None, None),
        ("reg:5000/app:v1@sha256:abc", "reg:5000/app", "v1", "sha256:abc"),
        ("app@sha256:abc", "app", None, "sha256:abc"),
    ],
)
def test_parse_ref(ref: str, repository: str, tag: str | None, digest: str | None) -> None:
    parsed = parse_ref(ref)
    assert (parsed.repository, parsed.tag, parsed.digest) == (repository, tag, digest)


def test_repositories_compare_in_canonical_form() -> None:
    assert canonical_repository("nginx") == "docker.io/library/nginx"
    assert canonical_repository("docker.io/library/nginx") == "docker.io/library/nginx"
    assert canonical_repository("index.docker.io/me/app") == "docker.io/me/app"
    assert canonical_repository("localhost/app") == "localhost/app"
    assert canonical_repository("127.0.0.1:5000/app") == "127.0.0.1:5000/app"
    image = {
        "RepoDigests": [
            "nginx@sha256:aaa",
            "127.0.0.1:5000/app@sha256:bbb",
            "127.0.0.1:5000/other@sha256:ccc",
        ]
    }
    assert repo_digests(image, "docker.io/library/nginx") == ["sha256:aaa"]
    assert repo_digests(image, "127.0.0.1:5000/app") == ["sha256:bbb"]
    assert repo_digests({"RepoDigests": None}, "x") == []


def test_values_inherited_from_the_image_are_left_out() -> None:
    body = user_config(inherited_only(), IMAGE, ID, "default")
    assert body["Env"] is None
    assert body["Labels"] == {}
    assert body["ExposedPorts"] is None and body["Volumes"] is None
    assert body["Healthcheck"] is None
    for key in ("Cmd", "Entrypoint", "WorkingDir", "User", "StopSignal", "OnBuild", "Hostname"):
        assert key not in body


def test_values_the_creator_set_are_kept() -> None:
    config = inherited_only()
    config.update(
        Env=["MINE=1", "APP=2", "PATH=/bin"],
        Labels={"app.version": "1", "vendor": "me", "team": "a"},
        Cmd=["serve", "--debug"],
        WorkingDir="/tmp",
        User="nobody",
        ExposedPorts={"80/tcp": {}, "9090/tcp": {}},
        Volumes={"/state": {}, "/cache": {}},
        Hostname="web1",
        StopTimeout=7,
    )
    config["Healthcheck"] = {"Test": ["CMD", "check"], "Interval": 5 * 10**9, "Retries": 3}
    body = user_config(config, IMAGE, ID, "default")
    assert body["Env"] == ["MINE=1", "APP=2"]
    assert body["Labels"] == {"vendor": "me", "team": "a"}
    assert body["Cmd"] == ["serve", "--debug"]
    assert (body["WorkingDir"], body["User"], body["Hostname"]) == ("/tmp", "nobody", "web1")
    assert body["ExposedPorts"] == {"9090/tcp": {}}
    assert body["Volumes"] == {"/cache": {}}
    assert body["StopTimeout"] == 7
    # The engine merges a healthcheck field by field: only the changed field is the user's.
    assert body["Healthcheck"] == {"Interval": 5 * 10**9}


def test_own_entrypoint_keeps_cmd_even_when_it_equals_the_image_cmd() -> None:
    config = inherited_only()
    config["Entrypoint"] = ["sh", "-c"]
    body = user_config(config, IMAGE, ID, "default")
    assert body["Entrypoint"] == ["sh", "-c"] and body["Cmd"] == ["serve"]


@pytest.mark.parametrize("mode", ["host", f"container:{'f' * 64}"])
def test_hostname_is_the_engines_when_sharing_a_namespace(mode: str) -> None:
    config = {**inherited_only(), "Hostname": "the-host", "Domainname": "example"}
    body = user_config(config, IMAGE, ID, mode)
    assert "Hostname" not in body
    assert ("Domainname" in body) == (mode == "host")


def _container(**changes: Any) -> dict[str, Any]:
    container: dict[str, Any] = {
        "Id": ID,
        "Config": {**inherited_only(), "Volumes": None},
        "HostConfig": {"NetworkMode": "front", "Binds": None, "Mounts": None, "Links": None},
        "NetworkSettings": {
            "Networks": {
                "front": {"Aliases": ["api", ID[:12]], "NetworkID": "n1", "IPAMConfig": None},
                "back": {
                    "Aliases": [ID[:12], "api-back"],
                    "NetworkID": "n2",
                    "IPAMConfig": {"IPv4Address": "10.9.0.5"},
                    "Links": ["db:database"],
                },
            }
        },
        "Mounts": [],
    }
    for key, value in changes.items():
        container[key] = {**container[key], **value} if isinstance(value, dict) else value
    return container


def test_create_request_networks_keep_user_aliases_and_addresses() -> None:
    request = create_request(_container(), IMAGE, "reg:5000/app:stable")
    assert request.body["Image"] == "reg:5000/app:stable"
    assert request.body["NetworkingConfig"] == {"EndpointsConfig": {"front": {"Aliases": ["api"]}}}
    assert request.connect == [
        (
            "back",
            {
                "Aliases": ["api-back"],
                "IPAMConfig": {"IPv4Address": "10.9.0.5"},
                "Links": ["db:database"],
            },
        )
    ]


def test_create_request_network_mode_by_id_and_none() -> None:
    by_id = create_request(_container(HostConfig={"NetworkMode": "n2"}), IMAGE, "a")
    assert list(by_id.body["NetworkingConfig"]["EndpointsConfig"]) == ["back"]
    assert [name for name, _ in by_id.connect] == ["front"]
    none = create_request(
        _container(HostConfig={"NetworkMode": "none"}, NetworkSettings={"Networks": {}}), IMAGE, "a"
    )
    assert "NetworkingConfig" not in none.body and none.connect == []


def test_legacy_links_are_given_in_create_form() -> None:
    container = _container(HostConfig={"Links": ["/db:/web/database", "/cache:/web/cache"]})
    host = create_request(container, IMAGE, "a").body["HostConfig"]
    assert host["Links"] == ["db:database", "cache:cache"]


def test_anonymous_volumes_are_handed_over_named_ones_and_binds_stay() -> None:
    container = _container(
        Config={"Volumes": {"/state": {}, "/data": {}}},
        HostConfig={
            "Binds": ["/cache", "named:/data", "/host/conf:/conf:ro"],
            "Mounts": [{"Type": "bind", "Source": "/h", "Target": "/m"}],
        },
        Mounts=[
            {"Type": "volume", "Name": "anon-state", "Destination": "/state", "RW": True},
            {"Type": "volume", "Name": "anon-cache", "Destination": "/cache", "RW": False},
            {"Type": "volume", "Name": "named", "Destination": "/data", "RW": True},
            {"Type": "bind", "Source": "/host/conf", "Destination": "/conf", "RW": False},
            {"Type": "bind", "Source": "/h", "Destination": "/m", "RW": True},
        ],
    )
    body = create_request(container, IMAGE, "a").body
    host = body["HostConfig"]
    assert host["Binds"] == ["named:/data", "/host/conf:/conf:ro"]
    assert host["Mounts"] == [
        {"Type": "bind", "Source": "/h", "Target": "/m"},
        {"Type": "volume", "Source": "anon-state", "Target": "/state"},
        {"Type": "volume", "Source": "anon-cache", "Target": "/cache", "ReadOnly": True},
    ]
    assert body["Volumes"] == {"/data": {}}


def test_network_disabled_by_an_engine_without_bridge_is_not_copied() -> None:
    container = _container(
        Config={"NetworkDisabled": True},
        HostConfig={"NetworkMode": "default"},
        NetworkSettings={"Networks": {"bridge": {"Aliases": None}}},
    )
    assert "NetworkDisabled" not in create_request(container, IMAGE, "a", bridge_disabled=True).body
    assert create_request(container, IMAGE, "a").body["NetworkDisabled"] is True


# --- the backend without an engine ---------------------------------------------------


def test_constructing_connects_to_nothing_and_a_missing_engine_is_transient(
    tmp_path: Path,
) -> None:
    backend = DockerBackend("d", DockerConfig(url=f"unix://{tmp_path}/no.sock", timeout="2s"))
    assert backend.config.rollback_retention is None  # refused when set: snapshot.keep
    with pytest.raises(TransientError):
        backend.ping()
    with pytest.raises(TransientError):
        backend.discover(DockerSelect())
    backend.close()


def test_plan_snapshot_is_pure() -> None:
    backend = DockerBackend("d", {"url": "tcp://192.0.2.1:2376"})  # never contacted
    target = Target(id="web", name="web", kind="container")
    snap = backend.plan_snapshot(target, "20261128T020000Z-abc123")
    assert snap.data == {"container": "web", "old_name": "web.patchd-20261128T020000Z-abc123"}


def test_config_keys() -> None:
    cfg = DockerConfig.model_validate({"rollback_timeout": "90s"})
    assert cfg.rollback_timeout == timedelta(seconds=90)
    with pytest.raises(ValidationError, match=r"replaced by groups\.NAME\.snapshot\.keep"):
        DockerConfig.model_validate({"rollback_retention": "36h"})
    with pytest.raises(ValidationError):
        DockerConfig.model_validate({"rollback_retention": 5})
