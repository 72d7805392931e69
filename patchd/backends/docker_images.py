"""Registry work of the Docker backend done once: update checks and pulls.

This module owns `Shared`, a thread-safe "one call per key" cache. A Docker backend
instance keeps two of them:

- update checks: the registry's manifest digest for an image reference. `prefetch`
  issues the queries of a whole run in parallel, one per reference, before its first
  target starts (the backend hands each target its answer once); checks made at the
  same time share one query. Nothing is kept beyond that, so a version published later
  is seen by the next check; a failed query is not kept either.
- pulls: `repository@digest`, pulled before any container is stopped; containers that
  need one digest at the same time wait for the same pull (one that comes later finds
  the image on the engine and does not pull).

Futures rather than a lock around the call: callers of one key wait for the same call,
and callers of different keys never wait for each other.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from patchd.backends.docker_engine import Engine

_PREFETCH_WORKERS = 8


class Shared:
    """One call per key at a time; a result is reused for `ttl` seconds.

    With `ttl = 0` only callers that arrive while the call runs share it.
    """

    def __init__(
        self, call: Callable[[str], str], ttl: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._call = call
        self.ttl = ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._futures: dict[str, tuple[float, Future[str]]] = {}

    def get(self, key: str) -> str:
        with self._lock:
            entry = self._futures.get(key)
            if entry is not None and entry[1].done() and self._clock() - entry[0] >= self.ttl:
                entry = None
            owner = entry is None
            if entry is None:
                entry = (self._clock(), Future())
                self._futures[key] = entry
        made, future = entry
        if owner:
            try:
                future.set_result(self._call(key))
            except BaseException as err:
                future.set_exception(err)
            with self._lock:
                # A failure is not kept (the next caller tries again); a result is kept
                # for ttl from when it was asked for.
                if self._futures.get(key) is entry and (
                    future.exception() is not None or self._clock() - made >= self.ttl
                ):
                    del self._futures[key]
        return future.result()

    def prefetch(self, keys: Iterable[str]) -> dict[str, str]:
        """Make the calls of every key in parallel: key -> result of those that worked
        (a failed one is left to the caller's own `get`, which reports it)."""
        distinct = sorted(set(keys))
        if not distinct:
            return {}
        with ThreadPoolExecutor(
            max_workers=min(_PREFETCH_WORKERS, len(distinct)), thread_name_prefix="patchd-check"
        ) as pool:
            futures = {key: pool.submit(self.get, key) for key in distinct}
            return {k: f.result() for k, f in futures.items() if f.exception() is None}


class Images:
    """The registry digests and pulls of one engine, each shared (see the module's doc)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.checks = Shared(self._registry_digest, ttl=0.0)
        self.pulls = Shared(self._pull, ttl=0.0)

    def _registry_digest(self, ref: str) -> str:
        return str(self.engine.api.inspect_distribution(ref)["Descriptor"]["digest"])

    def _pull(self, reference: str) -> str:
        """Pull `repository@digest` unless the engine has it; its image id."""
        image = self.engine.image(reference)
        if image is not None:
            return str(image["Id"])
        repository, _, digest = reference.partition("@")
        return self.engine.pull(repository, digest)

    def pull_in_background(self, references: Iterable[str]) -> None:
        """Start pulling: the first stop of a run then waits only for what it needs."""
        for reference in sorted(set(references)):
            threading.Thread(
                target=self._pull_quietly, args=(reference,), name="patchd-pull", daemon=True
            ).start()

    def _pull_quietly(self, reference: str) -> None:
        with contextlib.suppress(Exception):  # the snapshot that needs it reports it
            self.pulls.get(reference)
