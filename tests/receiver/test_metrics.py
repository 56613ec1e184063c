"""``/metrics``: the webhook counters and the inbox gauges, after real POSTs; the gauges
read from the database (delivery health, jobs, reconciliation exceptions, subscriptions)."""

from __future__ import annotations

import datetime as dt
import math
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from flask.testing import FlaskClient
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.orm import Session, sessionmaker

from heartbeat.metric_figures import EXCEPTION_CATEGORIES, first_settlements, refresh_figures
from heartbeat.subscriptions import ConnectionCheck, SubscriptionReport, record_checks
from receiver.database_metrics import DatabaseCollector
from receiver.webhook import WEBHOOK_PATH
from storage.engine import make_sessions
from storage.migrate import upgrade
from storage.models import (
    ChangeSource,
    Inbox,
    InboxSource,
    InboxState,
    OrderItem,
    StatusChange,
    VenueOrder,
    Wallet,
    canonical_payload,
    ensure_connection,
    inbox_dedup_key,
)
from storage.records import ExceptionState, JobRun, ReconException, ReconRun, ReconTrigger
from storage.types import utcnow
from tests.receiver.notifications import STATE_B, notification
from venue.models import OrderStatus

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


@pytest.mark.process
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


# --- delivery health, stuck and Error orders, scheduled jobs ------------------------------

NOW = dt.datetime(2026, 5, 27, 12, 0, tzinfo=dt.UTC)
STUCK_AFTER = dt.timedelta(hours=1)


def ago(**delta: float) -> dt.datetime:
    """``NOW`` minus a time span."""
    return NOW - dt.timedelta(**delta)


class Planter:
    """Writes mirror rows with known times, as the worker and the heartbeat would."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def order(
        self,
        connection: str,
        changes: list[tuple[OrderStatus | None, ChangeSource, dt.datetime]],
        *,
        issued_at: dt.datetime | None = None,
        notified_at: dt.datetime | None = None,
        removed_at: dt.datetime | None = None,
    ) -> VenueOrder:
        """An order that went through ``changes``, with a wallet and a webhook if given."""
        connection_id = ensure_connection(self.session, connection)
        # A removal (no status) leaves the last status on the order row.
        status = [s for s, _, _ in changes if s is not None][-1]
        changed_at = changes[-1][2]
        row = VenueOrder(
            connection_id=connection_id,
            order_id=str(uuid.uuid4()),
            partner_id=str(uuid.uuid4()),
            sell_to_order_reference=f"SHOP-{uuid.uuid4().hex[:8]}",
            status=status,
            status_changed_at=changed_at,
            first_seen_at=changes[0][2],
            removed_at=removed_at,
        )
        if issued_at is not None:
            wallet = Wallet(seq_no=1, issued_at=issued_at)
            # A later wallet: the earliest one is the evidence.
            later = Wallet(seq_no=2, issued_at=issued_at + dt.timedelta(seconds=7))
            row.items = [
                OrderItem(line_no=100000, item_number="31001", quantity=2, wallets=[wallet, later])
            ]
        row.status_changes = [
            StatusChange(status=s, source=source, observed_at=at) for s, source, at in changes
        ]
        self.session.add(row)
        self.session.flush()
        if notified_at is not None:
            # As the worker leaves an applied webhook: its row done, its time on the order.
            self.webhook(connection_id, row.order_id, notified_at)
            row.note_webhooks([notified_at])
            self.session.flush()
        return row

    def webhook(self, connection_id: int, order: str, notified_at: dt.datetime) -> None:
        """A webhook's inbox row for ``order``, stamped ``notified_at`` by the venue."""
        payload = {"orderId": order, "timestamp": notified_at.isoformat()}
        self.session.add(
            Inbox(
                connection_id=connection_id,
                source=InboxSource.WEBHOOK,
                event_name="ota_cm_order_processed",
                order_id=order,
                notified_status="Issued",
                notified_at=notified_at,
                received_at=notified_at,
                payload=payload,
                dedup_key=inbox_dedup_key(canonical_payload(payload)),
                state=InboxState.DONE,
                next_attempt_at=notified_at,
            )
        )
        self.session.flush()


