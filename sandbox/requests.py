"""createOrder and replaceOrder bodies, read as the venue reads them.

The venue parses the JSON by hand (ChannelMgrOrderAgent ``TryParseHeader``,
``TryParseItems``, ``TryParseItem``, ``TryParseWalletBlock``,
``TryParseComponentScheduleEntry``, ``GetRequired*Field``), so this module does too,
with the venue's rules and messages, and keeps its own request types: it must not share
the partner client's reading of the API (:mod:`venue.models`). Every refusal is an
:class:`~sandbox.errors.InvalidRequest` (400 ``generic_error``) with the venue's message;
the first problem found wins, in the venue's order:

- the body must be an object (``Body must be a JSON object``);
- header: ``partnerId`` (required text, a GUID), ``sellToOrderReference`` (required
  text), ``sellToEmail`` / ``sellToName`` / ``sellToLanguage`` / ``paymentReference``
  (optional, primitive when present). Required fields are ``missing``, ``must be a
  primitive value``, ``cannot be null`` or ``cannot be empty``;
- (the caller checks the partner and duplicates here, as the venue does, before items);
- ``items``: required, an array, not empty; each item an object with ``itemNumber`` (a
  catalog item), ``quantity`` (absent or null is 1; below 1 refused), ``visitDate``
  (``YYYY-MM-DD``, not before the venue's local today) and ``visitTime`` (``HH:mm:ss``),
  optional per-line ``sellToEmail`` / ``sellToName`` / ``sellToLanguage`` (null clears);
- ``wallet`` (only when an object): ``names`` and ``externalReferenceNumbers`` (only when
  arrays) must hold exactly one entry per wallet — the quantity, or 1 for a group ticket
  (``ExpectedWalletCount``); ``componentSchedule`` (only when an array) is refused on
  anything but a package, and each entry must be an object naming one of the package's
  components with a required ``visitDate`` and ``visitTime``, not in the past.

Values the venue would fail to convert (``AsInteger`` on text, ``AsDate`` on
``2026-02-30``) end its handler with a runtime error, which its API layer answers as a
400 ``generic_error`` too; the messages here say which field.
"""

from __future__ import annotations

import datetime as dt
import re
import uuid
from dataclasses import dataclass
from typing import Any

from sandbox.catalog import Catalog, ItemKind
from sandbox.errors import InvalidRequest

# ChannelMgrOrderAgent GetRequiredDateField / GetRequiredTimeField.
DATE_PATTERN = re.compile(r"^\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])$")
TIME_PATTERN = re.compile(r"^([01]\d|2[0-3]):[0-5]\d:[0-5]\d$")
_GUID = re.compile(
    r"^\{?([0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})\}?$"
)
# The CMOrder / CMOrderLine / CMOrderWallet fields the venue cuts values to.
CODE_50 = 50
TEXT_100 = 100
CODE_10 = 10
ITEM_NO = 20


@dataclass(frozen=True)
class ScheduleEntry:
    """One ``componentSchedule`` entry: a package component moved to another visit."""

    item_number: str
    visit_date: dt.date
    visit_time: dt.time


@dataclass(frozen=True)
class RequestLine:
    """One parsed item: the catalog item, the visit, and what its wallets get.

    ``names`` and ``external_reference_numbers`` hold one entry per wallet when the
    partner sent the array, else ``None``; ``component_schedule`` is ``None`` unless the
    partner sent an array.
    """

    item_number: str
    quantity: int
    visit_date: dt.date
    visit_time: dt.time
    sell_to_email: str
    sell_to_name: str
    sell_to_language: str
    names: tuple[str, ...] | None = None
    external_reference_numbers: tuple[str, ...] | None = None
    component_schedule: tuple[ScheduleEntry, ...] | None = None


@dataclass(frozen=True)
class Header:
    """The order's header fields as the venue keeps them."""

    partner_id: str
    sell_to_order_reference: str
    sell_to_email: str
    sell_to_name: str
    sell_to_language: str
    payment_reference: str


