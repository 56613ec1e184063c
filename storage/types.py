"""Column types that behave the same on SQLite and PostgreSQL: aware UTC times and money.

SQLite has neither a time zone aware timestamp nor an exact decimal type, so two
``TypeDecorator`` classes keep the Python side identical on both databases:
:class:`UTCDateTime` takes and returns aware UTC datetimes (on SQLite it stores the UTC
wall time and puts the zone back on read, as APScheduler's ``EmulatedTimestampTZ``), and
:class:`Money` stores a ``Decimal`` as a whole number of micro-units in a ``BIGINT``, so
that ``SUM`` in SQL is exact on both.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import sys
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

from sqlalchemy import BigInteger, DateTime
from sqlalchemy.engine import Dialect
from sqlalchemy.sql import operators
from sqlalchemy.sql.operators import OperatorType
from sqlalchemy.types import TypeDecorator, TypeEngine

from venue.text import storable_text

MONEY_PLACES = 6
"""Decimal places :class:`Money` keeps; more are rounded half-even."""

_MONEY_QUANTUM = Decimal(1).scaleb(-MONEY_PLACES)
MONEY_MAX = Decimal(2**63 - 1).scaleb(-MONEY_PLACES)
"""The largest amount :class:`Money` holds (a ``BIGINT`` of micro-units); validate
amounts from outside against it."""
# Operators whose other operand is a plain number, not an amount of money.
_SCALING_OPERATORS = frozenset({operators.mul, operators.truediv, operators.floordiv})
# Operators whose result is money again when the left operand is. Not division: SQL
# integer division truncates, so divide amounts in Python.
_MONEY_OPERATORS = frozenset({operators.mul, operators.add, operators.sub})


ID_MAX = 2**63 - 1
"""The largest row id (a ``BIGINT``): an id beyond it names no row, on either database,
and is answered as one that is not found rather than sent to the database."""


def text_problem(text: str, width: int | None = None) -> str | None:
    """Why a text column (``width`` characters wide, if given) would refuse ``text``.

    The one check for text that people type (a note, an actor's name, a reference, a
    ledger field) on its way to a column, so that the answer is the same on both
    databases (:func:`storable_text`): ``None`` when both take it as it is, else a
    phrase that follows the field's name ("is longer than 50 characters").
    """
    if width is not None and len(text) > width:
        return f"is longer than {width} characters"
    if not storable_text(text):
        return "holds a NUL character or an unpaired surrogate, which no text column takes"
    return None


def utcnow() -> dt.datetime:
    """The current time, aware, in UTC: the default of every timestamp column."""
    return dt.datetime.now(dt.UTC)


class UTCDateTime(TypeDecorator[dt.datetime]):
    """A timestamp that is an aware UTC ``datetime`` in Python on every database.

    PostgreSQL stores it as ``timestamp with time zone``. SQLite would silently drop the
    offset, so the value is converted to UTC before it is stored and read back as UTC.
    A naive datetime is refused: its zone is unknown, and guessing is how times go wrong.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> Any:
        """Check and normalize a datetime on its way to the database.

        Raises:
            TypeError: the value is not a datetime.
            ValueError: the datetime is naive.
        """
        if value is None:
            return None
        if not isinstance(value, dt.datetime):
            raise TypeError(f"UTCDateTime needs a datetime, not {type(value).__name__}")
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(
                f"naive datetime {value.isoformat()} refused: give it a time zone "
                "(e.g. datetime.now(datetime.UTC))"
            )
        value = value.astimezone(dt.UTC)
        if dialect.name == "sqlite":
            # SQLite keeps text without an offset: store the UTC wall time.
            return value.replace(tzinfo=None)
        return value

    def process_result_value(
        self, value: dt.datetime | None, dialect: Dialect
    ) -> dt.datetime | None:
        """An aware UTC datetime, whatever zone the driver returned it in."""
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC)


def to_micros(amount: Decimal | int) -> int:
    """A money amount as whole micro-units, rounded half-even at :data:`MONEY_PLACES`.

    Raises:
        TypeError: the amount is a float (binary fractions are not money) or not a number.
        ValueError: the amount is not finite.
    """
    if isinstance(amount, bool) or not isinstance(amount, Decimal | int):
        raise TypeError(f"money must be a Decimal or an int, not {type(amount).__name__}")
    amount = Decimal(amount)
    if not amount.is_finite():
        raise ValueError(f"money must be a finite number, not {amount}")
    return int(amount.quantize(_MONEY_QUANTUM, rounding=ROUND_HALF_EVEN).scaleb(MONEY_PLACES))


