"""The sandbox as a Flask app: its factory, and what every answer gets.

:func:`create_sandbox_app` serves a :class:`~sandbox.runtime.SandboxRuntime` through two
blueprints: the venue's API (:mod:`sandbox.api`) and the sandbox's own ``/_sandbox/``
endpoints (:mod:`sandbox.admin`); what their routes share is :mod:`sandbox.web`. Every
answer carries ``x-npr-version``, ``x-npr-duration`` and ``x-npr-request-id``; every
error is the venue's ``{"code", "message"}`` from one handler, and an unexpected failure
is a 400 ``generic_error`` as the venue's is. Every call of the venue's API is counted by
endpoint name and status; the lost answer (``answerLostRate``/``answerLostCount``)
strikes after the work is done, cutting the connection instead of answering.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
import uuid

from flask import Flask, Response, g, request
from werkzeug.exceptions import HTTPException

from sandbox.admin import admin
from sandbox.api import api, leave_gateway
from sandbox.config import SandboxConfig
from sandbox.errors import SandboxError, UnsupportedHttpMethod
from sandbox.runtime import SandboxRuntime
from sandbox.web import current_runtime, error_response

logger = logging.getLogger(__name__)


def create_sandbox_app(
    config: SandboxConfig | None = None, *, runtime: SandboxRuntime | None = None
) -> Flask:
    """The sandbox as a Flask app.

    Args:
        config: the venue to simulate; the defaults when omitted.
        runtime: an existing runtime to serve (its config wins). Without one the app
            builds its own, which its creator must close:
            ``sandbox_runtime(app).close()`` (:func:`sandbox.web.sandbox_runtime`).
    """
    if runtime is None:
        runtime = SandboxRuntime(config or SandboxConfig())
    app = Flask(__name__)
    # The venue's router sees the path's segments as sent: no redirect for "//".
    app.url_map.merge_slashes = False
    app.extensions["sandbox"] = runtime
    app.register_blueprint(api)
    app.register_blueprint(admin)
    app.register_error_handler(SandboxError, _sandbox_error)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected_error)
    app.before_request(_start_timer)
    app.after_request(_finish)
    app.teardown_request(leave_gateway)
    return app


# --- errors, and what every answer gets -----------------------------------------------


def _sandbox_error(exc: SandboxError) -> Response:
    return error_response(exc.status, exc.code, exc.message)


def _http_error(exc: HTTPException) -> Response:
    status = exc.code or 500
    if status == 405 and request.blueprint == api.name:
        # A method werkzeug does not route at all: the venue's answer to any method but
        # GET, POST, PUT, PATCH and DELETE (APIRequestProcessor ProcessRequest).
        return _sandbox_error(UnsupportedHttpMethod(request.method.upper()))
    code = "resource_not_found" if status == 404 else (exc.name or "error").lower()
    return error_response(status, code.replace(" ", "_"), exc.description or exc.name)


def _unexpected_error(exc: Exception) -> Response:
    # The venue answers an internal failure with 400 generic_error too.
    logger.exception("unexpected error in %s %s", request.method, request.path)
    return error_response(400, "generic_error", f"Unexpected error: {type(exc).__name__}")


def _start_timer() -> None:
    g.started = time.perf_counter()


LOSABLE_ANSWERS = frozenset(
    {"createOrder", "confirmOrder", "replaceOrder", "deleteOrder", "getOrder"}
)
"""The calls whose answer the ``answerLost`` fault may lose once they succeeded."""


def _finish(response: Response) -> Response:
    runtime = current_runtime()
    elapsed_ms = (time.perf_counter() - g.get("started", time.perf_counter())) * 1000
    response.headers["x-npr-version"] = runtime.config.api_version
    response.headers["x-npr-duration"] = f"{elapsed_ms:.0f}"
    response.headers["x-npr-request-id"] = str(uuid.uuid4())
    if response.status_code in (429, 503) and g.get("retry_after") is not None:
        response.headers["Retry-After"] = str(g.retry_after)
    if request.blueprint == api.name and g.get("api_name"):
        runtime.stats.record_call(g.api_name, response.status_code)
        if (
            g.api_name in LOSABLE_ANSWERS
            and 200 <= response.status_code < 300
            and runtime.faults.lose_answer()
        ):
            return _lose_answer(runtime, response)
    return response


def _lose_answer(runtime: SandboxRuntime, response: Response) -> Response:
    """Cut the connection instead of answering: the work is done, the answer never comes.

    After ``answerLostAfterSeconds`` of silence the socket is shut down, so the client
    reads the end of the connection where the answer should be (or has timed out by
    then); werkzeug's write of the answer then fails, and it drops the connection.
    Served without werkzeug's socket (a test client), the answer is a gateway 504
    instead: no order in it either.
    """
    runtime.stats.gateway("answersLost")
    logger.info("fault: the answer to %s %s is lost", request.method, g.api_name)
    wait = runtime.faults.faults.answer_lost_after_seconds
    if wait:
        time.sleep(wait)
    connection = request.environ.get("werkzeug.socket")
    if not isinstance(connection, socket.socket):
        return error_response(504, "gateway_timeout", "The gateway timed out waiting")
    # OSError: the client hung up first; the answer is lost all the same.
    with contextlib.suppress(OSError):
        connection.shutdown(socket.SHUT_RDWR)
    return response
