"""What a list of a run's exceptions is narrowed to, as SQL: :class:`ExceptionFilter`.

The finance pages' filters (category, state, age group, currency, a reference search)
become conditions on the run's exceptions (:func:`conditions`), so a list is filtered
by the database, never in Python; the age groups (:data:`AGING_BUCKETS`) are ranges of
the time an exception was first seen.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass

import sqlalchemy as sa

from storage.models import LedgerLine, VenueOrder
from storage.records import ExceptionState, ReconException

AGING_BUCKETS = ("0-1 days", "2-7 days", "8-30 days", "over 30 days")
"""The age groups of exceptions, youngest first: whole days since first seen."""

BUCKET_ENDS = (2, 8, 31)
"""The youngest age (whole days) beyond each age group but the last."""

# An orphan has no ledger line: the venue order's copy of the shop's reference.
SHOP_REFERENCE = sa.func.coalesce(LedgerLine.shop_reference, VenueOrder.sell_to_order_reference)


@dataclass(frozen=True)
class ExceptionFilter:
    """What a list of a run's exceptions is narrowed to; an empty field does not filter.

    ``search`` matches any part of the shop reference, the venue's orderId or document
    number, or the subject key, in any case (ASCII letters on SQLite, whose ``LIKE``
    folds no other).
    """

    category: str = ""
    state: str = ""
    aging: str = ""
    currency: str = ""
    search: str = ""

    @classmethod
    def from_args(cls, args: Mapping[str, str]) -> ExceptionFilter:
        """The filter a query string's ``args`` ask for (``q`` is the search)."""
        return cls(
            category=args.get("category", "").strip(),
            state=args.get("state", "").strip(),
            aging=args.get("aging", "").strip(),
            currency=args.get("currency", "").strip().upper(),
            search=args.get("q", "").strip(),
        )

    @property
    def active(self) -> bool:
        """Whether any filter is set."""
        return any((self.category, self.state, self.aging, self.currency, self.search))

    def as_args(self) -> dict[str, str]:
        """The query string's fields that give this filter back (set ones only)."""
        fields = {
            "category": self.category,
            "state": self.state,
            "aging": self.aging,
            "currency": self.currency,
            "q": self.search,
        }
        return {key: value for key, value in fields.items() if value}


def _like_pattern(text: str) -> str:
    """``text`` as a LIKE pattern matching it anywhere, its wildcards taken literally."""
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def conditions(chosen: ExceptionFilter, now: dt.datetime) -> list[sa.ColumnElement[bool]]:
    """The SQL conditions of ``chosen``; ages are counted to ``now``."""
    found: list[sa.ColumnElement[bool]] = []
    if chosen.category:
        found.append(ReconException.category == chosen.category)
    if chosen.state:
        # The column takes only its states: another value matches nothing.
        known = chosen.state in {state.value for state in ExceptionState}
        found.append(ReconException.state == ExceptionState(chosen.state) if known else sa.false())
    if chosen.currency:
        found.append(ReconException.currency == chosen.currency)
    if chosen.aging:
        found.append(_aging_condition(chosen.aging, now))
    if chosen.search:
        pattern = _like_pattern(chosen.search)
        found.append(
            sa.or_(
                *(
                    column.ilike(pattern, escape="\\")
                    for column in (
                        SHOP_REFERENCE,
                        VenueOrder.order_id,
                        VenueOrder.buy_from_order_reference,
                        ReconException.subject_key,
                    )
                )
            )
        )
    return found


def _aging_condition(bucket: str, now: dt.datetime) -> sa.ColumnElement[bool]:
    """First seen within ``bucket``'s ages (none for an unknown bucket).

    ``age_days`` is whole days, so an age of at most ``n`` days is a first sight later
    than ``now - (n + 1) days``.
    """
    if bucket not in AGING_BUCKETS:
        return sa.false()
    index = AGING_BUCKETS.index(bucket)
    first_seen = ReconException.first_seen_at
    bounds = []
    if index < len(BUCKET_ENDS):
        bounds.append(first_seen > now - dt.timedelta(days=BUCKET_ENDS[index]))
    if index > 0:
        bounds.append(first_seen <= now - dt.timedelta(days=BUCKET_ENDS[index - 1]))
    return sa.and_(*bounds)


def aging_bucket(age_days: int) -> str:
    """The age group (one of :data:`AGING_BUCKETS`) of an exception ``age_days`` old."""
    for bucket, end in zip(AGING_BUCKETS, BUCKET_ENDS, strict=False):
        if age_days < end:
            return bucket
    return AGING_BUCKETS[-1]
