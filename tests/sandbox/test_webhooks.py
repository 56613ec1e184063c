"""Webhook subscriptions and ``ota_cm_order_processed`` delivery, seen by a real receiver."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable

import pytest

from tests.sandbox.conftest import CLIENT_STATE, OTHER_PARTNER, Receiver, Venue, order_body
from venue.webhooks import ORDER_PROCESSED_EVENT


def test_subscriptions_can_be_created_listed_read_and_deleted(venue: Venue) -> None:
    """POST /webhook, GET /webhooks (and /webhook), GET and DELETE /webhook/{id}."""
    created = venue.subscribe("https://partner.example/hooks")
    subscription_id = created["id"]
    assert created["notificationUrl"] == "https://partner.example/hooks"
    assert created["eventName"] == ORDER_PROCESSED_EVENT

    assert [s["id"] for s in venue.api.get("/webhooks").json()["value"]] == [subscription_id]
    assert [s["id"] for s in venue.api.get("/webhook").json()["value"]] == [subscription_id]
    assert venue.api.get(f"/webhook/{subscription_id}").json()["id"] == subscription_id

    assert venue.api.delete(f"/webhook/{subscription_id}").status_code == 200
    gone = venue.api.get(f"/webhook/{subscription_id}")
    assert gone.status_code == 404 and gone.json()["code"] == "resource_not_found"
    assert venue.api.get("/webhooks").json()["value"] == []


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"clientState": "x" * 51}, "clientState: String should have at most 50 characters"),
        ({"eventName": "order_shipped"}, "Unknown eventName 'order_shipped'"),
        ({"notificationUrl": "ftp://x"}, "notificationUrl must be an absolute http(s) URL"),
        ({"notificationUrl": None}, "notificationUrl: Input should be a valid string"),
    ],
    ids=["client-state-too-long", "unknown-event", "not-http", "no-url"],
)
def test_invalid_subscriptions_are_refused(venue: Venue, changes: dict, message: str) -> None:
    """A subscription the venue would not take is a 400 naming the problem."""
    body = {
        "notificationUrl": "https://partner.example/hooks",
        "eventName": ORDER_PROCESSED_EVENT,
        "clientState": CLIENT_STATE,
        **changes,
    }
    response = venue.api.post("/webhook", json=body)
    assert response.status_code == 400
    assert response.json() == {"code": "generic_error", "message": message}


def test_a_processing_run_is_announced_in_one_post(venue: Venue, receiver: Receiver) -> None:
    """All orders one cycle settles arrive in one POST, with the venue's fields."""
    venue.subscribe(receiver.url)
    paid = venue.create(order_body("A"))
    draft = venue.create(order_body("B", payment=None))
    venue.tick()

    (body,) = receiver.wait_for_posts(1)
    assert set(body) == {"value"}
    notes = receiver.notifications()
    assert [n.payload for n in notes] == [
        {
            "orderId": paid["orderId"],
            "buyFromOrderReference": paid["buyFromOrderReference"],
            "status": "Issued",
        },
        {
            "orderId": draft["orderId"],
            "buyFromOrderReference": draft["buyFromOrderReference"],
            "status": "Draft",
        },
    ]
    for note in notes:
        assert note.client_state == CLIENT_STATE
        assert note.event_name == ORDER_PROCESSED_EVENT
        assert note.app_id == "992c2309-cca4-43cb-9e41-911f482ec088"
        assert note.event_version == "1.0"
        assert note.company_name == "CRONUS International Ltd."
        assert note.timestamp is not None


def test_an_error_run_is_announced(venue: Venue, receiver: Receiver) -> None:
    """A run that ends in Error is announced with status Error."""
    venue.subscribe(receiver.url)
    venue.faults(errorRate=1)
    venue.create(order_body())
    venue.tick()
    receiver.wait_for_posts(1)
    assert [n.payload["status"] for n in receiver.notifications()] == ["Error"]


