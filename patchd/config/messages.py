"""Config error messages in plain words: an unknown name with a "did you mean" hint and
the names known, and pydantic's validation errors said the way patchd says them."""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import BaseModel


def unknown(kind: str, value: str, known: list[str]) -> str:
    listed = ", ".join(known) if known else "none defined"
    return f"unknown {kind} {value!r}{suggest(value, known)} (known: {listed})"


def suggest(value: str, known: tuple[str, ...] | list[str]) -> str:
    close = difflib.get_close_matches(value, list(known), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The keys a nested model accepts at `loc`, for 'did you mean' hints."""
    current: Any = model
    for part in loc:
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return []
        candidates = [field.annotation, *getattr(field.annotation, "__args__", ())]
        current = next(
            (c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None
        )
        if current is None:
            return []
    return list(getattr(current, "model_fields", {}))


def reason(model: type[BaseModel], error: Any) -> str:
    kind = error["type"]
    loc = tuple(error["loc"])
    if kind == "extra_forbidden":
        known = fields_at(model, loc[:-1])
        hint = suggest(str(loc[-1]), known) if known else ""
        listed = f" (known: {', '.join(known)})" if known else ""
        return f"unknown key{hint}{listed}"
    if kind == "missing":
        return "required key is missing"
    if kind in ("model_type", "dict_type", "model_attributes_type"):
        return "expected a table"
    message = str(error["msg"])
    for prefix in ("Value error, ", "Assertion failed, "):
        if message.startswith(prefix):
            message = message[len(prefix) :]
    return message
