"""The venue's order rules: what createOrder, confirmOrder, replaceOrder, deleteOrder,
getOrder and listOrdersByPartner accept, refuse, and do to the stored order.

:class:`OrderBook` validates requests with the venue's own messages (``spec/API.md``,
"Errors"), enforces the state machine — replace only from Draft or Error, confirm only
from Draft (a no-op on Issued), delete keeping Issued/Cancelled orders as Cancelled and
removing Draft/Error ones (answering "Cancelled" for both), nothing while in flight — and
pages a partner's orders with the venue's filters, cursors and change feed. Issuance
itself is :mod:`sandbox.pipeline`. Every failure is an :mod:`sandbox.errors` exception;
nothing is stored when one is raised.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import re
import secrets
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from pydantic import ValidationError

from sandbox.catalog import Catalog
from sandbox.config import SandboxConfig
from sandbox.errors import InvalidRequest, ResourceNotFound
from sandbox.state import Clock, OrderQuery, OrderRecord, OrderStore, stamp
from venue.models import (
    IN_FLIGHT_STATUSES,
    ConfirmRequest,
    Order,
    OrderItem,
    OrderRequest,
    OrderStatus,
    Wallet,
    normalize_reference,
)

ZERO_GUID = "00000000-0000-0000-0000-000000000000"
REFERENCE_LENGTH = 50
MAX_PAGE_SIZE = 20000
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_TIME = re.compile(r"^\d{2}:\d{2}:\d{2}$")
_TRUE = ("true", "1", "yes")


def reference_code(text: str | None) -> str | None:
    """A reference as the venue stores it: trimmed, upper-cased, cut at 50 characters."""
    if text is None:
        return None
    code = normalize_reference(text)[:REFERENCE_LENGTH]
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


def parse_order_request(body: Any) -> OrderRequest:
    """The createOrder/replaceOrder body as a model, its formats checked.

    Raises:
        InvalidRequest: the body is not an order request; the message names the field.
    """
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object")
    items = body.get("items")
    if isinstance(items, list):
        for index, item in enumerate(items):
            if not isinstance(item, dict):
                continue
            # Checked on the raw text: pydantic would also take timestamps and "10:30".
            visit_date, visit_time = item.get("visitDate"), item.get("visitTime")
            if isinstance(visit_date, str) and not _DATE.match(visit_date):
                raise InvalidRequest(f"items[{index}] visitDate must be a date as YYYY-MM-DD")
            if visit_time is not None and (
                not isinstance(visit_time, str) or not _TIME.match(visit_time)
            ):
                raise InvalidRequest(f"items[{index}] visitTime must be a time as HH:mm:ss")
    try:
        return OrderRequest.model_validate(body)
    except ValidationError as exc:
        raise InvalidRequest(describe_validation_error(exc)) from None


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
        """getOrder.

        Raises:
            ResourceNotFound: no order has that id (or it was deleted outright).
        """
        record = self._store.get(order_id.strip().strip("{}"))
        if record is None:
            raise ResourceNotFound(f"Order '{order_id}' was not found")
        return record

    def create(self, body: Any) -> OrderRecord:
        """createOrder: validate, refuse duplicates, store the order as Submitted.

        A duplicate (partner, reference) is refused — unless the existing order is in
        Error: then it is deleted and the new one accepted under a new orderId.

        Raises:
            InvalidRequest: the body is invalid or the reference is already taken.
        """
        request = self._checked(parse_order_request(body))
        partner_id = self._partner_id(request)
        reference = reference_code(request.sell_to_order_reference) or ""
        now = self._now()
        with self._store.transaction():
            existing = self._store.find(partner_id, reference)
            if existing is not None:
                if existing.status is not OrderStatus.ERROR:
                    raise InvalidRequest(
                        f"Order with sellToOrderReference '{reference}' already exists"
                        f" for partner '{partner_id}'"
                    )
                self._store.remove(existing.order_id)
            order = self._submitted(
                str(uuid.uuid4()), request, received_at=now, buy_from=new_buy_from_reference(now)
            )
            return self._store.save(order, request, now)

    def confirm(self, order_id: str, body: Any) -> OrderRecord:
        """confirmOrder: Draft → Issued with the payment reference; a no-op on Issued.

        Raises:
            ResourceNotFound: no such order.
            InvalidRequest: no paymentReference, or the order is neither Draft nor Issued.
        """
        try:
            payment = ConfirmRequest.model_validate(body if isinstance(body, dict) else {})
        except ValidationError as exc:
            raise InvalidRequest(describe_validation_error(exc)) from None
        with self._store.transaction():
            record = self.get(order_id)
            if record.status is OrderStatus.ISSUED:
                return record
            if record.status is not OrderStatus.DRAFT:
                raise InvalidRequest(f"Order cannot be confirmed in status {record.status}")
            order = record.order.model_copy(
                update={
                    "status": OrderStatus.ISSUED,
                    "payment_reference": reference_code(payment.payment_reference),
                }
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
                raise InvalidRequest(f"Order cannot be replaced in status {record.status}")
            request = self._checked(parse_order_request(body))
            current = record.order
            if self._partner_id(request) != current.partner_id:
                raise InvalidRequest(
                    f"partnerId is immutable: order '{current.order_id}' belongs to partner"
                    f" '{current.partner_id}'"
                )
            if reference_code(request.sell_to_order_reference) != current.sell_to_order_reference:
                raise InvalidRequest(
                    "sellToOrderReference is immutable: order"
                    f" '{current.order_id}' has '{current.sell_to_order_reference}'"
                )
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

        Raises:
            InvalidRequest: a filter, page size or page key is invalid, or the partner
                is unknown.
        """
        partner = self._config.partner(partner_id)
        if partner is None:
            raise InvalidRequest(f"Unknown partnerId '{partner_id}'")
        filters, cursor = dict(args), None
        if args.get("pageKey"):
            # A page key carries the first request's filters; only pageSize may change.
            key = _decode_page_key(args["pageKey"], partner.id)
            filters, cursor = dict(key["f"]), key.get("c")
            if "pageSize" in args:
                filters["pageSize"] = args["pageSize"]
        query, page_size = _parse_filters(partner.id, filters)
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
            next_key = _encode_page_key({"p": partner.id, "f": original, "c": position})
        query_text = "&".join(f"{k}={v}" for k, v in filters.items() if k != "pageKey")
        return ListPage(page, query.by_row_version, next_key, query_text)

    # --- helpers ----------------------------------------------------------------------

    def _now(self) -> dt.datetime:
        # The venue's timestamps have whole seconds.
        return self._clock.now().replace(microsecond=0)

    def _partner_id(self, request: OrderRequest) -> str:
        partner = self._config.partner(request.partner_id)
        assert partner is not None  # _checked has made sure
        return partner.id

    def _checked(self, request: OrderRequest) -> OrderRequest:
        """``request`` when the venue would accept it.

        Raises:
            InvalidRequest: with the venue's message for the first problem found.
        """
        partner = self._config.partner(request.partner_id)
        if partner is None:
            raise InvalidRequest(f"Unknown partnerId '{request.partner_id}'")
        if not partner.active:
            raise InvalidRequest(f"Partner '{request.partner_id}' is not active")
        if reference_code(request.sell_to_order_reference) is None:
            raise InvalidRequest("sellToOrderReference is required")
        today = self._config.local_today(self._clock.now())
        for index, line in enumerate(request.items):
            item = self.catalog.get(line.item_number)
            if item is None:
                raise InvalidRequest(f"Unknown item '{line.item_number}'")
            if line.visit_date < today:
                raise InvalidRequest(f"items[{index}] visitDate must not be in the past")
            wallet = line.wallet
            if wallet is None:
                continue
            expected = item.wallet_count(line.quantity)
            line_no = (index + 1) * self._config.line_step
            for field, values in (
                ("names", wallet.names),
                ("externalReferenceNumbers", wallet.external_reference_numbers),
            ):
                if values and len(values) != expected:
                    raise InvalidRequest(
                        f"wallet.{field} array length ({len(values)}) must equal {expected}"
                        f" on line {line_no}"
                    )
            if wallet.component_schedule is not None and not item.is_package:
                raise InvalidRequest("wallet.componentSchedule is only valid for package items")
        return request

    def _submitted(
        self, order_id: str, request: OrderRequest, *, received_at: dt.datetime, buy_from: str
    ) -> Order:
        """The order as the venue answers a submission: Submitted, wallets as shells."""
        return Order(
            order_id=order_id,
            status=OrderStatus.SUBMITTED,
            status_message="",
            partner_id=self._partner_id(request),
            sell_to_order_reference=reference_code(request.sell_to_order_reference) or "",
            buy_from_order_reference=buy_from,
            received_at=received_at,
            sell_to_email=request.sell_to_email,
            sell_to_name=request.sell_to_name,
            sell_to_language=request.sell_to_language,
            payment_reference=reference_code(request.payment_reference),
            items=shell_items(request, self._config),
        )


