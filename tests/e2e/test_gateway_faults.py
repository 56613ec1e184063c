"""End to end over real HTTP with the gateway's delivery faults: notifications jittered
one by one across processing runs, several POSTs in flight at once, some twice.

Each test runs on SQLite and on PostgreSQL (``migrated_engine``).
"""

from __future__ import annotations

from tests.e2e.conftest import E2E


def test_concurrent_jittered_duplicated_webhooks_mirror_each_order_once(e2e: E2E) -> None:
    """Four POSTs in flight at once, each notification after its own random wait (so
    later runs overtake earlier ones), half of them twice: one inbox row, one getOrder
    and one mirrored order per order, as the venue has it."""
    e2e.faults(webhookConcurrency=4, webhookJitterSeconds=0.5, duplicateRate=0.5)
    first = e2e.create_many(8, "JIT-A")
    e2e.tick()
    second = e2e.create_many(8, "JIT-B", paid=False)
    e2e.tick()
    e2e.settle_webhooks()

    webhooks = e2e.stats()["webhooks"]
    assert (webhooks["failed"], webhooks["pending"]) == (0, 0)
    assert webhooks["sent"] == 16 + webhooks["duplicated"] > 16
    arrived = e2e.notified()
    assert sorted(arrived) == sorted(first + second)
    assert arrived != first + second  # the seeded jitter reordered them
    e2e.worker.drain()
    e2e.assert_mirrored(first + second)
    assert e2e.inbox_states() == {"done": 16}
    assert e2e.calls("getOrder") == 16
