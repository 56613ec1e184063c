"""Sales with customers' names and e-mails everywhere, for the tests of their erasure."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from orders.mirror import upsert_order
from orders.outbox import record_submission
from storage.models import ChangeSource, OutboxState, ensure_connection
from venue.models import Order, OrderRequest

PARTNER = "21e8c1d2-3f4a-4c5b-9e6d-7f8a9b0c1d2e"
NOW = dt.datetime(2026, 12, 1, 9, 0, tzinfo=dt.UTC)
PERSON = ("Ada Customer", "ada.customer@example.com", "Ada Holder")
OTHER = ("Bob Customer", "bob.customer@example.com", "Bob Holder")


def sale_request(reference: str, person: tuple[str, str, str]) -> dict[str, Any]:
    """An order request with the person's name and e-mail, a holder name and a visit on
    2027-01-10."""
    return {
        "partnerId": PARTNER,
        "sellToOrderReference": reference,
        "sellToName": person[0],
        "sellToEmail": person[1],
        "paymentReference": f"PAY-{reference}",
        "items": [
            {
                "itemNumber": "31001",
                "visitDate": "2027-01-10",
                "visitTime": "10:30:00",
                "quantity": 1,
                "wallet": {"names": [person[2]], "externalReferenceNumbers": [f"EXT-{reference}"]},
            }
        ],
    }


def venue_order(reference: str, person: tuple[str, str, str], order_id: str) -> Order:
    """The Issued order the venue made of :func:`sale_request`, wallet and ticket too."""
    return Order.model_validate(
        {
            "orderId": order_id,
            "status": "Issued",
            "partnerId": PARTNER,
            "sellToOrderReference": reference,
            "buyFromOrderReference": f"V-{reference}",
            "sellToName": person[0],
            "sellToEmail": person[1],
            "items": [
                {
                    "lineNo": 10000,
                    "itemNumber": "31001",
                    "quantity": 1,
                    "visitDate": "2027-01-10",
                    "sellToName": person[0],
                    "sellToEmail": person[1],
                    "wallets": [
                        {
                            "seqNo": 1,
                            "name": person[2],
                            "walletReferenceNumber": f"W-{reference}",
                            "externalReferenceNumber": f"EXT-{reference}",
                            "unitPriceInclVat": "100.00",
                            "currencyCode": "DKK",
                            "assets": [{"type": "Ticket", "referenceNumber": f"T-{reference}"}],
                        }
                    ],
                }
            ],
        }
    )


def plant(
    sessions: sessionmaker[Session],
    reference: str,
    person: tuple[str, str, str],
    order_id: str,
    *,
    sent: bool = True,
) -> None:
    """A sale recorded, its createOrder sent (or still pending) and its order mirrored."""
    with sessions.begin() as session:
        connection_id = ensure_connection(session, "default")
        recorded = record_submission(
            session,
            connection_id,
            OrderRequest.model_validate(sale_request(reference, person)),
            now=NOW,
        )
        if sent:
            recorded.outbox.state = OutboxState.SENT
            recorded.outbox.order_id = order_id
        upsert_order(
            session,
            connection_id,
            venue_order(reference, person, order_id),
            source=ChangeSource.SUBMIT,
            observed_at=NOW,
        )
