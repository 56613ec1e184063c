"""Column types: aware UTC datetimes and exact money, the same on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from decimal import Decimal

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import StatementError

from storage.types import Money, UTCDateTime, from_micros, to_micros

metadata = sa.MetaData()
sample = sa.Table(
    "sample",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("at", UTCDateTime),
    sa.Column("amount", Money),
    sa.Column("quantity", sa.Integer),
)

CET = dt.timezone(dt.timedelta(hours=2), "CEST")


@pytest.fixture
def table_engine(engine: sa.Engine) -> Iterator[sa.Engine]:
    """The ``engine`` database with the ``sample`` table."""
    metadata.create_all(engine)
    yield engine


def test_datetime_round_trips_as_aware_utc(table_engine: sa.Engine) -> None:
    """A datetime in any zone comes back as the same instant, aware, in UTC."""
    local = dt.datetime(2026, 5, 15, 11, 30, 0, 123456, tzinfo=CET)
    with table_engine.begin() as connection:
        connection.execute(sample.insert().values(id=1, at=local))
        stored = connection.execute(sa.select(sample.c.at)).scalar_one()

    assert stored == local
    assert stored.tzinfo == dt.UTC
    assert stored == dt.datetime(2026, 5, 15, 9, 30, 0, 123456, tzinfo=dt.UTC)


def test_datetimes_compare_and_sort_by_instant(table_engine: sa.Engine) -> None:
    """SQL comparisons and ORDER BY follow the instant, whatever zone each value had."""
    later_in_cet = dt.datetime(2026, 5, 15, 11, 0, tzinfo=CET)  # 09:00 UTC
    earlier_in_utc = dt.datetime(2026, 5, 15, 8, 0, tzinfo=dt.UTC)
    with table_engine.begin() as connection:
        connection.execute(sample.insert(), [{"id": 1, "at": later_in_cet}])
        connection.execute(sample.insert(), [{"id": 2, "at": earlier_in_utc}])
        ordered = connection.execute(sa.select(sample.c.id).order_by(sample.c.at)).scalars()
        after = connection.execute(
            sa.select(sample.c.id).where(sample.c.at > dt.datetime(2026, 5, 15, 10, 30, tzinfo=CET))
        ).scalars()

        assert list(ordered) == [2, 1]
        assert list(after) == [1]


def test_naive_datetime_is_refused(table_engine: sa.Engine) -> None:
    """A naive datetime is an error naming the problem, and nothing is stored."""
    with pytest.raises(StatementError, match="naive datetime"), table_engine.begin() as connection:
        connection.execute(sample.insert().values(id=1, at=dt.datetime(2026, 5, 15, 9, 30)))

    with table_engine.connect() as connection:
        assert connection.execute(sa.select(sa.func.count()).select_from(sample)).scalar() == 0


@pytest.mark.parametrize(
    "amount",
    [
        Decimal("0"),
        Decimal("0.000001"),
        Decimal("-5.5"),
        Decimal("49.95"),
        Decimal("12345678901.123456"),
    ],
)
def test_money_round_trips_exactly(table_engine: sa.Engine, amount: Decimal) -> None:
    """A Decimal with up to six places comes back equal, as a Decimal."""
    with table_engine.begin() as connection:
        connection.execute(sample.insert().values(id=1, amount=amount))
        stored = connection.execute(sa.select(sample.c.amount)).scalar_one()

    assert isinstance(stored, Decimal)
    assert stored == amount


def test_money_sums_exactly_in_sql(table_engine: sa.Engine) -> None:
    """SUM over money, amount * quantity and amount - amount are exact in SQL."""
    rows = [{"id": n, "amount": Decimal("0.1"), "quantity": 3} for n in range(1, 11)]
    rows.append({"id": 11, "amount": Decimal("1234.567891"), "quantity": 1})
    with table_engine.begin() as connection:
        connection.execute(sample.insert(), rows)
        total = connection.execute(sa.select(sa.func.sum(sample.c.amount))).scalar_one()
        extended = connection.execute(
            sa.select(sa.func.sum(sample.c.amount * sample.c.quantity))
        ).scalar_one()
        difference = connection.execute(
            sa.select(sa.func.sum(sample.c.amount) - Decimal("0.567891"))
        ).scalar_one()
        over = connection.execute(
            sa.select(sa.func.count()).where(sample.c.amount > Decimal("0.1"))
        ).scalar_one()

    assert total == Decimal("1235.567891")
    assert extended == Decimal("1237.567891")
    assert difference == Decimal("1235")
    assert over == 1


def test_money_refuses_floats(table_engine: sa.Engine) -> None:
    """A float is not money: binding one is an error, not a silent rounding."""
    with pytest.raises(StatementError, match="not float"), table_engine.begin() as connection:
        connection.execute(sample.insert().values(id=1, amount=0.1))


def test_money_rounds_half_even_at_six_places() -> None:
    """More than six places are rounded half-even, as banks do."""
    assert to_micros(Decimal("0.0000005")) == 0
    assert to_micros(Decimal("0.0000015")) == 2
    assert to_micros(Decimal("-2.5000025")) == -2_500_002
    assert from_micros(to_micros(Decimal("19.99"))) == Decimal("19.990000")


def test_money_refuses_non_finite_amounts() -> None:
    """NaN and infinity are not amounts."""
    with pytest.raises(ValueError, match="finite"):
        to_micros(Decimal("NaN"))
    with pytest.raises(ValueError, match="finite"):
        to_micros(Decimal("-Infinity"))
