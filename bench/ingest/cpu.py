"""CPU per webhook POST in one process: otacm's app against the bare endpoint, no HTTP.

``.venv/bin/python bench/ingest/cpu.py [--posts N] [--rounds R]`` calls each app as
gunicorn does (a WSGI environ per POST, the same bodies as the load generator's), on a
fresh SQLite file each, and prints the CPU time per POST for batches of 1 and of 20:
the best of ``R`` rounds of ``N`` POSTs, since this machine's speed moves from second to
second. Without gunicorn, sockets and the load generator, this is where a change to the
hot path shows; ``bench/ingest`` says what it is worth end to end.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any

from bare import create_bare_app, create_table
from bodies import CLIENT_STATE, WEBHOOK_PATH, webhook_bodies
from pydantic import SecretStr

from otacm.settings import Settings
from receiver import create_app
from storage.migrate import upgrade
from venue.connection import VenueConnection

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def environ(body: bytes) -> dict[str, Any]:
    """A WSGI environ for one webhook POST, as gunicorn builds it."""
    return {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": WEBHOOK_PATH,
        "QUERY_STRING": "",
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "8000",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "CONTENT_TYPE": "application/json",
        "CONTENT_LENGTH": str(len(body)),
        "HTTP_HOST": "127.0.0.1:8000",
        "REMOTE_ADDR": "127.0.0.1",
        "wsgi.input": io.BytesIO(body),
        "wsgi.url_scheme": "http",
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": False,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
        "wsgi.version": (1, 0),
    }


def post_all(app: WsgiApp, bodies: Iterator[bytes], count: int) -> float:
    """CPU seconds for ``count`` POSTs; every answer must be 200."""
    statuses: list[str] = []

    def start_response(status: str, headers: Any, exc_info: Any = None) -> None:
        statuses.append(status)

    prepared = [environ(body) for body in islice(bodies, count)]
    started = time.process_time()
    for request in prepared:
        answer = app(request, start_response)
        b"".join(answer)
        getattr(answer, "close", lambda: None)()
    spent = time.process_time() - started
    refused = {status for status in statuses if not status.startswith("200")}
    if refused:
        raise SystemExit(f"the app answered {sorted(refused)}")
    return spent


def otacm_app(directory: Path) -> WsgiApp:
    """otacm's receiver on a fresh, migrated SQLite file, with the benchmark's client state."""
    url = f"sqlite:///{directory}/otacm.sqlite3"
    upgrade(url)
    connection = VenueConnection(
        name="bench",
        api_base_url="http://venue.invalid",
        tenant="00000000-0000-0000-0000-000000000001",
        company="CRONUS International Ltd.",
        api_key=SecretStr("unused"),
        webhook_client_states=[SecretStr(CLIENT_STATE)],
    )
    return create_app(Settings(database_url=url, connections=[connection]))


def bare_app(directory: Path) -> WsgiApp:
    """The bare endpoint (``bare.py``) on a fresh SQLite file."""
    url = f"sqlite:///{directory}/bare.sqlite3"
    create_table(url)
    return create_bare_app(url)


def main() -> None:
    """Print the CPU per POST of both apps for batches of 1 and 20 (module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--posts", type=int, default=1000, help="POSTs per round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print(f"CPU ms per POST, best of {args.rounds} rounds of {args.posts} (SQLite, in-process)")
    for batch in (1, 20):
        figures: dict[str, float] = {}
        with tempfile.TemporaryDirectory(prefix="otacm-bench-cpu-") as scratch:
            for name, make in (("otacm", otacm_app), ("bare", bare_app)):
                app = make(Path(scratch))
                bodies = webhook_bodies(batch)
                post_all(app, bodies, args.posts // 5)  # warm-up
                best = min(post_all(app, bodies, args.posts) for _ in range(args.rounds))
                figures[name] = best / args.posts * 1000
        print(
            f"batch {batch:>2}: otacm {figures['otacm']:.3f} ms, bare {figures['bare']:.3f} ms"
            f" (bare / otacm = {figures['bare'] / figures['otacm']:.2f})"
        )


if __name__ == "__main__":
    main()
