"""``otacm demo``: the daemon against the built-in sandbox, for a newcomer to watch.

It starts the sandbox (the simulated venue) on loopback, then ``otacm serve`` — web,
worker and scheduler — as a child process on a demo database, subscribes the receiver to
the venue's ``ota_cm_order_processed`` webhook, and sends a stream of sample orders
through otacm's own API (``POST /api/orders``: the sale is recorded, then createOrder is
called). The venue settles them on its cadence and notifies the receiver; the worker
fetches each order in full. The demo watches the local mirror fill, then prints what it
holds: orders by status, wallets, issued value per currency, the reason of every Error,
and how many venue API calls each order cost.

Sample orders come from the sandbox's catalog with a seeded random generator, so a run
can be repeated exactly: most are paid (→ Issued), some are not (→ Draft, awaiting
payment), and the last is a package with an impossible component schedule (→ Error).
"""

from __future__ import annotations

import datetime as dt
import os
import random
import secrets
import socket
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import click
import httpx
import sqlalchemy as sa
from pydantic import SecretStr

from otacm.settings import VenueConnection
from venue.models import OrderRequest, OrderRequestItem, OrderStatus, WalletRequest

GUESTS = ("Ada Lovelace", "Alan Turing", "Grace Hopper", "Edsger Dijkstra", "Barbara Liskov")
DEMO_DATABASE = Path("var") / "demo.sqlite3"


@dataclass
class DemoReport:
    """What the local mirror holds at the end of the demo."""

    submitted: int = 0
    by_status: Counter[str] = field(default_factory=Counter)
    wallets: int = 0
    amounts: dict[str, Decimal] = field(default_factory=lambda: defaultdict(Decimal))
    errors: list[tuple[str, str]] = field(default_factory=list)
    venue_calls: dict[str, int] = field(default_factory=dict)
    webhooks_sent: int = 0
    database_url: str = ""
    example_reference: str = ""

    def lines(self) -> Iterator[str]:
        """The summary as lines for a terminal."""
        yield f"orders submitted through otacm: {self.submitted}; in the local mirror:"
        for status, count in sorted(self.by_status.items()):
            yield f"  {status:<10} {count}"
        yield f"wallets mirrored: {self.wallets}"
        for currency, amount in sorted(self.amounts.items()):
            yield f"  issued value {currency}: {amount:.2f} incl. VAT"
        for reference, reason in self.errors:
            yield f"  {reference} ended in Error: {reason}"
        calls = ", ".join(f"{name} {count}" for name, count in sorted(self.venue_calls.items()))
        yield f"venue API calls: {calls}; webhooks delivered: {self.webhooks_sent}"
        if self.submitted:
            fetched = self.venue_calls.get("getOrder", 0)
            yield f"getOrder calls per order: {fetched / self.submitted:.2f}"
        yield f"database: {self.database_url}"
        if self.example_reference:
            yield (
                f"look closer: OTACM_DATABASE_URL={self.database_url} "
                f"otacm orders show {self.example_reference}"
            )


def connection_from_sandbox(sandbox_url: str, http: httpx.Client) -> VenueConnection:
    """A venue connection for the sandbox at ``sandbox_url``, from its ``/_sandbox/config``."""
    config = http.get(f"{sandbox_url}/_sandbox/config").raise_for_status().json()
    return VenueConnection(
        name="sandbox",
        api_base_url=sandbox_url,
        tenant=config["tenant"],
        environment=config["environment"],
        company=config["company"],
        api_key=SecretStr(config["apiKey"]),
        partner_ids=[p["id"] for p in config["partners"] if p["active"]],
        webhook_client_states=[SecretStr(secrets.token_urlsafe(24))],
    )


