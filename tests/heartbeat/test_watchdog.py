"""The watchdog (``heartbeat.watchdog``) against the sandbox over real HTTP, no webhooks.

Every test runs on SQLite and PostgreSQL. Time passes by moving the virtual clocks of
otacm and the venue (:meth:`HeartbeatStack.advance`); the thresholds are the settings'
defaults (in flight 600 s, re-read 900 s, stuck 3600 s).
"""

from __future__ import annotations

import datetime as dt
import logging

import pytest
import sqlalchemy as sa

from heartbeat.watchdog import IN_FLIGHT_REASON, RECHECK_REASON
from orders.mirror import stuck_condition
from storage.models import VenueOrder
from tests.heartbeat.conftest import HeartbeatStack
from venue.models import OrderStatus


def _lookups(stack: HeartbeatStack, reason: str) -> list[str]:
    """The orderIds of the inbox rows queued for ``reason``, oldest first."""
    return [str(row.order_id) for row in stack.inbox() if row.payload.get("reason") == reason]


def test_an_order_settled_unseen_is_looked_up_once_quiet_for_long_enough(
    stack: HeartbeatStack,
) -> None:
    """An in-flight order nothing is heard of for in_flight_check_after is looked up, once."""
    order_id = stack.create("QUIET")
    stack.feed()  # the mirror holds it Submitted
    stack.tick()  # Issued at the venue; no webhook, and no feed pass after

    assert stack.watchdog().in_flight == 0
    stack.advance(stack.settings.in_flight_check_after + 1)
    report = stack.watchdog()
    again = stack.watchdog()  # the lookup is still waiting in the inbox

    assert (report.in_flight, report.rechecked, report.stuck) == (1, 0, 0)
    assert again.in_flight == 0
    assert _lookups(stack, IN_FLIGHT_REASON) == [order_id]
    assert stack.drain().fetched == 1
    (row,) = stack.assert_mirrored([order_id]).values()
    assert row.status is OrderStatus.ISSUED


def test_stuck_orders_are_counted_and_looked_up_once_per_interval(
    stack: HeartbeatStack, caplog: pytest.LogCaptureFixture
) -> None:
    """Orders hanging in Processing are looked up once per in_flight_check_after (a fetch
    finding them unchanged restarts the wait); past stuck_after they are counted and logged."""
    stack.faults(stallProcessingRate=1.0)
    stalled = [stack.create(f"HANGS-{n}") for n in range(2)]
    stack.tick()
    stack.feed()

    stack.advance(stack.settings.in_flight_check_after + 1)
    first = stack.watchdog()
    worker = stack.drain()
    after_fetch = stack.watchdog()

    assert (first.in_flight, first.stuck) == (2, 0)
    assert (worker.fetched, after_fetch.in_flight) == (2, 0)
    for order_id in stalled:
        assert stack.mirror(order_id).status is OrderStatus.PROCESSING  # type: ignore[union-attr]

    stack.advance(stack.settings.stuck_after)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="heartbeat.watchdog"):
        late = stack.watchdog()

    assert (late.in_flight, late.stuck) == (2, 2)
    (warning,) = [
        r for r in caplog.records if r.name == "heartbeat.watchdog" and r.levelno >= logging.WARNING
    ]
    assert all(order_id in warning.getMessage() for order_id in stalled)
    cutoff = stack.now() - dt.timedelta(seconds=stack.settings.stuck_after)
    with stack.read_sessions.begin() as session:
        stuck = set(session.scalars(sa.select(VenueOrder.order_id).where(stuck_condition(cutoff))))
    assert stuck == set(stalled)


def test_the_oldest_quiet_orders_go_first_within_the_limit(stack: HeartbeatStack) -> None:
    """At most ``limit`` lookups a run, the longest quiet first; the rest come next run."""
    stack.faults(stallScheduledRate=1.0)
    older = stack.create("OLDER")
    stack.tick()
    stack.feed()
    stack.advance(60, venue=False)
    newer = stack.create("NEWER")
    stack.tick()
    stack.feed()
    stack.advance(stack.settings.in_flight_check_after + 1, venue=False)

    first = stack.watchdog(limit=1)
    second = stack.watchdog(limit=1)

    assert (first.in_flight, second.in_flight) == (1, 1)
    assert _lookups(stack, IN_FLIGHT_REASON) == [older, newer]


