"""The reconciliation engine on SQLite and PostgreSQL: one planted case of every category.

The ledger and the mirror are built with the ORM directly (:class:`Book`); every case is
found once, in its category, with its amounts, and nothing else is reported. Re-runs,
fixes, reappearances and failures show the run and exception lifecycle.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from reconciler import findings
from reconciler.categories import Category
from reconciler.engine import ReconRunFailed, reconcile, reconcile_connections
from storage.models import (
    LedgerLine,
    LedgerSource,
    LedgerState,
    OrderItem,
    VenueOrder,
    Wallet,
    ensure_connection,
)
from storage.records import ExceptionEvent, ReconException, ReconRun, ReconTotal, ReconTrigger
from venue.models import OrderStatus

PARTNER = "7d1c2f3a-0000-4000-8000-000000000001"
PERIOD_FROM = dt.datetime(2026, 5, 1, tzinfo=dt.UTC)
PERIOD_TO = dt.datetime(2026, 5, 8, tzinfo=dt.UTC)
NOW = dt.datetime(2026, 5, 8, 12, 0, tzinfo=dt.UTC)
SOLD = dt.datetime(2026, 5, 3, 10, 0, tzinfo=dt.UTC)
GRACE = dt.timedelta(hours=1)
TOLERANCE = Decimal("0.01")


@dataclass
class Book:
    """Builds ledger lines and mirrored orders of one connection, for a test's session."""

    session: Session
    connection_id: int

    def line(
        self,
        reference: str,
        *,
        quantity: int = 2,
        amount: str = "20.00",
        currency: str = "EUR",
        sold_at: dt.datetime = SOLD,
        state: LedgerState = LedgerState.ACTIVE,
        includes_vat: bool = True,
        payment_reference: str | None = "PAY-1",
        venue_reference: str | None = None,
        external: list[str] | None = None,
    ) -> LedgerLine:
        """A sale in the ledger."""
        row = LedgerLine(
            connection_id=self.connection_id,
            partner_id=PARTNER,
            shop_reference=reference,
            sold_at=sold_at,
            quantity=quantity,
            amount=Decimal(amount),
            currency=currency,
            amount_includes_vat=includes_vat,
            payment_reference=payment_reference,
            venue_reference=venue_reference,
            external_reference_numbers=external,
            state=state,
            source=LedgerSource.IMPORT,
        )
        self.session.add(row)
        self.session.flush()
        return row

    def order(
        self,
        reference: str,
        status: OrderStatus = OrderStatus.ISSUED,
        *,
        wallets: Sequence[Price] = (),
        quantity: int | None = None,
        received_at: dt.datetime | None = SOLD,
        changed_at: dt.datetime = SOLD,
        buy_from: str | None = None,
        removed: bool = False,
    ) -> VenueOrder:
        """A mirrored venue order with one item holding ``wallets``."""
        wallets = wallets or (Price(), Price())
        row = VenueOrder(
            connection_id=self.connection_id,
            order_id=str(uuid.uuid4()),
            partner_id=PARTNER,
            sell_to_order_reference=reference,
            buy_from_order_reference=buy_from,
            status=status,
            status_changed_at=changed_at,
            received_at=received_at,
            first_seen_at=changed_at,
            removed_at=changed_at if removed else None,
            items=[
                OrderItem(
                    line_no=1,
                    item_number="ADULT",
                    quantity=len(wallets) if quantity is None else quantity,
                    wallets=[
                        Wallet(
                            seq_no=seq_no,
                            unit_price_incl_vat=price.incl,
                            unit_price_excl_vat=price.excl,
                            currency_code=price.currency,
                            external_reference_number=price.external,
                        )
                        for seq_no, price in enumerate(wallets, start=1)
                    ],
                )
            ],
        )
        self.session.add(row)
        self.session.flush()
        return row


@dataclass(frozen=True)
class Price:
    """A wallet's price and external reference number."""

    incl: Decimal | None = Decimal("10.00")
    excl: Decimal | None = Decimal("8.26")
    currency: str | None = "EUR"
    external: str | None = None


