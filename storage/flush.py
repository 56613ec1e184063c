"""The rules every flush keeps, put on a session factory by :func:`register_flush_hooks`.

- an order's totals follow its items and wallets (:func:`storage.totals.order_totals`);
- a value its column cannot hold (too wide, out of range) is refused before the
  database sees it, the same way on SQLite and PostgreSQL (:class:`ColumnOverflow`);
- an order whose customers were erased stays erased when it is fetched again.

:func:`storage.engine.make_sessions` registers them on the factory it makes; importing
this module changes nothing global.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from storage.models import OrderItem, VenueOrder, Wallet
from storage.types import MONEY_MAX, Money


def _summarize_orders(session: Session, flush_context: Any, instances: Any) -> None:
    """Keep every order's totals in step with its items and wallets, whoever writes them.

    An order is summed again when it is new, its list of items changed, or one of its
    items or wallets is new or changed; a change to the header alone leaves them be.
    """
    orders: dict[int, VenueOrder] = {}
    for row in (*session.new, *session.dirty):
        order: VenueOrder | None = None
        if isinstance(row, VenueOrder):
            if row in session.new or sa.inspect(row).attrs["items"].history.has_changes():
                order = row
        elif isinstance(row, OrderItem):
            order = row.order
        elif isinstance(row, Wallet) and row.item is not None:
            order = row.item.order
        if order is not None:
            orders[id(order)] = order
    for order in orders.values():
        order.summarize_items()


class ColumnOverflow(sa.exc.SQLAlchemyError):
    """A value its column cannot hold: text wider than its width, a number out of range.

    PostgreSQL refuses such a value while SQLite keeps it whole, so every flush checks
    first (:func:`_refuse_overflowing_values`) and the answer is the same on both: this
    error, which code handling database errors takes as it would PostgreSQL's. The
    message names the table, the column and its limit, never the value (it may be a
    customer's).
    """

    def __init__(self, table: str, column: str, limit: str) -> None:
        super().__init__(f"{table}.{column}: {limit}")
        self.table = table
        self.column = column


# An integer column's range on PostgreSQL (SQLite's INTEGER holds 64 bits whatever the
# declared type); Money is a BIGINT of micro-units.
INTEGER_MAX = 2**31 - 1
"""The largest value of an ``INTEGER`` column (``Mapped[int]``), such as a quantity."""


_INTEGER_LIMITS: tuple[tuple[type[sa.types.TypeEngine[Any]], int, str], ...] = (
    (sa.BigInteger, 2**63 - 1, "outside a 64-bit integer"),
    (sa.SmallInteger, 2**15 - 1, "outside a 16-bit integer"),
    (sa.Integer, INTEGER_MAX, "outside a 32-bit integer"),
)


_Check = Callable[[Any], str | None]


def _width_check(width: int) -> _Check:
    limit = f"longer than {width} characters"
    return lambda value: limit if isinstance(value, str) and len(value) > width else None


def _range_check(largest: int | Decimal, limit: str) -> _Check:
    bound = Decimal(largest)

    def check(value: Any) -> str | None:
        if isinstance(value, int | Decimal) and not isinstance(value, bool):
            return limit if abs(Decimal(value)) > bound else None
        return None

    return check


@functools.cache
def _column_checks(mapper: sa.orm.Mapper[Any]) -> tuple[tuple[str, str, _Check], ...]:
    """``(attribute, column, check)`` for each column of ``mapper`` with a limit to keep."""
    checks: list[tuple[str, str, _Check]] = []
    for prop in mapper.column_attrs:
        for column in prop.columns:
            kind = column.type
            if isinstance(kind, Money):
                checks.append((prop.key, column.name, _range_check(MONEY_MAX, "out of range")))
            elif isinstance(kind, sa.String) and kind.length is not None:
                checks.append((prop.key, column.name, _width_check(kind.length)))
            else:
                for integer, largest, limit in _INTEGER_LIMITS:
                    if isinstance(kind, integer):
                        checks.append((prop.key, column.name, _range_check(largest, limit)))
                        break
    return tuple(checks)


def _refuse_overflowing_values(session: Session, flush_context: Any, instances: Any) -> None:
    """Raise :class:`ColumnOverflow` before a row is written that a column cannot hold."""
    for row in (*session.new, *session.dirty):
        state = sa.inspect(row)
        for key, column, check in _column_checks(state.mapper):
            # The state's dict, not getattr: an attribute not loaded is not being written.
            limit = check(state.dict.get(key))
            if limit is not None:
                raise ColumnOverflow(state.mapper.local_table.name, column, limit)


def _keep_erased_orders_erased(session: Session, flush_context: Any, instances: Any) -> None:
    """Store no name or e-mail of an order whose personal data was erased.

    The venue keeps its orders' names and e-mails, and hands them back with every
    getOrder (the watchdog re-reads Draft and Error orders for ever): without this, an
    erased order would hold them again at its next fetch.
    """
    for row in (*session.new, *session.dirty):
        if isinstance(row, VenueOrder):
            if row.personal_data_erased_at is not None:
                row.sell_to_name = row.sell_to_email = None
        elif isinstance(row, OrderItem):
            if row.order is not None and row.order.personal_data_erased_at is not None:
                row.sell_to_name = row.sell_to_email = None
        elif isinstance(row, Wallet):
            order = row.item.order if row.item is not None else None
            if order is not None and order.personal_data_erased_at is not None:
                row.name = None


FLUSH_HOOKS = (_summarize_orders, _refuse_overflowing_values, _keep_erased_orders_erased)
"""What runs before every flush of otacm's sessions, in this order."""


def register_flush_hooks(sessions: sessionmaker[Session]) -> None:
    """Make every session of ``sessions`` keep the rules of :data:`FLUSH_HOOKS` whoever
    writes through it: orders' totals, values their columns can hold, erased orders
    without names or e-mails.

    On the factory, not on SQLAlchemy's ``Session`` class: a session made elsewhere (a
    library's, a test's) is left alone, and importing this module changes nothing.
    :func:`storage.engine.make_sessions` calls it for every factory it makes.
    """
    for hook in FLUSH_HOOKS:
        sa.event.listen(sessions, "before_flush", hook)
