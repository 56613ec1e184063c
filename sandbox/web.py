"""What the sandbox's routes share: the runtime they serve, the request's body, JSON answers.

:func:`current_runtime` is the :class:`~sandbox.runtime.SandboxRuntime` of the app serving
the request; :func:`request_body` reads its JSON body (as the venue's request processor
does, for the venue's handlers); :func:`json_response` writes money as JSON numbers, as
the venue sends it, and :func:`error_response` the venue's error body ``{"code",
"message"}``.
"""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

from flask import Flask, Response, current_app, request

from sandbox.errors import InvalidRequest
from sandbox.runtime import SandboxRuntime


def sandbox_runtime(app: Flask) -> SandboxRuntime:
    """The runtime an app serves."""
    runtime: SandboxRuntime = app.extensions["sandbox"]
    return runtime


def current_runtime() -> SandboxRuntime:
    """The runtime of the app serving the request."""
    return sandbox_runtime(current_app)


def json_response(payload: Any, status: int = 200) -> Response:
    """``payload`` as JSON; money (``Decimal``) as JSON numbers, as the venue sends it."""
    return Response(
        json.dumps(payload, default=_json_number), status=status, mimetype="application/json"
    )


def _json_number(value: Any) -> Any:
    if isinstance(value, Decimal):
        if value == value.to_integral_value():
            return int(value)
        # A float only to carry the number into JSON text, and only when its shortest
        # repr is exactly the decimal (true of any price in cents); else the exact string.
        as_float = float(value)
        return as_float if Decimal(repr(as_float)) == value else str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def error_response(status: int, code: str, message: str) -> Response:
    """The venue's error body ``{"code", "message"}``."""
    return json_response({"code": code, "message": message}, status)


def request_body(*, venue: bool = False) -> Any:
    """The request's JSON body; ``None`` when there is none.

    Args:
        venue: read as the venue's request processor does (APIRequestProcessor
            ProcessRequest): a body that is not JSON is kept as a JSON string, so the
            handler answers it "Body must be a JSON object"; elsewhere it is a 400 saying
            the body is not JSON.

    Raises:
        InvalidRequest: the body is not JSON (outside the venue's handlers).
    """
    raw = request.get_data(cache=True)
    if not raw.strip():
        return None
    try:
        return json.loads(raw)
    except ValueError:
        if venue:
            return raw.decode("utf-8", errors="replace")
        raise InvalidRequest("The request body is not valid JSON") from None
