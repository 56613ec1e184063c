"""Every way a call to the venue can fail, as one exception hierarchy.

The client raises only these; transport and validation errors are translated with
``raise ... from exc``. Each error names the call (method and path below the API base,
never the key) and carries the venue's ``code`` and ``message`` when its body had them::

    VenueError                   any failure; also an unexpected status (500, 502, 3xx)
    ├── VenueUnavailable         transport error, 503, 504: retried until attempts or
    │   │                        the deadline run out, then raised
    │   └── VenueRateLimited     429: retried the same way
    ├── VenueAuthError           401: the API key is wrong or revoked
    ├── VenueForbidden           403: the key lacks a permission
    ├── VenueNotFound            404: no such order (only when its message names it:
    │                            see ``names_order``), subscription or address
    ├── VenueRejected            400 and any other 4xx: see ``may_be_transient`` and
    │   │                        ``is_duplicate_reference``
    │   └── VenueInvalidId       an order or partner id that is not a GUID (400 "Invalid
    │                            order id" / "Invalid partnerId"), or refused before sending
    └── VenueProtocolError       a 2xx body that is not what the API documents
"""

from __future__ import annotations

import re
from urllib.parse import unquote

from venue.values import parse_guid

# Fragments of deleteOrder's refusal of an order still being processed, in every version:
# "Order is mid-flight (status %1); retry once it has settled." (ChannelMgrOrderAgent
# DeleteOrder) and, in the older synchronous version, "Order is currently being processed;
# retry once it has settled."
_IN_FLIGHT_MARKERS = (
    "mid-flight",
    "currently being processed",
)

# Fragments of the venue's 400 messages that say "not a verdict on the order": the
# in-flight refusals above and the shapes Business Central gives internal failures.
_TRANSIENT_MARKERS = (
    *_IN_FLIGHT_MARKERS,
    "retry once",
    "unexpected",
    "internal error",
    "deadlock",
    "locked by another",
)


class VenueError(Exception):
    """A call to the venue failed.

    Attributes:
        method: the HTTP method of the call.
        path: the path below the API base (order and partner ids, no query, no key).
        status: the HTTP status, or ``None`` when no response arrived.
        code: the venue's snake_case error code, when its body had one.
        message: the venue's human-readable message, when its body had one.
        reason: what otacm found wrong with an answer, when the fault is in the answer.
    """

    def __init__(
        self,
        method: str,
        path: str,
        *,
        status: int | None = None,
        code: str | None = None,
        message: str | None = None,
        reason: str | None = None,
    ) -> None:
        self.method = method
        self.path = path
        self.status = status
        self.code = code
        self.message = message
        self.reason = reason
        parts = [f"{method} {path}"]
        if status is not None:
            parts.append(f"HTTP {status}")
        if code:
            parts.append(code)
        if message:
            parts.append(message)
        if reason:
            parts.append(reason)
        super().__init__(": ".join(parts))


class VenueUnavailable(VenueError):
    """The venue could not be reached or did not answer in time (transport error, 503, 504).

    Raised once the client's retries are spent; ``__cause__`` holds the transport error,
    if there was one.

    Attributes:
        retry_after: the seconds the answer's ``Retry-After`` asked to wait, if it had one.
    """

    retry_after: float | None = None


class VenueRateLimited(VenueUnavailable):
    """The venue's gateway refused the call for the rate limit (429); retries are spent."""


class VenueAuthError(VenueError):
    """The venue did not accept the API key (401)."""


class VenueForbidden(VenueError):
    """The API key is valid but lacks the permission for this call (403)."""


# A GUID in a message, in any spelling .NET reads: hyphenated or 32 hex digits, optionally
# in braces. The character before it is kept to tell a path echo ("/channelManagerX/<id>")
# from a message that names the order.
_GUID_IN_TEXT = re.compile(
    r"(?P<before>^|[^0-9A-Za-z])[{(]?(?P<guid>[0-9A-Fa-f]{8}-?[0-9A-Fa-f]{4}-?[0-9A-Fa-f]{4}"
    r"-?[0-9A-Fa-f]{4}-?[0-9A-Fa-f]{12})(?![0-9A-Za-z])"
)


class VenueNotFound(VenueError):
    """A 404: the order or subscription does not exist, or the address is not served.

    Not every 404 says an order is gone. ChannelMgrOrderAgent (GetOrder, ReplaceOrder,
    DeleteOrder, ConfirmOrder) answers a missing order with "Order '{GUID}' not found";
    but ChannelMgrApi Handle answers an unmatched route with "API endpoint not found",
    APIRequestProcessor an unknown module with the path it read, and the gateway in front
    of the venue may answer 404 for its own reasons. :meth:`names_order` is the one place
    that tells them apart.
    """

    def names_order(self, order_id: str) -> bool:
        """Whether this 404 says that the order ``order_id`` does not exist.

        True when the message names the order's id, in any GUID spelling (braces, case,
        hyphens), other than as a path segment: the venue writes "Order '{6C2B…}' not
        found", and a 404 that names the id in another wording counts too; an unknown
        module's answer echoes the path ("/channelManagerX/6c2b… Not Found"), which names
        a route, not an order. A 404 without such a message says nothing about the order.
        """
        wanted = parse_guid(order_id)
        if wanted is None or not self.message:
            return False
        return any(
            found.group("before") != "/" and parse_guid(found.group("guid")) == wanted
            for found in _GUID_IN_TEXT.finditer(self.message)
        )