def test_no_webhook_for_confirm_delete_sync_or_sweeper(venue: Venue, receiver: Receiver) -> None:
    """confirmOrder, deleteOrder, ``?sync=1`` and the sweeper fire nothing."""
    venue.subscribe(receiver.url)
    draft = venue.create(order_body("DRAFT", payment=None))["orderId"]
    venue.tick()
    receiver.wait_for_posts(1)

    venue.api.post(f"/channelManager/{draft}/confirm", json={"paymentReference": "P"})
    venue.api.delete(f"/channelManager/{draft}")
    synced = venue.api.post("/channelManager", params={"sync": "1"}, json=order_body("SYNC"))
    assert synced.json()["status"] == "Issued"
    venue.faults(stallProcessingRate=1)
    venue.create(order_body("STUCK"))
    venue.tick()
    venue.advance(3601)
    swept = venue.tick()
    assert len(swept["timedOut"]) == 1

    stats = venue.settle_webhooks()
    assert len(receiver.bodies) == 1
    assert stats["webhooks"]["sent"] == 1


def test_each_replace_is_announced_again(venue: Venue, receiver: Receiver) -> None:
    """A replaced order's new processing run fires a second notification for it."""
    venue.subscribe(receiver.url)
    order_id = venue.create(order_body(payment=None))["orderId"]
    venue.tick()
    venue.api.put(f"/channelManager/{order_id}", json=order_body())
    venue.tick()
    receiver.wait_for_posts(2)
    notes = receiver.notifications()
    assert [(n.payload["orderId"], n.payload["status"]) for n in notes] == [
        (order_id, "Draft"),
        (order_id, "Issued"),
    ]


def test_every_subscription_gets_its_own_client_state(venue: Venue, receiver: Receiver) -> None:
    """Two subscriptions each receive the run, each with the clientState it chose."""
    venue.subscribe(receiver.url, client_state="first")
    venue.subscribe(receiver.url, client_state="second")
    venue.create(order_body())
    venue.tick()
    receiver.wait_for_posts(2)
    assert sorted(n.client_state for n in receiver.notifications()) == ["first", "second"]


@pytest.mark.parametrize(("envelope", "posts"), [("value", 1), ("values", 1), ("bare", 3)])
def test_envelope_shapes(venue: Venue, receiver: Receiver, envelope: str, posts: int) -> None:
    """``value`` and ``values`` wrap the run's list; ``bare`` POSTs each notification alone."""
    venue.subscribe(receiver.url)
    venue.faults(envelope=envelope)
    for n in range(3):
        venue.create(order_body(f"E-{n}"))
    venue.tick()

    bodies = receiver.wait_for_posts(posts)
    venue.settle_webhooks()
    assert len(receiver.bodies) == posts
    if envelope == "bare":
        assert all(body["eventName"] == ORDER_PROCESSED_EVENT for body in bodies)
    else:
        assert list(bodies[0]) == [envelope] and len(bodies[0][envelope]) == 3
    assert len(receiver.notifications()) == 3


def test_batches_are_capped(make_venue: Callable[..., Venue], receiver: Receiver) -> None:
    """With ``webhook_max_batch=2`` a run of 5 notifications takes 3 POSTs."""
    venue = make_venue(webhook_max_batch=2)
    venue.subscribe(receiver.url)
    for n in range(5):
        venue.create(order_body(f"M-{n}"))
    venue.tick()
    receiver.wait_for_posts(3)
    assert [len(body["value"]) for body in receiver.bodies] == [2, 2, 1]


def test_retryable_answers_are_retried(venue: Venue, receiver: Receiver) -> None:
    """503 and 429 answers are retried until the receiver takes the POST."""
    venue.subscribe(receiver.url)
    receiver.answers = [503, 429]
    venue.create(order_body())
    venue.tick()
    receiver.wait_for_posts(1)
    stats = venue.settle_webhooks()["webhooks"]
    assert (stats["posts"], stats["retries"], stats["sent"], stats["failed"]) == (3, 2, 1, 0)


def test_other_4xx_answers_are_final(venue: Venue, receiver: Receiver) -> None:
    """A 400 answer is not retried: the notification counts as failed."""
    venue.subscribe(receiver.url)
    receiver.answers = [400]
    venue.create(order_body())
    venue.tick()
    stats = venue.settle_webhooks()["webhooks"]
    assert (stats["posts"], stats["sent"], stats["failed"]) == (1, 0, 1)
    assert receiver.bodies == []


