"""The shop's read API: an order's fate and tickets, and a change feed of orders.

On the :data:`reads` blueprint, behind the same bearer token as ``POST /api/orders``
(:func:`receiver.api.require_token`):

- ``GET /api/orders/{reference}``: the order with the shop's reference (the newest, when
  an Error order was replaced by a new submission); ``?connection=`` names the venue
  connection when the reference is known under several (else 409
  ``ambiguous_reference``);
- ``GET /api/orders/by-id/{orderId}``: the order with the venue's orderId;
- ``GET /api/orders?status=…&changed_since=…&cursor=…&limit=…&connection=…``: the orders
  that changed after ``cursor``, in the order they changed (:func:`orders.shop_view.
  changed_orders`), a page at a time; the page's ``cursor`` reads on from it.

An order is :class:`~orders.shop_view.ShopOrder`; an order's answer carries an ``ETag``
(a digest of the body), and ``If-None-Match`` with it answers 304 while nothing changed.
Errors: 400 ``invalid_query`` naming the parameter, 404 ``not_found`` (no such order) or
``unknown_connection``, 409 ``ambiguous_reference``, 401 without a token, 503 while the
database cannot answer.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from typing import Annotated, TypeVar

from flask import Blueprint, Response, request
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError
from spectree import Response as Answers
from sqlalchemy.orm import Session

from orders.shop_view import (
    CURSOR_PATTERN,
    PAGE_SIZE,
    PAGE_SIZE_MAX,
    START,
    BadCursor,
    ShopOrder,
    ShopOrderPage,
    changed_orders,
    connection_names,
    decode_cursor,
    encode_cursor,
    order_by_id,
    orders_by_reference,
    shop_order,
)
from receiver.api import require_token
from receiver.context import current_receiver
from receiver.errors import ReceiverError
from receiver.openapi import ErrorBody, spec
from venue.models import OrderStatus

reads = Blueprint("api_reads", __name__, url_prefix="/api")
reads.before_request(require_token)

_ERRORS = {"HTTP_401": ErrorBody, "HTTP_503": ErrorBody}

_Query = TypeVar("_Query", bound=BaseModel)


class InvalidQuery(ReceiverError):
    """A query parameter the API cannot take; the message names it."""

    status = 400
    code = "invalid_query"


class OrderNotFound(ReceiverError):
    """No order answers to the reference or id."""

    status = 404
    code = "not_found"


class UnknownConnection(ReceiverError):
    """The query names no configured venue connection."""

    status = 404
    code = "unknown_connection"


class AmbiguousReference(ReceiverError):
    """The reference is known under several venue connections and none was named."""

    status = 409
    code = "ambiguous_reference"


class OrderQuery(BaseModel):
    """The query of one order: which venue connection, when the shop sells for several."""

    model_config = ConfigDict(extra="forbid")

    connection: Annotated[str, Field(min_length=1, max_length=64)] | None = None


class ChangesQuery(BaseModel):
    """The query of the change feed."""

    model_config = ConfigDict(extra="forbid")

    status: list[OrderStatus] = Field(
        default_factory=list, description="Only orders in these statuses (repeat it)."
    )
    changed_since: AwareDatetime | None = Field(
        default=None, description="Only orders that last changed at or after this time."
    )
    cursor: str | None = Field(
        default=None,
        pattern=CURSOR_PATTERN,
        description="Where the last page ended, as it gave it; none: from the beginning.",
    )
    limit: int = Field(default=PAGE_SIZE, ge=1, le=PAGE_SIZE_MAX)
    connection: Annotated[str, Field(min_length=1, max_length=64)] | None = None


def _query(model: type[_Query], repeated: frozenset[str] = frozenset()) -> _Query:
    """The request's query string read as ``model``; a refusal names the parameter."""
    raw: dict[str, object] = {}
    for name, values in request.args.lists():
        if name in repeated:
            raw[name] = values
        elif len(values) > 1:
            raise InvalidQuery(f"{name}: given more than once")
        else:
            raw[name] = values[0]
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        error = exc.errors(include_url=False, include_input=False)[0]
        where = ".".join(str(part) for part in error["loc"][:1]) or "query"
        raise InvalidQuery(f"{where}: {error['msg']}") from None


