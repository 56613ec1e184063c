"""End to end with otacm's real processes: ``otacm web`` under gunicorn, ``otacm worker``
killed mid-batch, and ``otacm orders show`` reading what they stored.

Each test runs on SQLite and on PostgreSQL (``migrated_engine``).
"""

from __future__ import annotations

import json
import signal
from collections.abc import Callable

import pytest

from otacm.settings import Settings
from tests.e2e.conftest import (
    E2E,
    OtacmProcess,
    line,
    metric,
    otacm_environment,
    run_otacm,
    wait_until,
)

pytestmark = pytest.mark.process


def test_otacm_web_under_gunicorn_takes_orders_and_webhooks(
    gunicorn_e2e: E2E, settings: Settings
) -> None:
    """Two gunicorn workers: orders submitted, webhooks sent twice stored once, shown by CLI."""
    e2e = gunicorn_e2e
    e2e.faults(duplicateRate=1.0)
    submitted = {}
    for n in range(6):
        body = e2e.order_body(f"WEB-{n:03d}", items=[line("40100", 1), line("31050", 5)])
        body.update(amount="235.00", currency="DKK")
        response = e2e.submit(body)
        assert response.status_code == 201, response.text
        submitted[response.json()["orderId"]] = response.json()

    e2e.deliver()

    webhooks = e2e.stats()["webhooks"]
    assert (webhooks["sent"], webhooks["duplicated"], webhooks["failed"]) == (12, 6, 0)
    assert sorted(e2e.notified()) == sorted(submitted)
    metrics = e2e.http.get("/metrics").text  # summed over both workers
    assert metric(metrics, "otacm_webhook_notifications_total", outcome="stored") == 6
    assert metric(metrics, "otacm_webhook_notifications_total", outcome="duplicate") == 6
    e2e.worker.drain()
    e2e.assert_mirrored(submitted)
    assert e2e.inbox_states() == {"done": 6}
    assert e2e.calls("getOrder") == 6

    order_id, answer = next(iter(submitted.items()))
    output = run_otacm(
        "orders", "show", answer["reference"], "--json", environment=otacm_environment(settings)
    )
    (story,) = json.loads(output)
    assert (story["orderId"], story["status"]) == (order_id, "Issued")
    assert story["buyFromOrderReference"] == answer["buyFromOrderReference"]
    assert [(t["status"], t["source"]) for t in story["timeline"]] == [
        ("Submitted", "submit"),
        ("Issued", "webhook"),
    ]
    assert [len(item["wallets"]) for item in story["items"]] == [1, 1]
    assert [len(w["assets"]) for w in story["items"][0]["wallets"]] == [3]
    assert (story["ledger"]["amount"], story["ledger"]["currency"]) == ("235.00", "DKK")


@pytest.mark.parametrize("settings_changes", [{"inbox_lease_seconds": 2.0}], ids=["lease2s"])
def test_a_worker_killed_mid_batch_loses_nothing_and_doubles_nothing(
    e2e: E2E, otacm: Callable[..., OtacmProcess], settings: Settings
) -> None:
    """``otacm worker`` SIGKILLed mid-batch: after its lease, every order mirrored once."""
    order_ids = e2e.create_many(30, "KILL")
    e2e.deliver()
    assert e2e.inbox_states() == {"pending": 30}
    e2e.faults(latencyMs=150)  # each getOrder slow, so the batch takes seconds

    worker = otacm("worker", environment=otacm_environment(settings))

    def mid_batch() -> bool:
        assert worker.alive(), worker.output()
        states = e2e.inbox_states()
        return states["done"] >= 2 and states["leased"] >= 1

    wait_until(mid_batch, 30, what="the worker to be part-way through its batch")
    assert worker.kill() == -signal.SIGKILL
    e2e.faults(latencyMs=0)
    stranded = {row.id: row for row in e2e.inbox() if str(row.state) == "leased"}
    assert stranded, "the killed worker left no row leased"
    assert all(row.attempts == 1 for row in stranded.values())

    with e2e.worker.running():
        wait_until(lambda: e2e.inbox_states() == {"done": 30}, 30, what="every row done")

    for row in e2e.inbox():
        if row.id in stranded:
            # Taken again only once the dead worker's lease had expired.
            expired = stranded[row.id].lease_expires_at
            assert expired is not None
            assert row.processed_at is not None
            assert row.processed_at >= expired
            assert row.attempts == 2
        else:
            assert row.attempts == 1
    e2e.assert_mirrored(order_ids)
    assert all(e2e.history(order_id) == [("Issued", "webhook")] for order_id in order_ids)
    counts = e2e.status_change_counts()
    assert len(counts) == 30
    assert set(counts.values()) == {1}
    # At most the calls the killed worker had in flight or answered and not yet applied,
    # again: its fetch concurrency.
    assert 30 <= e2e.calls("getOrder") <= 30 + settings.worker_fetch_concurrency
