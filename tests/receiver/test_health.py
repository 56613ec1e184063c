"""``/healthz`` and ``/readyz``: alive, ready, and the reasons for not being ready."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

import pytest
import sqlalchemy as sa
from flask import Flask
from flask.testing import FlaskClient
from prometheus_client.parser import text_string_to_metric_families

from otacm.settings import Settings
from receiver.webhook import WEBHOOK_PATH
from tests.receiver.conftest import settings_for
from tests.receiver.notifications import notification
from tests.receiver.test_webhook import assert_error


def test_healthz_answers_ok(client: FlaskClient) -> None:
    """The process is alive: 200 with a status of ok."""
    response = client.get("/healthz")

    assert response.status_code == 200
    assert response.get_json() == {"status": "ok"}


def test_readyz_answers_ok_on_a_migrated_database(client: FlaskClient) -> None:
    """Reachable, migrated and connections resolved: 200."""
    response = client.get("/readyz")

    assert response.status_code == 200
    assert response.get_json() == {"status": "ok", "connections": 2}


def test_readyz_is_503_without_a_venue_connection(
    migrated_engine: sa.Engine, make_app: Callable[[Settings], Flask]
) -> None:
    """A migrated database but no venue configured: 503 not_configured, naming what to set;
    the process is alive all the same."""
    client = make_app(settings_for(migrated_engine, connections=[])).test_client()

    refused = client.get("/readyz")
    assert_error(refused, 503, "not_configured")
    assert "no venue connection configured: set OTACM_TENANT" in refused.get_json()["message"]
    assert client.get("/healthz").status_code == 200


def test_readyz_is_503_on_an_unmigrated_database(
    engine: sa.Engine, make_app: Callable[[Settings], Flask]
) -> None:
    """An empty database: 503 schema_not_current, while /healthz stays 200."""
    client = make_app(settings_for(engine)).test_client()

    assert_error(client.get("/readyz"), 503, "schema_not_current")
    assert client.get("/healthz").status_code == 200


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_the_app_starts_without_a_database_and_says_so(
    tmp_path: Path, make_app: Callable[[Settings], Flask], backend: str
) -> None:
    """No database to reach: the app starts, /readyz and the webhook answer 503."""
    url = {
        # A directory where the database file should be: SQLite cannot open it.
        "sqlite": f"sqlite:///{tmp_path}",
        "postgresql": f"postgresql+psycopg://otacm@127.0.0.1:{_closed_port()}/otacm",
    }[backend]
    engine = sa.create_engine("sqlite://")
    settings = settings_for(engine, database_url=url)
    engine.dispose()

    client = make_app(settings).test_client()

    assert client.get("/healthz").status_code == 200
    assert_error(client.get("/readyz"), 503, "database_unavailable")
    refused = client.post(WEBHOOK_PATH, json={"value": [notification()]})
    assert_error(refused, 503, "database_unavailable")
    metrics = client.get("/metrics")
    assert metrics.status_code == 200
    [up] = [
        family
        for family in text_string_to_metric_families(metrics.get_data(as_text=True))
        if family.name == "otacm_database_up"
    ]
    assert [sample.value for sample in up.samples] == [0.0]
