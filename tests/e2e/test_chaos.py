"""Chaos, end to end: sales through a faulty gateway while otacm's processes die and its
database goes away; then nothing lost, nothing doubled, the mirror and reconciliation
exactly the venue's truth.

Real processes, started as an operator would: ``otacm web`` (gunicorn, two workers, with
an access log), ``otacm worker`` and ``otacm scheduler`` on short intervals, against the
simulated venue (in this process, its pickup cadence running) with the gateway's faults
on: webhooks dropped, duplicated, jittered (so reordered) and posted concurrently; 429
and 503 with ``Retry-After``; answers lost after createOrder or getOrder took effect;
some sales in Error (the sold-out item). While the shop posts a few dozen sales to
``POST /api/orders`` (posting again whatever got no 2xx, as a shop does), a gunicorn
worker is SIGKILLed, the worker and the scheduler are SIGKILLed and started again, and
the database goes away for ten seconds (PostgreSQL stopped; on SQLite an exclusive lock
held). Then the faults stop, and within three poll intervals (and some slack for a
loaded machine) of the last fault:

- every order the venue holds for the partner is mirrored as the venue has it, each sale
  has exactly one live order, and each sale was created at the venue exactly once;
- a reconciliation run finds exactly the Error sales (``venue_error``) and nothing else;
- otacm answered no 5xx but 503 while its database was away, and no process wrote a
  traceback.

Seeded (the sales, their timing and the gateway's dice), so a failure repeats as far as
the processes' scheduling allows. On SQLite and PostgreSQL, each under ~2 minutes.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import random
import re
import signal
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from pydantic import SecretStr

from receiver.webhook import WEBHOOK_PATH
from reconciler.engine import reconcile_connections
from storage.engine import make_engine, make_sessions
from storage.migrate import upgrade
from storage.models import (
    Inbox,
    InboxState,
    LedgerLine,
    Outbox,
    OutboxState,
    VenueOrder,
    ensure_connection,
)
from storage.records import ExceptionState, ReconException, ReconTotal, ReconTrigger
from storage.testing import PostgresqlServer, free_port, throwaway_postgresql
from storage.types import utcnow
from tests.e2e.conftest import API_TOKEN, CLIENT_STATE, OtacmProcess, otacm_environment
from tests.e2e.test_web_workers import children
from tests.support.stack import (
    SandboxStack,
    error_line,
    line,
    sandbox_admin,
    sandbox_settings,
    serve_sandbox,
    wait_until,
)
from venue.client import open_client
from venue.models import OrderStatus

pytestmark = pytest.mark.process

SEED = 1807
"""Seeds the sales, their timing and the gateway's faults."""

SALES = 36
ERROR_SHARE = 0.2
"""The share of sales holding the sold-out item: they end in Error at the venue."""

POLL_INTERVAL = 10.0
"""otacm's poll interval (the least it allows): the change feed's and watchdog's cadence."""

CONVERGENCE = 3 * POLL_INTERVAL + 30.0
"""How soon after the last fault everything must agree: three poll intervals, and slack
for a machine shared with other tests."""

OUTAGE_SECONDS = 10.0

FAULTS: dict[str, Any] = {
    "dropRate": 0.2,
    "duplicateRate": 0.2,
    "webhookJitterSeconds": 3.0,
    "webhookConcurrency": 4,
    "rate429": 0.05,
    "rate503": 0.05,
    "retryAfterSeconds": 1,
    "answerLostRate": 0.1,
}
NO_FAULTS: dict[str, Any] = {
    "dropRate": 0.0,
    "duplicateRate": 0.0,
    "webhookJitterSeconds": 0.0,
    "webhookConcurrency": 1,
    "rate429": 0.0,
    "rate503": 0.0,
    "retryAfterSeconds": None,
    "answerLostRate": 0.0,
}

ACCESS = re.compile(r'"(?P<method>[A-Z]+) (?P<path>\S+) HTTP/[\d.]+" (?P<status>\d{3}) ')
"""A line of gunicorn's access log (its default format): the request and the status."""


# --- the database, and taking it away -----------------------------------------------------


@dataclass
class Database:
    """otacm's database for the test, and how to take it away for a while."""

    url: str
    outage: Callable[[], AbstractContextManager[None]]


