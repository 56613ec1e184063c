"""The venue's order rules: what createOrder, confirmOrder, replaceOrder, deleteOrder,
getOrder and listOrdersByPartner accept, refuse, and do to the stored order.

:class:`OrderBook` validates requests as the venue does, with its messages
(:mod:`sandbox.requests`, ChannelMgrOrderAgent), enforces the state machine — replace
only from Draft or Error, confirm only from Draft (a no-op on Issued), delete keeping
Issued/Cancelled orders as Cancelled and removing Draft/Error ones (answering "Cancelled"
for both), nothing while in flight — and pages a partner's orders with the venue's
filters, cursors and change feed. Issuance itself is :mod:`sandbox.pipeline`. Every
failure is an
:mod:`sandbox.errors` exception; nothing is stored when one is raised (but a createOrder
that finds an Error order under its reference deletes it first, as the venue does).
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import secrets
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, replace
from decimal import Decimal
from typing import Any

from pydantic import ValidationError

from sandbox.catalog import Catalog
from sandbox.config import SandboxConfig
from sandbox.errors import InvalidRequest, not_found
from sandbox.requests import (
    LINE_STEP,
    Header,
    VenueRequest,
    body_object,
    parse_header,
    parse_items,
    required_text,
    upper,
)
from sandbox.state import Clock, OrderQuery, OrderRecord, OrderStore, stamp
from venue.models import IN_FLIGHT_STATUSES, Order, OrderItem, OrderStatus, Wallet
from venue.values import guid_caption, parse_guid

ZERO_GUID = "00000000-0000-0000-0000-000000000000"
REFERENCE_LENGTH = 50
MAX_PAGE_SIZE = 20000
_TRUE = ("true", "1", "yes")
_FALSE = ("false", "0", "no", "")


def reference_code(text: str | None, length: int = REFERENCE_LENGTH) -> str | None:
    """A reference as the venue stores it: upper-cased, cut at ``length``, trimmed
    (``CopyStr`` into a Code[``length``], ChannelMgrOrderAgent TryParseHeader, ConfirmOrder)."""
    if text is None:
        return None
    code = upper(text)[:length].strip()
    return code or None


def describe_validation_error(exc: ValidationError) -> str:
    """One clause per problem, naming the field as the partner wrote it (``items[0].quantity``)."""
    clauses = []
    for error in exc.errors():
        where = ""
        for part in error["loc"]:
            where += f"[{part}]" if isinstance(part, int) else f"{'.' if where else ''}{part}"
        where = where or "body"
        if error["type"] == "missing":
            clauses.append(f"{where} is required")
        else:
            clauses.append(f"{where}: {error['msg']}")
    return "; ".join(clauses)


def new_buy_from_reference(now: dt.datetime) -> str:
    """The venue's document number, ``CM-YYMMDDHHMMSS-XXXX``.

    The venue's docs show a four-digit year (``CM-20260515093000-A1B2``, 22 characters) but
    the field is a Business Central Code[20]; the two-digit year keeps the shape and fits.
    """
    return f"CM-{now:%y%m%d%H%M%S}-{secrets.token_hex(2).upper()}"


@dataclass(frozen=True)
class ListPage:
    """One page of listOrdersByPartner: the records, and how to ask for the next page."""

    records: list[OrderRecord]
    replication: bool
    next_page_key: str | None
    query_text: str


class OrderBook:
    """The venue's order operations over an :class:`~sandbox.state.OrderStore`."""

    def __init__(self, store: OrderStore, config: SandboxConfig, clock: Clock) -> None:
        self._store = store
        self._config = config
        self._clock = clock

    @property
    def catalog(self) -> Catalog:
        """The catalog orders are checked against."""
        return self._config.catalog

    def get(self, order_id: str) -> OrderRecord:
        """getOrder, and the first step of confirm, replace and delete.

        As ChannelMgrOrderAgent TryGetOrderIdFromPath: an id that is not a GUID is a 400
        "Invalid order id"; an unknown one a 404 naming the id as Business Central
        formats a GUID.

        Raises:
            InvalidRequest: the id is not a GUID.
            ResourceNotFound: no order has that id (or it was deleted outright).
        """
        guid = parse_guid(order_id)
        if guid is None:
            raise InvalidRequest("Invalid order id")
        record = self._store.get(guid)
        if record is None:
            raise not_found(f"Order '{guid_caption(guid)}' not found")
        return record

    def create(self, body: Any) -> OrderRecord:
        """createOrder: validate, refuse duplicates, store the order as Submitted.

        A duplicate (partner, reference) is refused — unless the existing order is in
        Error: then it is deleted and the new one accepted under a new orderId.

        Raises:
            InvalidRequest: the body is invalid or the reference is already taken.
        """
        fields = body_object(body)
        header = parse_header(fields, self._config.payment_reference_length)
        partner = self._config.partner(header.partner_id)
        # ChannelMgrOrderAgent TryGetPartnerSetup: the GUID as Business Central formats
        # it into text, the partner by its name.
        if partner is None:
            raise InvalidRequest(f"Unknown partnerId '{guid_caption(header.partner_id)}'")
        if not partner.active:
            raise InvalidRequest(f"Partner '{partner.name}' is not active")
        reference = header.sell_to_order_reference
        now = self._now()
        with self._store.transaction():
            existing = self._store.find(partner.id, reference)
            if existing is not None:
                if existing.status is not OrderStatus.ERROR:
                    raise InvalidRequest(
                        f"An order with sellToOrderReference '{reference}' already exists"
                        f" for partner '{partner.name}'"
                    )
                # ChannelMgrOrderAgent IsDuplicateOrder deletes the Error order before the
                # items are read: it is gone even when the new order is then refused.
                self._store.remove(existing.order_id)
        request = self._parsed(fields, header)
        with self._store.transaction():
            order = self._submitted(
                str(uuid.uuid4()), request, received_at=now, buy_from=new_buy_from_reference(now)
            )
            return self._store.save(order, request, now)

    def confirm(self, order_id: str, body: Any) -> OrderRecord:
        """confirmOrder: Draft → Issued with the payment reference; a no-op on Issued.

        ChannelMgrOrderAgent ConfirmOrder stores the reference in the Code[50] field
        (trimmed, upper-cased) and calls CMOrderIssuer ConfirmOrder, which does nothing
        when the stored reference is empty: a reference of only spaces leaves the order
        Draft (with no reference) and is answered 200. Becoming Issued builds the
        manifests (BuildManifestForOrder).

        Raises:
            ResourceNotFound: no such order.
            InvalidRequest: no paymentReference, or the order is neither Draft nor Issued.
        """
        with self._store.transaction():
            # The vendor's order (ChannelMgrOrderAgent ConfirmOrder): the id, the order,
            # the Issued no-op and the status come before the body is read.
            record = self.get(order_id)
            if record.status is OrderStatus.ISSUED:
                return record
            if record.status is not OrderStatus.DRAFT:
                raise InvalidRequest(f"Order cannot be confirmed in status {record.status.caption}")
            payment = reference_code(
                required_text(body_object(body), "paymentReference"),
                self._config.payment_reference_length,
            )
            order = record.order.model_copy(update={"payment_reference": payment})
            if payment is None:
                # The field is modified (set to ""), the status is not.
                return self._store.save(order, record.request, record.status_since)
            order = order.model_copy(
                update={"status": OrderStatus.ISSUED, **issued_changes(order, self._config)}
            )
            return self._store.save(order, record.request, self._now())

    def replace(self, order_id: str, body: Any) -> OrderRecord:
        """replaceOrder: new header and items for a Draft or Error order, back to Submitted.

        Raises:
            ResourceNotFound: no such order.
            InvalidRequest: the order is in another status, the body is invalid, or it
                tries to change partnerId or sellToOrderReference.
        """
        with self._store.transaction():
            record = self.get(order_id)
            if record.status not in (OrderStatus.DRAFT, OrderStatus.ERROR):
                raise InvalidRequest(f"Order cannot be replaced in status {record.status.caption}")
            header = parse_header(body_object(body), self._config.payment_reference_length)
            current = record.order
            if header.partner_id != current.partner_id:
                raise InvalidRequest("partnerId cannot be changed via PUT")
            if header.sell_to_order_reference != current.sell_to_order_reference:
                raise InvalidRequest("sellToOrderReference cannot be changed via PUT")
            request = self._parsed(body, header)
            order = self._submitted(
                current.order_id,
                request,
                received_at=current.received_at or self._now(),
                buy_from=current.buy_from_order_reference or new_buy_from_reference(self._now()),
            )
            return self._store.save(order, request, self._now())

    def delete(self, order_id: str) -> OrderRecord:
        """deleteOrder: Issued/Cancelled → kept as Cancelled; Draft/Error → gone.

        As the venue does (ChannelMgrOrderAgent ``DeleteOrder``, CMOrderIssuer
        ``DeleteOrder`` / ``DestroyOrderAssets``), every settled order first has its
        assets destroyed and its lines deleted, and is marked Cancelled with no status
        message, job or manifest; a Draft or Error order is then deleted outright. The
        answer is the order as marked, so it says ``Cancelled`` with no items either way,
        although the Draft or Error one is gone (getOrder answers 404).

        Returns:
            The order as marked Cancelled (kept, or as it was just before its deletion).

        Raises:
            ResourceNotFound: no such order.
            InvalidRequest: the order is still in flight.
        """
        with self._store.transaction():
            record = self.get(order_id)
            status = record.status
            if status in IN_FLIGHT_STATUSES:
                if self._config.legacy_sync:
                    # The older version's DeleteOrder (43834b3b8) said it in its own words.
                    raise InvalidRequest(
                        "Order is currently being processed; retry once it has settled."
                    )
                # The venue formats the status by its caption (CMOrderStatus).
                raise InvalidRequest(
                    f"Order is mid-flight (status {status.caption}); retry once it has settled."
                )
            if status is OrderStatus.CANCELLED:
                # Already stripped and Cancelled: marking it again changes no field.
                return record
            cancelled = record.order.model_copy(
                update={
                    "status": OrderStatus.CANCELLED,
                    "status_message": "",
                    "job_id": "",
                    "manifest_url": None,
                    "items": [],
                }
            )
            if status in (OrderStatus.DRAFT, OrderStatus.ERROR):
                self._store.remove(record.order_id)
                return replace(record, order=cancelled)
            return self._store.save(cancelled, record.request, self._now())

    def list(self, partner_id: str, args: Mapping[str, str]) -> ListPage:
        """listOrdersByPartner: filters, paging, and the ``sync=true`` change feed.

        The partner id is only read as a GUID (ChannelMgrOrderAgent ListOrdersByPartner
        ``Evaluate(PartnerId, ...)``) and then used as a filter: a partner the venue does
        not know, or an inactive one, simply lists what it has, usually nothing.

        Raises:
            InvalidRequest: the partner id is not a GUID ("Invalid partnerId"), or a
                filter, page size or page key is invalid.
        """
        guid = parse_guid(partner_id)
        if guid is None:
            raise InvalidRequest("Invalid partnerId")
        filters, cursor = dict(args), None
        if args.get("pageKey"):
            # APIRequest ApplyPageKey: the key carries the first request's view — its
            # filters, the partner's among them — which replaces this request's: a key
            # used on another partner's path goes on listing the first partner's orders.
            # Only pageSize is read from this request.
            key = _decode_page_key(args["pageKey"])
            guid = str(key.get("p") or guid)
            filters, cursor = dict(key["f"]), key.get("c")
            filters.pop("pageSize", None)  # read from this request (APIRequest GetRecords)
            if "pageSize" in args:
                filters["pageSize"] = args["pageSize"]
        query, page_size = _parse_filters(guid, filters)
        if cursor is not None:
            query = _resume_after(query, cursor)
        rows = self._store.query(query, page_size + 1)
        page, more = rows[:page_size], len(rows) > page_size
        next_key = None
        if more:
            last = page[-1]
            position: Any = (
                last.row_version if query.by_row_version else [_received_stamp(last), last.entry_no]
            )
            original = {k: v for k, v in filters.items() if k != "pageKey"}
            next_key = _encode_page_key({"p": guid, "f": original, "c": position})
        query_text = "&".join(f"{k}={v}" for k, v in filters.items() if k != "pageKey")
        return ListPage(page, query.by_row_version, next_key, query_text)

    # --- helpers ----------------------------------------------------------------------

    def _now(self) -> dt.datetime:
        # The venue's DateTime holds milliseconds.
        return self._clock.venue_now()

    def _parsed(self, body: dict[str, Any], header: Header) -> VenueRequest:
        """The request with its items read as the venue reads them.

        Raises:
            InvalidRequest: with the venue's message for the first problem found.
        """
        today = self._config.local_today(self._clock.now())
        items = parse_items(body, header, self.catalog, today)
        return VenueRequest(header, items)

    def _submitted(
        self, order_id: str, request: VenueRequest, *, received_at: dt.datetime, buy_from: str
    ) -> Order:
        """The order as the venue answers a submission: Submitted, wallets as shells."""
        header = request.header
        return Order(
            order_id=order_id,
            status=OrderStatus.SUBMITTED,
            status_message="",
            partner_id=header.partner_id,
            sell_to_order_reference=header.sell_to_order_reference,
            buy_from_order_reference=buy_from,
            received_at=received_at,
            sell_to_email=header.sell_to_email or None,
            sell_to_name=header.sell_to_name or None,
            sell_to_language=header.sell_to_language or None,
            payment_reference=header.payment_reference or None,
            items=shell_items(request, self._config),
        )


