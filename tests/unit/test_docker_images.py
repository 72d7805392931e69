"""The Docker backend's "one call per key" cache (docker_images.Shared) and the
configured image reference of a replacement (docker_recreate.configured_ref).

Pure: the calls are plain functions that count and wait on events; no engine needed.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from patchd.backends.docker_images import Shared
from patchd.backends.docker_recreate import REF_LABEL, configured_ref, create_request


class Slow:
    """A call that counts, and blocks until released, so callers overlap."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.fail = False

    def __call__(self, key: str) -> str:
        with self.lock:
            self.calls.append(key)
        assert self.release.wait(10)
        if self.fail:
            raise OSError(f"registry down for {key}")
        return f"digest-of-{key}"


def test_callers_of_one_key_share_one_call_and_other_keys_do_not_wait() -> None:
    call = Slow()
    shared = Shared(call, ttl=0.0)
    with ThreadPoolExecutor(8) as pool:
        same = [pool.submit(shared.get, "a") for _ in range(6)]
        time.sleep(0.2)
        assert call.calls == ["a"]  # one call in flight for six callers
        call.release.set()
        other = pool.submit(shared.get, "b")
        assert {f.result(5) for f in same} == {"digest-of-a"}
        assert other.result(5) == "digest-of-b"
    assert sorted(call.calls) == ["a", "b"]
    # ttl 0: a later caller asks again.
    assert shared.get("a") == "digest-of-a" and call.calls.count("a") == 2


def test_a_result_is_kept_for_ttl_and_a_failure_not_at_all() -> None:
    now = [0.0]
    call = Slow()
    call.release.set()
    shared = Shared(call, ttl=10.0, clock=lambda: now[0])
    assert shared.get("a") == shared.get("a") == "digest-of-a"
    assert call.calls == ["a"]
    now[0] = 10.0
    shared.get("a")
    assert call.calls == ["a", "a"]
    call.fail = True
    with pytest.raises(OSError, match="registry down"):
        shared.get("b")
    call.fail = False
    assert shared.get("b") == "digest-of-b"
    assert call.calls == ["a", "a", "b", "b"]


def test_prefetch_asks_every_distinct_key_in_parallel_and_returns_those_that_worked() -> None:
    calls: list[str] = []
    overlap = threading.Barrier(3, timeout=5)  # passes only if three calls run at once

    def query(key: str) -> str:
        calls.append(key)
        overlap.wait()
        if key == "down":
            raise OSError("unreachable")
        return key.upper()

    shared = Shared(query, ttl=0.0)
    assert shared.prefetch(["a", "down", "a", "b", "down"]) == {"a": "A", "b": "B"}
    assert sorted(calls) == ["a", "b", "down"]
    assert shared.prefetch([]) == {}


def test_configured_ref_of_a_replacement_is_its_label() -> None:
    ref = "reg:5000/app:stable"
    digest = "sha256:" + "d" * 64
    assert configured_ref({"Image": ref}) == ref
    labelled = {"Image": f"reg:5000/app@{digest}", "Labels": {REF_LABEL: ref}}
    assert configured_ref(labelled) == ref
    assert configured_ref({"Image": digest, "Labels": {REF_LABEL: ref}}) == ref
    # Recreated by someone else from another image, the label copied along: theirs.
    other = {"Image": "reg:5000/other:1", "Labels": {REF_LABEL: ref}}
    assert configured_ref(other) == "reg:5000/other:1"
    elsewhere = {"Image": f"reg:5000/other@{digest}", "Labels": {REF_LABEL: ref}}
    assert configured_ref(elsewhere) == f"reg:5000/other@{digest}"
    # A container pinned by its own configuration stays pinned.
    assert configured_ref({"Image": f"reg:5000/app@{digest}"}) == f"reg:5000/app@{digest}"


def test_create_request_from_a_digest_keeps_the_reference_in_a_label() -> None:
    old = {"Id": "0" * 64, "Config": {"Image": "reg:5000/app:stable", "Labels": {"team": "a"}}}
    source = "reg:5000/app@sha256:" + "e" * 64
    request = create_request(old, {}, "reg:5000/app:stable", image=source)
    assert request.body["Image"] == source
    assert request.body["Labels"] == {"team": "a", REF_LABEL: "reg:5000/app:stable"}
    assert configured_ref(request.body) == "reg:5000/app:stable"
