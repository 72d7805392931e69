"""Registry authentication (issue 15): a registry with htpasswd auth, credentials in the
service user's Docker client config (DOCKER_CONFIG), as README says; the password never
appears in what patchd says.

A second docker-registry (the bed's binary) with basic auth on a free loopback port; the
bed's private engine pulls from it.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import docker
import pytest

from patchd.backends.base import BackendError
from patchd.backends.docker import DockerBackend, DockerConfig, DockerSelect
from patchd.config.schema import HealthModel, SnapshotModel
from tests.integration.conftest import Lab

USER = "patchd"
PASSWORD = "s3cret-" + uuid.uuid4().hex[:8]
LABEL = "patchd.test.auth"


def bcrypt(password: str) -> str:
    """The bcrypt hash htpasswd files hold, from the C library (libxcrypt), as the
    registry reads it; the `crypt` module is deprecated but still in Python 3.11."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt

    hashed: str = crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=32))
    return hashed


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[str]:
    if shutil.which("docker-registry") is None:
        pytest.fail("docker-registry not installed (package docker-registry)")
    hashed = bcrypt(PASSWORD)
    (tmp_path / "htpasswd").write_text(f"{USER}:{hashed}\n")
    address = f"127.0.0.1:{free_port()}"
    (tmp_path / "config.yml").write_text(
        f"""version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: {tmp_path}/data
http:
  addr: {address}
  secret: auth-test
auth:
  htpasswd:
    realm: patchd-test
    path: {tmp_path}/htpasswd
"""
    )
    log = (tmp_path / "registry.log").open("w")
    proc = subprocess.Popen(
        ["docker-registry", "serve", str(tmp_path / "config.yml")], stdout=log, stderr=log
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://{address}/v2/", timeout=2)
            except urllib.error.HTTPError as err:
                if err.code == 401:
                    break  # up, and asking for credentials
            except OSError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                pytest.fail(
                    f"the auth registry did not start: {(tmp_path / 'registry.log').read_text()}"
                )
            time.sleep(0.2)
        yield address
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


def docker_config(path: Path, registry: str | None) -> Path:
    path.mkdir()
    auths = {}
    if registry is not None:
        token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        auths[registry] = {"auth": token}
    (path / "config.json").write_text(json.dumps({"auths": auths}))
    return path


def push(client: docker.DockerClient, base: str, tag: str, version: str) -> None:
    dockerfile = f'FROM {base}\nLABEL v="{version}"\nCMD ["sleep", "3600"]\n'
    client.images.build(fileobj=io.BytesIO(dockerfile.encode()), tag=tag, rm=True)
    auth = {"username": USER, "password": PASSWORD}
    for line in client.images.push(tag, stream=True, decode=True, auth_config=auth):
        assert "error" not in line, line


def test_a_registry_with_htpasswd_auth_is_pulled_from_with_the_users_docker_config(
    lab: Lab, registry: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = docker.DockerClient(base_url=lab.docker_host)
    token = uuid.uuid4().hex[:8]
    tag = f"{registry}/patchd-auth/app:stable"
    name = f"auth-{token}"
    push(client, lab.base_image, tag, "v1")
    client.images.pull(tag, auth_config={"username": USER, "password": PASSWORD})
    container = client.containers.run(tag, name=name, detach=True, labels={LABEL: token})
    try:
        push(client, lab.base_image, tag, "v2")
        select = DockerSelect(labels={LABEL: token})
        health = HealthModel(timeout=timedelta(seconds=20), stable_for=timedelta(seconds=1))

        # Without credentials: the update check fails, and says so without a secret.
        monkeypatch.setenv("DOCKER_CONFIG", str(docker_config(tmp_path / "none", None)))
        anonymous = DockerBackend("d", DockerConfig(url=lab.docker_host))
        [target] = anonymous.discover(select)
        with pytest.raises(BackendError) as failed:
            anonymous.check_update(target, {})
        assert PASSWORD not in str(failed.value)
        anonymous.close()

        # With the service user's config: checked, pulled and patched.
        monkeypatch.setenv("DOCKER_CONFIG", str(docker_config(tmp_path / "auth", registry)))
        backend = DockerBackend("d", DockerConfig(url=lab.docker_host))
        [target] = backend.discover(select)
        update = backend.check_update(target, {})
        assert update is not None
        snapshot = backend.snapshot(target, backend.plan_snapshot(target, "auth1"), SnapshotModel())
        backend.apply(target, update, snapshot)
        backend.verify(target, update, health)
        retained = backend.commit(target, snapshot, SnapshotModel())
        backend.close()
        patched = client.containers.get(name)
        assert patched.image.labels["v"] == "v2"
        assert PASSWORD not in json.dumps(retained.data if retained else {})
        assert PASSWORD not in (retained.description if retained else "")
    finally:
        for each in client.containers.list(all=True, filters={"label": f"{LABEL}={token}"}):
            each.remove(force=True)
        for each in client.containers.list(all=True, filters={"name": name}):
            each.remove(force=True)
        container.client.close()
        client.close()
