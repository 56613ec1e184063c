"""Fixtures for the finance pages' tests: settings with a finance user → app → client,
and a reconciliation run built with the ORM directly (not by the reconciler), so the
pages are tested on data whose every value is known.

``seed_run`` stores, on connection ``venue-a``: a run over June 2025 with totals in EUR
and USD, an ``amount_mismatch`` exception on sale ``SHOP-100`` (ledger 120.00 EUR, the
venue's order 100.00 EUR, with a line, a wallet and two status changes) and a
``missing_at_venue`` exception on sale ``SHOP-200`` (50.00 USD, no venue order).
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from flask import Flask
from flask.testing import FlaskClient
from pydantic import SecretStr
from sqlalchemy.orm import Session, sessionmaker

from otacm.settings import Settings
from receiver import create_app
from receiver.context import EXTENSION, Receiver
from receiver.finance.auth import hash_password
from storage.models import (
    ChangeSource,
    LedgerLine,
    LedgerSource,
    OrderItem,
    StatusChange,
    VenueOrder,
    Wallet,
    ensure_connection,
)
from storage.records import (
    ExceptionAction,
    ExceptionEvent,
    ReconException,
    ReconRun,
    ReconRunState,
    ReconTotal,
    ReconTrigger,
)
from tests.support.processes import foreign_environment
from venue.connection import VenueConnection
from venue.models import OrderStatus

USER, PASSWORD = "alice", "correct horse battery staple"
PARTNER = "11111111-2222-3333-4444-555555555555"
ORDER_ID = "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"
NOW = dt.datetime.now(dt.UTC)
CSRF_FIELD = re.compile(r'name="csrf_token" value="([^"]+)"')


@pytest.fixture(scope="session")
def user_entry() -> str:
    """The finance user's settings entry: hashing is slow on purpose, so once."""
    return f"{USER}:{hash_password(PASSWORD)}"


def finance_settings(engine: sa.Engine, secrets_dir: Path, **overrides: Any) -> Settings:
    """Settings on ``engine``'s database with one venue connection, ``venue-a``."""
    values: dict[str, Any] = {
        "database_url": engine.url.render_as_string(hide_password=False),
        "connections": [
            VenueConnection(
                name="venue-a",
                api_base_url="http://venue.invalid",
                tenant="00000000-0000-0000-0000-000000000001",
                company="CRONUS",
                api_key=SecretStr("key-for-tests"),
                webhook_client_states=[SecretStr("state-for-finance-tests")],
            )
        ],
        "secrets_dir": secrets_dir,
    }
    return Settings(**{**values, **overrides})


def web_environment(
    engine: sa.Engine, user_entry: str, tmp_path: Path, **extra: str
) -> dict[str, str]:
    """The environment of an ``otacm web`` serving the finance pages of ``engine``'s
    database to ``user_entry``, plus ``extra`` (``OTACM_*`` or gunicorn's own)."""
    environment = foreign_environment()
    environment.update(
        OTACM_DATABASE_URL=engine.url.render_as_string(hide_password=False),
        OTACM_FINANCE_USERS=user_entry,
        OTACM_SECRETS_DIR=str(tmp_path / "secrets"),
        **extra,
    )
    return environment


@pytest.fixture
def settings(migrated_engine: sa.Engine, tmp_path: Path, user_entry: str) -> Settings:
    """Settings with the finance user ``alice``."""
    return finance_settings(
        migrated_engine, tmp_path / "secrets", finance_users=[SecretStr(user_entry)]
    )


@pytest.fixture
def make_app() -> Iterator[Callable[[Settings], Flask]]:
    """Make receiver apps; each one's engine is disposed of after the test."""
    apps: list[Flask] = []

    def make(settings: Settings) -> Flask:
        app = create_app(settings)
        apps.append(app)
        return app

    yield make
    for app in apps:
        receiver: Receiver = app.extensions[EXTENSION]
        receiver.close()


@pytest.fixture
def app(make_app: Callable[[Settings], Flask], settings: Settings) -> Flask:
    """The receiver app with the finance pages."""
    return make_app(settings)


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    """A signed-out test client."""
    return app.test_client()


def csrf_token(page: bytes | str) -> str:
    """The CSRF token of the (first) form on ``page``."""
    text = page.decode() if isinstance(page, bytes) else page
    found = CSRF_FIELD.search(text)
    assert found, "no CSRF token on the page"
    return found.group(1)


def sign_in(client: FlaskClient | httpx.Client, name: str = USER, password: str = PASSWORD) -> Any:
    """Sign in through the form, as a browser does (the app's test client, or over HTTP
    to a running ``otacm web``); the sign-in POST's response."""
    page = client.get("/finance/sign-in")
    body = page.content if isinstance(page, httpx.Response) else page.data
    return client.post(
        "/finance/sign-in",
        data={"name": name, "password": password, "csrf_token": csrf_token(body)},
    )


