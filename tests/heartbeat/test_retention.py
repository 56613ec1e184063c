"""Pruning past retention (``heartbeat.retention``) on SQLite and PostgreSQL: what goes,
what stays because reconciliation, the order story, a person or a sender still needs it,
that a dry run changes nothing, and that pruning lets a writer in between its batches."""

from __future__ import annotations

import datetime as dt
import json
import re
import threading
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from sqlalchemy.orm import Session, sessionmaker

from heartbeat.coordination import job_lock
from heartbeat.retention import JOB, PruneReport, Retention, prune
from orders.story import order_story
from otacm.cli import main
from otacm.settings import Settings
from reconciler.engine import reconcile
from storage.models import (
    ChangeSource,
    Inbox,
    InboxSource,
    InboxState,
    LedgerLine,
    LedgerSource,
    Outbox,
    OutboxOperation,
    OutboxState,
    StatusChange,
    VenueOrder,
    ensure_connection,
)
from storage.records import (
    ExceptionEvent,
    PruneMark,
    ReconException,
    ReconTotal,
    ReconTrigger,
)
from tests.support.plans import query_plan
from venue.connection import SettingsError
from venue.models import OrderStatus

NOW = dt.datetime(2027, 6, 1, 12, 0, tzinfo=dt.UTC)
RETENTION = Retention(inbox_days=30, outbox_days=90, status_change_days=180)
PARTNER = "7d1c2f3a-0000-4000-8000-000000000001"
SU, PR, IS, DR, ER, CA = (
    OrderStatus.SUBMITTED,
    OrderStatus.PROCESSING,
    OrderStatus.ISSUED,
    OrderStatus.DRAFT,
    OrderStatus.ERROR,
    OrderStatus.CANCELLED,
)


def days_ago(days: float) -> dt.datetime:
    return NOW - dt.timedelta(days=days)


def _order(
    session: Session,
    connection_id: int,
    reference: str,
    timeline: list[tuple[OrderStatus, float]],
    *,
    inbox_id: int | None = None,
) -> VenueOrder:
    """A mirrored order whose status changes are ``timeline`` (status, days ago), in order."""
    last_status, last_days = timeline[-1]
    order = VenueOrder(
        connection_id=connection_id,
        order_id=str(uuid.uuid5(uuid.NAMESPACE_URL, reference)),
        partner_id=PARTNER,
        sell_to_order_reference=reference,
        status=last_status,
        status_changed_at=days_ago(last_days),
        received_at=days_ago(timeline[0][1]),
        first_seen_at=days_ago(timeline[0][1]),
    )
    for status, days in timeline:
        order.status_changes.append(
            StatusChange(
                status=status,
                observed_at=days_ago(days),
                source=ChangeSource.FEED,
                inbox_id=inbox_id,
            )
        )
    session.add(order)
    session.flush()
    return order


def _sale(session: Session, connection_id: int, reference: str, days: float) -> LedgerLine:
    line = LedgerLine(
        connection_id=connection_id,
        partner_id=PARTNER,
        shop_reference=reference,
        sold_at=days_ago(days),
        quantity=0,
        amount=Decimal("0"),
        currency="EUR",
        source=LedgerSource.IMPORT,
    )
    session.add(line)
    session.flush()
    return line


def _inbox(session: Session, connection_id: int, key: str, state: InboxState, days: float) -> int:
    row = Inbox(
        connection_id=connection_id,
        source=InboxSource.WEBHOOK,
        event_name="ota_cm_order_processed",
        received_at=days_ago(days),
        payload={"key": key, "sellToEmail": "someone@example.com"},
        dedup_key=key,
        state=state,
        next_attempt_at=days_ago(days),
        processed_at=days_ago(days) if state is InboxState.DONE else None,
    )
    session.add(row)
    session.flush()
    return row.id


def _call(
    session: Session,
    connection_id: int,
    operation: OutboxOperation,
    state: OutboxState,
    days: float,
    order_id: str | None = None,
) -> int:
    row = Outbox(
        connection_id=connection_id,
        operation=operation,
        state=state,
        next_attempt_at=days_ago(days),
        sent_at=days_ago(days) if state is OutboxState.SENT else None,
        order_id=order_id,
        created_at=days_ago(days),
    )
    session.add(row)
    session.flush()
    return row.id


