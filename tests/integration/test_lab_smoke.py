"""Proves each part of the test bed answers, with real results.

- the private Docker engine: ping, and a container of the base image runs `echo hello`;
- the registry: push, pull back, and the digest agrees everywhere;
- vcsim: a pyVmomi login and the VM inventory of the default VPX model through a
  ContainerView + RetrievePropertiesEx; the vcsim binary's flags (counts, -trace, TLS).
"""

from __future__ import annotations

import contextlib
import shlex
import ssl
import subprocess
import uuid
from pathlib import Path
from typing import Any

import docker
import pytest
import requests
from pyVim.connect import Disconnect, SmartConnect
from pyVmomi import vim, vmodl

# simulator.VPX(): 1 datacenter with 1 cluster (3 hosts) and 1 standalone host;
# 2 VMs in the cluster's root resource pool and 2 on the standalone host, powered on.
DEFAULT_VPX_VMS = {"DC0_H0_VM0", "DC0_H0_VM1", "DC0_C0_RP0_VM0", "DC0_C0_RP0_VM1"}


# --- Docker ------------------------------------------------------------------------


def test_docker_engine_is_the_private_one(docker_client: docker.DockerClient, lab: Any) -> None:
    assert docker_client.ping() is True
    info = docker_client.info()
    assert Path(info["DockerRootDir"]).is_relative_to(lab.lab_dir), info["DockerRootDir"]
    assert info["Driver"] == "vfs"
    assert lab.docker_host.startswith("unix://")
    assert lab.docker_host != "unix:///var/run/docker.sock"


def test_container_of_base_image_echoes(docker_client: docker.DockerClient, lab: Any) -> None:
    name = f"patchd-smoke-{uuid.uuid4().hex[:10]}"
    container = docker_client.containers.create(
        lab.base_image, ["echo", "hello"], name=name, network_mode="none"
    )
    try:
        container.start()
        result = container.wait(timeout=60)
        assert result["StatusCode"] == 0, result
        assert container.logs(stdout=True, stderr=True) == b"hello\n"
    finally:
        container.remove(force=True)
    with pytest.raises(docker.errors.NotFound):
        docker_client.containers.get(name)


def test_base_image_has_full_busybox(docker_client: docker.DockerClient, lab: Any) -> None:
    out = docker_client.containers.run(
        lab.base_image,
        ["sh", "-c", "test -d /tmp && test -w /tmp && which rm tar wget sleep"],
        network_mode="none",
        remove=True,
    )
    assert out.decode().split() == ["/bin/rm", "/bin/tar", "/bin/wget", "/bin/sleep"]


# --- registry ----------------------------------------------------------------------


def test_registry_push_pull_digest(docker_client: docker.DockerClient, lab: Any) -> None:
    tag = uuid.uuid4().hex[:12]
    repo = f"{lab.registry}/smoke"
    ref = f"{repo}:{tag}"
    base = docker_client.images.get(lab.base_image)
    assert base.tag(repo, tag)
    digest = ""
    try:
        events = list(docker_client.images.push(repo, tag=tag, stream=True, decode=True))
        errors = [e for e in events if "error" in e or "errorDetail" in e]
        assert not errors, errors
        pushed = [e["aux"]["Digest"] for e in events if "Digest" in e.get("aux", {})]
        assert len(pushed) == 1 and pushed[0].startswith("sha256:"), events

        docker_client.images.remove(ref)  # only untags: the base image keeps the layers
        with pytest.raises(docker.errors.ImageNotFound):
            docker_client.images.get(ref)

        pulled = docker_client.images.pull(repo, tag=tag)
        assert pulled.id == base.id  # same config, so the same image came back
        mine = [d for d in pulled.attrs["RepoDigests"] if d.startswith(f"{repo}@")]
        assert len(mine) == 1, pulled.attrs["RepoDigests"]
        digest = mine[0].split("@", 1)[1]
        assert digest == pushed[0]
        assert docker_client.images.get_registry_data(ref).id == digest

        # The registry's own view agrees.
        tags = requests.get(f"http://{lab.registry}/v2/smoke/tags/list", timeout=10)
        assert tags.status_code == 200 and tag in tags.json()["tags"], tags.text
        head = requests.head(
            f"http://{lab.registry}/v2/smoke/manifests/{tag}",
            headers={"Accept": "application/vnd.docker.distribution.manifest.v2+json"},
            timeout=10,
        )
        assert head.status_code == 200
        assert head.headers["Docker-Content-Digest"] == digest
    finally:
        for name in (ref, f"{repo}@{digest}" if digest else None):
            if name:
                with contextlib.suppress(docker.errors.ImageNotFound):
                    docker_client.images.remove(name)
        if digest:
            deleted = requests.delete(
                f"http://{lab.registry}/v2/smoke/manifests/{digest}", timeout=10
            )
            assert deleted.status_code == 202, deleted.text


