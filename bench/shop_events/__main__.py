"""bench/shop_events: from a mirror change committing to the shop receiving its event.

Run it as ``.venv/bin/python bench/shop_events [--db sqlite|postgresql|both]
[--seconds S] [--rate R] [--backlog N] [--producers P]`` from the repository
(``bench/README.md``). A benchmark, not a test: it measures and prints. Goals:
commit→receipt p99 under one second at 100 events/s, and at least 500 events/s
delivered by one process.

For each database (a fresh SQLite file; a throwaway PostgreSQL server with production's
durability, ``bench/ingest/servers.py``), freshly migrated, with one shop endpoint (a
``ThreadingHTTPServer`` in a process of its own, as a shop is, that verifies every
signature with the ``standardwebhooks`` library and answers 200; it notes each
receipt on ``time.monotonic()``, the system-wide ``CLOCK_MONOTONIC`` on Linux, so the
two processes' times compare):

- **latency**: ``P`` producer processes (``--producers``, 3; :mod:`producer`) commit
  mirror changes one at a time each (a new order mirrored Issued:
  ``orders.mirror.upsert_order``, whose transaction records ``order.issued`` and its
  delivery), together ``R`` per second for ``S`` seconds (one process alone reaches
  only about 1/(the upsert's cost) a second), while the endpoint's sender runs as
  the worker role runs it (:meth:`orders.shop_delivery.EndpointSender.run_forever`, its
  idle wait 0.1 s). Per event: the shop's receipt time minus the commit's return.
  Printed: p50, p99 and max, and the p99 against one bare signed POST's median round trip
  measured in the same run (the physical floor is the idle wait plus that round trip);
- **throughput**: ``N`` events recorded with no sender running, then one sender drains
  them, running as in the worker; timed from its start to the shop holding the last
  event. Printed: events/s, and against a bare loop POSTing the same signed bodies from
  one thread with no database (the endpoint's own capacity from here).
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPOSITORY = HERE.parents[1]
sys.path.insert(1, str(HERE.parent / "ingest"))
sys.path.insert(1, str(REPOSITORY))

import httpx  # noqa: E402
from producer import commit, produce, shop_sessions  # noqa: E402
from servers import BenchSetupError, DatabaseFactory, postgresql_server  # noqa: E402
from shop_endpoint import serve_shop  # noqa: E402
from standardwebhooks.webhooks import Webhook  # noqa: E402

from orders.shop_delivery import (  # noqa: E402
    Endpoint,
    EndpointSender,
    event_body,
    signed_headers,
)
from orders.shop_leases import DeliveryClaim  # noqa: E402
from storage.engine import make_engine, make_sessions  # noqa: E402
from storage.migrate import upgrade  # noqa: E402

DATABASES = ("sqlite", "postgresql")
SECRET = "whsec_" + base64.b64encode(os.urandom(32)).decode()


class Shop:
    """The shop's endpoint in its own process; when each order's event first arrived."""

    def __init__(self) -> None:
        self.received: dict[str, float] = {}
        self.lock = threading.Lock()
        context = multiprocessing.get_context("spawn")
        port, self.receipts = context.Queue(), context.Queue()
        self.process = context.Process(
            target=serve_shop, args=(SECRET, port, self.receipts), daemon=True
        )
        self.process.start()
        self.url = f"http://127.0.0.1:{port.get(timeout=60)}/events"
        threading.Thread(target=self._collect, daemon=True).start()

    def _collect(self) -> None:
        while True:
            order_id, at = self.receipts.get()
            with self.lock:
                self.received.setdefault(order_id, at)

    def count(self) -> int:
        """How many orders' events have arrived."""
        with self.lock:
            return len(self.received)

    def clear(self) -> None:
        """Forget what arrived (once it has all been collected)."""
        with self.lock:
            self.received.clear()

    def close(self) -> None:
        """Stop serving."""
        self.process.terminate()
        self.process.join(10)