def sample_orders(
    catalog: Sequence[dict[str, Any]],
    partner_id: str,
    count: int,
    *,
    rng: random.Random,
    today: dt.date,
    run_tag: str,
) -> list[tuple[OrderRequest, Decimal, str]]:
    """``count`` orders over the catalog, each with what the shop charged and its currency."""
    visit = today + dt.timedelta(days=7)
    packages = [entry for entry in catalog if entry["kind"] == "package"]
    orders = []
    for number in range(1, count + 1):
        last = number == count
        # The last order is always a package with a broken schedule: one Error to show.
        entry = rng.choice(packages) if last and packages else rng.choice(catalog)
        quantity = 1 if entry["kind"] == "package" else rng.randint(1, 3)
        wallets = 1 if entry["kind"] == "group" else quantity
        reference = f"DEMO-{run_tag}-{number:04d}"
        wallet = WalletRequest(
            names=[rng.choice(GUESTS) for _ in range(wallets)],
            external_reference_numbers=[f"{reference}-{n}" for n in range(1, wallets + 1)],
            component_schedule=_schedule(entry, visit, broken=last),
        )
        paid = rng.random() < 0.75
        request = OrderRequest(
            partner_id=partner_id,
            sell_to_order_reference=reference,
            sell_to_email="guest@example.com",
            sell_to_name=wallet.names[0] if wallet.names else None,
            sell_to_language="ENU",
            payment_reference=f"PAY-{run_tag}-{number:04d}" if paid else None,
            items=[
                OrderRequestItem(
                    item_number=entry["itemNumber"],
                    visit_date=visit,
                    visit_time=dt.time(10, 30),
                    quantity=quantity,
                    wallet=wallet,
                )
            ],
        )
        charged = Decimal(str(entry["unitPriceInclVat"])) * quantity
        orders.append((request, charged, str(entry["currencyCode"])))
    return orders


def _schedule(entry: dict[str, Any], visit: dt.date, *, broken: bool) -> Any:
    if entry["kind"] != "package":
        return None
    tickets = [c["itemNumber"] for c in entry.get("components", []) if c["type"] == "ticket"]
    # One day before the line's visit: the venue refuses it when it processes the order.
    day = visit - dt.timedelta(days=1) if broken else visit
    return [
        {"itemNumber": t, "visitDate": day.isoformat(), "visitTime": "11:00:00"} for t in tickets
    ]


def free_port() -> int:
    """A loopback port that is free now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def daemon_environment(
    connection: VenueConnection, database_url: str, api_token: str
) -> dict[str, str]:
    """The child's environment: this one without any OTACM_*, plus the demo's venue."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("OTACM_")}
    environment.update(
        {
            "OTACM_DATABASE_URL": database_url,
            "OTACM_CONNECTION_NAME": connection.name,
            "OTACM_API_BASE_URL": connection.api_base_url,
            "OTACM_TENANT": connection.tenant,
            "OTACM_ENVIRONMENT": connection.environment,
            "OTACM_COMPANY": connection.company,
            "OTACM_API_KEY": connection.api_key.get_secret_value(),
            "OTACM_PARTNER_IDS": ",".join(connection.partner_ids),
            "OTACM_WEBHOOK_CLIENT_STATES": ",".join(
                s.get_secret_value() for s in connection.webhook_client_states
            ),
            "OTACM_API_TOKENS": api_token,
        }
    )
    return environment


@contextmanager
def running_daemon(environment: dict[str, str], bind: str, log: Path) -> Iterator[str]:
    """``otacm serve`` as a child process until the block ends; yields its base URL.

    Raises:
        click.ClickException: the daemon did not become ready.
    """
    url = f"http://{bind}"
    command = [sys.executable, "-m", "otacm", "serve", "--bind", bind, "--workers", "2"]
    with log.open("w") as output:
        child = subprocess.Popen(command, env=environment, stdout=output, stderr=output)
        try:
            wait_for(lambda: _ready(url), timeout=60, what=f"otacm serve (log: {log})")
            if child.poll() is not None:
                raise click.ClickException(f"otacm serve exited; see {log}")
            yield url
        finally:
            child.terminate()
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def wait_for(predicate: Callable[[], bool], *, timeout: float, what: str) -> None:
    """Return once ``predicate()`` holds; poll twice a second.

    Raises:
        click.ClickException: it did not hold within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise click.ClickException(f"gave up waiting for {what} after {timeout:.0f} s")
        time.sleep(0.5)


def settled_count(engine: sa.Engine, references: set[str]) -> int:
    """How many of ``references`` the local mirror holds in a settled status."""
    from storage.models import VenueOrder

    in_flight = [status for status in OrderStatus if status.in_flight]
    query = sa.select(sa.func.count()).where(
        VenueOrder.reference_key.in_(references), VenueOrder.status.not_in(in_flight)
    )
    with engine.connect() as connection:
        return int(connection.execute(query).scalar_one())


def mirror_report(engine: sa.Engine, references: set[str], report: DemoReport) -> None:
    """Fill ``report`` from the local mirror's orders of ``references``."""
    from sqlalchemy.orm import Session, selectinload

    from storage.models import OrderItem, VenueOrder

    query = (
        sa.select(VenueOrder)
        .where(VenueOrder.reference_key.in_(references))
        .options(selectinload(VenueOrder.items).selectinload(OrderItem.wallets))
        .order_by(VenueOrder.reference_key)
    )
    with Session(engine) as session:
        for order in session.scalars(query):
            report.by_status[order.status.value] += 1
            if order.status is OrderStatus.ERROR:
                report.errors.append((order.sell_to_order_reference, order.status_message or ""))
            elif order.status is OrderStatus.ISSUED and not report.example_reference:
                report.example_reference = order.sell_to_order_reference
            for item in order.items:
                report.wallets += len(item.wallets)
                priced = [w for w in item.wallets if w.unit_price_incl_vat is not None]
                if order.status is OrderStatus.ISSUED and priced:
                    # Prices are per unit: a group ticket's one wallet stands for every guest.
                    unit = priced[0].unit_price_incl_vat or Decimal(0)
                    report.amounts[priced[0].currency_code or "?"] += unit * item.quantity