@dataclass(frozen=True)
class VenueRequest:
    """A createOrder/replaceOrder body as the venue parsed it: header and items."""

    header: Header
    items: tuple[RequestLine, ...]

    def to_wire(self) -> dict[str, Any]:
        """The request as JSON, for the order store."""
        header = self.header
        return {
            "partnerId": header.partner_id,
            "sellToOrderReference": header.sell_to_order_reference,
            "sellToEmail": header.sell_to_email,
            "sellToName": header.sell_to_name,
            "sellToLanguage": header.sell_to_language,
            "paymentReference": header.payment_reference,
            "items": [_line_wire(line) for line in self.items],
        }

    @classmethod
    def from_wire(cls, raw: dict[str, Any]) -> VenueRequest:
        """A request :meth:`to_wire` wrote."""
        header = Header(
            partner_id=raw["partnerId"],
            sell_to_order_reference=raw["sellToOrderReference"],
            sell_to_email=raw["sellToEmail"],
            sell_to_name=raw["sellToName"],
            sell_to_language=raw["sellToLanguage"],
            payment_reference=raw["paymentReference"],
        )
        return cls(header, tuple(_line_from_wire(line) for line in raw["items"]))


def _line_wire(line: RequestLine) -> dict[str, Any]:
    return {
        "itemNumber": line.item_number,
        "quantity": line.quantity,
        "visitDate": line.visit_date.isoformat(),
        "visitTime": line.visit_time.isoformat(),
        "sellToEmail": line.sell_to_email,
        "sellToName": line.sell_to_name,
        "sellToLanguage": line.sell_to_language,
        "names": None if line.names is None else list(line.names),
        "externalReferenceNumbers": (
            None
            if line.external_reference_numbers is None
            else list(line.external_reference_numbers)
        ),
        "componentSchedule": (
            None
            if line.component_schedule is None
            else [
                {
                    "itemNumber": e.item_number,
                    "visitDate": e.visit_date.isoformat(),
                    "visitTime": e.visit_time.isoformat(),
                }
                for e in line.component_schedule
            ]
        ),
    }


def _line_from_wire(raw: dict[str, Any]) -> RequestLine:
    schedule = raw.get("componentSchedule")
    return RequestLine(
        item_number=raw["itemNumber"],
        quantity=raw["quantity"],
        visit_date=dt.date.fromisoformat(raw["visitDate"]),
        visit_time=dt.time.fromisoformat(raw["visitTime"]),
        sell_to_email=raw["sellToEmail"],
        sell_to_name=raw["sellToName"],
        sell_to_language=raw["sellToLanguage"],
        names=None if raw.get("names") is None else tuple(raw["names"]),
        external_reference_numbers=(
            None
            if raw.get("externalReferenceNumbers") is None
            else tuple(raw["externalReferenceNumbers"])
        ),
        component_schedule=(
            None
            if schedule is None
            else tuple(
                ScheduleEntry(
                    e["itemNumber"],
                    dt.date.fromisoformat(e["visitDate"]),
                    dt.time.fromisoformat(e["visitTime"]),
                )
                for e in schedule
            )
        ),
    )


# --- the venue's field readers (GetRequiredField and friends) ---------------------------


def _is_value(token: Any) -> bool:
    """Whether a JSON token is a value (``JsonToken.IsValue``): not an object or array."""
    return not isinstance(token, dict | list)


