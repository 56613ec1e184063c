"""The errors the simulated venue answers with, one class per HTTP status and code.

Every one becomes the venue's body ``{"code": ..., "message": ...}`` in one error
handler (:mod:`sandbox.app`)::

    SandboxError                 (status, code, message)
    ├── InvalidRequest           400 generic_error — validation and state rules alike
    ├── ResourceNotFound         404 resource_not_found — unknown order, subscription, company
    ├── Unauthorized             401 unauthorized — missing or wrong API key
    ├── Forbidden                403 generic_error — the permission set is missing (a fault)
    ├── UnsupportedHttpMethod    400 unsupported_http_method — not GET/POST/PUT/PATCH/DELETE
    ├── TooManyRequests          429 too_many_requests — the gateway's rate limit (a fault)
    └── ServiceUnavailable       503 service_unavailable — the gateway's queue timeout (a fault)
"""

from __future__ import annotations


class SandboxError(Exception):
    """An answer other than success, with the venue's status, code and message."""

    status = 400
    code = "generic_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidRequest(SandboxError):
    """400 ``generic_error``: the venue's answer to bad input and to forbidden transitions."""


class ResourceNotFound(SandboxError):
    """404 ``resource_not_found``: no such order, subscription, tenant or company."""

    status = 404
    code = "resource_not_found"


def not_found(resource: str) -> ResourceNotFound:
    """The venue's 404 for ``resource``: APIResponse RespondResourceNotFound's
    ``'%1 Not Found'`` (so "Order '{…}' not found Not Found")."""
    return ResourceNotFound(f"{resource} Not Found")


class UnsupportedHttpMethod(SandboxError):
    """400 ``unsupported_http_method`` (APIResponse RespondBadRequestUnsupportedHttpMethod)."""

    code = "unsupported_http_method"

    def __init__(self, method: str) -> None:
        super().__init__(f"Http method {method} is not supported")


class Forbidden(SandboxError):
    """403 ``generic_error`` (APIResponse RespondForbidden): a missing permission set."""

    status = 403


class Unauthorized(SandboxError):
    """401 ``unauthorized``: the API key is missing or wrong."""

    status = 401
    code = "unauthorized"


class TooManyRequests(SandboxError):
    """429 ``too_many_requests``: the gateway's rate limit, injected as a fault."""

    status = 429
    code = "too_many_requests"


class ServiceUnavailable(SandboxError):
    """503 ``service_unavailable``: a queued request timed out, injected as a fault."""

    status = 503
    code = "service_unavailable"