def test_retries_are_bounded(make_venue: Callable[..., Venue], receiver: Receiver) -> None:
    """A receiver that keeps failing gets ``webhook_max_attempts`` POSTs, then it is failed."""
    venue = make_venue(webhook_max_attempts=3)
    venue.subscribe(receiver.url)
    receiver.answers = [500] * 10
    venue.create(order_body())
    venue.tick()
    stats = venue.settle_webhooks()["webhooks"]
    assert (stats["posts"], stats["retries"], stats["failed"]) == (3, 2, 1)


def test_drop_and_duplicate_faults_show_at_the_receiver(venue: Venue, receiver: Receiver) -> None:
    """Dropped notifications never arrive, duplicated ones arrive twice, and the counts
    the receiver sees are the ones /_sandbox/stats reports."""
    venue.subscribe(receiver.url)
    venue.faults(dropRate=0.3, duplicateRate=0.3, envelope="bare", seed=11)
    created = [venue.create(order_body(f"D-{n}"))["orderId"] for n in range(30)]
    venue.tick()

    stats = venue.settle_webhooks()["webhooks"]
    seen = Counter(n.payload["orderId"] for n in receiver.notifications())
    dropped = [order_id for order_id in created if order_id not in seen]
    duplicated = [order_id for order_id, count in seen.items() if count == 2]

    assert dropped and duplicated  # the seed makes both faults fire
    assert set(seen.values()) <= {1, 2}
    assert stats["dropped"] == len(dropped)
    assert stats["duplicated"] == len(duplicated)
    assert stats["sent"] == sum(seen.values()) == len(created) - len(dropped) + len(duplicated)


def test_reorder_shuffles_the_run(venue: Venue, receiver: Receiver) -> None:
    """With ``reorder`` the run's notifications arrive in another order than processed."""
    venue.subscribe(receiver.url)
    venue.faults(reorder=True, seed=3)
    created = [venue.create(order_body(f"O-{n}"))["orderId"] for n in range(10)]
    venue.tick()
    receiver.wait_for_posts(1)
    arrived = [n.payload["orderId"] for n in receiver.notifications()]
    assert sorted(arrived) == sorted(created)
    assert arrived != created


def test_delay_holds_each_post_back(venue: Venue, receiver: Receiver) -> None:
    """``delaySeconds`` delays the POST, without holding up the pickup cycle."""
    venue.subscribe(receiver.url)
    venue.faults(delaySeconds=0.3)
    venue.create(order_body())
    started = time.monotonic()
    venue.tick()
    assert receiver.bodies == []
    receiver.wait_for_posts(1)
    assert receiver.arrivals[0] - started >= 0.3


def test_every_partners_orders_are_announced_to_every_subscription(venue: Venue) -> None:
    """The event is company-wide: each subscription hears of every partner's orders.

    CMJobQueueRunner ``ProcessOneOrder`` calls CMOrderWebhooks ``SendOrderCompletionHook``
    for every order it settles, and ``OnOrderProcessed`` carries no partner: nothing
    filters by partner or by subscription.
    """
    first, second = Receiver(), Receiver()
    first.start()
    second.start()
    try:
        venue.subscribe(first.url, "state-of-the-first")
        venue.subscribe(second.url, "state-of-the-second")
        ours = venue.create(order_body("OURS"))
        theirs = venue.create(order_body("THEIRS", partner=OTHER_PARTNER))
        venue.tick()
        venue.settle_webhooks()

        for receiver, state in ((first, "state-of-the-first"), (second, "state-of-the-second")):
            notes = receiver.notifications()
            assert sorted(n.payload["orderId"] for n in notes) == sorted(
                [ours["orderId"], theirs["orderId"]]
            )
            assert {n.client_state for n in notes} == {state}
    finally:
        first.stop()
        second.stop()


def test_getorder_answers_any_partners_order(venue: Venue) -> None:
    """getOrder has no partner check: any order of the company is answered in full.

    ChannelMgrOrderAgent ``GetOrder`` reads the order by id alone.
    """
    theirs = venue.create(order_body("THEIRS", partner=OTHER_PARTNER, payment=None))
    venue.tick()

    order = venue.get(theirs["orderId"])

    assert order["partnerId"] == OTHER_PARTNER
    assert order["sellToName"] and order["items"]