@pytest.fixture(
    params=[
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgresql", id="postgresql", marks=pytest.mark.postgresql),
    ]
)
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    """A migrated database of the test's own: a SQLite file, or a PostgreSQL server that
    the test may stop (stopping it disturbs no other test)."""
    if request.param == "sqlite":
        path = tmp_path / "otacm.sqlite3"
        url = f"sqlite:///{path}"
        migrate(url)

        @contextmanager
        def locked() -> Iterator[None]:
            # Another program writing for a long time: every writer of otacm waits.
            holder = sqlite3.connect(path, isolation_level=None, timeout=30)
            try:
                holder.execute("BEGIN EXCLUSIVE")
                yield
            finally:
                holder.execute("ROLLBACK")
                holder.close()

        yield Database(url, locked)
        return
    with throwaway_postgresql(durable=False, prefix="otacm-pg-chaos-") as server:
        migrate(server.url)
        yield Database(server.url, lambda: stopped(server))


def migrate(url: str) -> None:
    """Bring the database at ``url`` to the latest schema."""
    engine = make_engine(url)
    try:
        upgrade(engine)
    finally:
        engine.dispose()


@contextmanager
def stopped(server: PostgresqlServer) -> Iterator[None]:
    """The PostgreSQL server stopped for the block, as an administrator would."""
    with server.stopped():
        yield


# --- what the shop saw -------------------------------------------------------------------


@dataclass
class Shop:
    """The shop posting sales to ``POST /api/orders``; every answer it got, timed."""

    http: httpx.Client
    answers: list[tuple[float, str, int | None]] = field(default_factory=list)
    accepted: set[str] = field(default_factory=set)

    def sell(self, reference: str, body: dict[str, Any], *, until: float) -> None:
        """Post the sale until it gets a 2xx (a shop posts again what got no answer)."""
        while time.monotonic() < until:
            try:
                status: int | None = self.http.post(
                    "/api/orders", json=body, headers={"Authorization": f"Bearer {API_TOKEN}"}
                ).status_code
            except httpx.TransportError:
                status = None
            self.answers.append((time.monotonic(), reference, status))
            if status is not None and 200 <= status < 300:
                self.accepted.add(reference)
                return
            time.sleep(0.5)


# --- the test ------------------------------------------------------------------------------


def test_sales_through_faults_kills_and_an_outage_are_each_issued_once_and_reconciled(
    database: Database, tmp_path: Path
) -> None:
    """A few dozen sales while the gateway misbehaves, a web worker, the worker and the
    scheduler are killed and the database goes away: each sale issued once, mirrored as
    the venue has it, reconciled exactly; no 5xx but the outage's 503, no traceback."""
    rng = random.Random(SEED)
    errors_seen: list[logging.LogRecord] = []
    recorder = _Recorder(errors_seen)
    logging.getLogger("sandbox").addHandler(recorder)
    engine = make_engine(database.url)
    processes: list[OtacmProcess] = []
    # The sandbox's request lines would drown what a failure shows.
    werkzeug = logging.getLogger("werkzeug")
    werkzeug_level = werkzeug.level
    werkzeug.setLevel(logging.WARNING)
    sandbox_values = {
        "pickup_interval": 1.0,
        "webhook_backoff": 0.2,
        "webhook_max_attempts": 20,
        "webhook_timeout": 10.0,
    }
    try:
        with (
            serve_sandbox(sandbox_values) as sandbox,
            sandbox_admin(sandbox) as admin,
        ):
            settings = sandbox_settings(
                sandbox,
                engine,
                {
                    "webhook_client_states": [SecretStr(CLIENT_STATE)],
                    "api_tokens": [SecretStr(API_TOKEN)],
                    "db_lock_timeout": 2.0,
                    "outbox_lease_seconds": 5.0,
                    "poll_interval": POLL_INTERVAL,
                },
            )
            environment = otacm_environment(
                settings,
                OTACM_POLL_INTERVAL=str(POLL_INTERVAL),
                OTACM_IN_FLIGHT_CHECK_AFTER=str(POLL_INTERVAL),
                OTACM_SUBMISSION_GRACE="10",
                OTACM_LIVENESS_DIR=str(tmp_path / "liveness"),
                GUNICORN_CMD_ARGS="--access-logfile -",
                TMPDIR=str(tmp_path),
            )

            def start(*args: str) -> OtacmProcess:
                log = tmp_path / f"{len(processes)}-{args[0]}.log"
                process = OtacmProcess(list(args), environment, log)
                processes.append(process)
                return process

            port = free_port()
            url = f"http://127.0.0.1:{port}"
            web = start("web", "--bind", f"127.0.0.1:{port}", "--workers", "2")
            worker = start("worker")
            scheduler = start("scheduler")
            with httpx.Client(base_url=url, timeout=30) as http:
                wait_until(lambda: _ready(http, web), 60, what="otacm web to answer /readyz")
                wait_until(lambda: len(children(web.popen.pid)) == 2, 30, what="two web workers")
                with open_client(settings.connections[0]) as venue:
                    venue.create_subscription(f"{url}{WEBHOOK_PATH}", CLIENT_STATE)
                    stack = SandboxStack(
                        sandbox=sandbox,
                        settings=settings,
                        venue=venue,
                        admin=admin,
                        read_sessions=make_sessions(engine, read_only=True),
                    )
                    chaos = _run_chaos(stack, database, http, start, web, worker, scheduler, rng)
                    _check(stack, engine, chaos, processes, errors_seen)
    finally:
        logging.getLogger("sandbox").removeHandler(recorder)
        werkzeug.setLevel(werkzeug_level)
        for process in processes:
            process.stop()
            # Captured, so pytest shows it only when the test failed.
            sys.stderr.write(f"--- otacm {' '.join(process.args)} ---\n{process.output()}\n")
        engine.dispose()


