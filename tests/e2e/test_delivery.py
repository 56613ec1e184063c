"""End to end over real HTTP: orders in, webhooks delivered by the sandbox, orders mirrored.

Every test runs on SQLite and on PostgreSQL (``migrated_engine``). The sandbox delivers
to the receiver in werkzeug's server; the worker runs in this process against the
sandbox's API. "Mirrored" is checked against the venue's own copy of the order, read
in-process from the sandbox so that the checks add no getOrder call to the counters.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.e2e.conftest import E2E, line, metric, wait_until
from venue.models import OrderStatus

ISSUED, DRAFT = str(OrderStatus.ISSUED), str(OrderStatus.DRAFT)


def sample_order(e2e: E2E, n: int) -> tuple[dict[str, Any], int]:
    """The ``n``-th of a mix of submissions, and how many wallets it must issue.

    One and several lines, two currencies, a package (three assets per wallet), a group
    (one wallet for twelve people) and partner reference numbers; every fifth is unpaid
    (no paymentReference), so it ends as Draft.
    """
    reference = f"E2E-{n:03d}"
    kind = n % 5
    if kind == 0:
        items, wallets = [line("31001", 2)], 2
    elif kind == 1:
        items, wallets = [line("31002", 1), line("52001", 3)], 4
    elif kind == 2:
        items, wallets = [line("40100", 2)], 2
    elif kind == 3:
        items, wallets = [line("31050", 12)], 1
    else:
        external = {"externalReferenceNumbers": [f"EXT-{n}-A", f"EXT-{n}-B"]}
        items, wallets = [line("52100", 2, wallet=external), line("CPN-PARK", 1)], 3
    body = e2e.order_body(reference, paid=kind != 1, items=items)
    body.update(amount="250.00", currency="DKK")
    return body, wallets


def test_twenty_submitted_orders_are_mirrored_with_all_their_wallets(e2e: E2E) -> None:
    """20 orders through POST /api/orders end mirrored in full, with one getOrder each."""
    expected_wallets: dict[str, int] = {}
    expected_status: dict[str, str] = {}
    submitted: dict[str, dict[str, Any]] = {}
    for n in range(20):
        body, wallets = sample_order(e2e, n)
        response = e2e.submit(body)
        assert response.status_code == 201, response.text
        answer = response.json()
        assert (answer["outcome"], answer["status"]) == ("sent", "Submitted")
        expected_wallets[answer["orderId"]] = wallets
        expected_status[answer["orderId"]] = ISSUED if "paymentReference" in body else DRAFT
        submitted[answer["orderId"]] = answer

    cycle = e2e.deliver()

    assert len(cycle.processed) == 20
    assert e2e.stats()["webhooks"] == {
        "sent": 20,
        "failed": 0,
        "dropped": 0,
        "duplicated": 0,
        "posts": 1,
        "retries": 0,
        "pending": 0,
    }
    assert e2e.inbox_states() == {"pending": 20}

    report = e2e.worker.drain()

    assert (report.done, report.fetched, report.retried, report.dead) == (20, 20, 0, 0)
    assert e2e.inbox_states() == {"done": 20}
    mirrored = e2e.assert_mirrored(submitted)
    for order_id, row in mirrored.items():
        final = expected_status[order_id]
        assert str(row.status) == final
        assert row.buy_from_order_reference == submitted[order_id]["buyFromOrderReference"]
        assert sum(len(item.wallets) for item in row.items) == expected_wallets[order_id]
        assert e2e.history(order_id) == [("Submitted", "submit"), (final, "webhook")]
    statuses = [str(row.status) for row in mirrored.values()]
    assert (statuses.count(ISSUED), statuses.count(DRAFT)) == (16, 4)
    assert e2e.calls("getOrder") <= 1.05 * 20
    assert e2e.calls("createOrder") == 20


@pytest.mark.parametrize("envelope", ["value", "values", "bare"])
def test_each_envelope_shape_is_stored_and_mirrored(e2e: E2E, envelope: str) -> None:
    """Deliveries as {"value": [...]}, {"values": [...]} and bare objects are all taken."""
    assert e2e.faults(envelope=envelope)["envelope"] == envelope
    order_ids = e2e.create_many(3, f"ENV-{envelope.upper()}")

    e2e.deliver()

    webhooks = e2e.stats()["webhooks"]
    assert (webhooks["sent"], webhooks["failed"]) == (3, 0)
    assert webhooks["posts"] == (3 if envelope == "bare" else 1)
    rows = e2e.inbox()
    assert sorted(e2e.notified()) == sorted(order_ids)
    for row in rows:
        assert row.event_name == "ota_cm_order_processed"
        assert row.notified_status == ISSUED
        assert row.payload["payload"]["orderId"] == row.order_id
        assert "clientState" not in row.payload  # the secret is never stored
    e2e.worker.drain()
    e2e.assert_mirrored(order_ids)
    assert e2e.inbox_states() == {"done": 3}


def test_duplicate_deliveries_are_stored_once_and_fetched_once(e2e: E2E) -> None:
    """Every notification sent twice: one inbox row and one getOrder per order."""
    e2e.faults(duplicateRate=1.0)
    order_ids = e2e.create_many(6, "DUP")

    e2e.deliver()

    webhooks = e2e.stats()["webhooks"]
    assert (webhooks["sent"], webhooks["duplicated"], webhooks["posts"]) == (12, 6, 2)
    assert len(e2e.inbox()) == 6
    metrics = e2e.http.get("/metrics").text
    assert metric(metrics, "otacm_webhook_notifications_total", outcome="stored") == 6
    assert metric(metrics, "otacm_webhook_notifications_total", outcome="duplicate") == 6
    e2e.worker.drain()
    e2e.assert_mirrored(order_ids)
    assert e2e.calls("getOrder") == 6
    assert all(e2e.history(order_id) == [(ISSUED, "webhook")] for order_id in order_ids)


@pytest.mark.parametrize(
    "sandbox_changes",
    [pytest.param({"webhook_max_batch": 2}, id="batch2"), pytest.param({}, id="batch100")],
)
def test_reordered_and_batched_deliveries_are_all_mirrored(
    e2e: E2E, sandbox_changes: dict[str, Any]
) -> None:
    """Shuffled notifications, several per tick, in small or large batches: all mirrored."""
    e2e.faults(reorder=True)
    first = e2e.create_many(7, "REORDER-A")
    e2e.deliver()
    second = e2e.create_many(5, "REORDER-B", paid=False)
    e2e.deliver()

    batch = e2e.sandbox.config.webhook_max_batch
    posts = -(-7 // batch) + -(-5 // batch)
    assert e2e.stats()["webhooks"] == {
        "sent": 12,
        "failed": 0,
        "dropped": 0,
        "duplicated": 0,
        "posts": posts,
        "retries": 0,
        "pending": 0,
    }
    arrived = e2e.notified()
    assert sorted(arrived) == sorted(first + second)
    assert arrived[:7] != first  # the seeded shuffle did reorder the first run
    e2e.worker.drain()
    mirrored = e2e.assert_mirrored(first + second)
    assert [str(mirrored[i].status) for i in first] == [ISSUED] * 7
    assert [str(mirrored[i].status) for i in second] == [DRAFT] * 5
    assert e2e.calls("getOrder") == 12


def test_a_stale_notification_arriving_late_does_not_roll_the_mirror_back(e2e: E2E) -> None:
    """A delayed Draft notice that arrives after the Issued one leaves the order Issued."""
    order = e2e.create("STALE-001", paid=False)
    e2e.faults(delaySeconds=1.5)
    e2e.tick()  # Draft, announced in 1.5 s
    replaced = e2e.venue.replace_order(order.order_id, e2e.order_request("STALE-001", paid=True))
    assert replaced.status is OrderStatus.SUBMITTED
    e2e.faults(delaySeconds=0)
    e2e.tick()  # Issued, announced at once: it overtakes the Draft notice

    first = wait_until(e2e.inbox, 5, what="the Issued notification")
    assert [row.notified_status for row in first] == [ISSUED]
    e2e.worker.drain()
    assert str(e2e.assert_mirrored([order.order_id])[order.order_id].status) == ISSUED
    e2e.settle_webhooks()
    assert [row.notified_status for row in e2e.inbox()] == [ISSUED, DRAFT]
    e2e.worker.drain()

    assert str(e2e.assert_mirrored([order.order_id])[order.order_id].status) == ISSUED
    assert e2e.history(order.order_id) == [(ISSUED, "webhook")]
    assert e2e.inbox_states() == {"done": 2}


def test_delayed_deliveries_are_still_mirrored_once(e2e: E2E) -> None:
    """Webhooks held back by the venue arrive late and are mirrored once, worker running."""
    e2e.faults(delaySeconds=0.5)
    order_ids = e2e.create_many(5, "DELAY")
    with e2e.worker.running():
        e2e.tick()
        assert e2e.inbox() == []  # nothing has arrived before the delay
        e2e.settle_webhooks()
        wait_until(lambda: e2e.inbox_states() == {"done": 5}, 10, what="the worker to finish")

    e2e.assert_mirrored(order_ids)
    assert e2e.calls("getOrder") == 5
    assert all(e2e.history(order_id) == [(ISSUED, "webhook")] for order_id in order_ids)


def test_a_confirmed_draft_is_not_announced_by_webhook(e2e: E2E) -> None:
    """confirmOrder fires no webhook (a venue rule): the mirror keeps Draft until polled."""
    order = e2e.create("CONFIRM-001", paid=False)
    e2e.deliver()
    e2e.worker.drain()
    assert str(e2e.assert_mirrored([order.order_id])[order.order_id].status) == DRAFT
    before = e2e.stats()["webhooks"]

    confirmed = e2e.venue.confirm_order(order.order_id, "PAY-LATE")
    e2e.deliver()

    assert confirmed.status is OrderStatus.ISSUED
    assert e2e.stats()["webhooks"] == before  # no notification for the confirm
    assert len(e2e.inbox()) == 1
    assert e2e.worker.drain().claimed == 0
    # The gap the heartbeat (polling, issue 5) closes: the mirror still says Draft.
    row = e2e.mirror(order.order_id)
    assert row is not None
    assert str(row.status) == DRAFT
