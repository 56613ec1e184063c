"""The security headers every answer of the receiver carries, and the trusted proxies.

:class:`SecurityHeaders` is WSGI middleware, the outermost layer of the app, so that the
webhook's fast path (:class:`receiver.webhook.WebhookPosts`, which bypasses Flask) and
werkzeug's own errors get the headers too: ``X-Content-Type-Options: nosniff``,
``Referrer-Policy``, ``X-Frame-Options: DENY``, a ``Content-Security-Policy`` that allows
nothing (the finance pages set their own, :data:`receiver.finance.CONTENT_SECURITY_POLICY`)
and, when the finance cookie is HTTPS-only (``finance_cookie_secure``), HSTS. A header an
answer already has is left as it is.

:func:`behind_proxies` applies ``trusted_proxies``: behind that many reverse proxies, the
client's address and scheme are read from ``X-Forwarded-For`` and ``X-Forwarded-Proto``
(werkzeug's ``ProxyFix``); with none, those headers are ignored, as a client can forge
them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from werkzeug.middleware.proxy_fix import ProxyFix

if TYPE_CHECKING:
    from _typeshed import OptExcInfo
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

HSTS = "max-age=31536000"
"""A year of HTTPS only, for this host alone (other hosts of the domain are not ours)."""
BASELINE: tuple[tuple[str, str], ...] = (
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "same-origin"),
    ("X-Frame-Options", "DENY"),
    ("Content-Security-Policy", "default-src 'none'; frame-ancestors 'none'"),
)
"""The headers of every answer; JSON and text answers need no content policy at all."""


class SecurityHeaders:
    """WSGI middleware adding :data:`BASELINE` (and HSTS, if asked) to every answer."""

    def __init__(self, app: WSGIApplication, *, hsts: bool) -> None:
        """Wrap ``app``; ``hsts``: also send ``Strict-Transport-Security``."""
        self.app = app
        self.headers = BASELINE + ((("Strict-Transport-Security", HSTS),) if hsts else ())

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        """Answer as the app does, with the headers it left out."""

        def with_headers(
            status: str, headers: list[tuple[str, str]], exc_info: OptExcInfo | None = None
        ) -> Callable[[bytes], object]:
            present = {name.lower() for name, _ in headers}
            headers.extend(item for item in self.headers if item[0].lower() not in present)
            return start_response(status, headers, exc_info)

        return self.app(environ, with_headers)


def behind_proxies(app: WSGIApplication, trusted_proxies: int) -> WSGIApplication:
    """``app``, reading the client's address and scheme from ``trusted_proxies`` proxies."""
    if trusted_proxies <= 0:
        return app
    return ProxyFix(app, x_for=trusted_proxies, x_proto=trusted_proxies)
