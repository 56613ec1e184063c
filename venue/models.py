"""Wire models of the OTA Channel Manager API: what otacm sends and what the venue answers.

These mirror the JSON the venue sends and accepts (``spec/API.md``): camelCase on the
wire, snake_case in Python. The requests (:class:`OrderRequest`, :class:`ConfirmRequest`)
refuse what the venue would refuse or cut; the answers (:class:`Order`,
:class:`OrderSummary`, a list's :class:`Page`, :class:`ErrorBody`) tolerate unknown
fields, because the venue adds fields between API versions; money is ``Decimal``; times
are aware UTC. Both the current asynchronous responses and the older synchronous ones
(which lack ``buyFromOrderReference``) parse. The value types the fields are declared
with, and the rules for ids and references, are :mod:`venue.values`; the webhook's
bodies are :mod:`venue.webhooks`.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable
from decimal import Decimal
from enum import StrEnum
from typing import Annotated, Any, Generic, TypeVar

import pydantic_core
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    SerializationInfo,
    SerializerFunctionWrapHandler,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
)
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticCustomError

from venue.values import (
    BlankAsNone,
    Guid,
    OptionalDate,
    OptionalText,
    OptionalTime,
    PersonalText,
    RowVersion,
    UtcDateTime,
    guid_or_none,
    parse_guid,
    parse_row_version,
)


class WireModel(BaseModel):
    """Base of every wire model: camelCase aliases, unknown fields kept, not rejected."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="allow",
        frozen=True,
    )

    def to_wire(self) -> dict[str, Any]:
        """The JSON-ready dict the venue expects (camelCase, no ``None`` values)."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class OrderStatus(StrEnum):
    """An order's status at the venue, by its plain name (CMOrderStatus.Enum.al).

    Single-order answers write the plain name; list summaries are written by the venue's
    generic formatter, which renders the enum by its caption (``Processing...``). Both
    read as the same member here, in any case: this is the one place that maps them.
    """

    SUBMITTED = "Submitted"
    SCHEDULED = "Scheduled"
    PROCESSING = "Processing"
    DRAFT = "Draft"
    ISSUED = "Issued"
    ERROR = "Error"
    CANCELLED = "Cancelled"

    @property
    def caption(self) -> str:
        """The status as the venue formats it into text (CMOrderStatus ``Caption``): list
        summaries and messages that name a status (deleteOrder's "mid-flight") carry it."""
        return _STATUS_CAPTIONS.get(self, self.value)

    @classmethod
    def _missing_(cls, value: object) -> OrderStatus | None:
        # Called for anything that is not exactly a plain name: a caption, another case.
        if not isinstance(value, str):
            return None
        return _STATUS_BY_TEXT.get(value.strip().casefold())

    @property
    def in_flight(self) -> bool:
        """Submitted, Scheduled and Processing are one state to the partner: not done yet."""
        return self in IN_FLIGHT_STATUSES

    @property
    def settled(self) -> bool:
        """A processing run has left the order here; a webhook may announce it."""
        return self in (OrderStatus.DRAFT, OrderStatus.ISSUED, OrderStatus.ERROR)


IN_FLIGHT_STATUSES = frozenset(
    {OrderStatus.SUBMITTED, OrderStatus.SCHEDULED, OrderStatus.PROCESSING}
)

# CMOrderStatus.Enum.al: every caption equals its name except Processing's.
_STATUS_CAPTIONS = {OrderStatus.PROCESSING: "Processing..."}
_STATUS_BY_TEXT = {
    text.casefold(): status
    for status in OrderStatus
    for text in (status.value, _STATUS_CAPTIONS.get(status, status.value))
}


# --- requests -------------------------------------------------------------------------


# ChannelMgrOrderAgent GetRequiredDateField / GetRequiredTimeField: the venue matches the
# text against these before it reads a date or a time, and refuses anything else.
VISIT_DATE_PATTERN = re.compile(r"^\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])$")
VISIT_TIME_PATTERN = re.compile(r"^([01]\d|2[0-3]):[0-5]\d:[0-5]\d$")


def _visit_date(value: Any) -> dt.date:
    """A visit date exactly as the venue takes it: ``YYYY-MM-DD`` text (or a ``date``)."""
    if isinstance(value, dt.date) and not isinstance(value, dt.datetime):
        return value
    if not isinstance(value, str) or not VISIT_DATE_PATTERN.match(value):
        raise PydanticCustomError("visit_date", "must be a date as YYYY-MM-DD")
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise PydanticCustomError(
            "visit_date", "{value} is not a date of the calendar", {"value": value}
        ) from None


def _visit_time(value: Any) -> dt.time:
    """A visit time exactly as the venue takes it: ``HH:mm:ss`` text, no fractions."""
    if isinstance(value, dt.time):
        if value.microsecond or value.tzinfo is not None:
            raise PydanticCustomError(
                "visit_time", "must be a time as HH:mm:ss, without fractions or offset"
            )
        return value
    if not isinstance(value, str) or not VISIT_TIME_PATTERN.match(value):
        raise PydanticCustomError("visit_time", "must be a time as HH:mm:ss")
    return dt.time.fromisoformat(value)


VisitDate = Annotated[
    dt.date,
    PlainValidator(_visit_date),
    PlainSerializer(lambda value: value.isoformat(), return_type=str, when_used="json"),
]
VisitTime = Annotated[
    dt.time,
    PlainValidator(_visit_time),
    PlainSerializer(lambda value: value.strftime("%H:%M:%S"), return_type=str, when_used="json"),
]


# The widths of the venue's fields (CMOrder.Table, CMOrderLine.Table, CMOrderWallet.Table).
# ChannelMgrOrderAgent TryParseHeader, TryParseItem and TryParseWalletBlock copy request
# text into them with CopyStr(…, MaxStrLen): longer text is cut without a word, and a cut
# e-mail sends tickets elsewhere, a cut reference no longer matches. So it is refused here.
TEXT_MAX_CHARS = 100
"""``sellToEmail``, ``sellToName`` (header and line), wallet names and external reference
numbers: Text[100]."""
LANGUAGE_MAX_CHARS = 10
"""``sellToLanguage`` (header and line): Code[10], upper-cased by the venue."""
REFERENCE_MAX_CHARS = 50
"""``sellToOrderReference`` and ``paymentReference``: Code[50] (CMOrder). The older
synchronous version stored ``paymentReference`` as Code[20] (CMOrder at 43834b3b8)."""
ITEM_NUMBER_MAX_CHARS = 20
"""``itemNumber`` (line and component schedule): looked up as the catalog's Code[20]
(``Item."No."``, NpIa Item AddOn Line ``Item No.``) after the same cut, so a longer number
would be read as another item's."""


def _at_most(limit: int, *, code: bool = False) -> AfterValidator:
    """Refuse text longer than a venue field of ``limit`` characters, which would be cut.

    A ``Code`` field is trimmed after the cut, so trailing blanks are not counted for it.
    """

    def check(value: str | None) -> str | None:
        if value is None:
            return None
        kept = value.rstrip() if code else value
        if len(kept) > limit:
            raise PydanticCustomError(
                "too_long",
                "at most {limit} characters: the venue would cut the rest",
                {"limit": limit},
            )
        return value

    return AfterValidator(check)


def _guid_text(value: str) -> str:
    """ChannelMgrOrderAgent TryParseHeader: ``partnerId`` must read as a GUID."""
    if parse_guid(value) is None:
        raise PydanticCustomError("guid", "is not a valid GUID")
    return value


ItemNumber = Annotated[str, Field(min_length=1), _at_most(ITEM_NUMBER_MAX_CHARS, code=True)]
# Customer data: kept out of reprs, and as long as the venue's field.
CustomerText = Annotated[str | None, _at_most(TEXT_MAX_CHARS), Field(default=None, repr=False)]
LanguageCode = Annotated[
    str | None, _at_most(LANGUAGE_MAX_CHARS, code=True), Field(default=None, repr=False)
]
WalletText = Annotated[str, _at_most(TEXT_MAX_CHARS)]


def _one_when_null(value: Any) -> Any:
    """ChannelMgrOrderAgent TryParseItem: a null ``quantity`` is the default, 1."""
    return 1 if value is None else value


class ComponentScheduleEntry(WireModel):
    """One component of a package line moved to its own visit.

    As the venue refuses them (ChannelMgrOrderAgent TryParseComponentScheduleEntry): an
    object with ``itemNumber`` (required text), ``visitDate`` and ``visitTime`` (required,
    ``YYYY-MM-DD`` and ``HH:mm:ss``). Whether the item is a component of the line's
    package only the venue knows; it answers that.
    """

    item_number: ItemNumber
    visit_date: VisitDate
    visit_time: VisitTime


class WalletRequest(WireModel):
    """Per-line wallet options of an order request.

    ``names`` and ``externalReferenceNumbers``, when given, hold one entry per wallet the
    line issues (ChannelMgrOrderAgent TryParseWalletBlock); an empty list is refused, and
    an entry longer than the venue's Text[100] too (it would be cut).

    ``componentSchedule`` must be a list when given (``null`` is no schedule): the venue
    ignores any other value, so the package's components would quietly keep the line's
    visit, which is surely not what was meant.
    """

    names: list[WalletText] | None = Field(default=None, min_length=1, repr=False)
    external_reference_numbers: list[WalletText] | None = Field(default=None, min_length=1)
    component_schedule: list[ComponentScheduleEntry] | None = None


class OrderRequestItem(WireModel):
    """One line of an order request: a catalog item, a visit, a quantity.

    ``sellToEmail``, ``sellToName`` and ``sellToLanguage`` override the header's for this
    line's tickets (ChannelMgrOrderAgent TryParseItem); given as ``null`` they clear it
    ("" at the venue), which is sent as ``null``, not left out.

    As the venue refuses them (ChannelMgrOrderAgent TryParseItem): ``visitDate`` and
    ``visitTime`` are required, exactly ``YYYY-MM-DD`` and ``HH:mm:ss``; ``quantity`` is
    optional (absent or null is 1) and at least 1. A wallet list must match the wallets
    the line issues (ExpectedWalletCount): the quantity, or 1 for a group ticket — which
    only the catalog knows, so both are accepted here and the venue decides.
    """

    item_number: ItemNumber
    visit_date: VisitDate
    visit_time: VisitTime
    quantity: Annotated[int, BeforeValidator(_one_when_null)] = Field(default=1, ge=1)
    sell_to_email: CustomerText
    sell_to_name: CustomerText
    sell_to_language: LanguageCode
    wallet: WalletRequest | None = None

    @model_serializer(mode="wrap")
    def _explicit_nulls_kept(
        self, handler: SerializerFunctionWrapHandler, info: SerializationInfo
    ) -> dict[str, Any]:
        # ChannelMgrOrderAgent TryParseItem: a line's sellTo* given as null is "" (this line
        # gets no e-mail), absent is the header's. to_wire drops None values, which would
        # turn one into the other, so a null the request held is written back.
        data: dict[str, Any] = handler(self)
        for name in _LINE_OVERRIDES:
            if name in self.model_fields_set and getattr(self, name) is None:
                data[to_camel(name) if info.by_alias else name] = None
        return data

    @field_validator("wallet")
    @classmethod
    def _one_entry_per_wallet(
        cls, wallet: WalletRequest | None, info: ValidationInfo
    ) -> WalletRequest | None:
        quantity = info.data.get("quantity")
        if wallet is None or not isinstance(quantity, int):
            return wallet
        for name, values in (
            ("names", wallet.names),
            ("externalReferenceNumbers", wallet.external_reference_numbers),
        ):
            if values is not None and len(values) not in (quantity, 1):
                raise PydanticCustomError(
                    "wallet_count",
                    "{name} holds {count} entries; a line of quantity {quantity} issues"
                    " {quantity} wallets (1 for a group ticket), one entry each",
                    {"name": name, "count": len(values), "quantity": quantity},
                )
        return wallet


_LINE_OVERRIDES = ("sell_to_email", "sell_to_name", "sell_to_language")

PaymentReference = Annotated[str, _at_most(REFERENCE_MAX_CHARS, code=True)]


class OrderRequest(WireModel):
    """The body of createOrder and replaceOrder.

    ``partnerId`` must read as a GUID (ChannelMgrOrderAgent TryParseHeader); text the
    venue would cut to its field's width is refused (see :data:`TEXT_MAX_CHARS` and the
    other widths).
    """

    partner_id: Annotated[str, AfterValidator(_guid_text)]
    sell_to_order_reference: Annotated[str, _at_most(REFERENCE_MAX_CHARS, code=True)] = Field(
        min_length=1
    )
    sell_to_email: CustomerText
    sell_to_name: CustomerText
    sell_to_language: LanguageCode
    payment_reference: PaymentReference | None = None
    items: list[OrderRequestItem] = Field(min_length=1)


class ConfirmRequest(WireModel):
    """The body of confirmOrder."""

    payment_reference: PaymentReference = Field(min_length=1)


# --- responses ------------------------------------------------------------------------


class Asset(WireModel):
    """A minted ticket or coupon inside a wallet."""

    id: BlankAsNone
    type: BlankAsNone
    asset_id: BlankAsNone
    reference_number: BlankAsNone
    item_number: BlankAsNone
    description: BlankAsNone


class Wallet(WireModel):
    """A wallet: one admission (or one package) with its assets and price.

    Before minting the venue returns a shell: empty ``walletReferenceNumber``, an all-zero
    ``walletId``, and the external reference number the partner supplied.
    """

    seq_no: int | None = None
    wallet_id: BlankAsNone
    wallet_reference_number: BlankAsNone
    external_reference_number: BlankAsNone
    name: PersonalText
    issued_at: UtcDateTime
    unit_price_excl_vat: Decimal | None = None
    unit_price_incl_vat: Decimal | None = None
    currency_code: BlankAsNone
    manifest_url: BlankAsNone
    assets: list[Asset] = Field(default_factory=list)


class OrderItem(WireModel):
    """A line of a venue order with the wallets it issued."""

    line_no: int
    item_number: str
    description: BlankAsNone
    is_package: bool = False
    quantity: int = 0
    visit_date: OptionalDate
    visit_time: OptionalTime
    sell_to_name: PersonalText
    sell_to_email: PersonalText
    sell_to_language: BlankAsNone
    wallets: list[Wallet] = Field(default_factory=list)


class OrderHeader(WireModel):
    """The header fields shared by full orders and list summaries.

    Ids are canonical GUIDs and blank text is ``None`` (:data:`~venue.values.Guid`,
    :data:`~venue.values.BlankAsNone`): every reader gets the values as the mirror stores
    them.
    """

    order_id: Guid
    status: OrderStatus
    status_message: BlankAsNone
    partner_id: Guid
    sell_to_order_reference: str
    # Absent from the older synchronous API's responses.
    buy_from_order_reference: BlankAsNone
    received_at: UtcDateTime
    sell_to_email: PersonalText
    sell_to_name: PersonalText
    sell_to_language: BlankAsNone
    payment_reference: BlankAsNone
    job_id: BlankAsNone
    manifest_url: BlankAsNone


class Order(OrderHeader):
    """A full order as getOrder (and create, confirm, replace, delete) return it."""

    items: list[OrderItem] = Field(default_factory=list)


class OrderSummary(OrderHeader):
    """A compact order from listOrdersByPartner.

    ``id`` is the record's SystemId (a GUID), not the orderId; ``rowVersion`` (present
    with ``sync=true``) is the database's row version, written as text
    (APIRequest ``GetRecords`` / ``AddFieldToJson``).
    """

    id: BlankAsNone
    row_version: RowVersion


ItemT = TypeVar("ItemT", bound=BaseModel)


class UnreadableRow(WireModel):
    """A list row that does not parse, with the ids that could still be read from it.

    Only ids and the names of the fields at fault are kept: the row's values may be
    personal (names, e-mails), so they never reach a log.

    Attributes:
        index: the row's position on its page, from 0.
        order_id: its ``orderId`` when that is a GUID (lowercase), else ``None``.
        record_id: its ``id`` (the record's SystemId) when that is a GUID, else ``None``.
        row_version: its ``rowVersion`` when that reads, else ``None``.
        problem: which fields are wrong and how, without their values.
    """

    index: int
    order_id: str | None = None
    record_id: str | None = None
    row_version: int | None = None
    problem: str


class Page(WireModel, Generic[ItemT]):
    """One page of a cursor-paged list.

    The venue's examples also show bare JSON arrays; :func:`parse_page` accepts both.
    ``unreadable`` holds the rows left out of ``data`` because they do not parse (only
    when the caller asked for that); it is never read from the wire.
    """

    more_pages: bool = False
    next_page_key: OptionalText
    next_page_url: Annotated[str | None, Field(default=None, alias="nextPageURL")]
    data: list[ItemT] = Field(default_factory=list)
    unreadable: list[UnreadableRow] = Field(default_factory=list, exclude=True)


class _Envelope(WireModel):
    """A list page with its rows not yet parsed."""

    more_pages: bool = False
    next_page_key: OptionalText
    next_page_url: Annotated[str | None, Field(default=None, alias="nextPageURL")]
    data: list[Any] = Field(default_factory=list)


RowCheck = Callable[[Any], str | None]
"""A further check of one raw row: what is wrong with it (no values), or ``None``."""


def parse_page(
    content: bytes | str,
    item_type: type[ItemT],
    *,
    skip_unreadable: bool = False,
    row_check: RowCheck | None = None,
) -> Page[ItemT]:
    """Parse a list response, whether a page envelope or a bare array.

    Args:
        content: the response body.
        item_type: the model of one row.
        skip_unreadable: a row that does not parse (or fails ``row_check``) is left out
            of ``data`` and described in ``unreadable`` instead of failing the page.
        row_check: a further check of each raw row.

    Raises:
        pydantic.ValidationError: the body is not a list response, or (unless
            ``skip_unreadable``) a row is not an ``item_type``.
        ValueError: a row fails ``row_check`` (unless ``skip_unreadable``).
    """
    # pydantic's parser, as for single bodies: it refuses unpaired surrogates, json does not.
    raw = pydantic_core.from_json(content)
    if isinstance(raw, list):
        raw = {"morePages": False, "data": raw}
    elif isinstance(raw, dict) and "value" in raw and "data" not in raw:
        # Business Central's OData list shape, seen on the webhook subscription list.
        raw = {"morePages": False, "data": raw["value"]}
    envelope = _Envelope.model_validate(raw)
    rows: list[ItemT] = []
    unreadable: list[UnreadableRow] = []
    for index, row in enumerate(envelope.data):
        try:
            problem = row_check(row) if row_check is not None else None
            if problem is not None:
                raise ValueError(problem)
            rows.append(item_type.model_validate(row))
        except ValueError as exc:  # a ValidationError too
            if not skip_unreadable:
                raise
            unreadable.append(_unreadable_row(index, row, exc))
    return Page[item_type](  # type: ignore[valid-type]
        more_pages=envelope.more_pages,
        next_page_key=envelope.next_page_key,
        next_page_url=envelope.next_page_url,
        data=rows,
        unreadable=unreadable,
    )


def describe_validation_problem(exc: ValueError) -> str:
    """What is wrong, naming fields, never echoing a value (values may be personal)."""
    if isinstance(exc, ValidationError):
        return "; ".join(
            f"{'.'.join(str(part) for part in error['loc']) or 'body'}: {error['msg']}"
            for error in exc.errors(include_input=False, include_url=False)[:3]
        )
    return str(exc)


def _unreadable_row(index: int, row: Any, exc: ValueError) -> UnreadableRow:
    """The ids that still read from a row that does not parse."""
    fields = row if isinstance(row, dict) else {}
    try:
        written = fields.get("rowVersion")
        row_version = None if written is None else parse_row_version(written)
    except ValueError:
        row_version = None
    return UnreadableRow(
        index=index,
        order_id=guid_or_none(fields.get("orderId")),
        record_id=guid_or_none(fields.get("id")),
        row_version=row_version,
        problem=describe_validation_problem(exc),
    )


class ErrorBody(WireModel):
    """The venue's error body: a stable snake_case ``code`` and a human ``message``."""

    code: str = "unknown_error"
    message: str = ""