def refresh(sessions: sessionmaker[Session], now: dt.datetime = NOW) -> None:
    """Run the scheduler's ``metric_figures`` job at ``now``."""
    refresh_figures(sessions, sessions, now=now, stuck_after=STUCK_AFTER)


def collect(engine: sa.Engine, *names: str, at: dt.datetime = NOW, run: bool = True) -> Samples:
    """What a :class:`DatabaseCollector` yields at ``at``, as samples by name and labels,
    after the ``metric_figures`` job ran at ``NOW`` (unless ``run`` is false)."""
    if run:
        refresh(make_sessions(engine))
    collector = DatabaseCollector(make_sessions(engine, read_only=True), names, clock=lambda: at)
    registry = CollectorRegistry()
    registry.register(collector)
    return parse(generate_latest(registry).decode())


def test_delivery_health_counts_settlements_by_source_and_measures_the_lag(
    migrated_engine: sa.Engine, sessions: sessionmaker[Session]
) -> None:
    """Orders first settled in the last 24 h are counted by source; lags are exact."""
    S, W = ChangeSource, OrderStatus  # short names keep the plantings on one line each
    with sessions.begin() as session:
        plant = Planter(session)
        # Webhook: known 20 s after its first wallet was issued (the webhook came later).
        plant.order(
            "venue-a",
            [(W.SUBMITTED, S.SUBMIT, ago(hours=2)), (W.ISSUED, S.WEBHOOK, ago(hours=1))],
            issued_at=ago(hours=1, seconds=20),
            notified_at=ago(hours=1, seconds=10),
        )
        # No webhook: the feed found it, 100 s after issue.
        plant.order(
            "venue-a",
            [(W.PROCESSING, S.POLL, ago(hours=1)), (W.ISSUED, S.FEED, ago(minutes=30))],
            issued_at=ago(minutes=31, seconds=40),
        )
        # Draft, by webhook, 60 s after minting; the webhook's timestamp is later.
        plant.order(
            "venue-a",
            [(W.DRAFT, S.WEBHOOK, ago(hours=5))],
            issued_at=ago(hours=5, seconds=60),
            notified_at=ago(hours=5, seconds=40),
        )
        # The venue's clock ahead of ours: its evidence is after our knowledge; lag 0.
        plant.order(
            "venue-a",
            [(W.ISSUED, S.WEBHOOK, ago(hours=1))],
            notified_at=ago(hours=1) + dt.timedelta(seconds=5),
        )
        # Error found by a look-up, and Cancelled found by the feed: no wallet, no
        # webhook, so no lag (untimed). Only the Error one is in Error now.
        plant.order(
            "venue-a",
            [(W.SUBMITTED, S.SUBMIT, ago(hours=3)), (W.ERROR, S.POLL, ago(minutes=10))],
        )
        plant.order("venue-a", [(W.CANCELLED, S.FEED, ago(hours=1))])
        # Error, then deleted at the venue: neither in Error now nor settled in the window.
        plant.order(
            "venue-a",
            [(W.ERROR, S.WEBHOOK, ago(hours=30)), (None, S.POLL, ago(hours=2))],
            removed_at=ago(hours=2),
            notified_at=ago(hours=30),
        )
        # First settled 30 h ago; replaced and settled again within the window: not counted.
        plant.order(
            "venue-a",
            [
                (W.ISSUED, S.WEBHOOK, ago(hours=30)),
                (W.SUBMITTED, S.REPLACE, ago(hours=3)),
                (W.ISSUED, S.WEBHOOK, ago(hours=2)),
            ],
            issued_at=ago(hours=2, seconds=1),
        )
        # In flight for 3 h (stuck), and for 10 minutes (not yet).
        plant.order("venue-a", [(W.PROCESSING, S.FEED, ago(hours=3))])
        plant.order("venue-a", [(W.SUBMITTED, S.SUBMIT, ago(minutes=10))])
        # Another connection: settled in the synchronous createOrder answer.
        plant.order(
            "venue-b", [(W.ISSUED, S.SUBMIT, ago(hours=2))], issued_at=ago(hours=2, seconds=3)
        )

    samples = collect(migrated_engine, "venue-a", "venue-b", "venue-c")

    settled = "otacm_orders_settled_recent"
    by_source_a = {
        source.value: value(samples, settled, connection="venue-a", learned_from=source.value)
        for source in ChangeSource
    }
    assert by_source_a == {
        **{source.value: 0 for source in ChangeSource},
        "webhook": 3,
        "feed": 2,
        "poll": 1,
    }
    assert value(samples, settled, connection="venue-b", learned_from="submit") == 1
    assert value(samples, settled, connection="venue-c", learned_from="webhook") == 0

    lag = "otacm_settlement_lag_seconds"
    # venue-a's lags: 0, 20, 60, 100 s; quantiles interpolate between the closest ranks.
    assert value(samples, lag, connection="venue-a", quantile="0.5") == pytest.approx(40)
    assert value(samples, lag, connection="venue-a", quantile="0.95") == pytest.approx(94)
    assert value(samples, f"{lag}_count", connection="venue-a") == 4
    assert value(samples, f"{lag}_sum", connection="venue-a") == pytest.approx(180)
    assert value(samples, "otacm_settlement_lag_untimed", connection="venue-a") == 2
    assert value(samples, lag, connection="venue-b", quantile="0.95") == pytest.approx(3)
    assert value(samples, f"{lag}_count", connection="venue-b") == 1
    assert value(samples, "otacm_settlement_lag_untimed", connection="venue-b") == 0
    assert math.isnan(value(samples, lag, connection="venue-c", quantile="0.5"))
    assert value(samples, f"{lag}_count", connection="venue-c") == 0

    assert value(samples, "otacm_orders_stuck", connection="venue-a") == 1
    assert value(samples, "otacm_orders_stuck", connection="venue-b") == 0
    assert value(samples, "otacm_orders_in_error", connection="venue-a") == 1
    assert value(samples, "otacm_orders_in_error", connection="venue-c") == 0
    assert value(samples, "otacm_database_up") == 1