@pytest.fixture
def signed_in(client: FlaskClient) -> FlaskClient:
    """The test client, signed in as ``alice``."""
    response = sign_in(client)
    assert response.status_code == 302
    return client


@dataclass(frozen=True)
class Seeded:
    """The ids of what :func:`seed_run` stored."""

    run_id: int
    amount_exception_id: int
    missing_exception_id: int


def seed_run(sessions: sessionmaker[Session]) -> Seeded:
    """Store a finished run with two exceptions (see the module docstring)."""
    sold = NOW - dt.timedelta(days=3)
    with sessions.begin() as session:
        connection_id = ensure_connection(session, "venue-a")
        run = ReconRun(
            connection_id=connection_id,
            started_at=NOW - dt.timedelta(minutes=5),
            finished_at=NOW - dt.timedelta(minutes=4),
            period_from=NOW - dt.timedelta(days=30),
            period_to=NOW,
            trigger=ReconTrigger.MANUAL,
            state=ReconRunState.FINISHED,
            actor=USER,
        )
        session.add(run)
        paid = LedgerLine(
            connection_id=connection_id,
            partner_id=PARTNER,
            shop_reference="SHOP-100",
            sold_at=sold,
            quantity=2,
            amount=Decimal("120.00"),
            currency="EUR",
            source=LedgerSource.IMPORT,
        )
        missing = LedgerLine(
            connection_id=connection_id,
            partner_id=PARTNER,
            shop_reference="SHOP-200",
            sold_at=sold,
            quantity=1,
            amount=Decimal("50.00"),
            currency="USD",
            source=LedgerSource.IMPORT,
        )
        order = VenueOrder(
            connection_id=connection_id,
            order_id=ORDER_ID,
            partner_id=PARTNER,
            sell_to_order_reference="SHOP-100",
            buy_from_order_reference="VEN-0042",
            status=OrderStatus.ISSUED,
            status_changed_at=sold,
            first_seen_at=sold,
            sell_to_name="Jane Customer",
            sell_to_email="jane@example.com",
        )
        item = OrderItem(line_no=1, item_number="ADULT", description="Adult day pass", quantity=2)
        item.wallets.append(
            Wallet(
                seq_no=1,
                wallet_reference_number="W-0001",
                external_reference_number="EXT-1",
                unit_price_incl_vat=Decimal("50.00"),
                unit_price_excl_vat=Decimal("40.00"),
                currency_code="EUR",
            )
        )
        order.items.append(item)
        order.status_changes.extend(
            [
                StatusChange(
                    status=OrderStatus.SUBMITTED, observed_at=sold, source=ChangeSource.SUBMIT
                ),
                StatusChange(
                    status=OrderStatus.ISSUED,
                    observed_at=sold + dt.timedelta(minutes=1),
                    source=ChangeSource.WEBHOOK,
                ),
            ]
        )
        session.add_all([paid, missing, order])
        session.flush()
        session.add_all(
            [
                ReconTotal(run=run, currency="EUR", category="matched", count=5,
                           ledger_amount=Decimal("500.00"), venue_amount=Decimal("500.00")),
                ReconTotal(run=run, currency="EUR", category="amount_mismatch", count=1,
                           ledger_amount=Decimal("120.00"), venue_amount=Decimal("100.00")),
                ReconTotal(run=run, currency="USD", category="missing_at_venue", count=1,
                           ledger_amount=Decimal("50.00"), venue_amount=Decimal("0")),
            ]
        )  # fmt: skip
        amount = ReconException(
            connection_id=connection_id,
            category="amount_mismatch",
            subject_key="SHOP-100",
            ledger_line_id=paid.id,
            venue_order_id=order.id,
            currency="EUR",
            ledger_amount=Decimal("120.00"),
            venue_amount=Decimal("100.00"),
            details={"orderIds": [ORDER_ID]},
            first_seen_run_id=run.id,
            last_seen_run_id=run.id,
            first_seen_at=sold,
        )
        gone = ReconException(
            connection_id=connection_id,
            category="missing_at_venue",
            subject_key="SHOP-200",
            ledger_line_id=missing.id,
            currency="USD",
            ledger_amount=Decimal("50.00"),
            first_seen_run_id=run.id,
            last_seen_run_id=run.id,
            first_seen_at=NOW - dt.timedelta(days=40),
        )
        session.add_all([amount, gone])
        session.flush()
        for exception in (amount, gone):
            session.add(
                ExceptionEvent(
                    recon_exception_id=exception.id,
                    recon_run_id=run.id,
                    action=ExceptionAction.OPENED,
                    at=NOW - dt.timedelta(minutes=4),
                )
            )
        return Seeded(run.id, amount.id, gone.id)