@dataclass
class _Timeline:
    """When the faults were: what may be excused at those moments, and the last of them."""

    web_killed: float = 0.0
    outage: tuple[float, float] = (0.0, 0.0)
    last_fault: float = 0.0


def _run_chaos(
    stack: SandboxStack,
    database: Database,
    http: httpx.Client,
    start: Callable[..., OtacmProcess],
    web: OtacmProcess,
    worker: OtacmProcess,
    scheduler: OtacmProcess,
    rng: random.Random,
) -> _Chaos:
    """The sales, posted while the processes die and the database goes away."""
    references = [f"CHAOS-{n:03d}" for n in range(SALES)]
    failing = set(rng.sample(references, round(SALES * ERROR_SHARE)))
    pauses = [rng.uniform(0.2, 0.8) for _ in references]
    shop = Shop(http)
    stack.faults(**FAULTS, seed=SEED)
    began = time.monotonic()

    def sell_all() -> None:
        for reference, pause in zip(references, pauses, strict=True):
            items = [error_line()] if reference in failing else [line("31001", 1)]
            body = stack.order_body(reference, items=items)
            body.update(amount="100.00", currency="DKK")
            shop.sell(reference, body, until=began + 120)
            time.sleep(pause)

    seller = threading.Thread(target=sell_all, name="chaos-shop")
    seller.start()
    timeline = _Timeline()
    try:
        _at(began + 3)
        (victim, *_) = sorted(children(web.popen.pid))
        _kill_pid(victim)
        timeline.web_killed = time.monotonic()
        _at(began + 6)
        assert worker.kill() == -signal.SIGKILL
        worker = start("worker")
        _at(began + 9)
        assert scheduler.kill() == -signal.SIGKILL
        scheduler = start("scheduler")
        _at(began + 12)
        outage_began = time.monotonic()
        with database.outage():
            time.sleep(OUTAGE_SECONDS)
        timeline.outage = (outage_began, time.monotonic())
    finally:
        seller.join()
    assert shop.accepted == set(references), sorted(set(references) - shop.accepted)
    stack.faults(**NO_FAULTS)
    timeline.last_fault = time.monotonic()
    for process in (web, worker, scheduler):
        assert process.alive(), f"otacm {process.args[0]} died:\n{process.output()}"
    return _Chaos(timeline, shop, references, failing)


@dataclass
class _Chaos:
    """What the chaos phase hands the checks."""

    timeline: _Timeline
    shop: Shop
    references: list[str]
    failing: set[str]


