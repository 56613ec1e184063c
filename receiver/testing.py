"""The receiver served over real HTTP in a thread, for tests and benchmarks.

Tests and benchmarks talk to the receiver (and the finance pages) over a real socket, as
the venue and a browser do, without starting gunicorn: werkzeug's threaded server on a
free loopback port, in a daemon thread, stopped when the block ends. Importing this
module starts nothing.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from flask import Flask
from werkzeug.serving import make_server

from otacm.settings import Settings
from receiver.app import create_app
from receiver.context import EXTENSION, Receiver


@contextmanager
def served(app: Flask) -> Iterator[str]:
    """``app`` on a free loopback port until the block ends; yields its base URL."""
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="served", daemon=True
    )
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(timeout=10)
        server.server_close()


@dataclass(frozen=True)
class LiveReceiver:
    """A served receiver: its base URL, and its engine, metrics and connections."""

    url: str
    receiver: Receiver


@contextmanager
def served_receiver(settings: Settings) -> Iterator[LiveReceiver]:
    """``receiver.create_app(settings)`` served until the block ends; its engine disposed."""
    app = create_app(settings)
    receiver: Receiver = app.extensions[EXTENSION]
    try:
        with served(app) as url:
            yield LiveReceiver(url, receiver)
    finally:
        receiver.close()