def test_the_window_counts_every_order_settled_within_it_exactly(
    migrated_engine: sa.Engine, sessions: sessionmaker[Session]
) -> None:
    """Hundreds of settlements across the window's start: those within it all count, the
    ones before it none, however many status changes were written."""
    S, W = ChangeSource, OrderStatus
    with sessions.begin() as session:
        plant = Planter(session)
        # Every 5 minutes for 4 h either side of the window's start (24 h ago), each
        # order with two changes; 48 settle within the window, 48 before it.
        for n in range(-48, 48):
            settled = ago(hours=24) + dt.timedelta(minutes=5 * n + 1)
            plant.order(
                "venue-a",
                [
                    (W.SUBMITTED, S.SUBMIT, settled - dt.timedelta(minutes=1)),
                    (W.ISSUED, S.FEED, settled),
                ],
            )
        # Settled before the window and again within it (a replace): not in the window.
        plant.order(
            "venue-a",
            [(W.ISSUED, S.WEBHOOK, ago(hours=30)), (W.ISSUED, S.POLL, ago(hours=1))],
        )
        # Many more recent changes of orders still in flight: no cap leaves any out.
        for _ in range(300):
            plant.order("venue-a", [(W.PROCESSING, S.POLL, ago(minutes=30))])

    samples = collect(migrated_engine, "venue-a")

    settled = "otacm_orders_settled_recent"
    assert value(samples, settled, connection="venue-a", learned_from="feed") == 48
    assert value(samples, settled, connection="venue-a", learned_from="poll") == 0
    assert value(samples, "otacm_settlement_lag_untimed", connection="venue-a") == 48


