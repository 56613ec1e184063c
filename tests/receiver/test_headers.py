"""The security headers on every answer of the receiver, over real HTTP: the webhook's
fast path, the API, health, metrics, the finance pages and errors alike."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest
from flask import Flask

from otacm.settings import Settings
from receiver.finance import CONTENT_SECURITY_POLICY
from receiver.headers import HSTS
from receiver.testing import served

# The headers do not depend on the database: one is enough.
pytestmark = pytest.mark.parametrize("engine", ["sqlite"], indirect=True)

REQUESTS: list[tuple[str, str, dict[str, object]]] = [
    ("GET", "/healthz", {}),
    ("GET", "/readyz", {}),
    ("GET", "/metrics", {}),
    ("POST", "/webhooks/ota-cm", {"json": {"value": []}}),
    ("POST", "/webhooks/ota-cm", {"content": b"{not json"}),
    ("GET", "/webhooks/ota-cm?validationToken=abc", {}),
    ("POST", "/api/orders", {"json": {}}),
    ("GET", "/finance/sign-in", {}),
    ("GET", "/finance/", {}),
    ("GET", "/finance/static/finance.css", {}),
    ("GET", "/no-such-page", {}),
    ("DELETE", "/healthz", {}),
]


def _answers(app: Flask) -> list[tuple[str, httpx.Response]]:
    with served(app) as url, httpx.Client(base_url=url) as client:
        return [
            (f"{method} {path}", client.request(method, path, **options))  # type: ignore[arg-type]
            for method, path, options in REQUESTS
        ]


def test_every_answer_carries_the_security_headers(app: Flask) -> None:
    """nosniff, a referrer policy, no framing and a content policy on every answer, each
    once; no HSTS while the cookie is not HTTPS-only."""
    for request, response in _answers(app):
        headers = response.headers
        assert headers.get_list("X-Content-Type-Options") == ["nosniff"], request
        assert headers.get_list("X-Frame-Options") == ["DENY"], request
        assert headers["Referrer-Policy"] == "same-origin", request
        assert len(headers.get_list("Content-Security-Policy")) == 1, request
        assert "frame-ancestors 'none'" in headers["Content-Security-Policy"], request
        assert "Strict-Transport-Security" not in headers, request


def test_pages_allow_their_own_stylesheet_and_nothing_inline(app: Flask) -> None:
    """The finance pages' policy loads this site's files only, with no 'unsafe-inline';
    JSON and text answers allow nothing at all."""
    for request, response in _answers(app):
        policy = response.headers["Content-Security-Policy"]
        assert "unsafe-inline" not in policy, request
        if " /finance/" in request and response.status_code == 200:
            assert policy == CONTENT_SECURITY_POLICY, request
            assert "default-src 'self'" in policy
        elif " /finance/" not in request:
            assert policy.startswith("default-src 'none'"), request


def test_hsts_when_the_cookie_is_https_only(
    settings: Settings, make_app: Callable[[Settings], Flask]
) -> None:
    """With finance_cookie_secure (served over HTTPS), every answer asks for HTTPS only."""
    app = make_app(settings.model_copy(update={"finance_cookie_secure": True}))
    for request, response in _answers(app):
        assert response.headers.get_list("Strict-Transport-Security") == [HSTS], request