def percentile(values: list[float], share: float) -> float:
    """The ``share`` percentile (nearest rank) of ``values``."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def bare_posts(url: str, count: int) -> tuple[float, float]:
    """POSTs of signed event bodies from one thread, no database: (per second, median s)."""
    claim = DeliveryClaim(
        id=1,
        event_id="msg_bench",
        type="order.issued",
        order_seq=1,
        payload={"orderId": "bare", "status": "Issued"},
        created_at=dt.datetime.now(dt.UTC),
        retry_from=dt.datetime.now(dt.UTC),
        attempts=1,
    )
    signer = [Webhook(SECRET)]
    times = []
    with httpx.Client(timeout=5) as client:
        started = time.monotonic()
        for _ in range(count):
            body = event_body(claim)
            one = time.monotonic()
            headers = signed_headers(signer, claim.event_id, body, dt.datetime.now(dt.UTC))
            client.post(url, content=body, headers=headers).raise_for_status()
            times.append(time.monotonic() - one)
        elapsed = time.monotonic() - started
    return count / elapsed, statistics.median(times)


def run(
    kind: str,
    factory: DatabaseFactory,
    seconds: float,
    rate: float,
    backlog: int,
    producers: int,
) -> None:
    """Both measures on a new database of ``kind``."""
    url = factory.new(f"shop_events_{kind}_{os.getpid()}")
    engine = make_engine(url)
    shop = Shop()
    try:
        upgrade(engine)
        sessions, connection_id = shop_sessions(engine)

        def sender() -> EndpointSender:
            return EndpointSender(
                Endpoint("shop", shop.url, (SECRET,)),
                sessions,
                make_sessions(engine, read_only=True),
                owner="bench",
                horizon=dt.timedelta(days=3),
                timeout=5.0,
            )

        bare_rate, round_trip = bare_posts(shop.url, 500)
        wait_for(shop, 1)  # the bare POSTs' one order id
        shop.clear()

        # Latency: a steady rate of commits, the sender running as in the worker.
        stop = threading.Event()
        running = sender()
        thread = threading.Thread(target=running.run_forever, args=(stop,), daemon=True)
        thread.start()
        committed: dict[str, float] = {}
        total = int(seconds * rate)
        context = multiprocessing.get_context("spawn")
        done = context.Queue()
        start = time.monotonic() + 5.0  # the producers' start-up
        workers = [
            context.Process(
                target=produce,
                args=(url, range(k, total, producers), start, rate, done),
                daemon=True,
            )
            for k in range(producers)
        ]
        for worker in workers:
            worker.start()
        for _ in workers:
            committed.update(done.get(timeout=seconds + 120))
        for worker in workers:
            worker.join(10)
        achieved = total / (max(committed.values()) - start)
        wait_for(shop, total)
        stop.set()
        thread.join(10)
        latencies = [shop.received[order_id] - at for order_id, at in committed.items()]
        p50, p99 = percentile(latencies, 0.50), percentile(latencies, 0.99)
        print(
            f"{kind:10} latency   {total} events at {rate:g}/s from {producers} producer"
            f" processes (achieved {achieved:.0f}/s): "
            f"p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, max {max(latencies) * 1000:.0f}"
            f" ms; one bare POST {round_trip * 1000:.1f} ms (p99/bare {p99 / round_trip:.0f}x);"
            f" goal p99 < 1000 ms: {'met' if p99 < 1.0 else 'MISSED'}"
        )

        # Throughput: a backlog drained by one sender.
        shop.clear()
        for n in range(total, total + backlog):
            commit(sessions, connection_id, n)
        drain = sender()
        stop = threading.Event()
        thread = threading.Thread(target=drain.run_forever, args=(stop,), daemon=True)
        started = time.monotonic()
        thread.start()
        wait_for(shop, backlog, timeout=300.0)
        elapsed = time.monotonic() - started
        stop.set()
        thread.join(30)
        delivered = shop.count()
        per_second = delivered / elapsed
        print(
            f"{kind:10} throughput {delivered}/{backlog} events in {elapsed:.2f} s: "
            f"{per_second:.0f} events/s; bare signed POSTs from one thread {bare_rate:.0f}/s "
            f"(ratio {per_second / bare_rate:.2f}); goal >= 500/s: "
            f"{'met' if per_second >= 500 else 'MISSED'}"
        )
    finally:
        shop.close()
        engine.dispose()


def wait_for(shop: Shop, count: int, timeout: float = 60.0) -> None:
    """Until the shop has ``count`` events, or ``timeout`` seconds passed."""
    deadline = time.monotonic() + timeout
    while shop.count() < count and time.monotonic() < deadline:
        time.sleep(0.05)


def main() -> int:
    """Parse the arguments and run."""
    parser = argparse.ArgumentParser(prog="bench/shop_events", description=__doc__.split("\n")[0])
    parser.add_argument("--db", choices=(*DATABASES, "both"), default="both")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--backlog", type=int, default=2000)
    parser.add_argument("--producers", type=int, default=3)
    args = parser.parse_args()
    kinds = DATABASES if args.db == "both" else (args.db,)
    print(
        json.dumps(
            {
                "seconds": args.seconds,
                "rate": args.rate,
                "backlog": args.backlog,
                "producers": args.producers,
            }
        )
    )
    with ExitStack() as stack:
        directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="shop-events-")))
        for kind in kinds:
            server = None
            if kind == "postgresql":
                try:
                    server = stack.enter_context(postgresql_server())
                except BenchSetupError as exc:
                    print(f"postgresql: {exc}", file=sys.stderr)
                    return 1
            run(
                kind,
                DatabaseFactory(kind, directory, server),
                args.seconds,
                args.rate,
                args.backlog,
                args.producers,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