def test_first_settlements_reads_the_window_by_time(sessions: sessionmaker[Session]) -> None:
    """The window is a range of ``observed_at``: written order (ids) does not matter."""
    with sessions.begin() as session:
        plant = Planter(session)
        # Written newest first: the oldest, outside the window, has the highest id.
        orders = [
            plant.order("venue-a", [(OrderStatus.ISSUED, ChangeSource.WEBHOOK, ago(hours=n))])
            for n in (1, 2, 25)
        ]
        first = first_settlements(ago(hours=24))
        found = session.scalars(sa.select(first.c.venue_order_id)).all()

    assert sorted(found) == sorted(order.id for order in orders[:2])


def test_a_scrape_reads_the_stored_figures_not_the_status_changes(
    migrated_engine: sa.Engine, sessions: sessionmaker[Session]
) -> None:
    """The job computes the figures; a scrape issues no query on ``status_change`` or
    ``venue_order`` and reports what the job stored, even after the mirror changed."""
    with sessions.begin() as session:
        Planter(session).order(
            "venue-a", [(OrderStatus.ISSUED, ChangeSource.WEBHOOK, ago(hours=1))]
        )
    refresh(sessions)
    with sessions.begin() as session:
        Planter(session).order("venue-a", [(OrderStatus.ISSUED, ChangeSource.FEED, ago(hours=1))])
    statements: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(statement)

    sa.event.listen(migrated_engine, "before_cursor_execute", record)
    try:
        samples = collect(migrated_engine, "venue-a", run=False)
    finally:
        sa.event.remove(migrated_engine, "before_cursor_execute", record)

    assert statements, "the scrape read the database"
    assert not [s for s in statements if "status_change" in s or "venue_order" in s]
    settled = "otacm_orders_settled_recent"
    assert value(samples, settled, connection="venue-a", learned_from="webhook") == 1
    assert value(samples, settled, connection="venue-a", learned_from="feed") == 0
    assert (
        value(
            collect(migrated_engine, "venue-a"), settled, connection="venue-a", learned_from="feed"
        )
        == 1
    )


def test_the_figures_age_grows_while_the_job_does_not_run(
    migrated_engine: sa.Engine, sessions: sessionmaker[Session]
) -> None:
    """Before the first run the figures and their age are absent; after it, the scrape
    keeps answering with the last figures, their age growing until the job runs again."""
    with sessions.begin() as session:
        plant = Planter(session)
        plant.order("venue-a", [(OrderStatus.PROCESSING, ChangeSource.FEED, ago(hours=3))])
    age = "otacm_metric_figures_age_seconds"

    before = collect(migrated_engine, "venue-a", run=False)
    assert (age, frozenset()) not in before
    assert ("otacm_orders_stuck", frozenset({("connection", "venue-a")})) not in before
    assert value(before, "otacm_inbox_depth", connection="venue-a", state="pending") == 0

    refresh(sessions, ago(minutes=10))
    later = collect(migrated_engine, "venue-a", run=False)
    much_later = collect(migrated_engine, "venue-a", at=NOW + dt.timedelta(hours=1), run=False)
    refresh(sessions)
    again = collect(migrated_engine, "venue-a", run=False)

    assert value(later, age) == 600
    assert value(much_later, age) == 4200
    assert value(much_later, "otacm_orders_stuck", connection="venue-a") == 1
    assert value(again, age) == 0