def _ids(session: Session, model: Any) -> set[int]:
    return set(session.scalars(sa.select(model.id)))


def _timeline(session: Session, order_id: int) -> list[tuple[str | None, dt.datetime]]:
    return [
        (change.status, change.observed_at)
        for change in session.scalars(
            sa.select(StatusChange)
            .where(StatusChange.venue_order_id == order_id)
            .order_by(StatusChange.id)
        )
    ]


def _everything(session: Session) -> dict[str, Any]:
    """Every row of the pruned tables and the mark, to compare before and after."""
    return {
        "inbox": sorted(session.execute(sa.select(Inbox.id, Inbox.state)).all()),
        "outbox": sorted(session.execute(sa.select(Outbox.id, Outbox.state)).all()),
        "status_change": sorted(
            session.execute(sa.select(StatusChange.id, StatusChange.inbox_id)).all()
        ),
        "marks": session.execute(sa.select(PruneMark.name)).all(),
    }


def _rows(report: Any) -> dict[str, int]:
    return {table.table: table.rows for table in report.tables}


def test_finished_inbox_rows_past_retention_go_and_every_other_stays(
    sessions: sessionmaker[Session],
) -> None:
    """Processed notifications older than 30 days go (their bodies with them); recent
    ones, dead letters, pending and leased rows stay, whatever their age. A status change
    that named a pruned notification stays, naming none."""
    with sessions.begin() as session:
        a = ensure_connection(session, "castle")
        old_done = _inbox(session, a, "old-done", InboxState.DONE, 31)
        kept = {
            _inbox(session, a, "recent-done", InboxState.DONE, 29),
            _inbox(session, a, "old-dead", InboxState.DEAD, 300),
            _inbox(session, a, "old-pending", InboxState.PENDING, 300),
            _inbox(session, a, "old-leased", InboxState.LEASED, 300),
        }
        order = _order(session, a, "R-INBOX", [(IS, 31)], inbox_id=old_done)

    report = prune(sessions, now=NOW, retention=RETENTION)

    assert _rows(report)["inbox"] == 1
    with sessions() as session:
        assert _ids(session, Inbox) == kept
        assert session.execute(
            sa.select(StatusChange.status, StatusChange.inbox_id).where(
                StatusChange.venue_order_id == order.id
            )
        ).all() == [(IS, None)]


def test_sent_calls_past_retention_go_but_creates_and_a_confirm_still_answering_stay(
    sessions: sessionmaker[Session],
) -> None:
    """Sent confirm, replace and delete calls older than 90 days go; a create stays (a
    re-submission finds the sale's call made), so does a confirm sent after its order's
    last change of status (it is what says that Draft was confirmed), and failed, dead
    and pending calls of any age."""
    with sessions.begin() as session:
        a = ensure_connection(session, "castle")
        confirmed = _order(session, a, "R-CONFIRMED", [(DR, 200), (IS, 150)])
        still_draft = _order(session, a, "R-STILL-DRAFT", [(DR, 200)])
        going = {
            _call(session, a, OutboxOperation.CONFIRM, OutboxState.SENT, 160, confirmed.order_id),
            _call(session, a, OutboxOperation.REPLACE, OutboxState.SENT, 91),
            _call(session, a, OutboxOperation.DELETE, OutboxState.SENT, 300),
        }
        kept = {
            _call(session, a, OutboxOperation.CONFIRM, OutboxState.SENT, 190, still_draft.order_id),
            _call(session, a, OutboxOperation.CREATE, OutboxState.SENT, 300),
            _call(session, a, OutboxOperation.DELETE, OutboxState.SENT, 89),
            _call(session, a, OutboxOperation.CREATE, OutboxState.FAILED, 300),
            _call(session, a, OutboxOperation.REPLACE, OutboxState.DEAD, 300),
            _call(session, a, OutboxOperation.CONFIRM, OutboxState.PENDING, 300),
        }

    report = prune(sessions, now=NOW, retention=RETENTION)

    assert _rows(report)["outbox"] == len(going)
    with sessions() as session:
        assert _ids(session, Outbox) == kept