def _as_text(value: Any) -> str:
    """``JsonValue.AsText``: text as is, numbers and booleans as JSON writes them."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def required_field(obj: dict[str, Any], name: str) -> Any:
    """ChannelMgrOrderAgent GetRequiredField: present, a primitive value, not null."""
    if name not in obj:
        raise InvalidRequest(f"Required field '{name}' is missing")
    token = obj[name]
    if not _is_value(token):
        raise InvalidRequest(f"Required field '{name}' must be a primitive value")
    if token is None:
        raise InvalidRequest(f"Required field '{name}' cannot be null")
    return token


def required_text(obj: dict[str, Any], name: str) -> str:
    """ChannelMgrOrderAgent GetRequiredTextField: a required value whose text is not empty."""
    text = _as_text(required_field(obj, name))
    if text == "":
        raise InvalidRequest(f"Required field '{name}' cannot be empty")
    return text


def optional_text(obj: dict[str, Any], name: str) -> str:
    """ChannelMgrOrderAgent GetOptionalTextField: absent or null is ``""``."""
    if name not in obj:
        return ""
    token = obj[name]
    if not _is_value(token):
        raise InvalidRequest(f"Optional field '{name}' must be a primitive value")
    return "" if token is None else _as_text(token)


def required_date(obj: dict[str, Any], name: str) -> dt.date:
    """ChannelMgrOrderAgent GetRequiredDateField: ``YYYY-MM-DD`` text of a real date."""
    text = _as_text(required_field(obj, name))
    if not DATE_PATTERN.match(text):
        raise InvalidRequest(f"Required field '{name}' must be YYYY-MM-DD")
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise InvalidRequest(f"Field '{name}': '{text}' is not a valid date") from None


def required_time(obj: dict[str, Any], name: str) -> dt.time:
    """ChannelMgrOrderAgent GetRequiredTimeField: ``HH:mm:ss`` text, no fractions."""
    text = _as_text(required_field(obj, name))
    if not TIME_PATTERN.match(text):
        raise InvalidRequest(f"Required field '{name}' must be HH:mm:ss")
    return dt.time.fromisoformat(text)


def _cut(text: str, length: int) -> str:
    """``CopyStr(text, 1, length)``: what a field of ``length`` characters keeps."""
    return text[:length]


def upper(text: str) -> str:
    """``Text.ToUpper()`` as .NET does it: one character for one (``ß`` stays ``ß``)."""
    return "".join(c.upper() if len(c.upper()) == 1 else c for c in text)


def _code(text: str, length: int) -> str:
    """``CopyStr`` of the upper-cased text into a Business Central ``Code`` field.

    Cut to the field's length first, then trimmed (a Code keeps no leading or trailing
    blanks): ``" english-gb"`` into Code[10] is ``"ENGLISH-G"``.
    """
    return upper(text)[:length].strip()


# --- parsing ----------------------------------------------------------------------------


def body_object(body: Any) -> dict[str, Any]:
    """The body as a JSON object (ChannelMgrOrderAgent CreateOrder / ReplaceOrder)."""
    if not isinstance(body, dict):
        raise InvalidRequest("Body must be a JSON object")
    return body


def parse_header(body: dict[str, Any], payment_length: int = CODE_50) -> Header:
    """ChannelMgrOrderAgent TryParseHeader.

    Args:
        body: the request body.
        payment_length: the width of CMOrder.PaymentReference (Code[50]; Code[20] in the
            older synchronous version).

    Raises:
        InvalidRequest: with the venue's message for the first problem.
    """
    partner_text = required_text(body, "partnerId")
    match = _GUID.match(partner_text.strip())
    if match is None:
        raise InvalidRequest("partnerId is not a valid GUID")
    reference = required_text(body, "sellToOrderReference")
    email = optional_text(body, "sellToEmail")
    name = optional_text(body, "sellToName")
    language = optional_text(body, "sellToLanguage")
    payment = optional_text(body, "paymentReference")
    return Header(
        partner_id=str(uuid.UUID(match.group(1))),
        sell_to_order_reference=_code(reference, CODE_50),
        sell_to_email=_cut(email, TEXT_100),
        sell_to_name=_cut(name, TEXT_100),
        sell_to_language=_code(language, CODE_10),
        payment_reference=_code(payment, payment_length),
    )


LINE_STEP = 100_000
"""Lines are numbered 100000, 200000, … (ChannelMgrOrderAgent TryParseItems ``LineNo +=
100000``, in the older synchronous version too)."""


def parse_items(
    body: dict[str, Any], header: Header, catalog: Catalog, today: dt.date
) -> tuple[RequestLine, ...]:
    """ChannelMgrOrderAgent TryParseItems / TryParseItem / TryParseWalletBlock.

    Args:
        body: the request body.
        header: its parsed header (per-line customer fields default to it).
        catalog: the items the venue sells.
        today: the venue's local date; visits before it are refused.

    Raises:
        InvalidRequest: with the venue's message for the first problem.
    """
    if "items" not in body:
        raise InvalidRequest("items array is required")
    items = body["items"]
    if not isinstance(items, list):
        raise InvalidRequest("items must be an array")
    if not items:
        raise InvalidRequest("items array must contain at least one entry")
    return tuple(
        _parse_item(token, index, (index + 1) * LINE_STEP, header, catalog, today)
        for index, token in enumerate(items)
    )


def _parse_item(
    token: Any, index: int, line_no: int, header: Header, catalog: Catalog, today: dt.date
) -> RequestLine:
    """ChannelMgrOrderAgent TryParseItem: one line, its wallets and schedule."""
    if not isinstance(token, dict):
        raise InvalidRequest(f"items[{index}] must be an object")
    number = required_text(token, "itemNumber")
    item = catalog.get(number[:ITEM_NO])
    if item is None:
        raise InvalidRequest(f"Unknown item '{number}'")
    quantity = _quantity(token, index)
    if quantity < 1:
        raise InvalidRequest(f"quantity must be >= 1 (line {line_no})")
    visit_date = required_date(token, "visitDate")
    visit_time = required_time(token, "visitTime")
    if visit_date < today:
        raise InvalidRequest(
            f"items[{index}] visitDate must not be in the past"
            f" (received {visit_date.isoformat()}, local today {today.isoformat()})"
        )
    line = RequestLine(
        item_number=item.item_number,
        quantity=quantity,
        visit_date=visit_date,
        visit_time=visit_time,
        sell_to_email=_cut(_line_text(token, "sellToEmail", header.sell_to_email), TEXT_100),
        sell_to_name=_cut(_line_text(token, "sellToName", header.sell_to_name), TEXT_100),
        sell_to_language=_code(
            _line_text(token, "sellToLanguage", header.sell_to_language), CODE_10
        ),
    )
    wallet = token.get("wallet")
    if not isinstance(wallet, dict):
        return line  # the venue reads the block only when it is an object
    # ExpectedWalletCount: a group ticket issues one wallet, anything else one per unit.
    count = 1 if item.kind is ItemKind.GROUP else quantity
    names = _per_wallet(wallet, "names", count, line_no)
    references = _per_wallet(wallet, "externalReferenceNumbers", count, line_no)
    schedule = None
    if isinstance(wallet.get("componentSchedule"), list):
        if not item.is_package:
            raise InvalidRequest(
                f"wallet.componentSchedule is only valid for package items (line {line_no})"
            )
        schedule = tuple(
            _schedule_entry(entry, index, line_no, item.item_number, catalog, today)
            for entry in wallet["componentSchedule"]
        )
    return RequestLine(
        **{
            **line.__dict__,
            "names": names,
            "external_reference_numbers": references,
            "component_schedule": schedule,
        }
    )


def _quantity(token: dict[str, Any], index: int) -> int:
    """``quantity``: absent or null is 1; otherwise the venue reads it as an integer."""
    value = token.get("quantity")
    if value is None:
        return 1
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
        raise InvalidRequest(f"items[{index}] quantity '{_as_text(value)}' is not an integer")
    return int(value)


def _line_text(token: dict[str, Any], name: str, default: str) -> str:
    """A per-line customer field: absent is the header's, null is empty."""
    if name not in token:
        return default
    value = token[name]
    if value is None:
        return ""
    if not _is_value(value):
        raise InvalidRequest(f"Field '{name}' of an item must be a primitive value")
    return _as_text(value)


