"""When the customers of a sale visit: what the erasure of their personal data waits for."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any


def request_visit_date(request: Mapping[str, Any] | None) -> dt.date | None:
    """The latest visit date an order request names: its lines' and scheduled components'.

    Dates that do not read as ``YYYY-MM-DD`` are passed over (a stored request was
    checked when it came, but this also reads whatever an older release stored).

    Args:
        request: an order request as stored (camelCase wire JSON), or ``None``.
    """
    if not isinstance(request, Mapping):
        return None
    found: list[dt.date] = []
    items = request.get("items")
    for item in items if isinstance(items, list) else ():
        if not isinstance(item, Mapping):
            continue
        dates = [item.get("visitDate")]
        wallet = item.get("wallet")
        schedule = wallet.get("componentSchedule") if isinstance(wallet, Mapping) else None
        for entry in schedule if isinstance(schedule, list) else ():
            if isinstance(entry, Mapping):
                dates.append(entry.get("visitDate"))
        for text in dates:
            if isinstance(text, str):
                try:
                    found.append(dt.date.fromisoformat(text))
                except ValueError:
                    continue
    return max(found, default=None)
