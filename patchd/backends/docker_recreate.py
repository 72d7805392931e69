"""What a replacement container is created with: the old one's user-set configuration.

This module owns the mapping from `docker inspect` of the old container (and of the old
image) to the `POST /containers/create` request for its replacement, plus the image
reference helpers the Docker backend needs. It is pure: no I/O, so it is tested without
an engine.

The engine merges an image's own Config into every container made from it (Env, Labels,
Cmd, Entrypoint, WorkingDir, User, Healthcheck, ExposedPorts, Volumes, StopSignal). An
inspected container cannot tell those apart from what its creator set, so a value that
equals the old image's is taken as inherited and left out: the new image's own default
then applies. The price: a value a user set to exactly the old image's default also
follows the new image. Everything in HostConfig is user-set (or an engine default that
is the same for the new container) and is copied verbatim, except legacy links, whose
inspected form differs from the create form.

Anonymous volumes (an image's VOLUME, `docker run -v /path`) would be created afresh and
empty for a new container; they are handed over as explicit volume mounts instead (in
HostConfig.Mounts, and out of Config.Volumes and source-less Binds, which may not name a
mounted path), so the
data stays. That is the one place where the replacement's configuration differs.

Network endpoints keep their user-set aliases, static addresses, links
and driver options; the engine adds the container's short id as an alias (API < 1.45),
which is dropped because the new container gets its own.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

Json = dict[str, Any]

# Set on a replacement created from `repository@digest`: the reference it was configured
# with (`repository:tag`), which updates are checked against.
REF_LABEL = "patchd.image"

# Values the engine computes per container, or that only images carry.
_IMAGE_ONLY = ("OnBuild",)
_SCALARS_FROM_IMAGE = ("WorkingDir", "User", "StopSignal", "Shell", "ArgsEscaped")
_HEALTH_FIELDS = ("Test", "Interval", "Timeout", "StartPeriod", "StartInterval", "Retries")
# Network modes that have no endpoint of their own to configure.
_NO_ENDPOINT_MODES = ("host", "none")


@dataclass(frozen=True)
class ImageRef:
    """An image reference split into repository, tag and digest."""

    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def canonical(self) -> str:
        """The repository with the default registry and `library/` made explicit."""
        return canonical_repository(self.repository)

    @property
    def tag_or_latest(self) -> str:
        return self.tag or "latest"


def parse_ref(ref: str) -> ImageRef:
    """Split `registry:port/path/name:tag@sha256:...` (tag and digest optional)."""
    name, _, digest = ref.partition("@")
    tag = None
    colon, slash = name.rfind(":"), name.rfind("/")
    if colon > slash:
        name, tag = name[:colon], name[colon + 1 :]
    return ImageRef(name, tag or None, digest or None)


def canonical_repository(repository: str) -> str:
    """`nginx` and `docker.io/library/nginx` are one repository; so are their digests."""
    first, sep, rest = repository.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        domain, path = first, rest
    else:
        domain, path = "docker.io", repository
    if domain in ("docker.io", "index.docker.io"):
        domain = "docker.io"
        if "/" not in path:
            path = f"library/{path}"
    return f"{domain}/{path}"


def configured_ref(config: Mapping[str, Any]) -> str:
    """The image reference a container is configured with (its `Config`).

    A replacement patchd made runs `repository@digest` (the exact version pulled, so no
    local tag is moved to create it) and carries the reference it was configured with in
    the `REF_LABEL` label; that reference is the one updates are checked against.
    """
    image = str(config.get("Image") or "")
    label = str((config.get("Labels") or {}).get(REF_LABEL) or "")
    if not label:
        return image
    parsed = parse_ref(image)
    same_repository = canonical_repository(parsed.repository) == canonical_repository(
        parse_ref(label).repository
    )
    if image.startswith("sha256:") or (parsed.digest is not None and same_repository):
        return label
    return image  # recreated by someone else since, from another image: theirs


def repo_digests(image: Mapping[str, Any], repository: str) -> list[str]:
    """The manifest digests an inspected image is known by in `repository`."""
    wanted = canonical_repository(repository)
    found = []
    for entry in image.get("RepoDigests") or []:
        repo, _, digest = str(entry).partition("@")
        if digest and canonical_repository(repo) == wanted:
            found.append(digest)
    return found


@dataclass(frozen=True)
class CreateRequest:
    """The create body, and the networks to connect after create (API < 1.44 takes one)."""

    body: Json
    connect: list[tuple[str, Json]] = field(default_factory=list)


def user_config(
    config: Mapping[str, Any], image: Mapping[str, Any], container_id: str, network_mode: str
) -> Json:
    """The container's Config without what it inherited from `image` (the image's Config)."""
    out: Json = dict(config)
    image_env = set(image.get("Env") or [])
    out["Env"] = [e for e in config.get("Env") or [] if e not in image_env] or None
    image_labels = image.get("Labels") or {}
    out["Labels"] = {
        k: v for k, v in (config.get("Labels") or {}).items() if image_labels.get(k) != v
    }
    own_entrypoint = config.get("Entrypoint") != image.get("Entrypoint")
    if not own_entrypoint:
        out.pop("Entrypoint", None)
        # With its own entrypoint the engine never gives a container the image's Cmd, so
        # its Cmd is the creator's even when it equals the image's.
        if config.get("Cmd") == image.get("Cmd"):
            out.pop("Cmd", None)
    for key in _SCALARS_FROM_IMAGE:
        if key in out and out[key] == image.get(key):
            out.pop(key)
    for key in _IMAGE_ONLY:
        out.pop(key, None)
    for key in ("ExposedPorts", "Volumes"):
        inherited = image.get(key) or {}
        own = {k: v for k, v in (config.get(key) or {}).items() if k not in inherited}
        out[key] = own or None
    out["Healthcheck"] = _own_healthcheck(config.get("Healthcheck"), image.get("Healthcheck"))
    # The engine fills in a hostname (the short id, or the host's with --network host);
    # a container sharing another's network namespace may not set one at all.
    hostname = config.get("Hostname") or ""
    shares_uts = network_mode == "host" or network_mode.startswith("container:")
    if shares_uts or not hostname or container_id.startswith(hostname):
        out.pop("Hostname", None)
    if network_mode.startswith("container:"):
        out.pop("Domainname", None)
        out.pop("MacAddress", None)
    return out


def _own_healthcheck(mine: Any, image: Any) -> Json | None:
    """The engine merges a healthcheck field by field, so it is split field by field."""
    if not mine:
        return None
    inherited = image or {}
    own = {k: v for k, v in mine.items() if k in _HEALTH_FIELDS and v != inherited.get(k)}
    own.update({k: v for k, v in mine.items() if k not in _HEALTH_FIELDS})
    return own or None


def _create_links(links: Any) -> list[str] | None:
    """`/db:/web/alias` (inspect) -> `db:alias` (create)."""
    if not links:
        return None
    out = []
    for link in links:
        source, _, alias = str(link).partition(":")
        out.append(f"{source.lstrip('/')}:{alias.rsplit('/', 1)[-1]}" if alias else source)
    return out


_BIND_MODES = frozenset(
    {"ro", "rw", "z", "Z", "nocopy", "shared", "rshared", "slave", "rslave", "private"}
)


def _bind_parts(bind: str) -> tuple[str | None, str]:
    """(source or None, destination) of a Binds entry; `/path[:mode]` has no source."""
    parts = bind.split(":")
    if len(parts) == 1 or (len(parts) == 2 and set(parts[1].split(",")) <= _BIND_MODES):
        return None, parts[0]
    return parts[0], parts[1]


def _anonymous_mounts(container: Mapping[str, Any]) -> tuple[list[Json], set[str]]:
    """Mounts handing the old container's anonymous volumes to its replacement.

    Also returns the source-less Binds entries (`-v /path` through the API) they replace.
    """
    host = container.get("HostConfig") or {}
    declared = set((container.get("Config") or {}).get("Volumes") or {})
    sourceless: dict[str, str] = {}
    covered = {m.get("Target") for m in host.get("Mounts") or []}
    for bind in host.get("Binds") or []:
        source, target = _bind_parts(str(bind))
        if source is None:
            sourceless[target] = str(bind)
        else:
            covered.add(target)
    mounts = []
    for mount in container.get("Mounts") or []:
        target = mount.get("Destination")
        anonymous = target in declared or target in sourceless
        if mount.get("Type") != "volume" or not anonymous or target in covered:
            continue
        entry: Json = {"Type": "volume", "Source": mount["Name"], "Target": target}
        if not mount.get("RW", True):
            entry["ReadOnly"] = True
        mounts.append(entry)
    carried = {m["Target"] for m in mounts}
    return mounts, {bind for target, bind in sourceless.items() if target in carried}


def _endpoint(settings: Mapping[str, Any], container_id: str) -> Json:
    aliases = [a for a in settings.get("Aliases") or [] if not container_id.startswith(a)]
    endpoint: Json = {}
    if aliases:
        endpoint["Aliases"] = aliases
    for key in ("IPAMConfig", "Links", "DriverOpts"):
        if settings.get(key):
            endpoint[key] = settings[key]
    return endpoint


def _primary_network(mode: str, networks: Mapping[str, Any]) -> str | None:
    if mode in _NO_ENDPOINT_MODES or mode.startswith("container:"):
        return None
    if mode == "default":
        mode = "bridge"
    if mode in networks:
        return mode
    for name, settings in networks.items():  # the mode may name the network by id
        if str(settings.get("NetworkID") or "").startswith(mode):
            return name
    return None


def create_request(
    container: Mapping[str, Any],
    image_config: Mapping[str, Any],
    ref: str,
    *,
    image: str | None = None,
    bridge_disabled: bool = False,
) -> CreateRequest:
    """The request creating `container`'s replacement, configured with `ref`.

    `container` is the old container's inspect, `image_config` the old image's Config.
    `image`: what to create it from when not `ref` itself (`repository@digest`); `ref` is
    then kept in the `REF_LABEL` label.
    `bridge_disabled`: the engine has no default bridge (dockerd --bridge=none).
    """
    container_id = str(container["Id"])
    host: Json = dict(container.get("HostConfig") or {})
    mode = str(host.get("NetworkMode") or "default")
    body = user_config(container.get("Config") or {}, image_config or {}, container_id, mode)
    if bridge_disabled and mode in ("default", "bridge"):
        # The engine sets NetworkDisabled itself when it starts such a container; copied,
        # it would keep the replacement off the bridge should one be configured later.
        body.pop("NetworkDisabled", None)
    body["Image"] = image or ref
    if image is not None and image != ref:
        body["Labels"] = {**(body.get("Labels") or {}), REF_LABEL: ref}
    host["Links"] = _create_links(host.get("Links"))
    carried, replaced_binds = _anonymous_mounts(container)
    if carried:
        host["Mounts"] = [*(host.get("Mounts") or []), *carried]
        # The engine refuses a path that is both declared (or bound) and mounted.
        paths = {m["Target"] for m in carried}
        declared = {k: v for k, v in (body.get("Volumes") or {}).items() if k not in paths}
        body["Volumes"] = declared or None
        binds = [b for b in host.get("Binds") or [] if b not in replaced_binds]
        host["Binds"] = binds or None
    body["HostConfig"] = host
    networks: Mapping[str, Any] = (container.get("NetworkSettings") or {}).get("Networks") or {}
    primary = _primary_network(mode, networks)
    connect = []
    if primary is not None:
        endpoint = _endpoint(networks[primary], container_id)
        body["NetworkingConfig"] = {"EndpointsConfig": {primary: endpoint}}
        for name in sorted(networks):
            if name != primary:
                connect.append((name, _endpoint(networks[name], container_id)))
    return CreateRequest(body, connect)
