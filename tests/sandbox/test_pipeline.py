"""The background pipeline: cadence, row versions, the sweeper (via the clock), ``?sync=1``
and the older synchronous API version."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.sandbox.conftest import PARTNER, Receiver, Venue, line, order_body
from venue.models import OrderStatus

LIST = f"/channelManager/orders/{PARTNER}"


def feed_row(venue: Venue, order_id: str) -> dict[str, Any]:
    """The order's row in the change feed."""
    rows = venue.api.get(LIST, params={"sync": "true"}).json()["data"]
    return next(row for row in rows if row["orderId"] == order_id)


def test_every_step_takes_a_new_row_version(venue: Venue) -> None:
    """Submitted → Scheduled → Processing → Issued is three changes, each a higher row
    version, written as text (APIRequest AddFieldToJson: field 0 by Format(..., 0, 9))."""
    order_id = venue.create(order_body())["orderId"]
    submitted = feed_row(venue, order_id)["rowVersion"]
    venue.tick()
    issued = feed_row(venue, order_id)["rowVersion"]
    assert isinstance(submitted, str) and submitted.isdigit() and issued.isdigit()
    # Three changes, each taking versions for the line, the wallet and the header.
    assert int(issued) >= int(submitted) + 3 * 3


def test_the_row_version_is_one_counter_for_the_whole_database(venue: Venue) -> None:
    """APIRequest GetRecords reads the SystemRowVersion: one counter for every table, so
    consecutive orders' versions have large, irregular gaps (each change also writes its
    lines and wallets, and the rest of the venue writes in between), and they are far
    beyond 32 bits."""
    for n in range(12):
        venue.create(order_body(f"GAP-{n}", items=[line(quantity=1 + n % 3)]))
    rows = venue.api.get(LIST, params={"sync": "true"}).json()["data"]
    versions = [int(row["rowVersion"]) for row in rows]
    gaps = [later - earlier for earlier, later in itertools.pairwise(versions)]

    assert versions[0] > 2**32
    assert all(gap >= 3 for gap in gaps)  # the next order's line, wallet and header at least
    assert len(set(gaps)) > 3


def test_a_held_commit_lands_below_versions_seen_before_it(venue: Venue) -> None:
    """A late commit (holdCommitSeconds): the processing run's last change takes its row
    version when the run ends but is seen only a cycle after the hold; an order changed
    meanwhile is seen first with a higher version, so a reader past it must look below
    its mark to find the late one (APIRequest GetRecords: ``lastRowVersion`` is strictly
    greater; SQL Server rowversion is taken at write, seen at commit)."""
    venue.faults(holdCommitSeconds=60)
    late = venue.create(order_body("LATE"))["orderId"]
    assert venue.tick()["held"] == [late]
    processing = feed_row(venue, late)
    assert processing["status"] == "Processing..."  # the caption, in a summary
    assert venue.get(late)["status"] == "Processing"  # the plain name, in an answer
    early = venue.create(order_body("EARLY"))["orderId"]
    high_water = int(feed_row(venue, early)["rowVersion"])

    venue.advance(30)
    waiting = venue.tick()  # not due yet: still Processing (the other order is held now)
    assert (waiting["processed"], waiting["held"]) == ([], [early])
    assert venue.get(late)["status"] == "Processing"
    venue.advance(31)
    committed = venue.tick()

    assert committed["processed"] == [{"orderId": late, "status": "Issued"}]
    assert venue.get(late)["status"] == "Issued"
    issued = feed_row(venue, late)
    assert int(processing["rowVersion"]) < int(issued["rowVersion"]) < high_water
    after_mark = venue.api.get(LIST, params={"sync": "true", "lastRowVersion": high_water})
    assert late not in {row["orderId"] for row in after_mark.json()["data"]}


def test_pickup_runs_on_its_cadence(make_venue: Callable[..., Venue]) -> None:
    """With a pickup interval set, orders settle without any tick."""
    venue = make_venue(pickup_interval=0.1)
    order_id = venue.create(order_body())["orderId"]
    deadline = time.monotonic() + 5
    while venue.get(order_id)["status"] != "Issued":
        assert time.monotonic() < deadline, "the cadence never picked the order up"
        time.sleep(0.05)


