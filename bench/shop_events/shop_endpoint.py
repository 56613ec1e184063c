"""The shop's endpoint of ``bench/shop_events``, run in a process of its own (spawned:
the function must be importable by name, hence this module beside ``__main__``)."""

from __future__ import annotations

import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from standardwebhooks.webhooks import Webhook


def serve_shop(secret: str, port: Any, receipts: Any) -> None:
    """The shop's process: verify each event, put (orderId, receipt time) on ``receipts``."""
    verifier = Webhook(secret)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["content-length"]))
            document = verifier.verify(body, dict(self.headers.items()))
            receipts.put((document["data"]["orderId"], time.monotonic()))
            self.send_response(200)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    class Server(ThreadingHTTPServer):
        # A sender opens up to 16 connections at once; the default queue of 5 resets some.
        request_queue_size = 64

    server = Server(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    port.put(server.server_address[1])
    server.serve_forever()
