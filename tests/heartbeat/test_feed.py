"""The change feed (``heartbeat.feed``) against the sandbox over real HTTP, no webhooks.

Every test runs on SQLite and PostgreSQL. No receiver is subscribed, so what the mirror
learns, the feed found (and the worker fetched).
"""

from __future__ import annotations

import datetime as dt
import json

import httpx
import pytest
import sqlalchemy as sa

from heartbeat.coordination import JobFailed, JobOutcome, run_job
from heartbeat.feed import FEED_JOB, FeedReport, feed_job, follow_feed, run_feed
from sandbox.pipeline import STUCK_MESSAGE
from storage.models import InboxSource
from storage.records import JobRun
from tests.heartbeat.conftest import HeartbeatStack, line
from tests.support.partner_faults import PartnerFaultProxy
from venue.client import open_client
from venue.models import OrderStatus
from venue.retry import RetryPolicy

EVERYTHING = dt.timedelta(days=1)
"""An overlap longer than any test's history: the pass re-reads the feed in full."""


def test_the_feed_alone_mirrors_every_order_in_its_true_state(stack: HeartbeatStack) -> None:
    """Issued, Draft and Error orders end mirrored with their wallets; each fetched once.

    The in-flight step before the pickup costs no getOrder: the feed writes the header.
    """
    issued = [stack.create(f"ISSUED-{n}") for n in range(4)]
    drafts = [stack.create(f"DRAFT-{n}", paid=False) for n in range(2)]
    errors = [stack.create_error(f"ERROR-{n}") for n in range(2)]
    every = issued + drafts + errors

    first = stack.feed()

    assert (first.partners, first.listed, first.updated, first.queued) == (1, 8, 8, 0)
    assert stack.drain().claimed == 0
    assert stack.calls("getOrder") == 0
    for order_id in every:
        row = stack.mirror(order_id)
        truth = stack.truth(order_id)
        assert row is not None and truth is not None
        assert (row.status, row.items, row.fetched_at) == (OrderStatus.SUBMITTED, [], None)
        assert row.buy_from_order_reference == truth.buy_from_order_reference

    stack.tick()
    second, worker = stack.sync()

    assert (second.queued, worker.fetched, worker.done) == (8, 8, 8)
    mirrored = stack.assert_mirrored(every)
    assert {mirrored[o].status for o in issued} == {OrderStatus.ISSUED}
    assert {mirrored[o].status for o in drafts} == {OrderStatus.DRAFT}
    assert {mirrored[o].status for o in errors} == {OrderStatus.ERROR}
    assert all(mirrored[o].status_message for o in errors)
    assert stack.calls("getOrder") == len(every)
    assert stack.history(issued[0]) == [("Submitted", "poll"), ("Issued", "poll")]
    assert {row.source for row in stack.inbox()} == {InboxSource.POLL}
    assert stack.cursor() == max(stack.truth_row_version(o) for o in every)


def test_unknown_settled_orders_are_fetched_once_and_then_adopted(stack: HeartbeatStack) -> None:
    """Orders first seen settled are fetched; the next pass only records their rowVersion."""
    orders = [stack.create(f"LATE-{n}") for n in range(3)]
    stack.tick()

    first, _ = stack.sync()
    second = stack.feed(overlap=EVERYTHING)

    assert (first.queued, first.updated) == (3, 0)
    assert (second.queued, second.updated, second.adopted) == (0, 0, 3)
    assert stack.calls("getOrder") == 3
    mirrored = stack.assert_mirrored(orders)
    assert {row.row_version for row in mirrored.values()} == {
        stack.truth_row_version(o) for o in orders
    }


def test_rerunning_the_feed_changes_nothing(stack: HeartbeatStack) -> None:
    """A second pass re-reading every row (overlap) stores nothing and calls no getOrder."""
    orders = [stack.create(f"AGAIN-{n}", paid=n % 2 == 0) for n in range(4)]
    stack.feed()
    stack.tick()
    stack.sync()
    stack.sync()
    before, get_calls = stack.snapshot(), stack.calls("getOrder")

    again = stack.feed(overlap=EVERYTHING)

    assert again.as_dict() == {
        **FeedReport().as_dict(),
        "partners": 1,
        "listed": len(orders),
        "venue_calls": 1,
    }
    assert stack.drain().claimed == 0
    assert stack.snapshot() == before
    assert stack.calls("getOrder") == get_calls