def test_stuck_processing_becomes_error_after_an_hour(venue: Venue, receiver: Receiver) -> None:
    """An order stalled in Processing turns Error after an hour of sandbox time, silently."""
    venue.subscribe(receiver.url)
    venue.faults(stallProcessingRate=1)
    order_id = venue.create(order_body())["orderId"]
    report = venue.tick()
    assert report["stalled"] == [{"orderId": order_id, "status": "Processing"}]
    venue.faults(stallProcessingRate=0)

    venue.advance(30 * 60)
    venue.tick()
    assert venue.get(order_id)["status"] == "Processing"

    venue.advance(31 * 60)
    report = venue.tick()

    assert report["timedOut"] == [order_id]
    order = venue.get(order_id)
    assert order["status"] == "Error"
    assert "stuck in Processing" in order["statusMessage"]
    assert venue.settle_webhooks()["webhooks"]["posts"] == 0
    assert receiver.bodies == []


def test_stale_scheduled_goes_back_to_submitted(venue: Venue) -> None:
    """An order left in Scheduled for over 5 minutes is swept back and processed again."""
    venue.faults(stallScheduledRate=1)
    order_id = venue.create(order_body())["orderId"]
    assert venue.tick()["stalled"] == [{"orderId": order_id, "status": "Scheduled"}]
    venue.faults(stallScheduledRate=0)

    venue.tick()
    assert venue.get(order_id)["status"] == "Scheduled"  # not yet 5 minutes
    venue.advance(301)
    report = venue.tick()

    assert report["rescheduled"] == [order_id]
    assert report["processed"] == [{"orderId": order_id, "status": "Issued"}]


def test_error_rate_fault_fails_the_run(venue: Venue) -> None:
    """``errorRate`` fails the run after the ticket import, as CMTicketIssuer ConfirmTickets
    can (CMOrderIssuer IssueForOrder): Error with the vendor's message, the job id kept."""
    venue.faults(errorRate=1)
    order_id = venue.create(order_body())["orderId"]
    venue.tick()
    order = venue.get(order_id)
    assert order["status"] == "Error"
    assert order["jobId"]
    assert order["statusMessage"] == (
        f"Import header for JobId {order['jobId']} not found. This is a programming bug."
    )


def test_visit_date_passed_before_pickup_fails_the_run(venue: Venue) -> None:
    """TMImportTicketWorker GetAdmissionTimeSlot: an order whose visit date has passed by
    the time it is picked up ends in Error with the ticket import's message."""
    body = order_body(items=[line()])
    order_id = venue.create(body)["orderId"]
    venue.advance(40 * 86400)
    venue.tick()
    order = venue.get(order_id)
    assert order["status"] == "Error"
    assert order["statusMessage"] == (
        f"Expected visit date {body['items'][0]['visitDate']} for admission code 31001"
        " is in the past."
    )


def test_sync_param_issues_inside_the_call(venue: Venue) -> None:
    """``?sync=1`` answers the final order, buyFromOrderReference included."""
    response = venue.api.post("/channelManager", params={"sync": "1"}, json=order_body())
    assert response.status_code == 201
    order = response.json()
    assert order["status"] == "Issued"
    assert order["buyFromOrderReference"]
    assert order["items"][0]["wallets"][0]["walletReferenceNumber"]
    assert venue.tick()["processed"] == []


def test_sync_param_failure_answers_400_and_leaves_error(venue: Venue) -> None:
    """A failed synchronous issuance is a 400 with the reason; the order stays as Error."""
    body = order_body("SYNC-ERR", items=[line("31099")])  # sold out
    response = venue.api.post("/channelManager", params={"sync": "1"}, json=body)
    assert response.status_code == 400
    assert "capacity for 31099" in response.json()["message"]
    listed = venue.api.get(LIST, params={"sellToOrderReference": "SYNC-ERR"}).json()["data"]
    assert [row["status"] for row in listed] == ["Error"]