def test_an_old_timeline_keeps_its_first_settlement_and_its_status_at_the_cutoff(
    sessions: sessionmaker[Session],
) -> None:
    """Past 180 days an order's story keeps its first settlement and its latest change
    before the cutoff, and everything since; the steps between go. The story of an order
    whose changes are all within the retention, and of one with an open exception, is
    unchanged."""
    with sessions.begin() as session:
        a = ensure_connection(session, "castle")
        quiet = _order(session, a, "R-QUIET", [(SU, 300), (PR, 299.9), (IS, 299.8), (CA, 200)])
        active = _order(
            session, a, "R-ACTIVE", [(SU, 300), (IS, 299), (ER, 250), (DR, 240), (IS, 10)]
        )
        recent = _order(session, a, "R-RECENT", [(SU, 100), (PR, 99), (IS, 98)])
        disputed = _order(session, a, "R-DISPUTED", [(SU, 300), (PR, 299), (IS, 298)])
        session.flush()
        run = _run(session, a)
        session.add(
            ReconException(
                connection_id=a,
                category="orphan",
                subject_key=f"order:{disputed.order_id}",
                venue_order_id=disputed.id,
                state="open",
                first_seen_run_id=run,
                last_seen_run_id=run,
                first_seen_at=NOW,
            )
        )
    with sessions() as session:
        stories = {
            order.id: order_story(session, session.get_one(VenueOrder, order.id))
            for order in (recent, disputed)
        }

    report = prune(sessions, now=NOW, retention=RETENTION)

    assert _rows(report)["status_change"] == 2 + 2
    with sessions() as session:
        assert [status for status, _ in _timeline(session, quiet.id)] == [IS, CA]
        assert _timeline(session, active.id) == [
            (IS, days_ago(299)),
            (DR, days_ago(240)),
            (IS, days_ago(10)),
        ]
        for order in (recent, disputed):
            assert order_story(session, session.get_one(VenueOrder, order.id)) == stories[order.id]


def _run(session: Session, connection_id: int) -> int:
    """A finished reconciliation run's id, for exceptions to name."""
    from storage.records import ReconRun, ReconRunState

    run = ReconRun(
        connection_id=connection_id,
        started_at=NOW,
        finished_at=NOW,
        period_from=days_ago(7),
        period_to=NOW,
        trigger=ReconTrigger.MANUAL,
        state=ReconRunState.FINISHED,
    )
    session.add(run)
    session.flush()
    return run.id


def test_the_walk_goes_on_from_its_mark(sessions: sessionmaker[Session]) -> None:
    """A second run at the same time walks nothing and deletes nothing; a run later,
    when more changes passed the cutoff, cuts the timelines they end."""
    with sessions.begin() as session:
        a = ensure_connection(session, "castle")
        old = _order(session, a, "R-OLD", [(SU, 300), (IS, 299)])
        later = _order(session, a, "R-LATER", [(SU, 100), (IS, 90)])

    first = prune(sessions, now=NOW, retention=RETENTION)
    again = prune(sessions, now=NOW, retention=RETENTION)
    hundred_days_on = prune(sessions, now=NOW + dt.timedelta(days=100), retention=RETENTION)

    assert _rows(first)["status_change"] == 1
    assert _rows(again)["status_change"] == 0
    assert _rows(hundred_days_on)["status_change"] == 1
    with sessions() as session:
        assert [status for status, _ in _timeline(session, old.id)] == [IS]
        assert [status for status, _ in _timeline(session, later.id)] == [IS]
        mark = session.get_one(PruneMark, "status_change")
        assert mark.reached_at == days_ago(90)