# --- vcsim -------------------------------------------------------------------------


def list_vms(si: Any) -> dict[str, dict[str, Any]]:
    """{moid: {property: value}} of every VM, reading only name and runtime.powerState."""
    content = si.RetrieveContent()
    view = content.viewManager.CreateContainerView(content.rootFolder, [vim.VirtualMachine], True)
    try:
        spec = vmodl.query.PropertyCollector.FilterSpec(
            objectSet=[
                vmodl.query.PropertyCollector.ObjectSpec(
                    obj=view,
                    skip=True,
                    selectSet=[
                        vmodl.query.PropertyCollector.TraversalSpec(
                            name="traverseView",
                            path="view",
                            skip=False,
                            type=vim.view.ContainerView,
                        )
                    ],
                )
            ],
            propSet=[
                vmodl.query.PropertyCollector.PropertySpec(
                    type=vim.VirtualMachine, pathSet=["name", "runtime.powerState"], all=False
                )
            ],
        )
        collector = content.propertyCollector
        vms: dict[str, dict[str, Any]] = {}
        result = collector.RetrievePropertiesEx(
            [spec], vmodl.query.PropertyCollector.RetrieveOptions()
        )
        while result is not None:
            for obj in result.objects:
                vms[obj.obj._moId] = {p.name: p.val for p in obj.propSet}
            if not result.token:  # vcsim never paginates; a real vCenter does
                break
            result = collector.ContinueRetrievePropertiesEx(result.token)
        return vms
    finally:
        view.Destroy()


def test_vcsim_login(vcsim_si: Any, lab: Any) -> None:
    about = vcsim_si.content.about
    assert about.apiType == "VirtualCenter"
    assert vcsim_si.content.sessionManager.currentSession.userName == lab.vcsim_user


def test_vcsim_default_inventory(vcsim_si: Any) -> None:
    vms = list_vms(vcsim_si)
    assert len(vms) == len(DEFAULT_VPX_VMS)
    assert {v["name"] for v in vms.values()} == DEFAULT_VPX_VMS
    for props in vms.values():
        assert set(props) == {"name", "runtime.powerState"}  # nothing else was fetched
        assert props["runtime.powerState"] == vim.VirtualMachinePowerState.poweredOn


def test_vcsim_binary_counts_and_trace(vcsim_factory: Any) -> None:
    # Per datacenter: 2 clusters x 4 VMs in each root pool + 1 standalone host x 4 VMs.
    vc = vcsim_factory(
        *shlex.split("-dc 2 -cluster 2 -host 1 -standalone-host 1 -vm 4 -autostart=false -trace")
    )
    assert vc.scheme == "http" and vc.host == "127.0.0.1"
    si = SmartConnect(host=vc.host, port=vc.port, user="user", pwd="pass", protocol="http")
    try:
        vms = list_vms(si)
    finally:
        Disconnect(si)
    assert len(vms) == 2 * (2 * 4 + 1 * 4)
    assert {v["runtime.powerState"] for v in vms.values()} == {"poweredOff"}
    assert "DC1_C1_RP0_VM3" in {v["name"] for v in vms.values()}
    assert vc.stop() == 0
    trace = vc.log.read_text()
    assert "RetrievePropertiesEx" in trace and "<name>runtime.powerState</name>" in trace


def test_vcsim_tls_with_own_certificate(vcsim_factory: Any, tmp_path: Path) -> None:
    # 127.0.0.2: pyVim silently skips verification for localhost/127.0.0.1/::1.
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            *shlex.split(
                "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes"
            ),
            *("-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.2"),
            *("-addext", "subjectAltName=IP:127.0.0.2"),
        ],
        check=True,
        capture_output=True,
    )
    vc = vcsim_factory("-tls-cert", str(cert), "-tls-key", str(key), listen="127.0.0.2:0")
    assert vc.scheme == "https" and vc.host == "127.0.0.2"

    trusting = ssl.create_default_context(cafile=str(cert))
    si = SmartConnect(host=vc.host, port=vc.port, user="user", pwd="pass", sslContext=trusting)
    try:
        assert si.content.about.apiType == "VirtualCenter"
    finally:
        Disconnect(si)

    # The certificate is really checked: the system CAs do not trust it.
    with pytest.raises(ssl.SSLCertVerificationError):
        SmartConnect(
            host=vc.host,
            port=vc.port,
            user="user",
            pwd="pass",
            sslContext=ssl.create_default_context(),
        )