def test_confirm_and_cancel_are_seen_by_the_feed(stack: HeartbeatStack) -> None:
    """confirmOrder (Draft → Issued) and deleteOrder of an Issued order (→ Cancelled) fire no
    webhook; the feed sees both and the worker mirrors them."""
    draft = stack.create("TO-CONFIRM", paid=False)
    issued = stack.create("TO-CANCEL")
    stack.tick()
    stack.sync()
    assert stack.mirror(draft).status is OrderStatus.DRAFT  # type: ignore[union-attr]
    stack.reset_stats()

    stack.venue.confirm_order(draft, "PAID-LATER")
    stack.venue.delete_order(issued)
    report, worker = stack.sync()

    assert (report.queued, worker.fetched) == (2, 2)
    mirrored = stack.assert_mirrored([draft, issued])
    assert mirrored[draft].status is OrderStatus.ISSUED
    assert mirrored[draft].payment_reference == "PAID-LATER"
    assert mirrored[issued].status is OrderStatus.CANCELLED
    assert [w for item in mirrored[issued].items for w in item.wallets] == []
    assert stack.history(issued)[-1] == ("Cancelled", "poll")
    assert stack.calls("getOrder") == 2


def test_a_replaced_order_re_enters_flight_and_settles_again(stack: HeartbeatStack) -> None:
    """An Error order replaced goes back in flight (header only, no getOrder), then settles."""
    order_id = stack.create_error("FIX-ME")
    stack.tick()
    stack.sync()
    assert stack.mirror(order_id).status is OrderStatus.ERROR  # type: ignore[union-attr]
    gets = stack.calls("getOrder")

    stack.venue.replace_order(order_id, stack.order_request("FIX-ME", items=[line(quantity=2)]))
    in_flight, _ = stack.sync()

    assert (in_flight.updated, in_flight.queued) == (1, 0)
    assert stack.mirror(order_id).status is OrderStatus.SUBMITTED  # type: ignore[union-attr]
    assert stack.calls("getOrder") == gets

    stack.tick()
    settled, _ = stack.sync()

    assert settled.queued == 1
    (row,) = stack.assert_mirrored([order_id]).values()
    assert row.status is OrderStatus.ISSUED
    assert sum(len(item.wallets) for item in row.items) == 2
    assert stack.history(order_id) == [
        ("Error", "poll"),
        ("Submitted", "poll"),
        ("Issued", "poll"),
    ]
    assert stack.calls("getOrder") == gets + 1


def test_a_processing_run_unseen_in_flight_is_found_by_its_row_version(
    stack: HeartbeatStack,
) -> None:
    """A Draft replaced and settled Draft again between two passes: same status, new version,
    so it is fetched and the new lines mirrored."""
    order_id = stack.create("REDO", paid=False)
    stack.tick()
    stack.sync()
    stack.sync()  # adopts the settled version

    stack.venue.replace_order(
        order_id, stack.order_request("REDO", paid=False, items=[line(quantity=3)])
    )
    stack.tick()
    report, worker = stack.sync()

    assert (report.queued, worker.fetched) == (1, 1)
    (row,) = stack.assert_mirrored([order_id]).values()
    assert row.status is OrderStatus.DRAFT
    assert sum(len(item.wallets) for item in row.items) == 3


def test_the_sweepers_silent_error_is_seen_by_the_feed(stack: HeartbeatStack) -> None:
    """An order stalled in Processing, turned to Error by the venue's sweeper an hour later
    (no webhook), is seen by the feed with the venue's reason."""
    stack.faults(stallProcessingRate=1.0)
    order_id = stack.create("STALLS")
    stack.tick()
    stalled, _ = stack.sync()
    assert (stalled.updated, stalled.queued) == (1, 0)
    assert stack.mirror(order_id).status is OrderStatus.PROCESSING  # type: ignore[union-attr]
    assert stack.calls("getOrder") == 0

    stack.faults(stallProcessingRate=0.0)
    stack.advance(3601)
    assert stack.tick().timed_out == [order_id]
    swept, worker = stack.sync()

    assert (swept.queued, worker.fetched) == (1, 1)
    (row,) = stack.assert_mirrored([order_id]).values()
    assert (row.status, row.status_message) == (OrderStatus.ERROR, STUCK_MESSAGE)
    assert stack.history(order_id) == [("Processing", "poll"), ("Error", "poll")]


