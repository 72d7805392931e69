"""How a version is named to people: the one form every output uses (plan, status,
history, logs, notifications, `patchd run`).

An image version is named `repository@sha256:<64 hex>`: what `docker pull` takes and
what registries list, whole (a shortened digest cannot be looked up or pasted). A
version of anything else (a package set, a `patch.version`, a vSphere baseline) is
named as the backend reported it. A leaf module: it knows image references, not
backends, so that reports and observers name versions without importing one.
"""

from __future__ import annotations

import re

_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


def repository(ref: str) -> str:
    """`registry:5000/app` of `registry:5000/app:1` (or of `...@sha256:...`)."""
    name = ref.partition("@")[0]
    colon, slash = name.rfind(":"), name.rfind("/")
    return name[:colon] if colon > slash else name


def name(ref: str | None, version: str | None) -> str:
    """The name of `version` of `ref`: `repository@sha256:<hex>` for an image digest."""
    if not version:
        return ""
    if ref and _DIGEST.fullmatch(version) and not _DIGEST.fullmatch(ref):
        return f"{repository(ref)}@{version}"
    return version


def of(ref: str | None, version: str) -> str:
    """The name of `version` where nothing else says what it is a version of: an image
    digest names its repository already; another version gets its ref before it."""
    named = name(ref, version)
    return f"{ref} {version}" if ref and named == version else named


def change(ref: str | None, current: str | None, available: str | None) -> str:
    """`<current> -> <available>`, both named by `name`."""
    return f"{name(ref, current)} -> {name(ref, available)}"