def order_gone(exc: VenueError, order_id: str) -> bool:
    """Whether ``exc`` is the venue's answer that order ``order_id`` does not exist.

    Only a 404 naming the order (:meth:`VenueNotFound.names_order`) is; every other
    failure, another 404 included, is not a verdict on the order and is retried.
    """
    return isinstance(exc, VenueNotFound) and exc.names_order(order_id)


class VenueRejected(VenueError):
    """The venue refused the request (400 ``generic_error`` or another 4xx).

    Nearly every Channel Manager failure is a 400, and not all of them are final: an order
    that is mid-flight, or an unexpected internal failure, also answers 400. Re-read the
    order with getOrder before treating a rejection as the order's fate.
    """

    @property
    def may_be_transient(self) -> bool:
        """The venue's rules say this may pass: the order is mid-flight or the venue failed."""
        text = (self.message or "").lower()
        return any(marker in text for marker in _TRANSIENT_MARKERS)

    @property
    def order_in_flight(self) -> bool:
        """deleteOrder refused the order because it is still being processed.

        The current version writes "mid-flight", the older synchronous one "currently
        being processed" (ChannelMgrOrderAgent DeleteOrder); the order exists and will
        settle, so the failure is transient and the delete is worth a recheck.
        """
        text = (self.message or "").lower()
        return any(marker in text for marker in _IN_FLIGHT_MARKERS)

    @property
    def is_duplicate_reference(self) -> bool:
        """The partner already has an order with this ``sellToOrderReference``."""
        return self.status == 400 and "already exists" in (self.message or "").lower()


class VenueInvalidId(VenueRejected):
    """An id in the path is not a GUID: the venue refuses it, with a 400 that names nothing.

    ChannelMgrOrderAgent answers "Invalid order id" (getOrder, confirmOrder, replaceOrder,
    deleteOrder) or "Invalid partnerId" (listOrdersByPartner) without saying which text it
    read; this error names it. The client raises it before sending when it can tell, with
    no ``status``. Never transient: the same id is refused every time.

    Attributes:
        kind: ``"order id"`` or ``"partnerId"``.
        value: the text that is not a GUID.
    """

    def __init__(
        self,
        method: str,
        path: str,
        *,
        kind: str,
        value: str,
        status: int | None = None,
        code: str | None = None,
        message: str | None = None,
    ) -> None:
        self.kind = kind
        self.value = value
        super().__init__(
            method,
            path,
            status=status,
            code=code,
            message=message,
            reason=f"{kind} {value!r} is not a GUID",
        )

    @property
    def may_be_transient(self) -> bool:
        """Never: the id is wrong, not the moment."""
        return False


# The venue's messages for an id it cannot read as a GUID, and where that id sits in the
# path (ChannelMgrApi routes: /channelManager/orders/:partnerId, /channelManager/:orderId).
_INVALID_IDS = {
    "invalid order id": ("order id", re.compile(r"^/channelManager/([^/]*)")),
    "invalid partnerid": ("partnerId", re.compile(r"^/channelManager/orders/([^/]*)")),
}


def invalid_id_error(
    method: str,
    path: str,
    *,
    status: int | None,
    code: str | None,
    message: str | None,
) -> VenueInvalidId | None:
    """The :class:`VenueInvalidId` a 400 stands for, naming the id from ``path``; or ``None``."""
    if status != 400 or message is None:
        return None
    known = _INVALID_IDS.get(message.strip().rstrip(".").lower())
    if known is None:
        return None
    kind, where = known
    found = where.match(path)
    value = unquote(found.group(1)) if found else ""
    return VenueInvalidId(
        method, path, kind=kind, value=value, status=status, code=code, message=message
    )


class VenueProtocolError(VenueError):
    """The venue answered with a body the API does not document (bad JSON, wrong shape)."""


def error_for_status(
    method: str,
    path: str,
    status: int,
    *,
    code: str | None = None,
    message: str | None = None,
) -> VenueError:
    """The exception for a non-2xx answer; the one place statuses map to classes."""
    kinds: dict[int, type[VenueError]] = {
        401: VenueAuthError,
        403: VenueForbidden,
        404: VenueNotFound,
        429: VenueRateLimited,
        503: VenueUnavailable,
        504: VenueUnavailable,
    }
    invalid_id = invalid_id_error(method, path, status=status, code=code, message=message)
    if invalid_id is not None:
        return invalid_id
    kind = kinds.get(status)
    if kind is None:
        kind = VenueRejected if 400 <= status < 500 else VenueError
    return kind(method, path, status=status, code=code, message=message)


def describe_venue_error(exc: VenueError) -> str:
    """A failure for ``last_error``: kind, status, the venue's code and message, our finding.

    Built from the error's fields, never from a body: the venue's messages for getOrder
    name orders and states, not customers, and a person needs them to act.
    """
    parts = [type(exc).__name__]
    if exc.status is not None:
        parts.append(f"HTTP {exc.status}")
    elif isinstance(exc, VenueUnavailable) and exc.__cause__ is not None:
        parts.append(type(exc.__cause__).__name__)
    if exc.code:
        parts.append(exc.code)
    if exc.message:
        parts.append(exc.message)
    if exc.reason:
        parts.append(exc.reason)
    if isinstance(exc, VenueRejected) and exc.may_be_transient:
        parts.append("(transient)")
    return ": ".join(parts)
