"""The venue's webhook: the ``ota_cm_order_processed`` event and its subscriptions.

:func:`parse_webhook_body` is the one place that tells the three envelope shapes of a
webhook body apart (``{"value": [...]}``, ``{"values": [...]}``, a bare notification);
:class:`Notification` is one notification, for any event, with the typed payload of
ours. :class:`SubscriptionRequest` and :class:`Subscription` are the bodies of the
subscription endpoints (``spec/WEBHOOKS.md``). Unknown fields are kept, as in every
wire model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import Field

from venue.models import OrderStatus, WireModel
from venue.values import BlankAsNone, Guid, OptionalText, SecretText, UtcDateTime

ORDER_PROCESSED_EVENT = "ota_cm_order_processed"


# --- notifications --------------------------------------------------------------------


class OrderProcessedPayload(WireModel):
    """The small payload of ``ota_cm_order_processed``: enough to call getOrder."""

    order_id: Guid
    buy_from_order_reference: BlankAsNone
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


@dataclass(frozen=True)
class WebhookBody:
    """A webhook body read: its notifications, typed and as received.

    Attributes:
        key: the envelope's list field, ``"value"`` or ``"values"``; ``None`` for a bare
            notification.
        notifications: the notifications, typed.
        received: the same notifications as they came (decoded JSON, unknown fields
            included), in the same order.
    """

    key: str | None
    notifications: list[Notification]
    received: list[Any]

    def where(self, index: int) -> str:
        """The field path prefix of notification ``index`` (``value.0.``), for errors."""
        return "" if self.key is None else f"{self.key}.{index}."


def parse_webhook_body(raw: Any) -> WebhookBody:
    """A webhook body of any of the three envelope shapes: the one place that tells them.

    ``{"value": [...]}`` first, then ``{"values": [...]}``, else a bare notification.

    Args:
        raw: the decoded JSON body.

    Raises:
        pydantic.ValidationError: the body is none of the shapes; its errors name the field.
    """
    if isinstance(raw, dict) and "value" in raw:
        return WebhookBody("value", ValueEnvelope.model_validate(raw).value, raw["value"])
    if isinstance(raw, dict) and "values" in raw:
        return WebhookBody("values", ValuesEnvelope.model_validate(raw).values, raw["values"])
    return WebhookBody(None, [Notification.model_validate(raw)], [raw])


def parse_notifications(raw: Any) -> list[Notification]:
    """The notifications in a webhook body of any of the three envelope shapes.

    Args:
        raw: the decoded JSON body.

    Raises:
        pydantic.ValidationError: the body is none of the shapes; its errors name the field.
    """
    return parse_webhook_body(raw).notifications


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