def test_a_restore_sends_the_cursor_down_and_later_changes_are_still_seen(
    stack: HeartbeatStack,
) -> None:
    """rowVersion going backwards (a venue restore) is noticed, the feed re-read in full and
    the cursor lowered; changes made after the restore reach the mirror."""
    draft = stack.create("BEFORE-DRAFT", paid=False)
    issued = stack.create("BEFORE-ISSUED")
    stack.tick()
    stack.sync()
    high_water = stack.cursor()
    assert high_water is not None and high_water > 2

    assert stack.restore() == {"orders": 2, "rowVersion": 2}
    stack.venue.confirm_order(draft, "PAID-AFTER-RESTORE")  # just above 2
    newcomer = stack.create("AFTER-RESTORE")  # above that: both below the high-water mark
    restarted, _ = stack.sync()

    assert restarted.restarted == 1
    assert stack.cursor() == stack.truth_row_version(newcomer) < high_water
    assert restarted.queued == 1 and restarted.updated == 1  # the confirm; the newcomer's header
    assert stack.mirror(draft).status is OrderStatus.ISSUED  # type: ignore[union-attr]
    assert stack.mirror(newcomer).status is OrderStatus.SUBMITTED  # type: ignore[union-attr]

    stack.tick()
    later, _ = stack.sync()

    assert (later.restarted, later.queued) == (0, 1)
    stack.assert_mirrored([draft, issued, newcomer])
    assert stack.cursor() == stack.truth_row_version(newcomer)


def test_an_empty_feed_and_a_feed_emptied_by_deletes(stack: HeartbeatStack) -> None:
    """No orders: no cursor, one call per partner. Every order deleted: the cursor goes to 0
    once, and idle passes after that cost one call per partner again."""
    empty = stack.feed()
    assert empty.as_dict() == {**FeedReport().as_dict(), "partners": 1, "venue_calls": 1}
    assert stack.cursor() is None

    order_id = stack.create("SHORT-LIVED", paid=False)
    stack.tick()
    stack.sync()
    assert stack.cursor() == stack.truth_row_version(order_id)
    stack.venue.delete_order(order_id)

    emptied = stack.feed()
    idle = stack.feed()

    assert (emptied.restarted, emptied.venue_calls) == (1, 2)
    assert stack.cursor() == 0
    assert (idle.restarted, idle.venue_calls, idle.queued) == (0, 1, 0)


class Killed(Exception):
    """Stands for the process dying in the middle of a feed pass."""


class DieOnNextPage(httpx.BaseTransport):
    """Real HTTP to the sandbox, except that asking for a second page kills the caller."""

    def __init__(self) -> None:
        self._inner = httpx.HTTPTransport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if "pageKey" in request.url.params:
            raise Killed
        return self._inner.handle_request(request)

    def close(self) -> None:
        self._inner.close()


def test_a_pass_killed_between_pages_keeps_the_pages_before(stack: HeartbeatStack) -> None:
    """A pass that dies at its second page keeps the first page's work and cursor; the next
    pass goes on from there."""
    orders = [stack.create(f"PAGED-{n}") for n in range(5)]
    stack.tick()
    versions = sorted(stack.truth_row_version(o) for o in orders)

    with (
        open_client(stack.settings.connections[0], transport=DieOnNextPage()) as dying,
        pytest.raises(Killed),
    ):
        follow_feed(
            stack.sessions,
            dying,
            connection_id=stack.connection_id,
            partner_id=stack.partner_id,
            now=stack.now(),
            overlap=dt.timedelta(0),
            page_size=2,
        )

    assert stack.cursor() == versions[1]
    assert len(stack.inbox()) == 2
    report = stack.feed(page_size=2)
    assert report.queued == 3
    stack.drain()
    stack.assert_mirrored(orders)
    assert stack.cursor() == versions[-1]
    assert stack.calls("getOrder") == 5


class WidenReference(httpx.BaseTransport):
    """Real HTTP to the sandbox, except that list pages show one order's buyFromOrderReference
    wider than the mirror's column holds (50 characters)."""

    def __init__(self, order_id: str) -> None:
        self._inner = httpx.HTTPTransport()
        self._order_id = order_id

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self._inner.handle_request(request)
        if "/channelManager/orders/" not in request.url.path:
            return response
        page = json.loads(response.read())
        for summary in page["data"]:
            if summary["orderId"] == self._order_id:
                summary["buyFromOrderReference"] = "CM-" + "W" * 60
        return httpx.Response(response.status_code, json=page)

    def close(self) -> None:
        self._inner.close()