def _check(
    stack: SandboxStack,
    engine: sa.Engine,
    chaos: _Chaos,
    processes: list[OtacmProcess],
    errors_seen: list[logging.LogRecord],
) -> None:
    """Convergence, then every promise."""
    timeline, shop, references = chaos.timeline, chaos.shop, chaos.references
    reads = stack.read_sessions
    partner = stack.partner_id

    def converged() -> bool:
        return not _differences(stack, reads, partner, references)

    try:
        wait_until(converged, CONVERGENCE, what="the mirror to agree with the venue")
    except AssertionError:
        raise AssertionError(
            f"not converged within {CONVERGENCE:.0f} s of the last fault: "
            f"{_differences(stack, reads, partner, references)[:10]}"
        ) from None
    took = time.monotonic() - timeline.last_fault
    stats = stack.stats()
    refused = [status for _, _, status in shop.answers if status is None or status >= 300]
    print(  # noqa: T201 — shown with -s
        f"converged {took:.1f} s after the last fault; {len(shop.answers)} posts, "
        f"not accepted: {sorted(refused, key=str)}; gateway {stats['gateway']}; "
        f"webhooks {stats['webhooks']}"
    )
    # The faults did bite: answers lost, webhooks dropped and doubled, sales refused
    # while the database was away.
    assert stats["gateway"].get("answersLost", 0) > 0, stats["gateway"]
    assert stats["webhooks"].get("dropped", 0) > 0, stats["webhooks"]
    assert stats["webhooks"].get("duplicated", 0) > 0, stats["webhooks"]
    assert 503 in refused, shop.answers

    # Exactly once at the venue, one live order per sale, each as the venue has it.
    venue_orders = _venue_orders(stack, partner)
    assert sorted(record.order.sell_to_order_reference for record in venue_orders) == references
    assert stack.stats()["calls"]["createOrder"].get("201") == len(references)
    stack.assert_mirrored(record.order.order_id for record in venue_orders)
    statuses = {r.order.sell_to_order_reference: r.order.status for r in venue_orders}
    assert {ref for ref, status in statuses.items() if status is OrderStatus.ERROR} == (
        chaos.failing
    )
    with reads.begin() as session:
        assert session.scalar(sa.select(sa.func.count()).select_from(LedgerLine)) == len(references)
        outbox = session.scalars(sa.select(Outbox.state)).all()
        inbox = session.scalars(sa.select(Inbox.state)).all()
    assert set(outbox) == {OutboxState.SENT} and len(outbox) == len(references)
    assert InboxState.DEAD not in inbox

    # Reconciliation: exactly the Error sales, nothing doubled or missing.
    sessions = make_sessions(engine)
    with sessions.begin() as session:
        connection_id = ensure_connection(session, stack.settings.connections[0].name)
    now = utcnow()
    report = reconcile_connections(
        sessions,
        [connection_id],
        period_from=now - dt.timedelta(hours=1),
        period_to=now + dt.timedelta(minutes=1),
        now=now + dt.timedelta(minutes=1),
        trigger=ReconTrigger.MANUAL,
        actor="chaos",
        grace=dt.timedelta(minutes=30),
        tolerance=Decimal("0.01"),
    )
    with reads.begin() as session:
        found = {
            subject.rsplit(":", 1)[1]: category
            # A run the scheduler made at its start, while sales were on their way, found
            # some missing; this run closed those.
            for subject, category in session.execute(
                sa.select(ReconException.subject_key, ReconException.category).where(
                    ReconException.state != ExceptionState.CLOSED
                )
            )
        }
        totals = {
            total.category: total.count
            for total in session.scalars(
                sa.select(ReconTotal).where(ReconTotal.recon_run_id == report.runs[connection_id])
            )
        }
    expected = {reference: "venue_error" for reference in chaos.failing}
    assert found == expected, _explain(reads, set(found.items()) ^ set(expected.items()))
    failing = len(chaos.failing)
    assert totals == {"matched": len(references) - failing, "venue_error": failing}

    # otacm's answers: 2xx, 503 only while its database was away, a broken connection
    # only from the gunicorn worker killed mid-request.
    outage_from, outage_to = timeline.outage
    for moment, reference, status in shop.answers:
        if status is None:
            assert timeline.web_killed <= moment <= timeline.web_killed + 10, reference
        elif status >= 300:
            assert status == 503, (reference, status)
            assert outage_from <= moment <= outage_to + 5, (reference, moment - outage_from)
    for process in processes:
        output = process.output()
        assert "Traceback" not in output, f"otacm {' '.join(process.args)}:\n{output}"
        if process.args[0] == "web":
            for found_line in ACCESS.finditer(output):
                status = int(found_line["status"])
                assert status < 500 or status == 503, found_line.group(0)
    assert errors_seen == [], [record.getMessage() for record in errors_seen]


