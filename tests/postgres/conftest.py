"""Fixtures for the tests of the PostgreSQL store and the leader lease, on the test bed's
private PostgreSQL (tests/pglab.py). They are integration tests: marked so here."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.pglab import pg, pg_url  # noqa: F401  (the fixtures of every test here)

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.integration)