def test_legacy_sync_answers_the_final_state(
    make_venue: Callable[..., Venue], receiver: Receiver
) -> None:
    """The older API issues inside createOrder/replaceOrder, without buyFromOrderReference,
    with lines numbered 100000 (TryParseItems, as now), and announces nothing."""
    venue = make_venue(legacy_sync=True)
    venue.subscribe(receiver.url)

    issued = venue.create(order_body("OLD-1"))
    draft = venue.create(order_body("OLD-2", payment=None))

    assert issued["status"] == "Issued"
    assert "buyFromOrderReference" not in issued
    assert issued["items"][0]["lineNo"] == 100000
    assert issued["items"][0]["wallets"][0]["walletReferenceNumber"]
    assert draft["status"] == "Draft"
    assert "buyFromOrderReference" not in venue.get(issued["orderId"])
    replaced = venue.api.put(f"/channelManager/{draft['orderId']}", json=order_body("OLD-2"))
    assert replaced.json()["status"] == "Issued"
    assert venue.settle_webhooks()["webhooks"]["posts"] == 0


def test_legacy_sync_failure_is_an_error_response(make_venue: Callable[..., Venue]) -> None:
    """In the older API a failed issuance answers an error and leaves the order as Error."""
    venue = make_venue(legacy_sync=True)
    body = order_body("OLD-ERR", items=[line("31099")])  # sold out
    response = venue.api.post("/channelManager", json=body)
    assert response.status_code == 400
    assert response.json()["code"] == "generic_error"
    (row,) = venue.api.get(LIST, params={"sellToOrderReference": "OLD-ERR"}).json()["data"]
    assert row["status"] == "Error"
    assert "capacity for 31099" in row["statusMessage"]


def test_the_sweeper_leaves_an_order_whose_commit_is_held(venue: Venue) -> None:
    """A held change's order is locked by its open transaction (CMJobQueueRunner's
    processing run): the stuck-order sweeper does not turn it Error under it, and the
    commit lands as the run ended it."""
    venue.faults(holdCommitSeconds=7200)
    order_id = venue.create(order_body())["orderId"]
    assert venue.tick()["held"] == [order_id]
    venue.advance(3700)
    assert venue.tick()["timedOut"] == []
    assert venue.get(order_id)["status"] == "Processing"
    venue.advance(3600)
    assert venue.tick()["processed"] == [{"orderId": order_id, "status": "Issued"}]


def test_legacy_payment_references_are_cut_at_twenty(make_venue: Callable[..., Venue]) -> None:
    """The older synchronous version's CMOrder.PaymentReference is Code[20] (CMOrder at
    43834b3b8): ChannelMgrOrderAgent TryParseHeader and ConfirmOrder copy the reference into
    it with CopyStr, upper-cased and trimmed as a Code; the current version keeps 50."""
    legacy = make_venue(legacy_sync=True)
    current = make_venue()

    issued = legacy.create(order_body("OLD-PAY-1", payment="pay-" + "1" * 30))
    draft = legacy.create(order_body("OLD-PAY-2", payment=None))
    confirmed = legacy.api.post(
        f"/channelManager/{draft['orderId']}/confirm", json={"paymentReference": "q" * 25}
    )
    kept = current.create(order_body("NEW-PAY-1", payment="pay-" + "1" * 30))

    assert issued["paymentReference"] == "PAY-" + "1" * 16
    assert confirmed.json()["paymentReference"] == "Q" * 20
    assert kept["paymentReference"] == "PAY-" + "1" * 30


@pytest.mark.parametrize(
    ("legacy", "message"),
    [
        (True, "Order is currently being processed; retry once it has settled."),
        (False, "Order is mid-flight (status Processing...); retry once it has settled."),
    ],
    ids=["older-version", "current"],
)
def test_deleting_an_order_being_processed_is_refused_in_each_versions_words(
    make_venue: Callable[..., Venue], legacy: bool, message: str
) -> None:
    """ChannelMgrOrderAgent DeleteOrder: the older synchronous version (43834b3b8) refused
    a Processing order as "currently being processed"; the current one says "mid-flight"
    with the status by its caption (CMOrderStatus)."""
    venue = make_venue(legacy_sync=legacy)
    order_id = venue.create(order_body("BUSY-1"))["orderId"]
    runtime = venue.server.runtime
    record = runtime.store.get(order_id)
    assert record is not None
    busy = record.order.model_copy(update={"status": OrderStatus.PROCESSING})
    runtime.store.save(busy, record.request, runtime.clock.now())

    response = venue.api.delete(f"/channelManager/{order_id}")

    assert response.status_code == 400
    assert response.json() == {"code": "generic_error", "message": message}
