"""The demo's shop: the sample orders it sells (:func:`sample_orders`), submits through
otacm's API as a shop does (:func:`submit_order`), and its ledger export
(:func:`shop_export`, :func:`write_ledger`).
"""

from __future__ import annotations

import datetime as dt
import json
import random
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import click
import httpx
import sqlalchemy as sa
import stamina

from venue.models import OrderRequest, OrderRequestItem, WalletRequest

GUESTS = ("Ada Lovelace", "Alan Turing", "Grace Hopper", "Edsger Dijkstra", "Barbara Liskov")
PLANTED_SALES = 2
"""The first sample orders: paid tickets, on which the ledger mismatches are planted."""
PER_UNIT_KINDS = ("ticket", "coupon")
"""Catalog kinds with one wallet per unit of quantity."""
SUBMIT_DEADLINE = 60.0
"""Seconds a sample order is retried while otacm answers "retry later"."""


def sample_orders(
    catalog: Sequence[dict[str, Any]],
    currency: str,
    partner_id: str,
    count: int,
    *,
    rng: random.Random,
    today: dt.date,
    run_tag: str,
) -> list[tuple[OrderRequest, Decimal, str]]:
    """``count`` orders over the catalog, each with what the shop charged and its currency
    (``currency``: the venue's own, in which it prices every wallet).

    A few roles are fixed, so that every run shows every case: the last order is an
    item the catalog marks ``soldOut`` (→ Error: the venue accepts it and its ticket
    import fails); no other order is drawn from those; the first :data:`PLANTED_SALES` are
    paid tickets with a wallet per unit (→ Issued, and their ledger lines match the venue
    exactly: the demo plants its ledger mismatches on them); the one before last is
    unpaid (→ Draft). The others are drawn at random, three in four paid.
    """
    visit = today + dt.timedelta(days=7)
    sold_out = [entry for entry in catalog if entry.get("soldOut")]
    on_sale = [entry for entry in catalog if not entry.get("soldOut")] or list(catalog)
    per_unit = [entry for entry in on_sale if entry["kind"] in PER_UNIT_KINDS] or on_sale
    orders = []
    for number in range(1, count + 1):
        last = number == count
        planted = number <= PLANTED_SALES and not last
        unpaid = number == count - 1 and number > PLANTED_SALES
        if last and sold_out:
            entry = rng.choice(sold_out)
        elif planted:
            entry = rng.choice(per_unit)
        else:
            entry = rng.choice(on_sale)
        paid = planted or (not unpaid and rng.random() < 0.75)
        orders.append(
            sample_order(
                entry,
                currency,
                partner_id,
                f"DEMO-{run_tag}-{number:04d}",
                rng=rng,
                visit=visit,
                payment_reference=f"PAY-{run_tag}-{number:04d}" if paid else None,
            )
        )
    return orders


def sample_order(
    entry: dict[str, Any],
    currency: str,
    partner_id: str,
    reference: str,
    *,
    rng: random.Random,
    visit: dt.date,
    payment_reference: str | None,
) -> tuple[OrderRequest, Decimal, str]:
    """One order of ``entry``: the request, what the shop charged, and its currency."""
    quantity = 1 if entry["kind"] == "package" else rng.randint(1, 3)
    wallets = 1 if entry["kind"] == "group" else quantity
    wallet = WalletRequest(
        names=[rng.choice(GUESTS) for _ in range(wallets)],
        external_reference_numbers=[f"{reference}-{n}" for n in range(1, wallets + 1)],
        component_schedule=_schedule(entry, visit),
    )
    request = OrderRequest(
        partner_id=partner_id,
        sell_to_order_reference=reference,
        sell_to_email="guest@example.com",
        sell_to_name=wallet.names[0] if wallet.names else None,
        sell_to_language="ENU",
        payment_reference=payment_reference,
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
    return request, charged, currency


def _schedule(entry: dict[str, Any], visit: dt.date) -> Any:
    if entry["kind"] != "package":
        return None
    tickets = [c["itemNumber"] for c in entry.get("components", []) if c["type"] == "ticket"]
    return [
        {"itemNumber": t, "visitDate": visit.isoformat(), "visitTime": "11:00:00"} for t in tickets
    ]


class _Busy(Exception):
    """otacm answered "retry later" (429, 503): its database was busy."""


def submit_order(
    http: httpx.Client, daemon: str, api_token: str, body: dict[str, Any], *, log: Path
) -> None:
    """``POST /api/orders`` as a shop does: "retry later" (429, 503) is retried with backoff
    for up to :data:`SUBMIT_DEADLINE` seconds, as the API asks; anything else but success
    ends the demo.

    Raises:
        click.ClickException: otacm refused the order, or stayed busy past the deadline.
    """
    answer = None
    try:
        for attempt in stamina.retry_context(on=_Busy, attempts=None, timeout=SUBMIT_DEADLINE):
            with attempt:
                answer = http.post(
                    f"{daemon}/api/orders",
                    json=body,
                    headers={"Authorization": f"Bearer {api_token}"},
                )
                if answer.status_code in (429, 503):
                    raise _Busy
    except _Busy:
        pass
    if answer is None or answer.status_code not in (200, 201, 202):
        text = answer.text if answer is not None else "no answer"
        raise click.ClickException(f"POST /api/orders: {text} (the daemon's log: {log})")


def shop_export(
    engine: sa.Engine, connection_id: int, references: set[str]
) -> list[dict[str, Any]]:
    """The shop's export of its sales of ``references``, in the ledger file's columns.

    The demo has no shop of its own, so the export is what otacm recorded of the sales it
    submitted: imported unchanged, each row changes nothing.
    """
    from storage.engine import make_sessions
    from storage.models import LedgerLine

    query = (
        sa.select(LedgerLine)
        .where(LedgerLine.connection_id == connection_id, LedgerLine.reference_key.in_(references))
        .order_by(LedgerLine.reference_key)
    )
    with make_sessions(engine, read_only=True)() as session:
        return [
            {
                "partner_id": line.partner_id,
                "reference": line.shop_reference,
                "sold_at": line.sold_at.isoformat(),
                "quantity": line.quantity,
                "amount": str(line.amount),
                "currency": line.currency,
                "amount_includes_vat": line.amount_includes_vat,
                "payment_reference": line.payment_reference,
                "venue_reference": line.venue_reference,
                "external_reference_numbers": line.external_reference_numbers,
                "state": line.state.value,
            }
            for line in session.scalars(query)
        ]


def write_ledger(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Write ``rows`` as a JSON lines ledger file (``docs/ledger-format.md``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        for row in rows:
            present = {key: value for key, value in row.items() if value is not None}
            out.write(json.dumps(present, ensure_ascii=False) + "\n")
