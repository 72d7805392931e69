"""vSphere tags through the REST (vAPI) endpoints under /rest: who carries which tag.

Owns one REST session per backend (opened on first use with the same user and password as
the SOAP session, over the same TLS rules, re-opened once on 401, closed on `close`), and
`tagged`: the objects that carry ALL of a set of tags, in a fixed number of requests
(list the tags, read each tag (and each category when one is named), then one batch
`list-attached-objects-on-tags`) whatever the inventory's size.

Tags are named "category:tag" or "tag" (any category).
"""

from __future__ import annotations

import base64
import contextlib
import json
import ssl
import threading
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

from patchd.backends.base import BackendError, TransientError
from patchd.backends.vsphere.connection import LoginFailed, Session, is_transient

_BASE = "/rest/com/vmware/cis"
_SESSION_HEADER = "vmware-api-session-id"


class TagLookupFailed(BackendError):
    """The tag service answered with an error (a selector names an unknown tag, ...)."""


class Tags:
    """The REST tag service of one vCenter."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self._id: str | None = None
        self._lock = threading.Lock()

    def _login(self) -> str:
        config = self.session.config
        password = self.session.password()
        basic = base64.b64encode(f"{config.username}:{password}".encode()).decode()
        status, body = self.session.request(
            "POST", f"{_BASE}/session", None, {"Authorization": f"Basic {basic}"}
        )
        if status in (401, 403):
            raise LoginFailed(
                f"vsphere {config.address}: the REST API refused {config.username!r}"
                f" (HTTP {status})"
            )
        if status != 200:
            raise TransientError(f"vsphere {config.address}: REST login answered HTTP {status}")
        return str(json.loads(body)["value"])

    def _call(self, method: str, path: str, payload: Any = None) -> Any:
        body = None if payload is None else json.dumps(payload).encode()
        for attempt in range(2):
            with self._lock:
                if self._id is None:
                    self._id = self._login()
                session_id = self._id
            headers = {_SESSION_HEADER: session_id, "Accept": "application/json"}
            if body is not None:
                headers["Content-Type"] = "application/json"
            status, answer = self.session.request(method, f"{_BASE}{path}", body, headers)
            if status == 401 and attempt == 0:  # expired: log in again, once
                with self._lock:
                    if self._id == session_id:
                        self._id = None
                continue
            if status >= 500:
                raise TransientError(f"tag service: {method} {path} answered HTTP {status}")
            if status >= 400:
                raise TagLookupFailed(f"tag service: {method} {path} answered HTTP {status}")
            return json.loads(answer)["value"] if answer.strip() else None
        raise TransientError("tag service: the REST session was refused right after login")

    def call(self, method: str, path: str, payload: Any = None) -> Any:
        try:
            return self._call(method, path, payload)
        except BackendError:
            raise
        except Exception as err:
            if isinstance(err, ssl.SSLError):
                raise self.session.tls_failure(err) from None
            if is_transient(err, mutating=False):
                raise TransientError(f"tag service: {err}") from None
            raise TagLookupFailed(
                f"tag service: unexpected answer ({type(err).__name__})"
            ) from None

    def tagged(self, wanted: Sequence[str]) -> set[tuple[str, str]]:
        """(type, moid) of every object carrying all `wanted` tags."""
        ids: list[str] = self.call("GET", "/tagging/tag") or []
        tags = [self.call("GET", f"/tagging/tag/id:{quote(i, safe='')}") for i in ids]
        categories: dict[str, str] = {}
        if any(":" in w for w in wanted):
            for category_id in {str(t["category_id"]) for t in tags}:
                category = self.call("GET", f"/tagging/category/id:{quote(category_id, safe='')}")
                categories[category_id] = str(category["name"])
        groups: list[set[str]] = []
        for want in wanted:
            category, sep, name = want.rpartition(":")
            matching = {
                str(t["id"])
                for t in tags
                if t["name"] == name
                and (not sep or categories.get(str(t["category_id"])) == category)
            }
            if not matching:
                raise TagLookupFailed(f"no vSphere tag {want!r} exists")
            groups.append(matching)
        every = sorted(set().union(*groups))
        attached = self.call(
            "POST",
            "/tagging/tag-association?~action=list-attached-objects-on-tags",
            {"tag_ids": every},
        )
        objects: dict[str, set[tuple[str, str]]] = {}
        for entry in attached or []:
            objects[str(entry["tag_id"])] = {
                (str(o["type"]), str(o["id"])) for o in entry.get("object_ids") or []
            }
        result: set[tuple[str, str]] | None = None
        for matching in groups:  # a tag of any matching id counts for that selector
            carriers = set().union(*(objects.get(i, set()) for i in matching))
            result = carriers if result is None else result & carriers
        return result or set()

    def close(self) -> None:
        with self._lock:
            session_id, self._id = self._id, None
        if session_id is not None:
            with contextlib.suppress(Exception):
                self.session.request(
                    "DELETE", f"{_BASE}/session", None, {_SESSION_HEADER: session_id}
                )