def test_job_health_from_the_run_records(
    client: FlaskClient, sessions: sessionmaker[Session]
) -> None:
    """Last success and consecutive failures per job; no success sample before one."""
    finished = ago(seconds=30)
    with sessions.begin() as session:
        common = {"owner": "node-1", "next_due_at": NOW, "runs": 7}
        session.add_all(
            [
                JobRun(
                    name="change_feed",
                    started_at=ago(seconds=31),
                    finished_at=finished,
                    last_success_at=finished,
                    failures=0,
                    **common,
                ),
                # Failing now, after an earlier success.
                JobRun(
                    name="watchdog",
                    started_at=ago(seconds=20),
                    finished_at=ago(seconds=19),
                    last_success_at=ago(seconds=600),
                    failures=2,
                    last_error="VenueUnavailable: 503",
                    **common,
                ),
                # Never succeeded yet.
                JobRun(
                    name="confirm_drafts",
                    started_at=ago(seconds=5),
                    finished_at=ago(seconds=4),
                    failures=1,
                    last_error="VenueUnavailable: 503",
                    **common,
                ),
            ]
        )

    samples = scrape(client)

    success = "otacm_job_last_success_timestamp_seconds"
    assert value(samples, success, job_name="change_feed") == finished.timestamp()
    assert value(samples, success, job_name="watchdog") == ago(seconds=600).timestamp()
    assert (success, frozenset({("job_name", "confirm_drafts")})) not in samples
    assert value(samples, "otacm_job_failures", job_name="change_feed") == 0
    assert value(samples, "otacm_job_failures", job_name="watchdog") == 2
    assert value(samples, "otacm_job_failures", job_name="confirm_drafts") == 1


def test_an_empty_mirror_reports_zeros_for_every_connection(
    client: FlaskClient, sessions: sessionmaker[Session]
) -> None:
    """Delivery health has a series per configured connection before any order."""
    refresh(sessions, utcnow())
    samples = scrape(client)

    for connection in ("venue-a", "venue-b"):
        for source in ("webhook", "poll", "feed"):
            settled = "otacm_orders_settled_recent"
            assert value(samples, settled, connection=connection, learned_from=source) == 0
        assert value(samples, "otacm_settlement_lag_seconds_count", connection=connection) == 0
        assert value(samples, "otacm_orders_stuck", connection=connection) == 0
        assert value(samples, "otacm_orders_in_error", connection=connection) == 0


def test_job_intervals_are_those_their_last_runs_were_scheduled_with(
    client: FlaskClient, sessions: sessionmaker[Session]
) -> None:
    """A job's interval is its next due time less its last start, as ``run_job`` sets them."""
    with sessions.begin() as session:
        for name, interval in (("change_feed", 15), ("reconcile", 86400)):
            session.add(
                JobRun(
                    name=name,
                    owner="node-1",
                    started_at=ago(seconds=5),
                    next_due_at=ago(seconds=5) + dt.timedelta(seconds=interval),
                    runs=1,
                    failures=0,
                )
            )

    samples = scrape(client)

    assert value(samples, "otacm_job_interval_seconds", job_name="change_feed") == 15
    assert value(samples, "otacm_job_interval_seconds", job_name="reconcile") == 86400