MANY_CATEGORIES = ("amount_mismatch", "missing_at_venue", "orphan")


@dataclass(frozen=True)
class Many:
    """What :func:`seed_many` stored: the run and its exceptions' values by id."""

    run_id: int
    seen: dict[int, dict[str, Any]]  # id -> category, state, currency, first_seen_at, subject
    closed: list[int]


def seed_many(
    sessions: sessionmaker[Session], count: int, *, closed: int = 0, runs: int = 0
) -> Many:
    """A finished run of ``venue-a`` that saw ``count`` exceptions and closed ``closed``,
    with totals that agree (and ``runs`` other, empty runs before it), in bulk.

    Exception ``i`` (from 0): category ``MANY_CATEGORIES[i % 3]``, currency EUR for even
    ``i`` and USD for odd, first seen ``i % 40`` days ago, resolved when ``i % 7 == 0``
    (open otherwise), subject ``ledger:p:REF-<i, five digits>``.
    """
    with sessions.begin() as session:
        connection_id = ensure_connection(session, "venue-a")
        for number in range(runs):
            session.add(
                ReconRun(
                    connection_id=connection_id,
                    started_at=NOW - dt.timedelta(days=runs + 1 - number),
                    finished_at=NOW - dt.timedelta(days=runs + 1 - number),
                    period_from=NOW - dt.timedelta(days=60),
                    period_to=NOW,
                    trigger=ReconTrigger.SCHEDULED,
                    state=ReconRunState.FINISHED,
                )
            )
        earlier = ReconRun(
            connection_id=connection_id,
            started_at=NOW - dt.timedelta(days=1, minutes=5),
            finished_at=NOW - dt.timedelta(days=1),
            period_from=NOW - dt.timedelta(days=60),
            period_to=NOW,
            trigger=ReconTrigger.SCHEDULED,
            state=ReconRunState.FINISHED,
        )
        run = ReconRun(
            connection_id=connection_id,
            started_at=NOW - dt.timedelta(minutes=5),
            finished_at=NOW - dt.timedelta(minutes=4),
            period_from=NOW - dt.timedelta(days=60),
            period_to=NOW,
            trigger=ReconTrigger.MANUAL,
            state=ReconRunState.FINISHED,
            actor=USER,
        )
        session.add_all([earlier, run])
        session.flush()
        values: list[dict[str, Any]] = []
        for index in range(count + closed):
            gone = index >= count
            values.append(
                {
                    "connection_id": connection_id,
                    "category": MANY_CATEGORIES[index % 3],
                    "subject_key": f"ledger:p:REF-{index:05d}",
                    "currency": "EUR" if index % 2 == 0 else "USD",
                    "ledger_amount": Decimal(100 + index),
                    "venue_amount": Decimal(90 + index),
                    "state": "closed" if gone else ("resolved" if index % 7 == 0 else "open"),
                    "first_seen_run_id": earlier.id if gone else run.id,
                    "last_seen_run_id": earlier.id if gone else run.id,
                    "closed_run_id": run.id if gone else None,
                    "first_seen_at": NOW - dt.timedelta(days=index % 40, minutes=1),
                    "updated_at": NOW,
                }
            )
        session.execute(sa.insert(ReconException), values)
        rows = session.execute(
            sa.select(ReconException.id, ReconException.subject_key).where(
                ReconException.connection_id == connection_id,
                ReconException.subject_key.like("ledger:p:REF-%"),
            )
        ).all()
        ids = {subject: id_ for id_, subject in rows}
        seen: dict[int, dict[str, Any]] = {}
        closed_ids: list[int] = []
        events = []
        for index, value in enumerate(values):
            exception_id = ids[value["subject_key"]]
            if index >= count:
                closed_ids.append(exception_id)
                action = ExceptionAction.CLOSED
            else:
                seen[exception_id] = value
                action = ExceptionAction.OPENED
            events.append(
                {"recon_exception_id": exception_id, "recon_run_id": run.id, "action": action,
                 "at": NOW - dt.timedelta(minutes=4)}
            )  # fmt: skip
        session.execute(sa.insert(ExceptionEvent), events)
        totals: dict[tuple[str, str], int] = {}
        for value in seen.values():
            key = (value["currency"], value["category"])
            totals[key] = totals.get(key, 0) + 1
        session.add_all(
            ReconTotal(run=run, currency=currency, category=category, count=number,
                       ledger_amount=Decimal(0), venue_amount=Decimal(0))
            for (currency, category), number in totals.items()
        )  # fmt: skip
        return Many(run.id, seen, sorted(closed_ids))