CENTS = Decimal("0.01")


def from_micros(micros: int | Decimal) -> Decimal:
    """Whole micro-units back as a ``Decimal``, written as people write amounts.

    Trailing zeros past the cents are dropped (``100.00``, ``35.956``), so amounts read
    back print as they were given; the value is exact either way.
    """
    value = Decimal(micros).scaleb(-MONEY_PLACES)
    trimmed = value.normalize()
    exponent = trimmed.as_tuple().exponent
    if isinstance(exponent, int) and exponent <= -2:
        return trimmed
    return value.quantize(CENTS)


class _MicroUnits(BigInteger):
    """``BIGINT`` for :class:`Money`; SQL arithmetic on it stays in money."""

    class Comparator(BigInteger.Comparator[int]):
        def _adapt_expression(
            self, op: OperatorType, other_comparator: TypeEngine.Comparator[Any]
        ) -> tuple[OperatorType, TypeEngine[Any]]:
            if op in _MONEY_OPERATORS:
                # self.expr.type is the Money column's type: keep it, so the result is
                # read back as a Decimal amount rather than raw micro-units.
                return op, self.expr.type
            return super()._adapt_expression(op, other_comparator)

    comparator_factory = Comparator


class Money(TypeDecorator[Decimal]):
    """An exact amount of money: ``Decimal`` in Python, micro-units in a ``BIGINT``.

    Six places cover every currency and unit price the venue sends; more are rounded
    half-even. Sums and differences computed in SQL stay exact (PostgreSQL's ``SUM`` of a
    ``BIGINT`` is a ``numeric``, SQLite's is an integer; both come back as ``Decimal``).
    Adding or subtracting amounts, and multiplying one by a plain number
    (``amount * quantity``, the amount on the left), gives money again.
    The currency is not part of the type: every amount column has a currency beside it.
    """

    impl = _MicroUnits
    cache_ok = True

    def process_bind_param(self, value: Decimal | int | None, dialect: Dialect) -> int | None:
        """The amount as micro-units.

        Raises:
            TypeError: the value is a float or not a number.
            ValueError: the value is not finite.
        """
        if value is None:
            return None
        return to_micros(value)

    def process_result_value(self, value: Any | None, dialect: Dialect) -> Decimal | None:
        """The stored micro-units (or their SQL sum) as a ``Decimal`` amount."""
        if value is None:
            return None
        return from_micros(value)

    def coerce_compared_value(self, op: OperatorType | None, value: Any) -> TypeEngine[Any]:
        """Treat the number in ``amount * 3`` as a count, not as three units of money."""
        if op in _SCALING_OPERATORS:
            return BigInteger()
        return self


# --- JSON in --------------------------------------------------------------------------


class JsonRefused(ValueError):
    """The text is not standard JSON (RFC 8259), or not one otacm can read."""


def decode_json(text: str, *, exact_numbers: bool = False) -> Any:
    """``text`` decoded as standard JSON; with ``exact_numbers``, fractions as ``Decimal``.

    Raises:
        json.JSONDecodeError: the text is not JSON (its ``msg`` says why; a document
            followed by more text is ``"Extra data"``, as with ``json.loads``).
        JsonRefused: ``NaN`` or ``Infinity``, a number out of range, or an integer of more
            digits than Python converts.
        RecursionError: the document is nested too deeply.
    """
    decoder = _EXACT if exact_numbers else _FLOATS
    try:
        return decoder.decode(text)
    except (JsonRefused, json.JSONDecodeError):
        raise
    except ValueError as exc:
        # The one other: an integer of more digits than Python's conversion limit.
        limit = sys.get_int_max_str_digits()
        raise JsonRefused(f"a number has more than {limit} digits") from exc


def _refuse_constant(name: str) -> Any:
    raise JsonRefused(f"{name} is not a JSON value")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise JsonRefused(f"the number {text[:40]} is out of range")
    return value


# Made once: json.loads with hooks would build a decoder per call, on the webhook's path.
_FLOATS = json.JSONDecoder(parse_constant=_refuse_constant, parse_float=_finite_float)
_EXACT = json.JSONDecoder(parse_constant=_refuse_constant, parse_float=Decimal)