def test_open_reconciliation_exceptions_are_counted_by_category(
    client: FlaskClient, sessions: sessionmaker[Session]
) -> None:
    """Only open exceptions count, per connection and category; every other category is 0."""
    with sessions.begin() as session:
        a, b = ensure_connection(session, "venue-a"), ensure_connection(session, "venue-b")
        runs = {
            connection_id: ReconRun(
                connection_id=connection_id,
                started_at=NOW,
                period_from=ago(days=7),
                period_to=NOW,
                trigger=ReconTrigger.SCHEDULED,
            )
            for connection_id in (a, b)
        }
        session.add_all(runs.values())
        session.flush()
        planted = [
            (a, "missing_at_venue", ExceptionState.OPEN),
            (a, "missing_at_venue", ExceptionState.OPEN),
            (a, "missing_at_venue", ExceptionState.CLOSED),
            (a, "amount_mismatch", ExceptionState.RESOLVED),
            (a, "orphan", ExceptionState.OPEN),
            (b, "missing_at_venue", ExceptionState.ACCEPTED),
            (b, "venue_error", ExceptionState.OPEN),
        ]
        for n, (connection_id, category, state) in enumerate(planted):
            run = runs[connection_id].id
            session.add(
                ReconException(
                    connection_id=connection_id,
                    category=category,
                    subject_key=f"ledger:p:SHOP-{n}",
                    state=state,
                    first_seen_run_id=run,
                    last_seen_run_id=run,
                    first_seen_at=NOW,
                )
            )

    refresh(sessions, utcnow())
    samples = scrape(client)

    found = {
        (connection, category.value): value(
            samples,
            "otacm_recon_exceptions_open",
            connection=connection,
            category=category.value,
        )
        for connection in ("venue-a", "venue-b")
        for category in EXCEPTION_CATEGORIES
    }
    assert {key: count for key, count in found.items() if count} == {
        ("venue-a", "missing_at_venue"): 2,
        ("venue-a", "orphan"): 1,
        ("venue-b", "venue_error"): 1,
    }
    assert (
        "otacm_recon_exceptions_open",
        frozenset({("connection", "venue-a"), ("category", "matched")}),
    ) not in samples, "matched is not an exception"


def test_subscriptions_as_the_last_check_found_them(
    client: FlaskClient, sessions: sessionmaker[Session]
) -> None:
    """Usable after a check that found or made one, not after a failed one; the time a
    subscription was last remade survives later checks; unchecked and unconfigured
    connections have no series."""
    with sessions.begin() as session:
        a, b = ensure_connection(session, "venue-a"), ensure_connection(session, "venue-b")
        gone = ensure_connection(session, "venue-gone")
    # venue-a: made at the first check, found at the second; venue-b: made, then the
    # venue refused the third check; venue-gone: no longer configured.
    made = ConnectionCheck(usable=True, recreated=True)
    found = ConnectionCheck(usable=True)
    failed = ConnectionCheck(usable=False, error="VenueUnavailable: 503")
    record_checks(
        sessions, SubscriptionReport(found={a: made, b: made, gone: failed}), now=ago(hours=2)
    )
    record_checks(sessions, SubscriptionReport(found={a: found, b: found}), now=ago(hours=1))
    record_checks(sessions, SubscriptionReport(found={b: failed}), now=ago(minutes=5))

    samples = scrape(client)

    usable = "otacm_subscription_usable"
    recreated = "otacm_subscription_recreated_timestamp_seconds"
    assert value(samples, usable, connection="venue-a") == 1
    assert value(samples, usable, connection="venue-b") == 0
    assert value(samples, recreated, connection="venue-a") == ago(hours=2).timestamp()
    assert value(samples, recreated, connection="venue-b") == ago(hours=2).timestamp()
    assert not [
        key
        for key in samples
        if ("connection", "venue-gone") in key[1] and key[0].startswith("otacm_subscription")
    ]


def test_an_unchecked_subscription_has_no_series(client: FlaskClient) -> None:
    """Before any check (no webhook URL, or a scheduler not yet started) nothing is
    claimed either way."""
    samples = scrape(client)

    assert not [name for name, _ in samples if name.startswith("otacm_subscription")]


def test_http_answers_are_counted_by_endpoint_and_status(client: FlaskClient) -> None:
    """Every answer Flask gives is counted, refusals and unmatched paths included; webhook
    POSTs are the webhook counters' alone."""
    assert client.get("/healthz").status_code == 200
    assert client.get("/healthz").status_code == 200
    assert client.get("/no-such-page").status_code == 404
    assert client.post("/api/orders", json={}).status_code == 401
    client.post(WEBHOOK_PATH, json={"value": [notification()]})

    samples = scrape(client)

    answers = {
        dict(labels)["endpoint"] + " " + dict(labels)["status"]: count
        for (name, labels), count in samples.items()
        if name == "otacm_http_responses_total"
    }
    assert answers == {"health.healthz 200": 2, "none 404": 1, "api.create_order 401": 1}
