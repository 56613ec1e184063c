"""Fixtures for the receiver's tests, one layer each: settings → app → test client.

``settings`` points at the ``migrated_engine`` database (SQLite, then PostgreSQL) and
configures two venue connections: ``venue-a`` with two client states (a rotation) and
``venue-b`` with one. ``make_app`` builds further apps from changed settings; every app
made here has its engine disposed of at the end of the test.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask
from flask.testing import FlaskClient
from pydantic import SecretStr

from otacm.settings import Settings
from receiver import create_app
from receiver.context import EXTENSION, Receiver
from tests.receiver.notifications import STATE_A, STATE_A_NEXT, STATE_B
from venue.connection import VenueConnection


def venue_connection(name: str, *states: str) -> VenueConnection:
    """A venue connection subscribed with ``states``."""
    return VenueConnection(
        name=name,
        api_base_url="http://venue.invalid",
        tenant="00000000-0000-0000-0000-000000000001",
        company="CRONUS International Ltd.",
        api_key=SecretStr("key-for-tests"),
        webhook_client_states=[SecretStr(state) for state in states],
    )


def settings_for(engine: sa.Engine, **overrides: Any) -> Settings:
    """Settings on ``engine``'s database with the two test connections."""
    values: dict[str, Any] = {
        "database_url": engine.url.render_as_string(hide_password=False),
        "connections": [
            venue_connection("venue-a", STATE_A, STATE_A_NEXT),
            venue_connection("venue-b", STATE_B),
        ],
        "db_lock_timeout": 2.0,
        "webhook_max_bytes": 64 * 1024,
    }
    return Settings(**{**values, **overrides})


def receiver_of(app: Flask) -> Receiver:
    """The app's receiver: its engine, sessions, metrics and connections."""
    receiver: Receiver = app.extensions[EXTENSION]
    return receiver


@pytest.fixture
def settings(migrated_engine: sa.Engine) -> Settings:
    """Settings on the migrated test database, with two venue connections."""
    return settings_for(migrated_engine)


@pytest.fixture
def make_app() -> Iterator[Callable[[Settings], Flask]]:
    """Make receiver apps; each one's engine is disposed of after the test."""
    apps: list[Flask] = []

    def make(settings: Settings) -> Flask:
        app = create_app(settings)
        app.config["TESTING"] = True
        apps.append(app)
        return app

    yield make
    for app in apps:
        receiver_of(app).close()


@pytest.fixture
def app(settings: Settings, make_app: Callable[[Settings], Flask]) -> Flask:
    """The receiver app on the test database."""
    return make_app(settings)


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    """A test client of ``app``."""
    return app.test_client()
