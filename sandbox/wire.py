"""Orders and order summaries as the venue writes them on the wire.

:func:`order_json` is an order as the single-order answers carry it (ChannelMgrOrderAgent
BuildOrderResponseJson), :func:`summary_json` one row of listOrdersByPartner as the
venue's generic formatter writes it; both leave out what the older synchronous API's
answers lack when the sandbox plays it (``legacy_sync``).
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any

from sandbox.orders import ZERO_GUID
from sandbox.requests import RequestLine
from sandbox.state import OrderRecord
from sandbox.web import current_runtime
from venue.models import OrderItem, Wallet


def order_json(record: OrderRecord) -> dict[str, Any]:
    """An order as ChannelMgrOrderAgent BuildOrderResponseJson writes it.

    Every field is written (AppendOrderLine, AppendWallet, AppendTicket/AppendCoupon):
    empty text as ``""``, a shell's prices as ``0``, an unset date-time as JsonBuilder
    CreateJsonValue's ``Format(0DT, 0, 9)``, ``""``; only ``manifestUrl`` (order and
    wallet) is left out when empty, and ``componentSchedule`` is written only on package
    lines with schedule entries stored (AppendComponentScheduleArray: every entry, in the
    order sent, item numbers as Code). The status is its plain name (GetStatusAsText).
    """
    order = record.order
    wire: dict[str, Any] = {
        "orderId": order.order_id,
        "status": str(order.status),
        "statusMessage": order.status_message or "",
        "partnerId": order.partner_id,
        "sellToOrderReference": order.sell_to_order_reference,
        "buyFromOrderReference": order.buy_from_order_reference or "",
        "sellToEmail": order.sell_to_email or "",
        "sellToName": order.sell_to_name or "",
        "sellToLanguage": order.sell_to_language or "",
        "paymentReference": order.payment_reference or "",
        "receivedAt": _xml_datetime(order.received_at),
        "jobId": order.job_id or "",
    }
    if order.manifest_url:
        wire["manifestUrl"] = order.manifest_url
    requested = record.request.items
    wire["items"] = [
        _line_json(item, requested[index] if index < len(requested) else None)
        for index, item in enumerate(order.items)
    ]
    if current_runtime().config.legacy_sync:
        # The older synchronous API's order answers have neither (Old Agent
        # BuildOrderResponseJson).
        wire.pop("buyFromOrderReference", None)
        wire.pop("statusMessage", None)
    return wire


def _line_json(item: OrderItem, requested: RequestLine | None) -> dict[str, Any]:
    wire: dict[str, Any] = {
        "lineNo": item.line_no,
        "itemNumber": item.item_number,
        "description": item.description or "",
        "isPackage": item.is_package,
        "quantity": item.quantity,
        "visitDate": item.visit_date.isoformat() if item.visit_date else "",
        "visitTime": item.visit_time.strftime("%H:%M:%S") if item.visit_time else "",
        "sellToName": item.sell_to_name or "",
        "sellToEmail": item.sell_to_email or "",
        "sellToLanguage": item.sell_to_language or "",
    }
    schedule = requested.component_schedule if requested is not None else None
    if item.is_package and schedule:
        wire["componentSchedule"] = [
            {
                "itemNumber": entry.item_number.strip().upper(),
                "visitDate": entry.visit_date.isoformat(),
                "visitTime": entry.visit_time.strftime("%H:%M:%S"),
            }
            for entry in schedule
        ]
    wire["wallets"] = [_wallet_json(wallet) for wallet in item.wallets]
    return wire


def _wallet_json(wallet: Wallet) -> dict[str, Any]:
    wire: dict[str, Any] = {
        "seqNo": wallet.seq_no,
        "walletId": wallet.wallet_id or ZERO_GUID,
        "walletReferenceNumber": wallet.wallet_reference_number or "",
        "externalReferenceNumber": wallet.external_reference_number or "",
        "name": wallet.name or "",
        "issuedAt": _xml_datetime(wallet.issued_at),
        "unitPriceExclVat": wallet.unit_price_excl_vat or Decimal(0),
        "unitPriceInclVat": wallet.unit_price_incl_vat or Decimal(0),
        "currencyCode": wallet.currency_code or "",
    }
    if wallet.manifest_url:
        wire["manifestUrl"] = wallet.manifest_url
    wire["assets"] = [
        {
            "id": asset.id or "",
            "type": asset.type or "",
            "assetId": asset.asset_id or "",
            "referenceNumber": asset.reference_number or "",
            "itemNumber": asset.item_number or "",
            "description": asset.description or "",
        }
        for asset in wallet.assets
    ]
    return wire


def summary_json(record: OrderRecord, replication: bool) -> dict[str, Any]:
    """One summary as the venue's generic formatter writes it.

    ChannelMgrOrderAgent ``ListOrdersByPartner`` names the fields; APIRequest
    ``GetRecords`` adds ``id`` (the SystemId) and, with ``sync``, ``rowVersion``;
    ``AddFieldToJson`` writes each by its type: every field present, blank text and codes
    as ``""``, GUIDs lowercase, the status enum by its caption (``Processing...``; the
    single-order answers keep the plain name), date-times in XML format, the row version
    as text.
    """
    order = record.order
    wire: dict[str, Any] = {
        "orderId": order.order_id,
        "partnerId": order.partner_id,
        "sellToOrderReference": order.sell_to_order_reference,
        "buyFromOrderReference": order.buy_from_order_reference or "",
        "sellToEmail": order.sell_to_email or "",
        "sellToName": order.sell_to_name or "",
        "sellToLanguage": order.sell_to_language or "",
        "paymentReference": order.payment_reference or "",
        "status": order.status.caption,
        "statusMessage": order.status_message or "",
        "receivedAt": _xml_datetime(order.received_at),
        "jobId": order.job_id or "",
        "manifestUrl": order.manifest_url or "",
        "id": record.system_id,
    }
    if replication:
        wire["rowVersion"] = str(record.row_version)
    if current_runtime().config.legacy_sync:
        wire.pop("buyFromOrderReference", None)
    return wire


def _xml_datetime(moment: dt.datetime | None) -> str:
    """A date-time as Format(..., 0, 9) writes it: UTC, ``Z``, fraction only when not zero."""
    if moment is None:
        return ""
    text = moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f").rstrip("0").rstrip(".")
    return text + "Z"
