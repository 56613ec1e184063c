"""The orders the quota benchmark sends, and when the venue picks them up: seeded, so runs repeat.

A :class:`Workload` is planned once per run (:func:`plan`) and played to every scenario,
so each one sees the same orders arriving at the same virtual seconds and the venue's
pickup cycles at the same moments. Orders arrive at random (uniformly) over the arrival
window; most are paid and end Issued, some are unpaid and end Draft, a few carry a
package schedule the venue refuses at processing and end in Error. The venue picks up
about every 60 s (55 to 65 s apart, from a random first moment), as its job queue does.
"""

from __future__ import annotations

import datetime as dt
import random
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from venue.models import OrderRequest

PICKUP_INTERVAL = (55, 65)
"""Seconds between two pickup cycles at the venue: about its 60-second cadence."""

SHARE_DRAFT = 0.08
SHARE_ERROR = 0.04
"""Unpaid orders (they end Draft) and orders that fail at processing (Error); the rest
are paid and end Issued."""


class Outcome(StrEnum):
    """How an order is meant to end at the venue."""

    ISSUED = "Issued"
    DRAFT = "Draft"
    ERROR = "Error"


@dataclass(frozen=True)
class PlannedOrder:
    """One order of the workload: when it arrives and how it will end."""

    second: int
    """When it is created, in virtual seconds from the start."""
    reference: str
    outcome: Outcome

    def request(self, partner_id: str, visit_date: dt.date) -> OrderRequest:
        """The createOrder body: one castle ticket, or a sold-out one the venue cannot issue."""
        line: dict[str, Any] = {
            "itemNumber": "31001",
            "visitDate": visit_date.isoformat(),
            "visitTime": "10:00:00",
            "quantity": 1,
        }
        if self.outcome is Outcome.ERROR:
            # The sandbox catalog's sold-out item: accepted by createOrder, its ticket
            # import fails at processing (the order ends in Error).
            line = {**line, "itemNumber": "31099"}
        body: dict[str, Any] = {
            "partnerId": partner_id,
            "sellToOrderReference": self.reference,
            "sellToEmail": "guest@example.com",
            "sellToName": "Bench Guest",
            "sellToLanguage": "ENU",
            "items": [line],
        }
        if self.outcome is not Outcome.DRAFT:
            body["paymentReference"] = f"PAY-{self.reference}"
        return OrderRequest.model_validate(body)


@dataclass(frozen=True)
class Workload:
    """The orders, by arrival, and the venue's pickup moments (virtual seconds)."""

    orders: tuple[PlannedOrder, ...]
    pickups: tuple[int, ...]
    window: int
    """The arrival window, in seconds: every order arrives before it ends."""

    def arriving(self, second: int) -> list[PlannedOrder]:
        """The orders created in this virtual second."""
        return [order for order in self.orders if order.second == second]

    def outcomes(self) -> dict[Outcome, int]:
        """How many orders are meant to end in each status."""
        counts = dict.fromkeys(Outcome, 0)
        for order in self.orders:
            counts[order.outcome] += 1
        return counts


def plan(count: int, window: int, *, seed: int, horizon: int) -> Workload:
    """A workload of ``count`` orders arriving over ``window`` seconds.

    Args:
        count: how many orders.
        window: the arrival window, in virtual seconds.
        seed: the random seed: the same seed gives the same workload.
        horizon: pickup moments are planned up to this many seconds.
    """
    rng = random.Random(seed)
    seconds = sorted(rng.randrange(window) for _ in range(count))
    orders = []
    for number, second in enumerate(seconds):
        roll = rng.random()
        if roll < SHARE_ERROR:
            outcome = Outcome.ERROR
        elif roll < SHARE_ERROR + SHARE_DRAFT:
            outcome = Outcome.DRAFT
        else:
            outcome = Outcome.ISSUED
        orders.append(PlannedOrder(second, f"QB-{seed}-{number:05d}", outcome))
    pickups = [rng.randrange(PICKUP_INTERVAL[1])]
    while pickups[-1] < horizon:
        pickups.append(pickups[-1] + rng.randint(*PICKUP_INTERVAL))
    return Workload(tuple(orders), tuple(pickups), window)