def ledger_key(reference: str) -> str:
    """The subject key of a ledger-side exception."""
    return f"ledger:{PARTNER}:{reference.strip().upper()}"


@dataclass
class Planted:
    """What :func:`plant_every_case` built: the expected exceptions by subject key."""

    connection_id: int
    expected: dict[str, Category] = field(default_factory=dict)
    orphan_key: str = ""


def plant_every_case(sessions: sessionmaker[Session], name: str = "venue") -> Planted:
    """One case of every category (four matched, one in flight), plus out-of-scope rows."""
    with sessions.begin() as session:
        connection_id = ensure_connection(session, name)
        book = Book(session, connection_id)
        planted = Planted(connection_id)
        expect = planted.expected

        # Matched, with the reference in another case, VAT included, refs case-insensitive.
        book.line("match-1", venue_reference="bf-1", external=["e1", "E2"])
        book.order(
            "MATCH-1",
            buy_from="BF-1",
            wallets=[Price(external="E1"), Price(external="e2")],
        )
        # Matched on the excluding-VAT basis, within the tolerance.
        book.line("MATCH-EXCL", amount="16.525", includes_vat=False)
        book.order("MATCH-EXCL")
        # Matched: a group ticket, its one wallet carrying the price of all three guests
        # (CMTicketIssuer AccumulatePriceOnWallet).
        book.line("GROUP", quantity=3, amount="30.00")
        book.order(
            "GROUP", wallets=[Price(incl=Decimal("30.00"), excl=Decimal("24.78"))], quantity=3
        )
        # Matched: cancelled in both.
        book.line("CANCELLED-BOTH", state=LedgerState.CANCELLED)
        book.order("CANCELLED-BOTH", OrderStatus.CANCELLED)
        # In flight within the grace: no exception.
        recent = NOW - dt.timedelta(minutes=10)
        book.line("IN-FLIGHT", sold_at=PERIOD_TO - dt.timedelta(minutes=5))
        book.order("IN-FLIGHT", OrderStatus.SUBMITTED, changed_at=recent)

        book.line("MISSING")
        book.order("MISSING", removed=True)  # a removed order is no order
        expect[ledger_key("MISSING")] = Category.MISSING_AT_VENUE
        book.line("MULTI")
        book.order("MULTI", OrderStatus.ERROR)
        book.order("MULTI")
        expect[ledger_key("MULTI")] = Category.MULTIPLE_ORDERS
        book.line("STUCK")
        book.order("STUCK", OrderStatus.PROCESSING)
        expect[ledger_key("STUCK")] = Category.STUCK_IN_FLIGHT
        book.line("ERROR")
        book.order("ERROR", OrderStatus.ERROR)
        expect[ledger_key("ERROR")] = Category.VENUE_ERROR
        book.line("REFUNDED", state=LedgerState.REFUNDED)
        book.order("REFUNDED")
        expect[ledger_key("REFUNDED")] = Category.CANCELLED_IN_LEDGER
        book.line("VENUE-CANCELLED")
        book.order("VENUE-CANCELLED", OrderStatus.CANCELLED)
        expect[ledger_key("VENUE-CANCELLED")] = Category.CANCELLED_AT_VENUE
        book.line("DRAFT")
        book.order("DRAFT", OrderStatus.DRAFT)
        expect[ledger_key("DRAFT")] = Category.DRAFT_UNCONFIRMED
        book.line("REF", venue_reference="BF-OURS")
        book.order("REF", buy_from="BF-THEIRS")
        expect[ledger_key("REF")] = Category.REFERENCE_MISMATCH
        book.line("QTY", quantity=3, amount="30.00")
        book.order("QTY")
        expect[ledger_key("QTY")] = Category.QUANTITY_MISMATCH
        book.line("CURRENCY")
        book.order("CURRENCY", wallets=[Price(currency="USD"), Price(currency="USD")])
        expect[ledger_key("CURRENCY")] = Category.CURRENCY_MISMATCH
        book.line("AMOUNT", amount="25.00")
        book.order("AMOUNT")
        expect[ledger_key("AMOUNT")] = Category.AMOUNT_MISMATCH
        book.line("EXTREF", external=["X1", "X2"])
        book.order("EXTREF", wallets=[Price(external="X1"), Price(external="X3")])
        expect[ledger_key("EXTREF")] = Category.EXTERNAL_REFERENCE_MISMATCH
        orphan = book.order("ORPHAN", wallets=[Price()])
        planted.orphan_key = f"order:{orphan.order_id}"
        expect[planted.orphan_key] = Category.ORPHAN

        # Out of scope: a sale before the period (and its orphan-looking order, which the
        # sale claims), an orphan received after the period.
        book.line("BEFORE", sold_at=PERIOD_FROM - dt.timedelta(days=1), amount="99.00")
        book.order("BEFORE", received_at=PERIOD_FROM + dt.timedelta(days=1))
        book.order("LATE-ORPHAN", received_at=PERIOD_TO)
        return planted