def shell_items(request: VenueRequest, config: SandboxConfig) -> list[OrderItem]:
    """The order's lines before minting: wallets are shells carrying the partner's values.

    A shell has an all-zero ``walletId``, an empty ``walletReferenceNumber``, prices of
    0, and the external reference number and name the partner gave for it.
    """
    lines = []
    for index, line in enumerate(request.items):
        item = config.catalog.get(line.item_number)
        count = item.wallet_count(line.quantity) if item else 0
        names = line.names or ()
        references = line.external_reference_numbers or ()
        wallets = [
            Wallet(
                seq_no=seq + 1,
                wallet_id=ZERO_GUID,
                wallet_reference_number="",
                external_reference_number=(references[seq] or None)
                if seq < len(references)
                else None,
                name=(names[seq] or None) if seq < len(names) else None,
                # CMOrderIssuer PersistWalletShells: a shell's prices are 0, not absent.
                unit_price_excl_vat=Decimal(0),
                unit_price_incl_vat=Decimal(0),
            )
            for seq in range(count)
        ]
        lines.append(
            OrderItem(
                line_no=(index + 1) * LINE_STEP,
                item_number=line.item_number,
                description=item.description if item else None,
                is_package=item.is_package if item else False,
                quantity=line.quantity,
                visit_date=line.visit_date,
                visit_time=line.visit_time,
                sell_to_name=line.sell_to_name or None,
                sell_to_email=line.sell_to_email or None,
                sell_to_language=line.sell_to_language or None,
                wallets=wallets,
            )
        )
    return lines