def test_deleted_draft_and_error_orders_are_found_removed_by_the_recheck(
    stack: HeartbeatStack,
) -> None:
    """Draft and Error orders deleted at the venue vanish from the feed; the re-read after
    open_order_recheck finds them gone (404) and marks them removed. Issued ones are not
    re-read."""
    draft = stack.create("DRAFT-GONE", paid=False)
    error = stack.create_error("ERROR-GONE")
    issued = stack.create("STAYS")
    stack.tick()
    stack.sync()
    stack.venue.delete_order(draft)
    stack.venue.delete_order(error)

    unseen, _ = stack.sync()
    too_soon = stack.watchdog()
    stack.advance(stack.settings.open_order_recheck + 1)
    due = stack.watchdog()
    worker = stack.drain()

    assert unseen.queued == 0
    assert too_soon.rechecked == 0
    assert (due.rechecked, due.in_flight) == (2, 0)
    assert sorted(_lookups(stack, RECHECK_REASON)) == sorted([draft, error])
    assert worker.removed == 2
    for order_id in (draft, error):
        stack.assert_removed(order_id)
        assert stack.history(order_id)[-1] == (None, "poll")
    stack.assert_mirrored([issued])
    assert stack.watchdog().rechecked == 0  # removed orders are not re-read


def test_open_orders_are_re_read_less_often_as_they_age_and_never_past_the_horizon(
    stack: HeartbeatStack,
) -> None:
    """A Draft is re-read every open_order_recheck on its first day in that status, then
    at intervals doubling with that age (hourly between its second and fourth day: not
    15 minutes after a re-read, but an hour after), and never once older than
    recheck_horizon_days."""
    recheck = stack.settings.open_order_recheck
    draft = stack.create("DRAFT-AGES", paid=False)
    stack.tick()
    stack.sync()
    assert stack.mirror(draft).status is OrderStatus.DRAFT  # type: ignore[union-attr]

    stack.advance(recheck + 1)
    young = stack.watchdog()
    stack.drain()
    stack.advance(3 * DAY)
    three_days_old = stack.watchdog()  # last read three days ago
    stack.drain()
    stack.advance(recheck + 1)
    too_soon = stack.watchdog()  # 15 minutes after its last read: young orders' interval
    stack.advance(HOUR - recheck)
    hourly = stack.watchdog()  # an hour and a second after it
    stack.drain()
    stack.advance(stack.settings.recheck_horizon_days * DAY - 3 * DAY)
    past_horizon = stack.watchdog()  # in Draft for the horizon and an hour: never again
    stack.advance(DAY)
    day_after = stack.watchdog()

    assert (young.rechecked, three_days_old.rechecked) == (1, 1)
    assert (too_soon.rechecked, hourly.rechecked) == (0, 1)
    assert (past_horizon.rechecked, day_after.rechecked) == (0, 0)
    assert _lookups(stack, RECHECK_REASON) == [draft] * 3
    assert stack.mirror(draft).status is OrderStatus.DRAFT  # type: ignore[union-attr]


HOUR = 3600.0
DAY = 24 * HOUR


def test_an_error_order_past_the_horizon_is_re_read_once_its_reference_is_taken(
    stack: HeartbeatStack,
) -> None:
    """Past recheck_horizon_days an Error order is not re-read, until a resubmission of its
    reference is mirrored (the venue deleted it to take the new order, which the feed does
    not show): then it is re-read once and found removed."""
    old = stack.create_error("LATE-RETRY")
    stack.tick()
    stack.sync()
    stack.advance(stack.settings.recheck_horizon_days * DAY + HOUR)
    left_alone = stack.watchdog()

    new = stack.create("LATE-RETRY")
    stack.tick()
    stack.sync()
    taken = stack.watchdog()
    stack.drain()

    assert (left_alone.rechecked, taken.rechecked) == (0, 1)
    assert _lookups(stack, RECHECK_REASON) == [old]
    stack.assert_removed(old)
    stack.assert_mirrored([new])
    assert stack.watchdog().rechecked == 0


def test_a_duplicate_after_error_ends_with_the_new_order_and_the_old_removed(
    stack: HeartbeatStack,
) -> None:
    """Resubmitting an Error order's reference makes the venue delete it and take a new
    orderId: the feed brings the new order, the re-read finds the old one gone."""
    old = stack.create_error("RETRY-ME")
    stack.tick()
    stack.sync()
    assert stack.mirror(old).status is OrderStatus.ERROR  # type: ignore[union-attr]

    new = stack.create("RETRY-ME")
    stack.tick()
    stack.sync()
    stack.advance(stack.settings.open_order_recheck + 1)
    stack.watchdog()
    stack.drain()

    assert new != old
    (row,) = stack.assert_mirrored([new]).values()
    assert row.status is OrderStatus.ISSUED
    removed = stack.assert_removed(old)
    assert removed.reference_key == row.reference_key == "RETRY-ME"
