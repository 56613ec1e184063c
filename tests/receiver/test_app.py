"""``create_app``'s contract: what importing does (nothing), what it reads, what it owns."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa

from receiver import create_app
from receiver.webhook import WEBHOOK_PATH
from tests.receiver.conftest import receiver_of, settings_for, venue_connection
from tests.receiver.notifications import STATE_A, STATE_B, notification
from venue.connection import SettingsError


@pytest.mark.process
def test_importing_the_package_opens_and_reads_nothing(tmp_path: Path) -> None:
    """``import receiver`` reads no configuration and creates no database."""
    environment = {
        **{k: v for k, v in os.environ.items() if not k.startswith("OTACM_")},
        # Reading either would fail or leave a trace.
        "OTACM_CONFIG_FILE": str(tmp_path / "missing.toml"),
        "OTACM_DATABASE_URL": f"sqlite:///{tmp_path / 'var' / 'otacm.sqlite3'}",
    }

    subprocess.run(
        [sys.executable, "-c", "import receiver; receiver.create_app"],
        cwd=Path(__file__).resolve().parents[2],
        env=environment,
        check=True,
        timeout=60,
    )

    assert list(tmp_path.iterdir()) == []


def test_without_settings_the_app_loads_them_from_the_environment(
    migrated_engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``create_app()`` reads ``OTACM_*``: the database and the venue's client state."""
    monkeypatch.setenv("OTACM_DATABASE_URL", migrated_engine.url.render_as_string(False))
    monkeypatch.setenv("OTACM_TENANT", "00000000-0000-0000-0000-000000000001")
    monkeypatch.setenv("OTACM_COMPANY", "CRONUS International Ltd.")
    monkeypatch.setenv("OTACM_API_KEY", "key-for-tests")
    monkeypatch.setenv("OTACM_WEBHOOK_CLIENT_STATES", f"{STATE_B},{STATE_A}")

    app = create_app()
    try:
        response = app.test_client().post(WEBHOOK_PATH, json={"value": [notification()]})
        assert receiver_of(app).settings.db_lock_timeout == 5.0
    finally:
        receiver_of(app).close()

    assert response.get_json() == {"stored": 1, "duplicates": 0}


def test_a_client_state_shared_by_two_connections_is_refused(migrated_engine: sa.Engine) -> None:
    """A state configured for two connections cannot attribute a notification: no app."""
    settings = settings_for(
        migrated_engine,
        connections=[venue_connection("one", STATE_A), venue_connection("two", STATE_B, STATE_A)],
    )

    with pytest.raises(SettingsError, match="'one' and 'two'") as raised:
        create_app(settings)

    assert STATE_A not in str(raised.value)


def test_the_app_owns_its_engine_and_close_disposes_of_it(migrated_engine: sa.Engine) -> None:
    """The app's engine is its own (not the caller's), and ``close`` releases it."""
    app = create_app(settings_for(migrated_engine))
    receiver = receiver_of(app)
    app.test_client().get("/readyz")

    receiver.close()

    assert receiver.engine is not migrated_engine
    assert receiver.engine.pool.checkedout() == 0