def test_an_order_the_mirror_cannot_hold_as_listed_does_not_stop_the_feed(
    stack: HeartbeatStack,
) -> None:
    """The rest of its page is written and the cursor moves on; that order is left to the
    worker's getOrder (here the full order fits, so it is mirrored)."""
    orders = [stack.create(f"WIDE-{n}") for n in range(3)]
    versions = sorted(stack.truth_row_version(o) for o in orders)

    with open_client(stack.settings.connections[0], transport=WidenReference(orders[1])) as odd:
        report = stack.feed(client=odd)

    assert (report.updated, report.queued) == (2, 1)
    assert stack.cursor() == versions[-1]
    assert {stack.mirror(o) is not None for o in (orders[0], orders[2])} == {True}
    assert stack.mirror(orders[1]) is None
    [lookup] = stack.inbox()
    assert (lookup.order_id, lookup.source) == (orders[1], InboxSource.POLL)
    assert lookup.buy_from_order_reference is None  # the hint does not fit its column either
    stack.drain()
    fetched, truth = stack.mirror(orders[1]), stack.truth(orders[1])
    assert fetched is not None and truth is not None
    assert fetched.buy_from_order_reference == truth.buy_from_order_reference
    stack.tick()
    stack.feed()
    stack.drain()
    stack.assert_mirrored(orders)


def test_a_venue_error_on_one_partner_does_not_stop_the_others(stack: HeartbeatStack) -> None:
    """A partner the venue refuses (an id that is not a GUID: 400 "Invalid partnerId",
    ChannelMgrOrderAgent ListOrdersByPartner) is logged and counted; the next partner is
    still read."""
    order_id = stack.create("GOOD-PARTNER")
    stack.tick()

    report = run_feed(
        stack.sessions,
        stack.clients,
        {stack.connection_id: ["not-a-partner-guid", stack.partner_id]},
        now=stack.now(),
        overlap=dt.timedelta(minutes=10),
    )

    assert (report.partners, report.errors, report.queued) == (2, 1, 1)
    assert stack.cursor("not-a-partner-guid") is None
    stack.drain()
    stack.assert_mirrored([order_id])


def test_each_partner_is_a_unit_and_one_answering_503_fails_only_its_own(
    stack: HeartbeatStack, migrated_engine: sa.Engine
) -> None:
    """The scheduled feed is a unit per partner, each with its own run record: a partner
    whose listings the venue answers 503 (retried, then given up) fails its own record,
    naming the failure, while the other partner's pass completes and is recorded as a
    success; once the venue answers again, the failed partner's record recovers."""
    second = next(p.id for p in stack.sandbox.config.partners[1:] if p.active)
    order_id = stack.create("ONE-PARTNER-FAILS")
    connection = stack.settings.connections[0]
    quick = RetryPolicy(attempts=2, deadline=1.0, wait_initial=0.01, wait_max=0.01)
    with PartnerFaultProxy(stack.sandbox.url, failing=[second]) as proxy:
        proxied = connection.model_copy(
            update={"api_base_url": proxy.url, "partner_ids": [stack.partner_id, second]}
        )
        with open_client(proxied, retry=quick) as client:
            job = feed_job(
                stack.sessions,
                {stack.connection_id: client},
                {stack.connection_id: proxied},
                interval=15,
                overlap=EVERYTHING,
                workers=2,
            )
            names = [f"{FEED_JOB}:{connection.name}:{p}" for p in (stack.partner_id, second)]
            assert [unit.name for unit in job.units] == names

            outcome, error = run_job(
                migrated_engine, stack.sessions, job, owner="poll", now=stack.now(), force=True
            )
            failed = job_run(stack, names[1])
            proxy.failing.clear()
            recovered, _ = run_job(
                migrated_engine, stack.sessions, job, owner="poll", now=stack.now(), force=True
            )

    assert outcome is JobOutcome.FAILED and isinstance(error, JobFailed)
    assert str(error).startswith(f"1 of 2 units failed, the first: {names[1]}: ")
    assert error.report is not None and error.report.as_dict()["updated"] == 1  # type: ignore[attr-defined]
    assert proxy.listings[second] >= 2  # retried before it gave up
    assert (failed.failures, failed.last_success_at) == (1, None)
    assert failed.last_error is not None and "503" in failed.last_error
    assert second in failed.last_error
    good = job_run(stack, names[0])
    assert (good.runs, good.failures) == (2, 0) and good.last_success_at is not None
    assert recovered is JobOutcome.RAN
    assert job_run(stack, names[1]).failures == 0
    assert stack.mirror(order_id) is not None