def run(
    sessions: sessionmaker[Session],
    connection_id: int,
    *,
    period_from: dt.datetime = PERIOD_FROM,
    period_to: dt.datetime = PERIOD_TO,
    now: dt.datetime = NOW,
) -> int:
    """One manual run with the test's grace and tolerance."""
    return reconcile(
        sessions,
        connection_id=connection_id,
        period_from=period_from,
        period_to=period_to,
        now=now,
        trigger=ReconTrigger.MANUAL,
        actor="finance",
        grace=GRACE,
        tolerance=TOLERANCE,
    )


def exceptions_by_key(session: Session, connection_id: int) -> dict[str, ReconException]:
    """Every exception of the connection, by subject key."""
    rows = session.scalars(
        sa.select(ReconException).where(ReconException.connection_id == connection_id)
    )
    return {row.subject_key: row for row in rows}


def totals(session: Session, run_id: int) -> dict[tuple[str, str], tuple[int, Decimal, Decimal]]:
    """A run's totals by (currency, category)."""
    rows = session.scalars(sa.select(ReconTotal).where(ReconTotal.recon_run_id == run_id))
    return {
        (row.currency, row.category): (row.count, row.ledger_amount, row.venue_amount)
        for row in rows
    }


def actions(session: Session, run_id: int) -> list[str]:
    """The event actions a run wrote, sorted."""
    query = sa.select(ExceptionEvent.action).where(ExceptionEvent.recon_run_id == run_id)
    return sorted(str(action) for action in session.scalars(query))


