"""What a reconciliation can find: the categories of a comparison, in one place.

Each ledger line in a run's period gets exactly one category (the first that applies,
in the order below), and so does each venue order the ledger does not know (``orphan``).
Only ``matched`` and ``in_flight`` are not exceptions.
"""

from __future__ import annotations

from enum import StrEnum


class Category(StrEnum):
    """The outcome of comparing one sale (or one unknown venue order) with the venue."""

    MATCHED = "matched"
    # The order is still being worked on at the venue, within the grace period.
    IN_FLIGHT = "in_flight"
    # The ledger has the sale; the venue has no order under its reference.
    MISSING_AT_VENUE = "missing_at_venue"
    # The venue has an order no ledger line has.
    ORPHAN = "orphan"
    # Several live venue orders under one sale's reference.
    MULTIPLE_ORDERS = "multiple_orders"
    # The buyFromOrderReference the shop recorded is not the venue's.
    REFERENCE_MISMATCH = "reference_mismatch"
    # State mismatches.
    DRAFT_UNCONFIRMED = "draft_unconfirmed"  # paid in the ledger, Draft at the venue
    VENUE_ERROR = "venue_error"  # the order is in Error at the venue
    STUCK_IN_FLIGHT = "stuck_in_flight"  # in flight past the grace period
    CANCELLED_AT_VENUE = "cancelled_at_venue"  # active in the ledger, Cancelled at the venue
    CANCELLED_IN_LEDGER = "cancelled_in_ledger"  # cancelled/refunded, still Issued at the venue
    # Content mismatches, on orders in the right state.
    QUANTITY_MISMATCH = "quantity_mismatch"
    CURRENCY_MISMATCH = "currency_mismatch"
    AMOUNT_MISMATCH = "amount_mismatch"
    EXTERNAL_REFERENCE_MISMATCH = "external_reference_mismatch"

    @property
    def is_exception(self) -> bool:
        """Whether finance must look at it."""
        return self not in (Category.MATCHED, Category.IN_FLIGHT)

    @property
    def label(self) -> str:
        """The category as finance reads it."""
        return _LABELS[self]


_LABELS = {
    Category.MATCHED: "Matched",
    Category.IN_FLIGHT: "In flight (within grace)",
    Category.MISSING_AT_VENUE: "Missing at the venue",
    Category.ORPHAN: "Unknown to the ledger",
    Category.MULTIPLE_ORDERS: "Several venue orders",
    Category.REFERENCE_MISMATCH: "Venue reference differs",
    Category.DRAFT_UNCONFIRMED: "Paid but Draft",
    Category.VENUE_ERROR: "Error at the venue",
    Category.STUCK_IN_FLIGHT: "Stuck in flight",
    Category.CANCELLED_AT_VENUE: "Cancelled at the venue, active in the ledger",
    Category.CANCELLED_IN_LEDGER: "Cancelled in the ledger, Issued at the venue",
    Category.QUANTITY_MISMATCH: "Ticket count differs",
    Category.CURRENCY_MISMATCH: "Currency differs",
    Category.AMOUNT_MISMATCH: "Amount differs",
    Category.EXTERNAL_REFERENCE_MISMATCH: "External references differ",
}
