"""Undoing and cleaning up after a Docker patch: rollback and the release of old images.

This module owns the Docker backend's rollback from any partial state of a patch (the
backend retries it while the engine cannot be reached), the stop call every step uses,
and the removal of an image a commit kept once its retention has passed. A container is
never removed unless the old one is there to replace it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from patchd import faults
from patchd.backends.base import RollbackFailed, Snapshot
from patchd.backends.docker_engine import Engine, message, not_found, status_code

_DEFAULT_STOP = 10  # seconds; the engine's default stop timeout


def stop(api: Any, attrs: Mapping[str, Any]) -> None:
    """Stop a container within its own stop timeout."""
    # Given explicitly, the container's own stop timeout also extends the HTTP
    # request's; left out, a long one would outlast the client's timeout.
    grace = (attrs.get("Config") or {}).get("StopTimeout")
    api.stop(attrs["Id"], timeout=_DEFAULT_STOP if grace is None else grace)


def restore(engine: Engine, snapshot: Snapshot, timeout: float) -> None:
    """Put the snapshotted container back under its name, started and healthy."""
    data = snapshot.data
    name, old_name, old_id = data["container"], data["old_name"], data.get("old_id")
    old = engine.container(old_name)
    current = engine.container(name)
    if old is not None:
        if old_id and old["Id"] != old_id:
            raise RollbackFailed(
                f"{old_name} is container {old['Id'][:12]}, not {old_id[:12]} that patchd"
                " renamed; nothing was changed"
            )
        if current is not None and current["Id"] != old["Id"]:
            stop(engine.api, current)
            engine.api.remove_container(current["Id"], force=True)
            faults.hit("docker.during_rollback")
        if (old.get("State") or {}).get("Running"):
            # An engine restart started it under the snapshot name (restart policy
            # always). It is renamed stopped: the engine renames a running container's
            # network sandbox too, and refuses when it has none after its restart.
            stop(engine.api, old)
            old = {**old, "State": {**old["State"], "Running": False}}
        engine.api.rename(old["Id"], name)
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
        engine.api.start(restored["Id"])
    try:
        engine.await_healthy(name, timeout, 0.0, RollbackFailed)
    except RollbackFailed as err:
        raise RollbackFailed(f"{name} is back on its old image but {err}") from err


def release_image(engine: Engine, image_id: str) -> None:
    """Remove an image a commit kept, unless it is gone, tagged or still in use."""
    image = engine.image(image_id)
    tags = [t for t in image.get("RepoTags") or [] if t != "<none>:<none>"] if image else []
    if image is None or tags:
        return  # gone already, or someone tagged it: theirs to remove
    try:
        engine.api.remove_image(image_id)
    except Exception as err:
        if not_found(err):
            return
        if status_code(err) != 409:
            raise
        # 409: a container (running or not) or a child image uses it: kept. Or it is
        # known by digest in several repositories, which only force removes.
        if "multiple repositories" not in message(err):
            return
        users = engine.api.containers(all=True, quiet=True, filters={"ancestor": image_id})
        if not users:
            engine.api.remove_image(image_id, force=True)
