"""A venue where some partners' change feeds answer 503: a reverse proxy before the sandbox.

The sandbox's faults are company-wide; the change feed is per partner, and what it must
show is that one partner failing (its calls retried, then given up) delays nobody else.
:class:`PartnerFaultProxy` forwards every request to the venue over real HTTP, but
answers ``503`` to ``listOrdersByPartner`` of the partners in ``failing`` (a set the
caller may change while it runs), and counts each partner's listings. Tests and
``bench/feed`` point otacm's ``api_base_url`` at :attr:`PartnerFaultProxy.url`.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType

import httpx

LISTING_PATH = "/channelmanager/orders/"
"""Where a partner's listing (and its change feed) is, before the partner's id."""

_NOT_FORWARDED = {"connection", "content-length", "transfer-encoding", "content-encoding"}
"""Hop-by-hop headers, and those the forwarded body no longer matches (httpx decodes)."""


class PartnerFaultProxy:
    """A reverse proxy on a free local port, failing some partners' listings with 503.

    Attributes:
        failing: partner ids (lower case) whose listings are answered 503.
        listings: listings asked for, by partner id, failed ones included.
        listed_at: when each was asked for (``time.monotonic()``), by partner id.
    """

    def __init__(self, upstream: str, failing: Iterable[str] = ()) -> None:
        self.upstream = upstream.rstrip("/")
        self.failing = {partner.lower() for partner in failing}
        self.listings: Counter[str] = Counter()
        self.listed_at: defaultdict[str, list[float]] = defaultdict(list)
        self._lock = threading.Lock()
        self._http = httpx.Client(base_url=self.upstream, timeout=60)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        """The proxy's root, standing for the venue's."""
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def __enter__(self) -> PartnerFaultProxy:
        self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._http.close()

    def _listed(self, path: str) -> str | None:
        """The partner whose listing ``path`` asks for, counted; ``None`` for other calls."""
        lowered = path.lower().split("?", 1)[0]
        if LISTING_PATH not in lowered:
            return None
        partner = lowered.rsplit(LISTING_PATH, 1)[1].strip("/").split("/", 1)[0]
        with self._lock:
            self.listings[partner] += 1
            self.listed_at[partner].append(time.monotonic())
        return partner

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                """Quiet: the tests' output is theirs."""

            def _forward(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                partner = proxy._listed(self.path) if self.command == "GET" else None
                if partner is not None and partner in proxy.failing:
                    self._answer(503, [("content-type", "text/plain")], b"Service Unavailable")
                    return
                headers = [(k, v) for k, v in self.headers.items() if k.lower() != "host"]
                answer = proxy._http.request(self.command, self.path, headers=headers, content=body)
                kept = [
                    (k, v) for k, v in answer.headers.items() if k.lower() not in _NOT_FORWARDED
                ]
                self._answer(answer.status_code, kept, answer.content)

            def _answer(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
                self.send_response(status)
                for key, value in headers:
                    self.send_header(key, value)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _forward

        return Handler