def _differences(stack: SandboxStack, reads: Any, partner: str, references: list[str]) -> list[str]:
    """What still differs between the venue and otacm (empty: converged)."""
    problems = []
    venue_orders = {r.order.order_id: r.order for r in _venue_orders(stack, partner)}
    for reference in references:
        record = stack.sandbox.runtime.store.find(partner, reference)
        if record is None:
            problems.append(f"{reference}: not at the venue")
        elif record.order.status not in (OrderStatus.ISSUED, OrderStatus.ERROR):
            problems.append(f"{reference}: {record.order.status} at the venue")
    try:
        with reads.begin() as session:
            live = session.execute(
                sa.select(VenueOrder.order_id, VenueOrder.status, VenueOrder.reference_key).where(
                    VenueOrder.removed_at.is_(None)
                )
            ).all()
            open_outbox = session.scalar(
                sa.select(sa.func.count())
                .select_from(Outbox)
                .where(Outbox.state != OutboxState.SENT)
            )
            open_inbox = session.scalar(
                sa.select(sa.func.count())
                .select_from(Inbox)
                .where(Inbox.state.in_([InboxState.PENDING, InboxState.LEASED]))
            )
    except sa.exc.OperationalError as exc:
        return [f"database: {type(exc).__name__}"]
    mirrored = {row.order_id: row.status for row in live}
    for order_id, order in venue_orders.items():
        if mirrored.get(order_id) != order.status:
            problems.append(f"{order_id}: {order.status} at the venue, {mirrored.get(order_id)}")
    for order_id in set(mirrored) - set(venue_orders):
        problems.append(f"{order_id}: mirrored live, not at the venue")
    if open_outbox:
        problems.append(f"{open_outbox} outbox rows not sent")
    if open_inbox:
        problems.append(f"{open_inbox} inbox rows open")
    return problems


def _explain(reads: Any, differing: set[tuple[str, str]]) -> str:
    """The ledger lines and mirrored orders of the sales reconciliation got wrong."""
    lines = []
    with reads.begin() as session:
        for reference, category in sorted(differing):
            ledger = session.execute(
                sa.select(
                    LedgerLine.id,
                    LedgerLine.partner_id,
                    LedgerLine.reference_key,
                    LedgerLine.sold_at,
                    LedgerLine.connection_id,
                ).where(LedgerLine.reference_key == reference)
            ).all()
            orders = session.execute(
                sa.select(
                    VenueOrder.order_id,
                    VenueOrder.partner_id,
                    VenueOrder.reference_key,
                    VenueOrder.status,
                    VenueOrder.removed_at,
                    VenueOrder.connection_id,
                ).where(VenueOrder.sell_to_order_reference == reference)
            ).all()
            lines.append(f"{reference} {category}: ledger {ledger}; mirror {orders}")
    return "\n".join(lines)


def _venue_orders(stack: SandboxStack, partner: str) -> list[Any]:
    """Every order the venue holds for ``partner``."""
    return [
        record
        for record in stack.sandbox.runtime.store.with_status(*OrderStatus)
        if record.order.partner_id == partner
    ]


def _ready(http: httpx.Client, web: OtacmProcess) -> bool:
    """Whether ``otacm web`` answers ``/readyz`` with 200; its death fails the test."""
    assert web.alive(), web.output()
    try:
        return http.get("/readyz").status_code == 200
    except httpx.TransportError:
        return False


def _at(moment: float) -> None:
    """Sleep until the monotonic clock reads ``moment``."""
    time.sleep(max(0.0, moment - time.monotonic()))


def _kill_pid(pid: int) -> None:
    """SIGKILL a process that is not ours to wait for (a gunicorn worker)."""
    os.kill(pid, signal.SIGKILL)


class _Recorder(logging.Handler):
    """Keeps the sandbox's error records (a pickup cycle or delivery that failed)."""

    def __init__(self, records: list[logging.LogRecord]) -> None:
        super().__init__(logging.ERROR)
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        """Keep it."""
        self.records.append(record)
