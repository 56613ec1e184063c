"""``otacm demo``: the whole round trip against the built-in sandbox, for a newcomer to watch.

It starts the sandbox on loopback, configures a venue connection from the sandbox's own
``/_sandbox/config`` (as any client of it would), submits a stream of sample orders
through otacm's venue client, waits for the venue's pipeline to settle them, confirms the
Drafts, and ends with a summary: orders by status, wallets minted, amounts per currency,
and the reason of every Error. Sample orders are drawn from the sandbox's catalog with a
seeded random generator, so a run can be repeated exactly.
"""

from __future__ import annotations

import datetime as dt
import random
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import click
import httpx
from pydantic import SecretStr

from otacm.settings import VenueConnection
from venue.client import VenueClient
from venue.models import Order, OrderRequest, OrderRequestItem, OrderStatus, WalletRequest

GUESTS = ("Ada Lovelace", "Alan Turing", "Grace Hopper", "Edsger Dijkstra", "Barbara Liskov")


@dataclass
class DemoReport:
    """What the demo saw, for its closing summary."""

    submitted: int = 0
    confirmed: int = 0
    by_status: Counter[str] = field(default_factory=Counter)
    wallets: int = 0
    amounts: dict[str, Decimal] = field(default_factory=lambda: defaultdict(Decimal))
    errors: list[tuple[str, str]] = field(default_factory=list)
    venue_calls: int = 0

    def lines(self) -> Iterator[str]:
        """The summary as lines for a terminal."""
        yield f"orders submitted: {self.submitted}, Drafts confirmed: {self.confirmed}"
        for status, count in sorted(self.by_status.items()):
            yield f"  {status:<10} {count}"
        yield f"wallets minted: {self.wallets}"
        for currency, amount in sorted(self.amounts.items()):
            yield f"  issued value {currency}: {amount:.2f} incl. VAT"
        for reference, reason in self.errors:
            yield f"  {reference} ended in Error: {reason}"
        yield f"venue API calls: {self.venue_calls}"


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
    )


def sample_orders(
    catalog: Sequence[dict[str, Any]],
    partner_id: str,
    count: int,
    *,
    rng: random.Random,
    today: dt.date,
    run_tag: str,
) -> list[OrderRequest]:
    """``count`` orders over the catalog: most paid (→ Issued), some not (→ Draft), and one
    package with an impossible component schedule (→ Error), as a shop would send them."""
    visit = today + dt.timedelta(days=7)
    orders = []
    packages = [entry for entry in catalog if entry["kind"] == "package"]
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
        orders.append(
            OrderRequest(
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
        )
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


def wait_until_settled(
    client: VenueClient,
    partner_id: str,
    order_ids: set[str],
    *,
    timeout: float,
    on_progress: Callable[[int], None],
) -> list[Order]:
    """Poll the partner's in-flight list until none of ``order_ids`` is in flight.

    One list call per round (not a getOrder per order), then one getOrder per settled
    order for its wallets.

    Raises:
        TimeoutError: orders were still in flight after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    in_flight = [s.value for s in OrderStatus if s.in_flight]
    settled_before = 0
    while True:
        pending = {s.order_id for s in client.list_orders(partner_id, statuses=in_flight)}
        pending &= order_ids
        settled = len(order_ids) - len(pending)
        on_progress(settled - settled_before)
        settled_before = settled
        if not pending:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(pending)} orders still in flight after {timeout:.0f} s")
        time.sleep(0.5)
    return [client.get_order(order_id) for order_id in sorted(order_ids)]


def summarize(orders: Sequence[Order], report: DemoReport) -> None:
    """Add the settled ``orders`` to ``report``."""
    for order in orders:
        report.by_status[order.status.value] += 1
        if order.status is OrderStatus.ERROR:
            report.errors.append((order.sell_to_order_reference, order.status_message or ""))
        for item in order.items:
            report.wallets += len(item.wallets)
            priced = [w for w in item.wallets if w.unit_price_incl_vat is not None]
            if order.status is OrderStatus.ISSUED and priced:
                # Prices are per unit: a group ticket's one wallet stands for every guest.
                unit = priced[0].unit_price_incl_vat or Decimal(0)
                report.amounts[priced[0].currency_code or "?"] += unit * item.quantity


def run_demo(
    *, orders: int, pickup_interval: float, seed: int | None, timeout: float
) -> DemoReport:
    """Start the sandbox, send ``orders`` sample orders through otacm's client, settle them.

    Raises:
        TimeoutError: the sandbox did not settle every order within ``timeout`` seconds.
    """
    from sandbox import SandboxConfig, SandboxServer
    from venue.client import open_client

    rng = random.Random(seed)  # noqa: S311 - sample orders, not secrets
    run_tag = f"{rng.randrange(16**4):04X}"
    report = DemoReport()
    with SandboxServer(SandboxConfig(pickup_interval=pickup_interval)) as sandbox:
        click.echo(f"sandbox (the simulated venue) listening on {sandbox.url}")
        with httpx.Client(timeout=10) as http:
            connection = connection_from_sandbox(sandbox.url, http)
            catalog = http.get(f"{sandbox.url}/_sandbox/config").json()["catalog"]["items"]
        partner_id = connection.partner_ids[0]
        requests = sample_orders(
            catalog,
            partner_id,
            orders,
            rng=rng,
            today=dt.datetime.now(dt.UTC).date(),
            run_tag=run_tag,
        )
        with open_client(connection) as client:
            order_ids: dict[str, Order] = {}
            with click.progressbar(requests, label="submitting orders    ") as bar:
                for request in bar:
                    order = client.create_order(request)
                    order_ids[order.order_id] = order
            report.submitted = len(order_ids)
            click.echo(f"all {len(order_ids)} orders Submitted; the venue picks them up")
            with click.progressbar(length=len(order_ids), label="waiting for the venue") as bar:
                settled = wait_until_settled(
                    client, partner_id, set(order_ids), timeout=timeout, on_progress=bar.update
                )
            drafts = [o for o in settled if o.status is OrderStatus.DRAFT]
            for draft in drafts:
                client.confirm_order(draft.order_id, f"PAY-{run_tag}-LATE")
            report.confirmed = len(drafts)
            final = [client.get_order(order_id) for order_id in sorted(order_ids)]
            summarize(final, report)
        stats = httpx.get(f"{sandbox.url}/_sandbox/stats", timeout=10).json()
        report.venue_calls = sum(
            count for by_status in stats["calls"].values() for count in by_status.values()
        )
    return report