def _connection_id(session: Session, name: str | None) -> tuple[int | None, dict[int, str]]:
    names = connection_names(session)
    if name is None:
        return None, names
    for connection_id, known in names.items():
        if known == name:
            return connection_id, names
    raise UnknownConnection(f"connection: no venue connection is named {name!r}")


def _order_answer(order: ShopOrder) -> Response:
    body = order.model_dump_json(by_alias=True).encode()
    tag = hashlib.sha256(body).hexdigest()[:32]
    if request.if_none_match.contains(tag):
        response = Response(status=304)
    else:
        response = Response(body + b"\n", mimetype="application/json")
    response.set_etag(tag)
    # The shop may keep the answer, but asks again each time: an order changes.
    response.headers["Cache-Control"] = "private, no-cache"
    return response


@reads.get("/orders/<path:reference>")
@spec.validate(
    query=OrderQuery,
    resp=Answers(
        HTTP_200=ShopOrder,
        HTTP_304=None,
        HTTP_400=ErrorBody,
        HTTP_404=ErrorBody,
        HTTP_409=ErrorBody,
        **_ERRORS,
    ),
    skip_validation=True,
    tags=["orders"],
)
def order_by_reference(reference: str) -> Response:
    """An order by the shop's reference.

    The newest order with that ``sellToOrderReference``: an Error order the shop replaced
    by submitting again stays behind it, removed.
    """
    query = _query(OrderQuery)
    with current_receiver().read_sessions() as session:
        connection_id, names = _connection_id(session, query.connection)
        found = orders_by_reference(session, reference, connection_id=connection_id)
        if not found:
            raise OrderNotFound(f"no order has the reference {reference!r}")
        under = {order.connection_id for order in found}
        if len(under) > 1:
            listed = ", ".join(sorted(names[c] for c in under))
            raise AmbiguousReference(
                f"the reference {reference!r} is known under several venue connections "
                f"({listed}): name one with ?connection="
            )
        order = found[0]
        return _order_answer(shop_order(order, names[order.connection_id]))


@reads.get("/orders/by-id/<order_id>")
@spec.validate(
    resp=Answers(HTTP_200=ShopOrder, HTTP_304=None, HTTP_404=ErrorBody, **_ERRORS),
    skip_validation=True,
    tags=["orders"],
)
def order_by_order_id(order_id: str) -> Response:
    """An order by the venue's orderId."""
    _query(OrderQuery)
    with current_receiver().read_sessions() as session:
        order = order_by_id(session, order_id)
        if order is None:
            raise OrderNotFound(f"no order has the orderId {order_id!r}")
        names = connection_names(session)
        return _order_answer(shop_order(order, names[order.connection_id]))


@reads.get("/orders")
@spec.validate(
    query=ChangesQuery,
    resp=Answers(HTTP_200=ShopOrderPage, HTTP_400=ErrorBody, HTTP_404=ErrorBody, **_ERRORS),
    skip_validation=True,
    tags=["orders"],
)
def order_changes() -> Response:
    """The orders that changed after a cursor, in the order they changed.

    Read with the last page's ``cursor`` to see what changed since: every order that
    changed after it comes, once per change, never one that changed before it. An empty
    page keeps the cursor where it was.
    """
    query = _query(ChangesQuery, repeated=frozenset({"status"}))
    try:
        after = decode_cursor(query.cursor or START)
    except BadCursor as exc:
        raise InvalidQuery(str(exc)) from None
    since = None if query.changed_since is None else query.changed_since.astimezone(dt.UTC)
    with current_receiver().read_sessions() as session:
        connection_id, names = _connection_id(session, query.connection)
        rows, end, more = changed_orders(
            session,
            after,
            limit=query.limit,
            statuses=query.status,
            changed_since=since,
            connection_id=connection_id,
        )
        page = ShopOrderPage(
            orders=[shop_order(order, names[order.connection_id]) for order in rows],
            cursor=encode_cursor(*end),
            more=more,
        )
    return Response(page.model_dump_json(by_alias=True) + "\n", mimetype="application/json")
