"""The shop's deliveries for people: ``otacm deliveries list`` and ``replay``.

:func:`list_deliveries` shows them newest first; :func:`replay` puts dead ones back in the
queue of :mod:`orders.shop_delivery`'s senders, the same event (id, sequence, payload)
with its retry horizon starting again.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from storage.lease import NO_SYNC
from storage.records import DeliveryState, ShopDelivery, ShopEvent


@dataclass(frozen=True)
class DeliveryRow:
    """A delivery as ``otacm deliveries list`` shows it."""

    id: int
    endpoint: str
    state: str
    type: str
    event_id: str
    order_id: str | None
    reference: str | None
    order_seq: int
    attempts: int
    next_attempt_at: dt.datetime
    last_status: int | None
    last_error: str | None
    created_at: dt.datetime
    delivered_at: dt.datetime | None

    def as_dict(self) -> dict[str, Any]:
        """The row as JSON values."""
        return {
            key: value.isoformat() if isinstance(value, dt.datetime) else value
            for key, value in self.__dict__.items()
        }


def list_deliveries(
    session: Session,
    *,
    state: DeliveryState | None = None,
    endpoint: str | None = None,
    limit: int = 100,
) -> list[DeliveryRow]:
    """The newest deliveries first, ``limit`` of them, filtered by state and endpoint."""
    d = ShopDelivery
    query = sa.select(d, ShopEvent).join(ShopEvent, ShopEvent.id == d.shop_event_id)
    if state is not None:
        query = query.where(d.state == state)
    if endpoint is not None:
        query = query.where(d.endpoint == endpoint)
    query = query.order_by(d.id.desc()).limit(limit)
    rows = []
    for delivery, event in session.execute(query).all():
        payload = event.payload if isinstance(event.payload, dict) else {}
        rows.append(
            DeliveryRow(
                id=delivery.id,
                endpoint=delivery.endpoint,
                state=delivery.state.value,
                type=event.type.value,
                event_id=event.event_id,
                order_id=_text(payload.get("orderId")),
                reference=_text(payload.get("sellToOrderReference")),
                order_seq=delivery.order_seq,
                attempts=delivery.attempts,
                next_attempt_at=delivery.next_attempt_at,
                last_status=delivery.last_status,
                last_error=delivery.last_error,
                created_at=event.created_at,
                delivered_at=delivery.delivered_at,
            )
        )
    return rows


class ReplayRefused(ValueError):
    """A replay names a delivery that does not exist or is not dead."""


def replay(
    session: Session,
    *,
    delivery_id: int | None = None,
    endpoint: str | None = None,
    now: dt.datetime,
) -> list[int]:
    """Put dead deliveries back in the queue: one by id, or every dead one (of an endpoint).

    Each is pending at once, with the same event (id, sequence, payload), its retry
    horizon starting again now.

    Raises:
        ReplayRefused: ``delivery_id`` names no delivery, or one not dead.

    Returns:
        The deliveries replayed, by id.
    """
    d = ShopDelivery
    query = sa.update(d).where(d.state == DeliveryState.DEAD)
    if delivery_id is not None:
        found = session.get(ShopDelivery, delivery_id)
        if found is None:
            raise ReplayRefused(f"no shop delivery {delivery_id}")
        if found.state is not DeliveryState.DEAD:
            raise ReplayRefused(f"shop delivery {delivery_id} is {found.state}, not dead")
        query = query.where(d.id == delivery_id)
    if endpoint is not None:
        query = query.where(d.endpoint == endpoint)
    statement = (
        query.values(
            state=DeliveryState.PENDING,
            next_attempt_at=now,
            retry_from=now,
            lease_owner=None,
            lease_expires_at=None,
        )
        .returning(d.id)
        .execution_options(**NO_SYNC)
    )
    return sorted(session.scalars(statement).all())


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None