def issued_changes(order: Order, config: SandboxConfig) -> dict[str, Any]:
    """What becoming Issued changes: the manifests, when the partner has a design template.

    CMOrderIssuer ConfirmOrder (from a paid processing run or confirmOrder) calls
    BuildManifestForOrder, the only place manifests are made: one for the order and one
    per wallet, and none at all when the partner has no design template. A Draft has none.
    """
    partner = config.partner(order.partner_id)
    if partner is None or not partner.design_template:
        return {"items": order.items}
    items = [
        item.model_copy(
            update={
                "wallets": [
                    w.model_copy(update={"manifest_url": manifest_url(config, w.wallet_id or "")})
                    for w in item.wallets
                ]
            }
        )
        for item in order.items
    ]
    if not any(item.wallets for item in items):
        return {"items": items}  # no wallet, no manifest
    return {"items": items, "manifest_url": manifest_url(config, order.order_id)}


def manifest_url(config: SandboxConfig, manifest_id: str) -> str:
    """A manifest's address (NPDesignerManifestFacade GetManifestUrl)."""
    return f"{config.manifest_base_url}?mid={manifest_id}"


# --- listing --------------------------------------------------------------------------


def _parse_filters(partner_id: str, args: Mapping[str, str]) -> tuple[OrderQuery, int]:
    """The query and page size a list request asks for.

    Raises:
        InvalidRequest: a value is malformed; the message names the parameter.
    """
    statuses: list[OrderStatus] = []
    for text in (args.get("status") or "").split(","):
        if not text.strip():
            continue
        status = next((s for s in OrderStatus if s.value.lower() == text.strip().lower()), None)
        if status is None:
            raise InvalidRequest(f"Unknown status '{text.strip()}'")
        statuses.append(status)
    # APIRequest GetRecords: ``sync`` orders by the row version; ``lastRowVersion`` is
    # read only when ``sync`` is given at all (true or false), and ignored without it.
    sync, last_row_version = False, None
    if "sync" in args:
        sync = _bool_param(args, "sync")
        if args.get("lastRowVersion"):
            last_row_version = _int_param(args, "lastRowVersion", 0, None)
    # A page size that is not a number is refused; one out of range is the maximum.
    page_size = _int_param(args, "pageSize", None, None) if args.get("pageSize") else 0
    if not 1 <= page_size <= MAX_PAGE_SIZE:
        page_size = MAX_PAGE_SIZE
    reference = args.get("sellToOrderReference")
    query = OrderQuery(
        partner_id=partner_id,
        statuses=tuple(statuses),
        reference=reference_code(reference) if reference else None,
        received_from=_instant_param(args, "receivedAtFrom"),
        received_to=_instant_param(args, "receivedAtTo"),
        by_row_version=sync,
        after_row_version=last_row_version,
    )
    return query, page_size