def test_a_dry_run_changes_nothing_and_counts_what_a_run_then_deletes(
    sessions: sessionmaker[Session],
) -> None:
    """`--dry-run` counts per table, deletes nothing and moves no mark; the run after it
    deletes exactly those counts. A retention of 0 keeps a table whole."""
    with sessions.begin() as session:
        a = ensure_connection(session, "castle")
        for number in range(7):
            _inbox(session, a, f"done-{number}", InboxState.DONE, 40 + number)
            _call(session, a, OutboxOperation.DELETE, OutboxState.SENT, 100 + number)
            _order(session, a, f"R-{number}", [(SU, 400 + number), (PR, 399), (IS, 398)])
    with sessions() as session:
        before = _everything(session)

    dry = prune(sessions, now=NOW, retention=RETENTION, dry_run=True, batch_size=3)
    with sessions() as session:
        assert _everything(session) == before
    real = prune(sessions, now=NOW, retention=RETENTION, batch_size=3)
    none_kept = Retention(inbox_days=0, outbox_days=0, status_change_days=0)
    off = prune(sessions, now=NOW + dt.timedelta(days=3650), retention=none_kept)

    assert (
        _rows(dry)
        == _rows(real)
        == {
            "inbox": 7,
            "outbox": 7,
            "status_change": 14,
            "shop_delivery": 0,
            "shop_event": 0,
        }
    )
    assert all(table.done for table in real.tables)
    assert all(rows == 0 for rows in _rows(off).values())
    assert [table.before for table in off.tables] == [None] * 5


def test_a_bounded_run_says_more_is_left_and_the_next_goes_on(
    sessions: sessionmaker[Session],
) -> None:
    """The scheduled job's run stops at its batch limit, says so, and the next run
    prunes the rest."""
    with sessions.begin() as session:
        a = ensure_connection(session, "castle")
        for number in range(5):
            _inbox(session, a, f"done-{number}", InboxState.DONE, 40)

    first = prune(sessions, now=NOW, retention=RETENTION, batch_size=2, max_batches=1)
    rest = prune(sessions, now=NOW, retention=RETENTION, batch_size=2, max_batches=10)

    assert (first.tables[0].rows, first.tables[0].done) == (2, False)
    assert (rest.tables[0].rows, rest.tables[0].done) == (3, True)


def test_a_reconciliation_finds_the_same_before_and_after_pruning(
    sessions: sessionmaker[Session],
) -> None:
    """Re-running a kept period after pruning (every pruned table cut to a day) gives the
    same totals and exceptions, and opens none: a run reads no pruned table."""
    with sessions.begin() as session:
        a = ensure_connection(session, "castle")
        for number in range(6):
            days = 3 + number * 0.5
            inbox_id = _inbox(session, a, f"n-{number}", InboxState.DONE, days)
            if number != 1:  # missing_at_venue
                order = _order(
                    session, a, f"R-{number}", [(SU, days), (PR, days - 0.1), (IS, days - 0.2)],
                    inbox_id=inbox_id,
                )  # fmt: skip
                _call(session, a, OutboxOperation.CONFIRM, OutboxState.SENT, days, order.order_id)
            if number != 2:  # an orphan
                _sale(session, a, f"R-{number}", days)
        _order(session, a, "R-ERROR", [(SU, 4), (ER, 3.9)])
        _sale(session, a, "R-ERROR", 4)

    def run() -> tuple[list[Any], list[Any]]:
        run_id = reconcile(
            sessions,
            connection_id=a,
            period_from=days_ago(7),
            period_to=NOW,
            now=NOW,
            trigger=ReconTrigger.MANUAL,
            actor="test",
            grace=dt.timedelta(hours=1),
            tolerance=Decimal("0.01"),
        )
        with sessions() as session:
            totals = session.execute(
                sa.select(ReconTotal.category, ReconTotal.currency, ReconTotal.count)
                .where(ReconTotal.recon_run_id == run_id)
                .order_by(ReconTotal.category, ReconTotal.currency)
            ).all()
            exceptions = session.execute(
                sa.select(
                    ReconException.category, ReconException.subject_key, ReconException.state
                ).order_by(ReconException.subject_key)
            ).all()
        return list(totals), list(exceptions)

    before = run()
    one_day = Retention(inbox_days=1, outbox_days=1, status_change_days=1)
    report = prune(sessions, now=NOW, retention=one_day)
    after = run()

    assert report.rows > 0
    assert after == before
    assert {category for category, _, _ in before[0]} >= {"matched", "orphan", "venue_error"}
    with sessions() as session:
        opened = session.scalars(
            sa.select(ExceptionEvent.recon_run_id).where(ExceptionEvent.action == "opened")
        ).all()
    assert len(set(opened)) == 1


