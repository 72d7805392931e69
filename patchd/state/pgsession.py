"""Connections of the PostgreSQL store: how a session is opened and set up, which
failures a new session may cure, and how a URL is shown in messages (never a password).

Every session: UTC times, synchronous_commit on (a returned commit is on disk), and
idle_in_transaction_session_timeout, so a process paused inside a transaction (SIGSTOP,
a frozen VM) loses its session and its locks within seconds instead of holding the lease
row up; keepalives, so a server that vanished is noticed in seconds.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict

from patchd.state.base import StoreError

RECONNECT_PAUSE = 0.25
CONNECT_TIMEOUT = 5  # seconds, unless the URL says otherwise
# A session left idle inside a transaction (its process paused mid-write) is ended by the
# server after this long, so its FOR SHARE lock on the lease never holds up a takeover.
IDLE_IN_TRANSACTION = "2s"
# Libpq keepalives (unless the URL sets them): a server that vanished without closing the
# connection is noticed within about 11 s instead of TCP's minutes.
_KEEPALIVES = {"keepalives": "1", "keepalives_idle": "5", "keepalives_interval": "2",
               "keepalives_count": "3"}  # fmt: skip
# SQLSTATEs after which the same work may be tried again on a fresh connection or
# transaction: connection failures (08), the server shutting down (57P01-57P03), a session
# ended for idling in a transaction (25P03: this process was paused mid-write),
# serialization failure and deadlock (40001, 40P01).
_RETRY_STATES = ("57P01", "57P02", "57P03", "25P03", "40001", "40P01")


class Unreachable(StoreError):
    """The database did not answer within outage_wait (not split into single writes)."""


def describe(url: str) -> str:
    """The URL as messages show it: user, host, port and database, never a password."""
    try:
        info = conninfo_to_dict(url)
    except psycopg.Error:
        return "postgresql://<unparsable URL>"
    user = f"{info['user']}@" if info.get("user") else ""
    port = f":{info['port']}" if info.get("port") else ""
    return f"postgresql://{user}{info.get('host', '')}{port}/{info.get('dbname', '')}"


def options(url: str) -> dict[str, str]:
    """The connection options patchd adds to the URL's (which win where both are given)."""
    try:
        params = conninfo_to_dict(url)
    except psycopg.Error as err:
        raise StoreError(f"state.url: not a PostgreSQL URL ({err})") from None
    extra = {k: v for k, v in _KEEPALIVES.items() if k not in params}
    if "connect_timeout" not in params:
        extra["connect_timeout"] = str(CONNECT_TIMEOUT)
    return extra


def connect(
    url: str, extra: dict[str, str], password: str | None, readonly: bool
) -> psycopg.Connection[Any]:
    """A new autocommit session, set up as the module docstring says."""
    kwargs: dict[str, Any] = dict(extra)
    if password is not None:
        kwargs["password"] = password
    conn = psycopg.connect(url, autocommit=True, application_name="patchd", **kwargs)
    try:
        conn.execute(
            "SET TIME ZONE 'UTC'; SET synchronous_commit TO on;"
            f" SET idle_in_transaction_session_timeout TO '{IDLE_IN_TRANSACTION}'"
        )
        if readonly:
            conn.execute("SET default_transaction_read_only TO on")
    except BaseException:
        conn.close()
        raise
    return conn


def retryable(err: psycopg.Error, conn: psycopg.Connection[Any] | None) -> bool:
    """Whether the work that failed with `err` may be tried again on a new session."""
    state = err.sqlstate or ""
    if conn is not None and (conn.broken or conn.closed):
        return True  # whatever the server said last, the session is gone: a new one
    if state:
        return state.startswith("08") or state in _RETRY_STATES
    if isinstance(err, psycopg.OperationalError) and "FATAL:" in str(err):
        # The server refused the connection: a wrong user, password or database is for a
        # person to fix; only a server starting or stopping is worth a wait.
        return "the database system is" in str(err)
    return conn is None or isinstance(err, psycopg.OperationalError)