@pytest.fixture(params=["searched per sale", "joined"])
def sales_read(
    request: pytest.FixtureRequest, migrated_engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> str:
    """On PostgreSQL, both ways a run reads each sale's orders (``reconciler.findings``:
    which one follows the period's size against the mirror's); SQLite has one."""
    if migrated_engine.dialect.name != "postgresql" and request.param != "joined":
        pytest.skip("SQLite joins, and searches per sale through its plan")
    monkeypatch.setattr(findings, "_few_sales", lambda *_: request.param != "joined")
    return str(request.param)


def test_every_category_is_found_once_with_its_amounts(
    sessions: sessionmaker[Session], sales_read: str
) -> None:
    """Each planted case is one exception in its category; matches and in-flight are none;
    whichever way the sales' orders are read."""
    planted = plant_every_case(sessions)
    run_id = run(sessions, planted.connection_id)

    with sessions() as session:
        found = exceptions_by_key(session, planted.connection_id)
        assert {key: row.category for key, row in found.items()} == planted.expected
        assert {row.state for row in found.values()} == {"open"}
        assert all(row.first_seen_run_id == run_id for row in found.values())
        assert all(row.first_seen_at == NOW for row in found.values())

        amount = found[ledger_key("AMOUNT")]
        assert (amount.currency, amount.ledger_amount, amount.venue_amount) == (
            "EUR",
            Decimal("25.00"),
            Decimal("20.00"),
        )
        orphan = found[planted.orphan_key]
        assert (orphan.currency, orphan.ledger_amount, orphan.venue_amount) == (
            "EUR",
            None,
            Decimal("10.00"),
        )
        assert orphan.ledger_line_id is None and orphan.venue_order_id is not None
        missing = found[ledger_key("MISSING")]
        assert missing.venue_amount is None and missing.venue_order_id is None
        assert found[ledger_key("MULTI")].details is not None
        assert found[ledger_key("MULTI")].details["order_count"] == 2
        assert found[ledger_key("CURRENCY")].details["venue_currency"] == "USD"
        assert found[ledger_key("QTY")].details["venue_quantity"] == 2
        assert found[ledger_key("STUCK")].details["status"] == "Processing"

        assert actions(session, run_id) == ["opened"] * len(planted.expected)
        run_row = session.get(ReconRun, run_id)
        assert run_row is not None
        assert (run_row.state, run_row.error, run_row.actor) == ("finished", None, "finance")
        assert run_row.finished_at is not None and run_row.finished_at >= NOW

        by_category = totals(session, run_id)
        assert by_category[("EUR", "matched")] == (4, Decimal("86.525"), Decimal("86.52"))
        assert by_category[("EUR", "in_flight")] == (1, Decimal("20.00"), Decimal("20.00"))
        assert by_category[("EUR", "amount_mismatch")] == (1, Decimal("25.00"), Decimal("20.00"))
        assert by_category[("EUR", "missing_at_venue")] == (1, Decimal("20.00"), Decimal(0))
        assert by_category[("EUR", "multiple_orders")] == (1, Decimal("20.00"), Decimal("40.00"))
        assert by_category[("EUR", "orphan")] == (1, Decimal(0), Decimal("10.00"))
        counts = {category: count for (_, category), (count, _, _) in by_category.items()}
        assert sum(counts.values()) == len(planted.expected) + 5
        assert set(counts) == {c.value for c in planted.expected.values()} | {
            "matched",
            "in_flight",
        }


def test_rerunning_a_period_changes_nothing(sessions: sessionmaker[Session]) -> None:
    """A second run: same totals, same exceptions, only ``seen`` events."""
    planted = plant_every_case(sessions)
    first = run(sessions, planted.connection_id)
    second = run(sessions, planted.connection_id, now=NOW + dt.timedelta(minutes=1))

    with sessions() as session:
        assert totals(session, second) == totals(session, first)
        found = exceptions_by_key(session, planted.connection_id)
        assert len(found) == len(planted.expected)
        assert {row.state for row in found.values()} == {"open"}
        assert {row.first_seen_run_id for row in found.values()} == {first}
        assert {row.last_seen_run_id for row in found.values()} == {second}
        assert all(row.first_seen_at == NOW for row in found.values())
        assert actions(session, second) == ["seen"] * len(planted.expected)


def test_a_fixed_case_is_closed_and_a_reappearing_one_reopened(
    sessions: sessionmaker[Session],
) -> None:
    """Fixing the ledger closes the exception in the next run; breaking it again reopens it."""
    planted = plant_every_case(sessions)
    first = run(sessions, planted.connection_id)
    key = ledger_key("AMOUNT")

    def set_amount(amount: str) -> None:
        with sessions.begin() as session:
            line = session.scalars(
                sa.select(LedgerLine).where(LedgerLine.reference_key == "AMOUNT")
            ).one()
            line.amount = Decimal(amount)

    set_amount("20.00")
    second = run(sessions, planted.connection_id)
    with sessions() as session:
        fixed = exceptions_by_key(session, planted.connection_id)[key]
        assert (fixed.state, fixed.closed_run_id) == ("closed", second)
        assert actions(session, second).count("closed") == 1
        assert totals(session, second)[("EUR", "matched")][0] == 5

    set_amount("21.00")
    third = run(sessions, planted.connection_id)
    with sessions() as session:
        again = exceptions_by_key(session, planted.connection_id)[key]
        assert (again.state, again.closed_run_id, again.id) == ("open", None, fixed.id)
        assert (again.first_seen_run_id, again.last_seen_run_id) == (first, third)
        assert again.ledger_amount == Decimal("21.00")
        assert [str(event.action) for event in again.events] == ["opened", "closed", "reopened"]
        assert "opened" not in actions(session, third)


def test_a_changed_category_closes_the_old_exception_and_opens_a_new_one(
    sessions: sessionmaker[Session],
) -> None:
    """An order that settles from stuck to Issued with the wrong count moves category."""
    planted = plant_every_case(sessions)
    run(sessions, planted.connection_id)
    with sessions.begin() as session:
        order = session.scalars(
            sa.select(VenueOrder).where(VenueOrder.reference_key == "STUCK")
        ).one()
        order.status = OrderStatus.ISSUED
        order.items[0].quantity = 5
    second = run(sessions, planted.connection_id)
    with sessions() as session:
        found = session.scalars(
            sa.select(ReconException).where(ReconException.subject_key == ledger_key("STUCK"))
        ).all()
        assert {(row.category, row.state) for row in found} == {
            ("stuck_in_flight", "closed"),
            ("quantity_mismatch", "open"),
        }
        assert actions(session, second).count("opened") == 1


def test_a_run_over_another_period_closes_nothing_outside_it(
    sessions: sessionmaker[Session],
) -> None:
    """Exceptions whose subject lies outside a run's period are left alone by it."""
    planted = plant_every_case(sessions)
    run(sessions, planted.connection_id)
    later = run(
        sessions,
        planted.connection_id,
        period_from=PERIOD_TO,
        period_to=PERIOD_TO + dt.timedelta(days=7),
        now=NOW + dt.timedelta(days=7),
    )
    with sessions() as session:
        found = exceptions_by_key(session, planted.connection_id)
        late = {key for key, row in found.items() if row.first_seen_run_id == later}
        assert [found[key].category for key in late] == ["orphan"]
        earlier = {key: row.state for key, row in found.items() if key not in late}
        assert set(earlier.values()) == {"open"}
        assert "closed" not in actions(session, later)


def test_connections_are_reconciled_apart(sessions: sessionmaker[Session]) -> None:
    """A run sees only its own connection's ledger and orders."""
    planted = plant_every_case(sessions, "venue-a")
    with sessions.begin() as session:
        other = ensure_connection(session, "venue-b")
    run_id = run(sessions, other)
    with sessions() as session:
        assert totals(session, run_id) == {}
        assert exceptions_by_key(session, other) == {}
        assert len(exceptions_by_key(session, planted.connection_id)) == 0


OTHER_PARTNER = "7d1c2f3a-0000-4000-8000-000000000002"


def test_a_run_compares_only_the_configured_partners_sales_and_orders(
    sessions: sessionmaker[Session],
) -> None:
    """Another partner's orders (and sales) are neither compared, counted nor reported.

    The venue notifies and answers getOrder company-wide (CMOrderWebhooks;
    ChannelMgrOrderAgent ``GetOrder``), so the mirror may hold other partners' orders.
    """
    with sessions.begin() as session:
        connection_id = ensure_connection(session, "venue")
        book = Book(session, connection_id)
        book.line("OURS", quantity=2, amount="20.00")
        book.order("OURS")
        book.order("OURS-ORPHAN")
        for reference in ("THEIRS-ORPHAN", "THEIRS"):
            book.order(reference).partner_id = OTHER_PARTNER
        book.line("THEIRS-MISSING").partner_id = OTHER_PARTNER

    def scoped_run(partner_ids: list[str] | None) -> int:
        return reconcile(
            sessions,
            connection_id=connection_id,
            period_from=PERIOD_FROM,
            period_to=PERIOD_TO,
            now=NOW,
            trigger=ReconTrigger.MANUAL,
            actor="finance",
            grace=GRACE,
            tolerance=TOLERANCE,
            partner_ids=partner_ids,
        )

    scoped = scoped_run([PARTNER])
    with sessions() as session:
        assert {
            key: row.category for key, row in exceptions_by_key(session, connection_id).items()
        } == {
            next(
                f"order:{order_id}"
                for order_id in session.scalars(
                    sa.select(VenueOrder.order_id).where(
                        VenueOrder.sell_to_order_reference == "OURS-ORPHAN"
                    )
                )
            ): Category.ORPHAN
        }
        assert sum(count for count, _, _ in totals(session, scoped).values()) == 2

    everyone = scoped_run(None)
    nobody = scoped_run([])
    with sessions() as session:
        assert sum(count for count, _, _ in totals(session, everyone).values()) == 5
        assert totals(session, nobody) == {}


def test_a_failed_run_is_recorded_and_leaves_nothing_behind(
    sessions: sessionmaker[Session],
) -> None:
    """When the comparison fails, the run is marked failed with the error; no totals."""
    planted = plant_every_case(sessions)
    with sessions.begin() as session:
        session.execute(sa.text("ALTER TABLE ledger_line RENAME TO ledger_elsewhere"))
    with pytest.raises(ReconRunFailed) as failure:
        run(sessions, planted.connection_id)
    with sessions() as session:
        failed = session.get(ReconRun, failure.value.run_id)
        assert failed is not None
        assert failed.state == "failed"
        assert failed.error is not None and "ledger_line" in failed.error
        assert totals(session, failed.id) == {}
        assert exceptions_by_key(session, planted.connection_id) == {}


def test_reconciling_connections_returns_every_run_the_failed_ones_included(
    sessions: sessionmaker[Session],
) -> None:
    """A failing connection does not stop the next: the report has each connection's
    run, failed or not, and why each failed; raising the first failure is the caller's."""
    planted = plant_every_case(sessions)
    with sessions.begin() as session:
        other = ensure_connection(session, "other")
        session.execute(sa.text("ALTER TABLE ledger_line RENAME TO ledger_elsewhere"))
    report = reconcile_connections(
        sessions,
        [planted.connection_id, other],
        period_from=PERIOD_FROM,
        period_to=PERIOD_TO,
        now=NOW,
        trigger=ReconTrigger.MANUAL,
        actor="finance",
        grace=GRACE,
        tolerance=TOLERANCE,
    )
    with sessions() as session:
        recorded = {
            row.connection_id: (row.id, row.state) for row in session.scalars(sa.select(ReconRun))
        }
    assert recorded == {
        planted.connection_id: (report.runs[planted.connection_id], "failed"),
        other: (report.runs[other], "failed"),
    }
    assert report.failed == [planted.connection_id, other]
    assert report.as_dict() == {"runs": 2, "failed": 2}
    with pytest.raises(ReconRunFailed) as first:
        report.raise_first_failure()
    assert first.value.run_id == report.runs[planted.connection_id]


def test_an_empty_or_naive_period_is_refused_before_any_run(
    sessions: sessionmaker[Session],
) -> None:
    """Bad periods raise ValueError and record no run."""
    with sessions.begin() as session:
        connection_id = ensure_connection(session, "venue")
    with pytest.raises(ValueError, match="empty period"):
        run(sessions, connection_id, period_from=PERIOD_TO, period_to=PERIOD_FROM)
    with pytest.raises(ValueError, match="aware"):
        run(sessions, connection_id, period_from=PERIOD_FROM.replace(tzinfo=None))
    with sessions() as session:
        assert session.scalar(sa.select(sa.func.count()).select_from(ReconRun)) == 0


def test_the_scheduled_job_reconciles_every_connection_over_the_lookback(
    sessions: sessionmaker[Session],
) -> None:
    """The scheduler's ``reconcile`` job runs each connection over the lookback window."""
    from otacm.processes import Runtime, scheduled_jobs
    from otacm.settings import Settings

    engine = sessions.kw["bind"]
    settings = Settings(
        database_url=engine.url.render_as_string(hide_password=False),
        tenant="tenant",
        company="company",
        api_key="key",
        partner_ids=[PARTNER],
        recon_lookback_days=7,
    )
    (venue,) = settings.connections
    planted = plant_every_case(sessions, venue.name)
    runtime = Runtime(
        engine=engine,
        sessions=sessions,
        clients={},
        connections={planted.connection_id: venue},
    )
    jobs = {job.name: job for job in scheduled_jobs(settings, runtime)}
    job = jobs["reconcile"]
    assert job.interval == settings.recon_interval

    job.run(PERIOD_TO + dt.timedelta(hours=1))
    with sessions() as session:
        (run_row,) = session.scalars(sa.select(ReconRun)).all()
        assert (run_row.trigger, run_row.state, run_row.actor) == ("scheduled", "finished", None)
        assert run_row.period_to == PERIOD_TO + dt.timedelta(hours=1)
        assert run_row.period_from == PERIOD_TO + dt.timedelta(hours=1) - dt.timedelta(days=7)
        found = exceptions_by_key(session, planted.connection_id)
        categories = {key: row.category for key, row in found.items()}
        # The window reaches past PERIOD_TO: the late orphan is in it too.
        extra = {key: categories.pop(key) for key in set(categories) - set(planted.expected)}
        assert categories == planted.expected
        assert list(extra.values()) == ["orphan"]


def test_the_scheduled_job_fails_when_a_run_failed(sessions: sessionmaker[Session]) -> None:
    """The ``reconcile`` job raises the failed run's error, so its run record shows it."""
    from otacm.processes import Runtime, scheduled_jobs
    from otacm.settings import Settings

    engine = sessions.kw["bind"]
    settings = Settings(
        database_url=engine.url.render_as_string(hide_password=False),
        tenant="tenant",
        company="company",
        api_key="key",
        partner_ids=[PARTNER],
    )
    (venue,) = settings.connections
    planted = plant_every_case(sessions, venue.name)
    with sessions.begin() as session:
        session.execute(sa.text("ALTER TABLE ledger_line RENAME TO ledger_elsewhere"))
    runtime = Runtime(
        engine=engine, sessions=sessions, clients={}, connections={planted.connection_id: venue}
    )
    job = {job.name: job for job in scheduled_jobs(settings, runtime)}["reconcile"]
    with pytest.raises(ReconRunFailed, match="ledger_line") as failure:
        job.run(PERIOD_TO)
    with sessions() as session:
        run_row = session.get_one(ReconRun, failure.value.run_id)
        assert (run_row.trigger, run_row.state) == ("scheduled", "failed")


def test_an_orphan_counts_in_the_venues_own_currency_code(
    sessions: sessionmaker[Session],
) -> None:
    """A company's currency code of up to ten characters (CMOrderWallet CurrencyCode,
    Code[10]) is an orphan's currency as written; mixed codes count as XXX."""
    with sessions.begin() as session:
        connection_id = ensure_connection(session, "venue")
        book = Book(session, connection_id)
        own = book.order("OWN", wallets=[Price(currency="LOCALCUR10")])
        mixed = book.order("MIXED", wallets=[Price(currency="EUR"), Price(currency="DKK")])

    run_id = run(sessions, connection_id)

    with sessions() as session:
        found = exceptions_by_key(session, connection_id)
        assert found[f"order:{own.order_id}"].currency == "LOCALCUR10"
        assert found[f"order:{mixed.order_id}"].currency == "XXX"
        assert totals(session, run_id) == {
            ("LOCALCUR10", Category.ORPHAN): (1, Decimal(0), Decimal("10.00")),
            ("XXX", Category.ORPHAN): (1, Decimal(0), Decimal("20.00")),
        }
