"""What the local mirror holds at the end of the demo: :class:`DemoReport`, filled by
:func:`mirror_report`, and :func:`settled_count` to wait on.
"""

from __future__ import annotations

import shlex
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal

import sqlalchemy as sa

from otacm.demo.daemon import otacm_command_line
from venue.models import OrderStatus


@dataclass
class DemoReport:
    """What the local mirror holds at the end of the demo."""

    submitted: int = 0
    by_status: Counter[str] = field(default_factory=Counter)
    wallets: int = 0
    amounts: dict[str, Decimal] = field(default_factory=lambda: defaultdict(Decimal))
    errors: list[tuple[str, str]] = field(default_factory=list)
    venue_calls: dict[str, int] = field(default_factory=dict)
    webhooks_sent: int = 0
    database_url: str = ""
    example_reference: str = ""
    # Issued orders with a wallet per unit of quantity, by reference: those whose ledger
    # lines match the venue exactly, so a mismatch planted on one is the only one.
    plantable: list[str] = field(default_factory=list)

    def lines(self) -> Iterator[str]:
        """The summary as lines for a terminal."""
        yield f"orders submitted through otacm: {self.submitted}; in the local mirror:"
        for status, count in sorted(self.by_status.items()):
            yield f"  {status:<10} {count}"
        yield f"wallets mirrored: {self.wallets}"
        for currency, amount in sorted(self.amounts.items()):
            yield f"  issued value {currency}: {amount:.2f} incl. VAT"
        for reference, reason in self.errors:
            yield f"  {reference} ended in Error: {reason}"
        calls = ", ".join(f"{name} {count}" for name, count in sorted(self.venue_calls.items()))
        yield f"venue API calls: {calls}; webhooks delivered: {self.webhooks_sent}"
        if self.submitted:
            fetched = self.venue_calls.get("getOrder", 0)
            yield f"getOrder calls per order: {fetched / self.submitted:.2f}"
        yield f"database: {self.database_url}"
        if self.example_reference:
            yield (
                f"look closer: OTACM_DATABASE_URL={shlex.quote(self.database_url)} "
                f"{otacm_command_line()} orders show {self.example_reference}"
            )


def settled_count(engine: sa.Engine, references: set[str]) -> int:
    """How many of ``references`` the local mirror holds in a settled status."""
    from storage.models import VenueOrder

    in_flight = [status for status in OrderStatus if status.in_flight]
    query = sa.select(sa.func.count()).where(
        VenueOrder.reference_key.in_(references), VenueOrder.status.not_in(in_flight)
    )
    with engine.connect() as connection:
        return int(connection.execute(query).scalar_one())


def mirror_report(engine: sa.Engine, references: set[str], report: DemoReport) -> None:
    """Fill ``report`` from the local mirror's orders of ``references``."""
    from sqlalchemy.orm import selectinload

    from storage.engine import make_sessions
    from storage.models import OrderItem, VenueOrder

    query = (
        sa.select(VenueOrder)
        .where(VenueOrder.reference_key.in_(references))
        .options(selectinload(VenueOrder.items).selectinload(OrderItem.wallets))
        .order_by(VenueOrder.reference_key)
    )
    with make_sessions(engine, read_only=True)() as session:
        for order in session.scalars(query):
            report.by_status[order.status.value] += 1
            if order.status is OrderStatus.ERROR:
                report.errors.append((order.sell_to_order_reference, order.status_message or ""))
            elif order.status is OrderStatus.ISSUED and not report.example_reference:
                report.example_reference = order.sell_to_order_reference
            if order.status is OrderStatus.ISSUED and all(
                len(item.wallets) == item.quantity for item in order.items
            ):
                report.plantable.append(order.sell_to_order_reference)
            for item in order.items:
                report.wallets += len(item.wallets)
                if order.status is not OrderStatus.ISSUED:
                    continue
                # Each wallet carries the price of what it holds (a group ticket's one
                # wallet the whole group's), so the issued value is their sum.
                for wallet in item.wallets:
                    if wallet.unit_price_incl_vat is not None:
                        report.amounts[wallet.currency_code or "?"] += wallet.unit_price_incl_vat
