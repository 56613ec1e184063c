"""One exception of a report as a row: :class:`ExceptionRow`, the columns it is read
from (:data:`ROW_COLUMNS`) and how a row is made of them (:class:`RowMaker`).

The columns are read as the driver returns them (amounts in micro-units, details as JSON
text) and converted here once, what rows share (a category, an age group, a details
document) worked out once per stream, rather than each value by its column type, which
cost an export more than the rest of its reading (``bench/finance --exports`` times
both). Customers' names and e-mails are stripped from the details.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import sqlalchemy as sa

from reconciler.categories import Category
from reconciler.report_filter import SHOP_REFERENCE, aging_bucket
from storage.models import VenueOrder
from storage.records import ReconException
from storage.types import from_micros

# Keys a details dict must never carry into a report (customers' personal data).
_PERSONAL_KEYS = frozenset(
    {"name", "email", "selltoname", "selltoemail", "sell_to_name", "sell_to_email"}
)


@dataclass(frozen=True)
class ExceptionRow:
    """One exception in a report, with the references finance looks it up by.

    ``difference`` is the venue's amount minus the ledger's, when both are known in one
    currency. ``age_days`` counts whole days from ``first_seen_at`` to the report's time.
    """

    id: int
    category: Category
    state: str
    subject_key: str
    shop_reference: str | None
    order_id: str | None
    buy_from_order_reference: str | None
    currency: str | None
    ledger_amount: Decimal | None
    venue_amount: Decimal | None
    difference: Decimal | None
    details: dict[str, Any]
    first_seen_at: dt.datetime
    age_days: int
    aging_bucket: str


# A row's columns as the driver returns them: the amounts as micro-units, the details as
# JSON text. :class:`RowMaker` converts them; SQLAlchemy's processing of each Money, JSON
# and enum value, row by row, cost more than the rest of an export's reading together.
ROW_COLUMNS: tuple[Any, ...] = (
    ReconException.id,
    ReconException.category,
    sa.type_coerce(ReconException.state, sa.String),
    ReconException.subject_key,
    SHOP_REFERENCE,
    VenueOrder.order_id,
    VenueOrder.buy_from_order_reference,
    ReconException.currency,
    sa.type_coerce(ReconException.ledger_amount, sa.BigInteger),
    sa.type_coerce(ReconException.venue_amount, sa.BigInteger),
    sa.cast(ReconException.details, sa.Text),
    ReconException.first_seen_at,
)


class RowMaker:
    """Turns rows of :data:`ROW_COLUMNS` into :class:`ExceptionRow`\\s, ages counted to
    ``now``.

    What many rows share is worked out once: a category, an age's group, and a details
    document (most rows of a run carry one of a few): its JSON is parsed and stripped
    of personal keys once, and the rows that carry the same text share the result,
    which nothing changes (a row is frozen, and every reader of ``details`` only reads).
    """

    _DETAILS_KEPT = 4096  # distinct details texts remembered at most (then forgotten)

    def __init__(self, now: dt.datetime) -> None:
        self._now = now
        self._categories = {category.value: category for category in Category}
        self._buckets: dict[int, str] = {}
        self._details: dict[str | None, dict[str, Any]] = {}

    def row(self, values: Sequence[Any]) -> ExceptionRow:
        """One row of :data:`ROW_COLUMNS` as an :class:`ExceptionRow`."""
        (exception_id, category_value, state, subject_key, shop_reference, order_id,
         venue_reference, currency, ledger_micros, venue_micros, details_text,
         first_seen_at) = values  # fmt: skip
        category = self._categories[category_value]
        ledger = None if ledger_micros is None else from_micros(ledger_micros)
        venue = None if venue_micros is None else from_micros(venue_micros)
        difference = None
        # Amounts in two currencies have no difference worth printing.
        if ledger is not None and venue is not None and category is not Category.CURRENCY_MISMATCH:
            difference = venue - ledger
        age = max((self._now - first_seen_at).days, 0)
        bucket = self._buckets.get(age)
        if bucket is None:
            bucket = self._buckets[age] = aging_bucket(age)
        details = self._details.get(details_text)
        if details is None:
            details = self._parsed(details_text)
        return ExceptionRow(
            id=exception_id,
            category=category,
            state=state,
            subject_key=subject_key,
            shop_reference=shop_reference,
            order_id=order_id,
            buy_from_order_reference=venue_reference,
            currency=currency,
            ledger_amount=ledger,
            venue_amount=venue,
            difference=difference,
            details=details,
            first_seen_at=first_seen_at,
            age_days=age,
            aging_bucket=bucket,
        )

    def _parsed(self, text: str | None) -> dict[str, Any]:
        """A details document without personal keys ({} for none), remembered."""
        document = json.loads(text) if text is not None else None
        details = {
            key: value
            for key, value in (document or {}).items()
            if key.lower() not in _PERSONAL_KEYS
        }
        if len(self._details) >= self._DETAILS_KEPT:
            self._details.clear()  # a run whose details are all different: no reuse
        self._details[text] = details
        return details