def _int_param(args: Mapping[str, str], name: str, low: int | None, high: int | None) -> int:
    bounds = ""
    if low is not None:
        bounds = f" between {low} and {high}" if high is not None else f" at least {low}"
    try:
        value = int(args[name])
    except ValueError:
        raise InvalidRequest(f"{name} must be an integer{bounds}") from None
    if (low is not None and value < low) or (high is not None and value > high):
        raise InvalidRequest(f"{name} must be an integer{bounds}")
    return value


def _bool_param(args: Mapping[str, str], name: str) -> bool:
    text = args[name].strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise InvalidRequest(f"{name} must be true or false")


def _instant_param(args: Mapping[str, str], name: str) -> dt.datetime | None:
    text = args.get(name)
    if not text:
        return None
    try:
        moment = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        # ChannelMgrOrderAgent ListOrdersByPartner.
        raise InvalidRequest(f"{name} must be ISO 8601 datetime") from None
    return moment.replace(tzinfo=dt.UTC) if moment.tzinfo is None else moment


def _received_stamp(record: OrderRecord) -> str:
    return stamp(record.order.received_at or record.status_since)


def _resume_after(query: OrderQuery, cursor: Any) -> OrderQuery:
    """``query`` narrowed to the rows after the last one a previous page returned.

    Raises:
        InvalidRequest: the cursor is not one this list issued.
    """
    try:
        if query.by_row_version:
            floor = max(query.after_row_version or 0, int(cursor))
            return replace(query, after_row_version=floor)
        return replace(query, after_position=(str(cursor[0]), int(cursor[1])))
    except (TypeError, ValueError, IndexError, KeyError):
        raise InvalidRequest("pageKey is not a page key this list issued") from None


def _encode_page_key(key: dict[str, Any]) -> str:
    raw = json.dumps(key, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_page_key(text: str) -> dict[str, Any]:
    """The page key's content.

    Raises:
        InvalidRequest: the key is garbled.
    """
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        key = json.loads(raw)
    except (binascii.Error, ValueError):
        raise InvalidRequest("pageKey is not a page key this list issued") from None
    if not isinstance(key, dict) or not isinstance(key.get("f"), dict):
        raise InvalidRequest("pageKey is not a page key this list issued")
    if parse_guid(str(key.get("p"))) is None:
        raise InvalidRequest("pageKey is not a page key this list issued")
    return key
