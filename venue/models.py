"""Wire models for the OTA Channel Manager API and its ``ota_cm_order_processed`` webhook.

These mirror the JSON the venue sends and accepts (``spec/API.md``, ``spec/WEBHOOKS.md``):
camelCase on the wire, snake_case in Python. Every model tolerates unknown fields, because
the venue adds fields between API versions; money is ``Decimal``; times are aware UTC.
Both the current asynchronous responses and the older synchronous ones (which lack
``buyFromOrderReference``) parse.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from decimal import Decimal
from enum import StrEnum
from typing import Annotated, Any, Generic, TypeVar

import pydantic_core
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field
from pydantic.alias_generators import to_camel

ORDER_PROCESSED_EVENT = "ota_cm_order_processed"


def _blank_to_none(value: Any) -> Any:
    """The venue sends ``""`` (and Business Central's zero date) for "no value"."""
    if isinstance(value, str) and (value.strip() == "" or value.startswith("0001-01-01")):
        return None
    return value


def _utc(value: dt.datetime | None) -> dt.datetime | None:
    if value is None:
        return None
    if value.tzinfo is None:
        # The venue documents its times as UTC; a missing offset means UTC, not local time.
        return value.replace(tzinfo=dt.UTC)
    return value.astimezone(dt.UTC)


UtcDateTime = Annotated[
    dt.datetime | None,
    BeforeValidator(_blank_to_none),
    AfterValidator(_utc),
    Field(default=None),
]
OptionalDate = Annotated[dt.date | None, BeforeValidator(_blank_to_none), Field(default=None)]
OptionalTime = Annotated[dt.time | None, BeforeValidator(_blank_to_none), Field(default=None)]
OptionalText = Annotated[str | None, Field(default=None)]
# Customer data and shared secrets: kept out of reprs, so out of logs and tracebacks.
PersonalText = Annotated[str | None, Field(default=None, repr=False)]
SecretText = Annotated[str, Field(repr=False)]


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
    """An order's status at the venue."""

    SUBMITTED = "Submitted"
    SCHEDULED = "Scheduled"
    PROCESSING = "Processing"
    DRAFT = "Draft"
    ISSUED = "Issued"
    ERROR = "Error"
    CANCELLED = "Cancelled"

    @property
    def in_flight(self) -> bool:
        """Submitted, Scheduled and Processing are one state to the partner: not done yet."""
        return self in IN_FLIGHT_STATUSES

    @property
    def settled(self) -> bool:
        """A processing run has left the order here; a webhook may announce it."""
        return self in (OrderStatus.DRAFT, OrderStatus.ISSUED, OrderStatus.ERROR)

    @property
    def caption(self) -> str:
        """The status as the venue formats it into text (CMOrderStatus ``Caption``).

        Only Processing differs from its name: ``Processing...``. Messages that name a
        status (deleteOrder's "mid-flight") and list summaries carry the caption.
        """
        return "Processing..." if self is OrderStatus.PROCESSING else self.value


IN_FLIGHT_STATUSES = frozenset(
    {OrderStatus.SUBMITTED, OrderStatus.SCHEDULED, OrderStatus.PROCESSING}
)


def normalize_reference(reference: str) -> str:
    """The venue's form of a reference code: trimmed and upper-cased.

    References compare case-insensitively; this is the one place that decides how.
    """
    return reference.strip().upper()


def reference_set_key(references: Iterable[str | None]) -> str | None:
    """A set of reference codes as one text that compares equal exactly when the sets do.

    Each code in the venue's form (:func:`normalize_reference`), blanks left out, every
    code once, sorted, one per line; ``None`` when no code is left. The external
    reference numbers a sale lists and those its wallets carry are compared this way.
    """
    codes = sorted({normalize_reference(code) for code in references if code and code.strip()})
    return "\n".join(codes) or None


# --- requests -------------------------------------------------------------------------


class WalletRequest(WireModel):
    """Per-line wallet options of an order request."""

    names: list[str] | None = Field(default=None, repr=False)
    external_reference_numbers: list[str] | None = None
    component_schedule: Any = None


class OrderRequestItem(WireModel):
    """One line of an order request: a catalog item, a visit, a quantity."""

    item_number: str
    visit_date: dt.date
    visit_time: dt.time | None = None
    quantity: int = Field(ge=1)
    wallet: WalletRequest | None = None


class OrderRequest(WireModel):
    """The body of createOrder and replaceOrder."""

    partner_id: str
    sell_to_order_reference: str = Field(min_length=1)
    sell_to_email: PersonalText
    sell_to_name: PersonalText
    sell_to_language: OptionalText
    payment_reference: OptionalText
    items: list[OrderRequestItem] = Field(min_length=1)


class ConfirmRequest(WireModel):
    """The body of confirmOrder."""

    payment_reference: str = Field(min_length=1)


# --- responses ------------------------------------------------------------------------


class Asset(WireModel):
    """A minted ticket or coupon inside a wallet."""

    id: OptionalText
    type: OptionalText
    asset_id: OptionalText
    reference_number: OptionalText
    item_number: OptionalText
    description: OptionalText


class Wallet(WireModel):
    """A wallet: one admission (or one package) with its assets and price.

    Before minting the venue returns a shell: empty ``walletReferenceNumber``, an all-zero
    ``walletId``, and the external reference number the partner supplied.
    """

    seq_no: int | None = None
    wallet_id: OptionalText
    wallet_reference_number: OptionalText
    external_reference_number: OptionalText
    name: PersonalText
    issued_at: UtcDateTime
    unit_price_excl_vat: Decimal | None = None
    unit_price_incl_vat: Decimal | None = None
    currency_code: OptionalText
    manifest_url: OptionalText
    assets: list[Asset] = Field(default_factory=list)


class OrderItem(WireModel):
    """A line of a venue order with the wallets it issued."""

    line_no: int
    item_number: str
    description: OptionalText
    is_package: bool = False
    quantity: int = 0
    visit_date: OptionalDate
    visit_time: OptionalTime
    sell_to_name: PersonalText
    sell_to_email: PersonalText
    sell_to_language: OptionalText
    wallets: list[Wallet] = Field(default_factory=list)


class OrderHeader(WireModel):
    """The header fields shared by full orders and list summaries."""

    order_id: str
    status: OrderStatus
    status_message: OptionalText
    partner_id: str
    sell_to_order_reference: str
    # Absent from the older synchronous API's responses.
    buy_from_order_reference: OptionalText
    received_at: UtcDateTime
    sell_to_email: PersonalText
    sell_to_name: PersonalText
    sell_to_language: OptionalText
    payment_reference: OptionalText
    job_id: OptionalText
    manifest_url: OptionalText


class Order(OrderHeader):
    """A full order as getOrder (and create, confirm, replace, delete) return it."""

    items: list[OrderItem] = Field(default_factory=list)


class OrderSummary(OrderHeader):
    """A compact order from listOrdersByPartner; ``id`` is a row id, not the orderId."""

    id: OptionalText
    row_version: int | None = None


ItemT = TypeVar("ItemT", bound=BaseModel)


class Page(WireModel, Generic[ItemT]):
    """One page of a cursor-paged list.

    The venue's examples also show bare JSON arrays; :func:`parse_page` accepts both.
    """

    more_pages: bool = False
    next_page_key: OptionalText
    next_page_url: Annotated[str | None, Field(default=None, alias="nextPageURL")]
    data: list[ItemT] = Field(default_factory=list)


def parse_page(content: bytes | str, item_type: type[ItemT]) -> Page[ItemT]:
    """Parse a list response, whether a page envelope or a bare array.

    Raises:
        pydantic.ValidationError: the body is not a list response of ``item_type``.
    """
    # pydantic's parser, as for single bodies: it refuses unpaired surrogates, json does not.
    raw = pydantic_core.from_json(content)
    if isinstance(raw, list):
        raw = {"morePages": False, "data": raw}
    elif isinstance(raw, dict) and "value" in raw and "data" not in raw:
        # Business Central's OData list shape, seen on the webhook subscription list.
        raw = {"morePages": False, "data": raw["value"]}
    return Page[item_type].model_validate(raw)  # type: ignore[valid-type]


class ErrorBody(WireModel):
    """The venue's error body: a stable snake_case ``code`` and a human ``message``."""

    code: str = "unknown_error"
    message: str = ""


# --- webhooks -------------------------------------------------------------------------


class OrderProcessedPayload(WireModel):
    """The small payload of ``ota_cm_order_processed``: enough to call getOrder."""

    order_id: str
    buy_from_order_reference: OptionalText
    status: OrderStatus | None = None


class Notification(WireModel):
    """One webhook notification, for any event; unknown fields are kept."""

    client_state: SecretText
    event_name: str
    app_id: OptionalText
    event_version: OptionalText
    timestamp: UtcDateTime
    company_name: OptionalText
    company_id: OptionalText
    initiating_user_aad_object_id: Annotated[
        str | None, Field(default=None, alias="initiatingUserAADObjectId")
    ]
    payload: dict[str, Any] = Field(default_factory=dict)

    def order_processed(self) -> OrderProcessedPayload | None:
        """The typed payload when this is an ``ota_cm_order_processed`` notification.

        Raises:
            pydantic.ValidationError: the event is ours but its payload is not.
        """
        if self.event_name != ORDER_PROCESSED_EVENT:
            return None
        return OrderProcessedPayload.model_validate(self.payload)


class ValueEnvelope(WireModel):
    """``{"value": [...]}``: the vendor's general webhook guide."""

    value: list[Notification]


class ValuesEnvelope(WireModel):
    """``{"values": [...]}``: the event's own reference page."""

    values: list[Notification]


def parse_notifications(raw: Any) -> list[Notification]:
    """The notifications in a webhook body of any of the three envelope shapes.

    Args:
        raw: the decoded JSON body.

    Raises:
        pydantic.ValidationError: the body is none of the shapes; its errors name the field.
    """
    if isinstance(raw, dict) and "value" in raw:
        return ValueEnvelope.model_validate(raw).value
    if isinstance(raw, dict) and "values" in raw:
        return ValuesEnvelope.model_validate(raw).values
    return [Notification.model_validate(raw)]


# --- webhook subscriptions ------------------------------------------------------------


class SubscriptionRequest(WireModel):
    """The body of ``POST /webhook``."""

    notification_url: str
    event_name: str = ORDER_PROCESSED_EVENT
    client_state: str = Field(max_length=50, repr=False)


class Subscription(WireModel):
    """A webhook subscription as the venue lists it."""

    id: str
    notification_url: OptionalText
    event_name: OptionalText
    client_state: Annotated[str | None, Field(default=None, repr=False)]