def run_demo(
    *, orders: int, pickup_interval: float, seed: int | None, timeout: float, database_url: str
) -> DemoReport:
    """Run sandbox and daemon, send ``orders`` sample orders, report the local mirror.

    Raises:
        click.ClickException: the daemon did not start, or orders did not settle in time.
    """
    from sandbox import SandboxConfig, SandboxServer
    from storage.engine import make_engine
    from venue.client import open_client

    rng = random.Random(seed)  # noqa: S311 - sample orders, not secrets
    run_tag = f"{rng.randrange(16**4):04X}"
    report = DemoReport(database_url=database_url)
    api_token = secrets.token_urlsafe(24)
    with ExitStack() as stack:
        sandbox = stack.enter_context(SandboxServer(SandboxConfig(pickup_interval=pickup_interval)))
        click.echo(f"sandbox (the simulated venue) on {sandbox.url}")
        http = stack.enter_context(httpx.Client(timeout=30))
        connection = connection_from_sandbox(sandbox.url, http)
        catalog = http.get(f"{sandbox.url}/_sandbox/config").json()["catalog"]["items"]

        bind = f"127.0.0.1:{free_port()}"
        log = Path("var") / "demo-serve.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        environment = daemon_environment(connection, database_url, api_token)
        daemon = stack.enter_context(running_daemon(environment, bind, log))
        click.echo(f"otacm serve (web, worker, scheduler) on {daemon}; its log: {log}")

        client = stack.enter_context(open_client(connection))
        state = connection.webhook_client_states[0]
        client.create_subscription(f"{daemon}/webhooks/ota-cm", state)
        click.echo("subscribed the receiver to ota_cm_order_processed")

        samples = sample_orders(
            catalog,
            connection.partner_ids[0],
            orders,
            rng=rng,
            today=dt.datetime.now(dt.UTC).date(),
            run_tag=run_tag,
        )
        headers = {"Authorization": f"Bearer {api_token}"}
        with click.progressbar(samples, label="submitting orders to otacm ") as bar:
            for request, charged, currency in bar:
                body = {**request.to_wire(), "amount": str(charged), "currency": currency}
                answer = http.post(f"{daemon}/api/orders", json=body, headers=headers)
                if answer.status_code not in (200, 201, 202):
                    raise click.ClickException(f"POST /api/orders: {answer.text}")
        report.submitted = len(samples)
        references = {request.sell_to_order_reference.upper() for request, _, _ in samples}

        engine = make_engine(database_url)
        stack.callback(engine.dispose)
        with click.progressbar(
            length=len(references), label="settled in the local mirror"
        ) as settling:
            seen = 0

            def all_settled() -> bool:
                nonlocal seen
                now = settled_count(engine, references)
                settling.update(now - seen)
                seen = now
                return now == len(references)

            wait_for(all_settled, timeout=timeout, what="the orders to settle locally")
        mirror_report(engine, references, report)
        stats = http.get(f"{sandbox.url}/_sandbox/stats").json()
        report.venue_calls = {
            name: sum(by_status.values()) for name, by_status in stats["calls"].items()
        }
        report.webhooks_sent = int(stats["webhooks"]["sent"])
    return report


def fresh_demo_database() -> str:
    """The demo's own SQLite file under ./var/, emptied so each run starts clean."""
    DEMO_DATABASE.parent.mkdir(parents=True, exist_ok=True)
    for suffix in ("", "-wal", "-shm"):
        Path(f"{DEMO_DATABASE}{suffix}").unlink(missing_ok=True)
    return f"sqlite:///{DEMO_DATABASE.resolve()}"
