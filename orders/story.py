"""An order's story: what the mirror and the ledger hold of one venue order, for a person.

The story is the order's header, every line with its wallets and assets, every status
change with its time and source (the timeline), and the sale's ledger line:
:func:`find_orders` finds the stored orders a key names, :func:`order_story` loads one
as a JSON-ready dict and :func:`story_lines` prints it for a terminal. ``otacm orders
show`` (:mod:`otacm.cli`) and the finance pages' exception drill-down
(:mod:`receiver.finance.views`) both tell it.

It lives with the tables it reads, below everything that acts on orders: it imports only
:mod:`storage` and :mod:`venue`, so the finance pages can import it without pulling in the
outbox (whose package imports the app the pages belong to). Customer names and e-mails
are left out: this ends up in terminals, tickets, chat and the finance pages.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session, selectinload

from storage.models import LedgerLine, OrderItem, VenueConnection, VenueOrder, Wallet
from venue.values import canonical_guid, normalize_reference


def find_orders(session: Session, key: str) -> list[VenueOrder]:
    """The stored orders whose orderId, shop reference or venue reference is ``key``.

    A shop reference can name several orders (an Error order replaced by a duplicate
    submission gets a new orderId), and the same reference may exist for two venues.
    """
    wanted = key.strip()
    query = (
        sa.select(VenueOrder)
        .where(
            sa.or_(
                VenueOrder.order_id == canonical_guid(wanted),
                VenueOrder.reference_key == normalize_reference(wanted),
                VenueOrder.buy_from_order_reference == normalize_reference(wanted),
            )
        )
        .options(
            selectinload(VenueOrder.items)
            .selectinload(OrderItem.wallets)
            .selectinload(Wallet.assets),
            selectinload(VenueOrder.status_changes),
        )
        .order_by(VenueOrder.first_seen_at, VenueOrder.id)
    )
    return list(session.scalars(query))


def order_story(session: Session, order: VenueOrder) -> dict[str, Any]:
    """The order as a JSON-ready dict: header, lines, wallets, assets, timeline, ledger."""
    connection = session.get_one(VenueConnection, order.connection_id)
    ledger = session.scalar(
        sa.select(LedgerLine).where(
            LedgerLine.connection_id == order.connection_id,
            LedgerLine.partner_id == order.partner_id,
            LedgerLine.reference_key == order.reference_key,
        )
    )
    return {
        "connection": connection.name,
        "orderId": order.order_id,
        "partnerId": order.partner_id,
        "sellToOrderReference": order.sell_to_order_reference,
        "buyFromOrderReference": order.buy_from_order_reference,
        "status": None if order.removed_at else order.status.value,
        "statusMessage": order.status_message,
        "removedAt": order.removed_at,
        "receivedAt": order.received_at,
        "paymentReference": order.payment_reference,
        "manifestUrl": order.manifest_url,
        "firstSeenAt": order.first_seen_at,
        "fetchedAt": order.fetched_at,
        "items": [
            {
                "lineNo": item.line_no,
                "itemNumber": item.item_number,
                "description": item.description,
                "isPackage": item.is_package,
                "quantity": item.quantity,
                "visitDate": item.visit_date,
                "visitTime": item.visit_time,
                "wallets": [
                    {
                        "seqNo": wallet.seq_no,
                        "walletId": wallet.wallet_id,
                        "walletReferenceNumber": wallet.wallet_reference_number,
                        "externalReferenceNumber": wallet.external_reference_number,
                        "issuedAt": wallet.issued_at,
                        "unitPriceExclVat": wallet.unit_price_excl_vat,
                        "unitPriceInclVat": wallet.unit_price_incl_vat,
                        "currencyCode": wallet.currency_code,
                        "manifestUrl": wallet.manifest_url,
                        "assets": [
                            {
                                "type": asset.type,
                                "referenceNumber": asset.reference_number,
                                "itemNumber": asset.item_number,
                                "description": asset.description,
                            }
                            for asset in wallet.assets
                        ],
                    }
                    for wallet in item.wallets
                ],
            }
            for item in order.items
        ],
        "timeline": [
            {
                "at": change.observed_at,
                "status": change.status.value if change.status else "(removed at the venue)",
                "statusMessage": change.status_message,
                "source": change.source.value,
            }
            for change in order.status_changes
        ],
        "ledger": None
        if ledger is None
        else {
            "shopReference": ledger.shop_reference,
            "soldAt": ledger.sold_at,
            "quantity": ledger.quantity,
            "amount": ledger.amount,
            "currency": ledger.currency,
            "amountIncludesVat": ledger.amount_includes_vat,
            "paymentReference": ledger.payment_reference,
            "state": ledger.state.value,
            "source": ledger.source.value,
        },
    }


def story_lines(story: dict[str, Any]) -> Iterator[str]:
    """The story as lines for a person at a terminal."""
    status = story["status"] or "removed at the venue"
    yield f"order {story['orderId']} ({story['connection']})"
    yield f"  reference      {story['sellToOrderReference']}"
    yield f"  venue document {story['buyFromOrderReference'] or '-'}"
    yield f"  status         {status}" + (
        f": {story['statusMessage']}" if story["statusMessage"] else ""
    )
    yield f"  partner        {story['partnerId']}"
    if story["manifestUrl"]:
        yield f"  manifest       {story['manifestUrl']}"
    for item in story["items"]:
        yield (
            f"  line {item['lineNo']}: {item['quantity']} x {item['itemNumber']}"
            f" {item['description'] or ''} on {item['visitDate'] or '?'}"
        )
        for wallet in item["wallets"]:
            price = wallet["unitPriceInclVat"]
            shown = f"{price} {wallet['currencyCode']}" if price is not None else "unpriced"
            yield (
                f"    wallet {wallet['seqNo']}: {wallet['walletReferenceNumber'] or '(not minted)'}"
                f" ext {wallet['externalReferenceNumber'] or '-'}, {shown}"
            )
            for asset in wallet["assets"]:
                yield f"      {asset['type']} {asset['referenceNumber']} ({asset['itemNumber']})"
    yield "  timeline:"
    for change in story["timeline"]:
        message = f": {change['statusMessage']}" if change["statusMessage"] else ""
        when = f"{change['at']:%Y-%m-%d %H:%M:%S}Z"
        yield f"    {when} {change['status']}{message} ({change['source']})"
    ledger = story["ledger"]
    if ledger is None:
        yield "  ledger: no sale recorded for this reference"
    else:
        yield (
            f"  ledger: {ledger['state']} sale of {ledger['quantity']} for {ledger['amount']}"
            f" {ledger['currency']} ({ledger['source']})"
        )