def test_pruning_commits_each_batch_and_lets_a_writer_in_between(
    sessions: sessionmaker[Session], migrated_engine: sa.Engine
) -> None:
    """Pruning 600 notifications in batches of 50 is twelve transactions of its own, and
    a writer storing notifications all along (as the webhook does) commits between
    them: the pruning never holds the database for the whole run."""
    with sessions.begin() as session:
        a = ensure_connection(session, "castle")
        for number in range(600):
            _inbox(session, a, f"old-{number}", InboxState.DONE, 40)
    commits: list[str] = []
    pruner = threading.get_ident()

    def on_commit(connection: sa.Connection) -> None:
        commits.append("prune" if threading.get_ident() == pruner else "write")

    stop = threading.Event()
    errors: list[BaseException] = []

    def write() -> None:
        number = 0
        try:
            while not stop.is_set():
                with sessions.begin() as session:
                    _inbox(session, a, f"new-{number}", InboxState.PENDING, 0)
                number += 1
                time.sleep(0.005)  # notifications arrive, not one right after the other
        except BaseException as exc:  # reported by the test
            errors.append(exc)

    writer = threading.Thread(target=write)
    sa.event.listen(migrated_engine, "commit", on_commit)
    try:
        writer.start()
        report = prune(sessions, now=NOW, retention=RETENTION, batch_size=50)
    finally:
        stop.set()
        writer.join()
        sa.event.remove(migrated_engine, "commit", on_commit)

    assert not errors
    assert _rows(report)["inbox"] == 600
    pruning = [index for index, who in enumerate(commits) if who == "prune"]
    assert len(pruning) >= 12
    between = commits[pruning[0] : pruning[-1]]
    assert "write" in between, commits


@pytest.fixture
def cli_environment(migrated_engine: sa.Engine) -> Iterator[dict[str, str]]:
    """The environment `otacm db prune` needs: the database, nothing of a venue."""
    yield {"OTACM_DATABASE_URL": migrated_engine.url.render_as_string(hide_password=False)}


def test_otacm_db_prune_says_per_table_what_would_go_then_what_went(
    sessions: sessionmaker[Session], cli_environment: dict[str, str]
) -> None:
    """`otacm db prune --dry-run --json` counts per table with its cutoff and deletes
    nothing; `otacm db prune` then deletes those rows and says so in a line per table."""
    now = dt.datetime.now(dt.UTC)
    with sessions.begin() as session:
        a = ensure_connection(session, "castle")
        session.add(
            Inbox(
                connection_id=a,
                source=InboxSource.WEBHOOK,
                event_name="ota_cm_order_processed",
                received_at=now - dt.timedelta(days=45),
                payload={},
                dedup_key="old",
                state=InboxState.DONE,
                next_attempt_at=now - dt.timedelta(days=45),
                processed_at=now - dt.timedelta(days=45),
            )
        )
    env = {**cli_environment, "OTACM_RETAIN_STATUS_CHANGES_DAYS": "0"}

    dry = CliRunner().invoke(main, ["db", "prune", "--dry-run", "--json"], env=env)
    with sessions() as session:
        still_there = _ids(session, Inbox)
    real = CliRunner().invoke(main, ["db", "prune"], env=env)

    assert dry.exit_code == 0, dry.output
    shown = json.loads(dry.output)
    assert shown["dry_run"] is True
    assert [(t["table"], t["rows"]) for t in shown["tables"]] == [
        ("inbox", 1),
        ("outbox", 0),
        ("status_change", 0),
        ("shop_delivery", 0),
        ("shop_event", 0),
    ]
    cutoff = dt.datetime.fromisoformat(shown["tables"][0]["before"])
    assert now - dt.timedelta(days=30, minutes=5) < cutoff < now - dt.timedelta(days=29)
    assert shown["tables"][2]["before"] is None
    assert len(still_there) == 1
    assert real.exit_code == 0, real.output
    lines = real.stdout.splitlines()
    assert lines[0].startswith("inbox: 1 rows pruned, older than ")
    assert lines[1].startswith("outbox: 0 rows pruned, older than ")
    assert lines[2] == "status_change: kept (no retention set)"
    with sessions() as session:
        assert _ids(session, Inbox) == set()