def shell_items(request: OrderRequest, config: SandboxConfig) -> list[OrderItem]:
    """The order's lines before minting: wallets are shells carrying the partner's values.

    A shell has an all-zero ``walletId``, an empty ``walletReferenceNumber``, and the
    external reference number and name the partner gave for it.
    """
    lines = []
    for index, line in enumerate(request.items):
        item = config.catalog.get(line.item_number)
        names = (line.wallet.names if line.wallet else None) or []
        references = (line.wallet.external_reference_numbers if line.wallet else None) or []
        count = item.wallet_count(line.quantity) if item else 0
        wallets = [
            Wallet(
                seq_no=seq + 1,
                wallet_id=ZERO_GUID,
                wallet_reference_number="",
                external_reference_number=references[seq] if seq < len(references) else None,
                name=names[seq] if seq < len(names) else None,
            )
            for seq in range(count)
        ]
        lines.append(
            OrderItem(
                line_no=(index + 1) * config.line_step,
                item_number=item.item_number if item else line.item_number,
                description=item.description if item else None,
                is_package=item.is_package if item else False,
                quantity=line.quantity,
                visit_date=line.visit_date,
                visit_time=line.visit_time,
                sell_to_name=request.sell_to_name,
                sell_to_email=request.sell_to_email,
                sell_to_language=request.sell_to_language,
                wallets=wallets,
            )
        )
    return lines


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
    sync = (args.get("sync") or "").strip().lower() in _TRUE
    last_row_version = None
    if args.get("lastRowVersion"):
        last_row_version = _int_param(args, "lastRowVersion", 0, None)
        sync = True  # a row-version floor only makes sense in row-version order
    page_size = (
        _int_param(args, "pageSize", 1, MAX_PAGE_SIZE) if args.get("pageSize") else MAX_PAGE_SIZE
    )
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


def _int_param(args: Mapping[str, str], name: str, low: int, high: int | None) -> int:
    try:
        value = int(args[name])
    except ValueError:
        value = low - 1
    if value < low or (high is not None and value > high):
        bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise InvalidRequest(f"{name} must be an integer {bounds}")
    return value


def _instant_param(args: Mapping[str, str], name: str) -> dt.datetime | None:
    text = args.get(name)
    if not text:
        return None
    try:
        moment = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise InvalidRequest(f"{name} must be an ISO 8601 date-time, not '{text}'") from None
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


def _decode_page_key(text: str, partner_id: str) -> dict[str, Any]:
    """The page key's content.

    Raises:
        InvalidRequest: the key is garbled or belongs to another partner's list.
    """
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        key = json.loads(raw)
    except (binascii.Error, ValueError):
        raise InvalidRequest("pageKey is not a page key this list issued") from None
    if not isinstance(key, dict) or not isinstance(key.get("f"), dict):
        raise InvalidRequest("pageKey is not a page key this list issued")
    if key.get("p") != partner_id:
        raise InvalidRequest("pageKey belongs to another partner's list")
    return key
