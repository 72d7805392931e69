"""The control protocol: HTTP/1.1 with JSON bodies over the daemon's Unix socket.

One request per verb (README "Control socket" shows each with an example):

    GET  /v1/status                 live state: runs, targets' steps, gates, pauses
    POST /v1/pause                  {"groups": [..], "all": false, "for": "2h", "reason": ".."}
    POST /v1/resume                 {"groups": [..], "all": false}
    POST /v1/approve                {"group": "prod"}
    POST /v1/trigger                {"group": "web", "force": false}
    GET  /v1/quarantine             every group's quarantined versions
    POST /v1/quarantine/clear       {"group": "web", "version": "sha256:.." or null}

A reply is a JSON object with "ok": true and the verb's fields, or "ok": false and an
"error" in plain words, with the HTTP status saying which kind: 400 a bad request, 403
the caller may not steer patchd, 404 an unknown group or path, 409 the daemon cannot do
it now (nothing to approve, a run already going on). This module only parses and checks
bodies; what a verb does is patchd.control.actions'.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from patchd.durations import parse_duration

VERSION = "v1"


@dataclass(frozen=True)
class Verb:
    name: str
    method: str
    path: str
    # field -> (type, required); only these fields are accepted
    fields: dict[str, tuple[type | tuple[type, ...], bool]]


VERBS: dict[str, Verb] = {
    v.name: v
    for v in (
        Verb("status", "GET", "/v1/status", {}),
        Verb(
            "pause",
            "POST",
            "/v1/pause",
            {
                "groups": (list, False),
                "all": (bool, False),
                "for": ((str, type(None)), False),
                "reason": (str, False),
            },
        ),
        Verb("resume", "POST", "/v1/resume", {"groups": (list, False), "all": (bool, False)}),
        Verb("approve", "POST", "/v1/approve", {"group": (str, True)}),
        Verb("trigger", "POST", "/v1/trigger", {"group": (str, True), "force": (bool, False)}),
        Verb("quarantine", "GET", "/v1/quarantine", {}),
        Verb(
            "quarantine-clear",
            "POST",
            "/v1/quarantine/clear",
            {"group": (str, True), "version": ((str, type(None)), False)},
        ),
    )
}
BY_ROUTE = {(v.method, v.path): v for v in VERBS.values()}


class ProtocolError(Exception):
    """A request that cannot be served: `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def route(method: str, path: str) -> Verb:
    verb = BY_ROUTE.get((method, path.split("?", 1)[0].rstrip("/") or "/"))
    if verb is None:
        known = ", ".join(f"{v.method} {v.path}" for v in VERBS.values())
        raise ProtocolError(404, f"no such request {method} {path} (known: {known})")
    return verb


def parse_body(verb: Verb, raw: bytes) -> dict[str, Any]:
    """The request's JSON object, checked against the verb's fields."""
    if not raw.strip():
        body: Any = {}
    else:
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as err:
            raise ProtocolError(400, f"{verb.name}: the body is not JSON: {err}") from None
    if not isinstance(body, dict):
        raise ProtocolError(400, f"{verb.name}: the body must be a JSON object")
    unknown = sorted(set(body) - set(verb.fields))
    if unknown:
        raise ProtocolError(400, f"{verb.name}: unknown field(s) {', '.join(unknown)}")
    for name, (kind, required) in verb.fields.items():
        if name not in body:
            if required:
                raise ProtocolError(400, f"{verb.name}: field {name!r} is required")
            continue
        value = body[name]
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise ProtocolError(400, f"{verb.name}: field {name!r} has the wrong type")
        if isinstance(value, list) and not all(isinstance(item, str) for item in value):
            raise ProtocolError(400, f"{verb.name}: field {name!r} must list group names")
    if body.get("for") is not None:
        try:
            if parse_duration(body["for"]).total_seconds() <= 0:
                raise ValueError(f"duration {body['for']!r} must be longer than 0s")
        except ValueError as err:
            raise ProtocolError(400, f"{verb.name}: for: {err}") from None
    if verb.name in ("pause", "resume") and bool(body.get("groups")) == bool(body.get("all")):
        raise ProtocolError(400, f"{verb.name}: name groups or give all, not both or neither")
    return body


def encode(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, indent=2, default=str).encode() + b"\n"