def test_otacm_db_prune_is_refused_while_the_job_runs(
    migrated_engine: sa.Engine, cli_environment: dict[str, str]
) -> None:
    """While the scheduler's prune job holds its lock, `otacm db prune` is one line
    saying so, exit 1; a dry run, which only reads, still answers."""
    with job_lock(migrated_engine, JOB) as held:
        assert held
        refused = CliRunner().invoke(main, ["db", "prune"], env=cli_environment)
        dry = CliRunner().invoke(main, ["db", "prune", "--dry-run"], env=cli_environment)

    assert refused.exit_code == 1
    assert refused.output.strip() == (
        "Error: the scheduler's prune job is running now: try again when it ends"
    )
    assert dry.exit_code == 0, dry.output


@pytest.mark.parametrize("name", ["INBOX", "OUTBOX", "STATUS_CHANGES", "SHOP_EVENTS"])
def test_a_retention_is_a_number_of_days_not_below_zero(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """OTACM_RETAIN_*_DAYS=-1 is refused naming the setting."""
    monkeypatch.setenv(f"OTACM_RETAIN_{name}_DAYS", "-1")
    with pytest.raises(SettingsError, match=f"retain_{name.lower()}_days"):
        Settings.load()


INDEX_READ = re.compile(
    r"(?:USING INDEX|USING COVERING INDEX|Index Scan using|Index Only Scan using|Index Scan on)"
    r" (\w+)"
)
"""A plan's step reading an index, in SQLite's words and PostgreSQL's; the index's name."""


def test_pruning_reads_each_table_through_an_index_by_time(
    sessions: sessionmaker[Session], migrated_engine: sa.Engine
) -> None:
    """Over a history of rows it keeps (3,000 sent creates, pending notifications, and
    status changes within the retention), each table's read of what is due is a range of
    an index by time, never the whole table."""
    with sessions.begin() as session:
        a = ensure_connection(session, "castle")
        for number in range(3000):
            _call(session, a, OutboxOperation.CREATE, OutboxState.SENT, 300)
            _inbox(session, a, f"pending-{number}", InboxState.PENDING, 300)
        for number in range(300):
            _order(session, a, f"R-{number}", [(SU, 10), (IS, 9)])
        _call(session, a, OutboxOperation.DELETE, OutboxState.SENT, 300)
        _inbox(session, a, "done", InboxState.DONE, 300)
        _order(session, a, "R-OLD", [(SU, 300), (IS, 299)])
    if migrated_engine.dialect.name == "postgresql":
        with migrated_engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("ANALYZE")
    report, sent = pruned_reading(migrated_engine, sessions)

    assert _rows(report) == {
        "inbox": 1,
        "outbox": 1,
        "status_change": 1,
        "shop_delivery": 0,
        "shop_event": 0,
    }
    first_reads = {}
    for table in ("inbox", "outbox", "status_change"):
        statement, parameters = next((s, p) for s, p in sent if re.search(rf"\bFROM {table}\b", s))
        first_reads[table] = query_plan(migrated_engine, statement, parameters)
    assert INDEX_READ.findall(first_reads["inbox"])[0] == "ix_inbox_state_next_attempt_at"
    assert INDEX_READ.findall(first_reads["outbox"])[0] == "ix_outbox_state_sent_at"
    assert INDEX_READ.findall(first_reads["status_change"])[0] == "ix_status_change_observed_at"
    for table, plan in first_reads.items():
        assert not re.search(rf"\bSCAN {table}\b|Seq Scan", plan), plan


def pruned_reading(
    engine: sa.Engine,
    sessions: sessionmaker[Session],
    *,
    now: dt.datetime = NOW,
    retention: Retention = RETENTION,
) -> tuple[PruneReport, list[tuple[str, Any]]]:
    """A prune at ``now`` with ``retention``, and the SELECTs it sent, in order."""
    sent: list[tuple[str, Any]] = []

    def capture(conn: Any, cursor: Any, statement: str, parameters: Any, *args: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            sent.append((statement, parameters))

    sa.event.listen(engine, "before_cursor_execute", capture)
    try:
        return prune(sessions, now=now, retention=retention), sent
    finally:
        sa.event.remove(engine, "before_cursor_execute", capture)
