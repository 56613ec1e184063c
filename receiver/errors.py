"""The receiver's HTTP errors: one JSON shape, one helper that builds it, one handler.

Every error the receiver answers with, its own or Flask's and werkzeug's (404, 405, 413,
500...), has the body ``{"status": 413, "code": "body_too_large", "message": "..."}``:
the HTTP status again, a stable snake_case ``code`` that scripts and metrics rely on, and
a ``message`` a person can act on. Messages never quote a client state or a payload.

The hierarchy, with the status each answers::

    ReceiverError
    ├── BodyTooLarge            413 body_too_large
    ├── UnsupportedMediaType    415 unsupported_media_type
    ├── InvalidJson             400 invalid_json
    ├── InvalidNotification     400 invalid_notification (names the field)
    ├── UnknownClientState      401 unknown_client_state
    └── Unavailable             503: "try again later", so the venue retries
        ├── DatabaseUnavailable     503 database_unavailable
        ├── SchemaNotCurrent        503 schema_not_current
        └── NotConfigured           503 not_configured (``/readyz`` only)

A body that cannot be read at all (a chunked body whose chunk size is not a number, one
cut short) is :class:`UnreadableBody`, 400 ``unreadable_body``: a werkzeug
``BadRequest`` rather than a ``ReceiverError``, since whatever reads the body raises it
(the webhook, a form, the CSRF check), and the finance pages answer HTTP exceptions with
a page of their own (:mod:`receiver.body`).

Only requests that are really forged or unreadable get a 4xx: the venue may end a
subscription after repeated 4xx answers, and retries only after 408, 429 and 5xx. Our
own trouble (a locked or unreachable database) is always a 503; an ``OperationalError``
that escapes any view becomes one too (:func:`register_error_handlers`).
"""

from __future__ import annotations

import json
import logging
import re

from flask import Flask, Response
from sqlalchemy import exc as sa_exc
from werkzeug.exceptions import BadRequest, HTTPException

# Re-exported: the receiver's modules answer the database's errors that storage names.
from storage.engine import DATABASE_UNAVAILABLE as DATABASE_UNAVAILABLE
from storage.engine import describe_database_error as describe_database_error

logger = logging.getLogger(__name__)

# werkzeug's names, where its own would make an odd code ("Request Entity Too Large").
_HTTP_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
    415: "unsupported_media_type",
    500: "internal_error",
    503: "service_unavailable",
}
# Response headers of an HTTPException worth keeping on the JSON answer.
_KEPT_HEADERS = ("Allow", "Retry-After", "WWW-Authenticate")


class ReceiverError(Exception):
    """An error the receiver answers with; subclasses fix ``status`` and ``code``."""

    status = 500
    code = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def response(self) -> Response:
        """This error as the receiver's JSON error response."""
        return error_response(self.status, self.code, self.message)


class BodyTooLarge(ReceiverError):
    """The body is larger than the receiver accepts."""

    status = 413
    code = "body_too_large"

    def __init__(self, limit: int) -> None:
        super().__init__(f"the body is larger than {limit} bytes")
        self.limit = limit


class UnsupportedMediaType(ReceiverError):
    """The body is not declared as JSON."""

    status = 415
    code = "unsupported_media_type"

    def __init__(self, mimetype: str) -> None:
        declared = mimetype or "no content type"
        super().__init__(f"the body must be application/json, not {declared}")


class InvalidJson(ReceiverError):
    """The body is declared as JSON but does not decode as JSON."""

    status = 400
    code = "invalid_json"

    def __init__(self, reason: str) -> None:
        super().__init__(f"the body is not valid JSON: {reason}")


class InvalidNotification(ReceiverError):
    """The JSON is not a webhook envelope; ``field`` is the dotted path of the problem."""

    status = 400
    code = "invalid_notification"

    def __init__(self, field: str, problem: str) -> None:
        where = field or "body"
        super().__init__(f"{where}: {problem}")
        self.field = field


class UnknownClientState(ReceiverError):
    """A notification carries a clientState that no venue connection is configured with."""

    status = 401
    code = "unknown_client_state"

    def __init__(self, field: str) -> None:
        super().__init__(f"{field} is not the client state of any venue subscription")
        self.field = field


class NotAuthorized(ReceiverError):
    """A request to the shop's API without a valid bearer token."""

    status = 401
    code = "not_authorized"


class Unavailable(ReceiverError):
    """The receiver cannot take the request now; the sender should retry later."""

    status = 503
    code = "service_unavailable"


class DatabaseUnavailable(Unavailable):
    """The database cannot be reached or cannot take the write in time."""

    code = "database_unavailable"

    def __init__(self, reason: str) -> None:
        super().__init__(f"the database cannot take the request now ({reason}); retry later")


class SchemaNotCurrent(Unavailable):
    """The database is reachable but its schema is not the one this code needs."""

    code = "schema_not_current"

    def __init__(self) -> None:
        super().__init__("the database schema is not current: run `otacm db upgrade`")


class NotConfigured(Unavailable):
    """The process runs but is not configured to do its work (no venue connection)."""

    code = "not_configured"


class UnreadableBody(BadRequest):
    """The request's body cannot be read: its chunked encoding is broken, or it was cut short."""

    error_code = "unreadable_body"
    description = (
        "The body cannot be read: its chunked encoding is broken (a chunk size that is"
        " not a hexadecimal number) or it ends early."
    )


def error_response(status: int, code: str, message: str) -> Response:
    """The one JSON error body, ``{"status", "code", "message"}``, with ``status`` set.

    Args:
        status: the HTTP status.
        code: a stable snake_case code.
        message: what went wrong, for a person; never a secret or a payload.
    """
    # Encoded here rather than by jsonify: the webhook answers outside a request context.
    body = json.dumps({"code": code, "message": message, "status": status})
    return Response(f"{body}\n", status=status, mimetype="application/json")


def http_error_code(exc: HTTPException) -> str:
    """A werkzeug exception's stable code: ``404`` → ``not_found``."""
    if isinstance(exc, UnreadableBody):
        return exc.error_code
    if exc.code in _HTTP_CODES:
        return _HTTP_CODES[exc.code]
    return re.sub(r"[^a-z0-9]+", "_", (exc.name or "error").lower()).strip("_")


def _handle_receiver_error(exc: ReceiverError) -> Response:
    return exc.response()


def http_error_response(exc: HTTPException) -> Response:
    """A werkzeug HTTP exception (a 405, a 400 for a cut-short body) as the one JSON shape."""
    status = exc.code or 500
    response = error_response(status, http_error_code(exc), exc.description or exc.name)
    for name, value in exc.get_headers():
        if name in _KEPT_HEADERS:
            response.headers[name] = value
    return response


def _handle_database_error(exc: sa_exc.SQLAlchemyError) -> Response:
    reason = describe_database_error(exc)
    logger.warning("database unavailable during a request: %s", reason)
    return DatabaseUnavailable(reason).response()


def register_error_handlers(app: Flask) -> None:
    """Answer every error of ``app`` with the one JSON shape.

    Unhandled exceptions reach Flask's ``InternalServerError`` (an ``HTTPException``),
    so they get the shape too, with code ``internal_error``; Flask logs them first.
    """
    app.register_error_handler(ReceiverError, _handle_receiver_error)
    app.register_error_handler(HTTPException, http_error_response)
    # Our own trouble is never the sender's fault: a 503 makes the venue retry.
    for database_error in DATABASE_UNAVAILABLE:
        app.register_error_handler(database_error, _handle_database_error)
