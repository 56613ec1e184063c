"""Webhook bodies for the receiver's tests: notifications as the venue sends them."""

from __future__ import annotations

import uuid
from typing import Any

from venue.webhooks import ORDER_PROCESSED_EVENT

APP_ID = "992c2309-cca4-43cb-9e41-911f482ec088"
STATE_A = "state-of-venue-a-0123456789"
STATE_A_NEXT = "next-state-of-venue-a-9876"
STATE_B = "state-of-venue-b-abcdefghij"
ALL_STATES = (STATE_A, STATE_A_NEXT, STATE_B)


def order_id() -> str:
    """A new venue order id: a lowercase GUID."""
    return str(uuid.uuid4())


def notification(
    order: str | None = None,
    *,
    status: str = "Issued",
    state: str = STATE_A,
    timestamp: str = "2024-01-15T10:30:00Z",
    reference: str = "CM-20240115103000-A1B2",
    event: str = ORDER_PROCESSED_EVENT,
    **extra: Any,
) -> dict[str, Any]:
    """One ``ota_cm_order_processed`` notification, as the venue's webhook guide shows it."""
    return {
        "appId": APP_ID,
        "clientState": state,
        "eventName": event,
        "eventVersion": "1.0",
        "timestamp": timestamp,
        "companyName": "CRONUS International Ltd.",
        "payload": {
            "orderId": order or order_id(),
            "buyFromOrderReference": reference,
            "status": status,
        },
        **extra,
    }
