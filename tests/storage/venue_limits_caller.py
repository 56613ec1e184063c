"""A process that calls the venue within its key's shared limit, for the limiter's tests.

Run as ``python -m tests.storage.venue_limits_caller '<json>'``; the JSON names the
database (``url``), the venue connection's fields (``connection``) and the ``mode``:

- ``calls``: ``calls`` listOrdersByPartner pages from ``threads`` threads at once; prints
  ``done`` and how many failed; with ``stamps``, first the wall-clock time each call
  ended at, as a JSON list; with ``together``, first prints ``ready`` and waits for a
  line on its standard input;
- ``hold``: takes one place in flight, prints ``held`` and waits to be killed;
- ``wait``: prints ``waiting``, then waits up to ``max_wait`` seconds for a place in
  flight and prints ``got`` once it has one, or ``gave up`` (then holds nothing);
- ``once``: one call with a single attempt; prints its outcome as JSON (``status``,
  ``retry_after``, ``sent``: whether the venue saw it).
"""

from __future__ import annotations

import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from storage.engine import make_engine
from storage.venue_limits import shared_throttle
from venue.client import open_client
from venue.connection import VenueConnection
from venue.errors import VenueError
from venue.retry import RetryPolicy
from venue.throttle import HeldOff, NoPlaceFree, throttle_for

ONCE = RetryPolicy(attempts=1, deadline=5.0, wait_initial=0.0, wait_max=5.0, wait_jitter=0.0)


def say(line: str) -> None:
    """One line to the test that started this process, at once."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main(arguments: dict[str, Any]) -> None:
    """Do what ``arguments`` says (module docstring)."""
    engine = make_engine(arguments["url"])
    connection = VenueConnection.model_validate(arguments["connection"])
    # "local": each process keeps the limit alone, as before it was shared (the control).
    throttle = (
        throttle_for(connection.api_identity, connection.limits)
        if arguments.get("local")
        else shared_throttle(engine, connection)
    )
    partner = connection.partner_ids[0]
    mode = arguments.get("mode", "calls")
    if mode == "hold":
        with throttle.slot():
            say("held")
            threading.Event().wait()
    if mode == "wait":
        say("waiting")
        try:
            with throttle.slot(max_hold=arguments["max_wait"]):
                say("got")
        except NoPlaceFree:
            say("gave up")
        return
    if mode == "once":
        with open_client(connection, throttle=throttle, retry=ONCE) as client:
            outcome: dict[str, Any] = {"status": 200, "retry_after": None, "sent": True}
            try:
                client.orders_page(partner, page_size=1)
            except VenueError as exc:
                outcome["status"] = exc.status
                outcome["retry_after"] = getattr(exc, "retry_after", None)
                outcome["sent"] = not isinstance(exc.__cause__, HeldOff)
            say(json.dumps(outcome))
            return
    if arguments.get("together"):
        # Started with others: none calls before every one is ready.
        say("ready")
        sys.stdin.readline()
    failures = 0
    ended: list[float] = []
    lock = threading.Lock()
    with open_client(connection, throttle=throttle) as client:

        def call(_: int) -> None:
            nonlocal failures
            try:
                client.orders_page(partner, page_size=1)
            except VenueError:
                with lock:
                    failures += 1
            with lock:
                ended.append(time.time())

        with ThreadPoolExecutor(max_workers=arguments["threads"]) as pool:
            list(pool.map(call, range(arguments["calls"])))
    if arguments.get("stamps"):
        say(json.dumps(sorted(ended)))
    say(f"done {failures} failed")


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