def job_run(stack: HeartbeatStack, name: str) -> JobRun:
    """A unit's run record."""
    with stack.read_sessions.begin() as session:
        record = session.get(JobRun, name)
        assert record is not None, f"no run record {name}"
        return record


def test_a_late_commit_below_the_mark_is_still_seen(stack: HeartbeatStack) -> None:
    """A change that took its rowVersion before the mark moved past it, and was committed
    after, is seen by the next pass: it re-reads from the mark as it stood the overlap ago.

    Follows APIRequest GetRecords (``sync`` by the SystemRowVersion key, ``lastRowVersion``
    strictly greater): the database's row version is taken at write and seen at commit.
    """
    overlap = dt.timedelta(minutes=5)
    before = stack.create("BEFORE-THE-MARK")
    stack.tick()
    first = stack.feed(overlap=overlap)
    stack.drain()
    assert first.queued == 1 and stack.cursor() == stack.truth_row_version(before)
    stack.advance(20 * 60)

    stack.faults(holdCommitSeconds=60)
    late = stack.create("LATE-COMMIT")
    assert stack.tick().held == [late]  # its Issued change has its version, not yet seen
    stack.faults(holdCommitSeconds=0)
    meanwhile = stack.create("MEANWHILE")
    passed = stack.feed(overlap=overlap)
    high_water = stack.cursor()
    assert passed.updated == 2 and high_water == stack.truth_row_version(meanwhile)
    assert stack.mirror(late).status is OrderStatus.PROCESSING  # type: ignore[union-attr]

    stack.advance(120)
    stack.tick()  # the held change is committed, below the high-water mark
    assert stack.truth_row_version(late) < high_water
    resumed = stack.client.change_feed(stack.partner_id, high_water)
    assert late not in {summary.order_id for summary in resumed}  # no overlap misses it

    again = stack.feed(overlap=overlap)
    stack.drain()

    # Read from the mark as it stood five minutes ago (BEFORE's), not the whole feed.
    assert (again.listed, again.queued) == (2, 2)
    assert stack.mirror(late).status is OrderStatus.ISSUED  # type: ignore[union-attr]
    stack.assert_mirrored([late, meanwhile])


class GarbleSummaries(httpx.BaseTransport):
    """Real HTTP to the sandbox, except that list pages show one order with a status the
    client does not know and another without its orderId."""

    def __init__(self, unknown_status: str, nameless: str) -> None:
        self._inner = httpx.HTTPTransport()
        self._unknown_status = unknown_status
        self._nameless = nameless

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self._inner.handle_request(request)
        if "/channelManager/orders/" not in request.url.path:
            return response
        page = json.loads(response.read())
        for summary in page["data"]:
            if summary["orderId"] == self._unknown_status:
                summary["status"] = "On hold"
            elif summary["orderId"] == self._nameless:
                del summary["orderId"]
        return httpx.Response(response.status_code, json=page)

    def close(self) -> None:
        self._inner.close()


def test_summaries_that_do_not_read_never_stop_the_feed(
    stack: HeartbeatStack, caplog: pytest.LogCaptureFixture
) -> None:
    """One row the client cannot read is logged by its ids and queued for getOrder; one
    without a readable orderId is logged and counted; the rest of the page is applied and
    the cursor moves past both (APIRequest GetRecords: a page of rows written one by one by
    AddFieldToJson)."""
    orders = [stack.create(f"ODD-{n}") for n in range(4)]
    stack.tick()
    versions = sorted(stack.truth_row_version(o) for o in orders)
    odd, nameless = orders[1], orders[2]

    with open_client(
        stack.settings.connections[0], transport=GarbleSummaries(odd, nameless)
    ) as garbled:
        report = stack.feed(client=garbled)

    assert (report.listed, report.unreadable, report.unreadable_unqueued) == (4, 2, 1)
    assert report.queued == 3  # the two readable settled orders, and the unreadable one
    assert stack.cursor() == versions[-1]
    assert {row.order_id for row in stack.inbox()} == {orders[0], odd, orders[3]}
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("without a readable orderId" in line for line in warnings)
    assert not any("Jane" in line or "@" in line for line in warnings)
    stack.drain()
    stack.assert_mirrored([orders[0], odd, orders[3]])
    assert stack.mirror(nameless) is None
