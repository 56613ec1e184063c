"""``/metrics``: the webhook counters and the inbox gauges, after real POSTs."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from flask.testing import FlaskClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.orm import Session, sessionmaker

from receiver.webhook import WEBHOOK_PATH
from storage.migrate import upgrade
from storage.models import Inbox, InboxState
from tests.receiver.notifications import STATE_B, notification

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(client: FlaskClient) -> Samples:
    """The samples of ``/metrics``, by name and labels."""
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.mimetype == "text/plain"
    return parse(response.get_data(as_text=True))


def parse(text: str) -> Samples:
    """Samples of a Prometheus text exposition, by name and labels."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value."""
    return samples[(name, frozenset(labels.items()))]


def test_metrics_count_webhooks_and_measure_the_inbox(
    client: FlaskClient, sessions: sessionmaker[Session]
) -> None:
    """Stored, duplicate and refused POSTs are counted; depth, age and dead letters match."""
    sent = notification()
    client.post(WEBHOOK_PATH, json={"value": [sent, notification(), notification(state=STATE_B)]})
    client.post(WEBHOOK_PATH, json={"value": [sent]})
    client.post(WEBHOOK_PATH, json={"value": [notification(state="forged")]})
    client.post(WEBHOOK_PATH, json={"value": [notification(state="forged")]})
    client.post(WEBHOOK_PATH, data="{", content_type="application/json")
    with sessions.begin() as session:
        ids = session.scalars(sa.select(Inbox.id).order_by(Inbox.id)).all()
        session.execute(
            sa.update(Inbox)
            .where(Inbox.id == ids[0])
            .values(received_at=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=120))
        )
        session.execute(sa.update(Inbox).where(Inbox.id == ids[1]).values(state=InboxState.DEAD))

    samples = scrape(client)

    counted: dict[str, Any] = {
        "stored": value(samples, "otacm_webhook_notifications_total", outcome="stored"),
        "duplicate": value(samples, "otacm_webhook_notifications_total", outcome="duplicate"),
        "401": value(samples, "otacm_webhook_rejections_total", code="unknown_client_state"),
        "400": value(samples, "otacm_webhook_rejections_total", code="invalid_json"),
    }
    assert counted == {"stored": 3, "duplicate": 1, "401": 2, "400": 1}
    depth = "otacm_inbox_depth"
    assert value(samples, depth, connection="venue-a", state="pending") == 1
    assert value(samples, depth, connection="venue-a", state="dead") == 1
    assert value(samples, depth, connection="venue-a", state="leased") == 0
    assert value(samples, depth, connection="venue-b", state="pending") == 1
    age = "otacm_inbox_oldest_pending_age_seconds"
    assert 120 <= value(samples, age, connection="venue-a") < 180
    assert 0 <= value(samples, age, connection="venue-b") < 60
    dead = "otacm_dead_letters"
    assert value(samples, dead, connection="venue-a", queue="inbox") == 1
    assert value(samples, dead, connection="venue-a", queue="outbox") == 0
    assert value(samples, dead, connection="venue-b", queue="inbox") == 0
    assert value(samples, "otacm_database_up") == 1


def test_an_empty_inbox_reports_zeros_for_every_connection(client: FlaskClient) -> None:
    """Configured connections have series even before their first row."""
    samples = scrape(client)

    for connection in ("venue-a", "venue-b"):
        assert value(samples, "otacm_inbox_depth", connection=connection, state="pending") == 0
        assert value(samples, "otacm_inbox_oldest_pending_age_seconds", connection=connection) == 0
    assert value(samples, "otacm_webhook_notifications_total", outcome="stored") == 0


_MULTIPROCESS_SCRIPT = textwrap.dedent(
    """
    import sys
    from otacm.settings import Settings
    from receiver import create_app
    from tests.receiver.conftest import venue_connection
    from tests.receiver.notifications import STATE_A, notification

    app = create_app(Settings(
        database_url=sys.argv[1], connections=[venue_connection("venue-a", STATE_A)]
    ))
    client = app.test_client()
    assert client.post("/webhooks/ota-cm", json={"value": [notification()]}).status_code == 200
    sys.stdout.write(client.get("/metrics").get_data(as_text=True))
    app.extensions["otacm"].close()
    """
)


def test_counters_of_several_processes_add_up_in_multiprocess_mode(tmp_path: Path) -> None:
    """With PROMETHEUS_MULTIPROC_DIR, each process's counters are summed at the scrape."""
    url = f"sqlite:///{tmp_path / 'otacm.sqlite3'}"
    upgrade(url)
    directory = tmp_path / "prometheus"
    directory.mkdir()
    environment = {
        **{k: v for k, v in os.environ.items() if not k.startswith("OTACM_")},
        "PROMETHEUS_MULTIPROC_DIR": str(directory),
    }
    root = Path(__file__).resolve().parents[2]

    scrapes = [
        subprocess.run(
            [sys.executable, "-c", _MULTIPROCESS_SCRIPT, url],
            cwd=root,
            env=environment,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        for _ in range(2)
    ]

    first, second = (parse(text) for text in scrapes)
    stored = "otacm_webhook_notifications_total"
    assert value(first, stored, outcome="stored") == 1
    assert value(second, stored, outcome="stored") == 2
    assert value(second, "otacm_inbox_depth", connection="venue-a", state="pending") == 2