def _per_wallet(
    wallet: dict[str, Any], name: str, count: int, line_no: int
) -> tuple[str, ...] | None:
    """``names`` / ``externalReferenceNumbers``: exactly one entry per wallet when an array."""
    values = wallet.get(name)
    if not isinstance(values, list):
        return None
    if len(values) != count:
        raise InvalidRequest(
            f"wallet.{name} array length ({len(values)}) must equal {count} on line {line_no}"
        )
    entries = []
    for value in values:
        if not _is_value(value):
            raise InvalidRequest(f"wallet.{name} entries must be primitive values (line {line_no})")
        entries.append(_cut("" if value is None else _as_text(value), TEXT_100))
    return tuple(entries)


def _schedule_entry(
    token: Any, index: int, line_no: int, package: str, catalog: Catalog, today: dt.date
) -> ScheduleEntry:
    """ChannelMgrOrderAgent TryParseComponentScheduleEntry."""
    if not isinstance(token, dict):
        raise InvalidRequest(f"wallet.componentSchedule entries must be objects (line {line_no})")
    number = required_text(token, "itemNumber")
    item = catalog.get(package)
    components = {c.item_number.upper() for c in item.components} if item else set()
    if number.strip().upper()[:ITEM_NO] not in components:
        raise InvalidRequest(
            f"'{number}' is not a component of package '{package}' (line {line_no})"
        )
    visit_date = required_date(token, "visitDate")
    visit_time = required_time(token, "visitTime")
    if visit_date < today:
        raise InvalidRequest(
            f"items[{index}].componentSchedule entry '{number}' visitDate must not be in the"
            f" past (received {visit_date.isoformat()}, local today {today.isoformat()})"
        )
    return ScheduleEntry(number.strip().upper(), visit_date, visit_time)
