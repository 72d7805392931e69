"""Fixtures for the tests of the PostgreSQL store and the leader lease, on the test bed's
private PostgreSQL (tests/pglab.py). They are integration tests: marked so here."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.pglab import PgLab, ensure_up, stop_if_started

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def pg() -> Iterator[PgLab]:
    lab = ensure_up()
    yield lab
    stop_if_started(lab)


@pytest.fixture
def pg_url(pg: PgLab) -> Iterator[str]:
    """A fresh, empty database for one test."""
    url = pg.create_database()
    yield url
    pg.drop_database(url)
