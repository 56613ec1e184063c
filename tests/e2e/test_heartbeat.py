"""End to end with every webhook dropped: the real ``otacm scheduler`` and ``otacm worker``
processes alone bring every order to its true state, including the changes that fire no
webhook at all (confirm, delete).

Runs on SQLite and on PostgreSQL (``migrated_engine``).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from otacm.settings import Settings
from tests.e2e.conftest import E2E, OtacmProcess, otacm_environment, wait_until
from tests.support.stack import error_line
from venue.models import OrderStatus

# The shortest change-feed interval the settings accept (the venue advises no less).
POLL_INTERVAL = "10"
# Two poll intervals and the scheduler's start-up: the promise is "within one poll".
SEEN_WITHIN = 60.0


@pytest.mark.parametrize("settings_changes", [{"auto_confirm_drafts": False}], ids=["manual"])
def test_with_every_webhook_dropped_the_heartbeat_alone_mirrors_the_truth(
    e2e: E2E, settings: Settings, otacm: Callable[..., OtacmProcess]
) -> None:
    """Issued, Draft, Error, confirmed, cancelled and deleted orders all reach the mirror."""
    e2e.faults(dropRate=1.0)
    environment = otacm_environment(
        settings, OTACM_POLL_INTERVAL=POLL_INTERVAL, OTACM_AUTO_CONFIRM_DRAFTS="false"
    )
    worker = otacm("worker", environment=environment)
    scheduler = otacm("scheduler", environment=environment)

    issued = e2e.create_many(3, "HB-PAID")
    drafts = e2e.create_many(3, "HB-DRAFT", paid=False)
    broken = e2e.create("HB-ERR", items=[error_line()]).order_id
    e2e.deliver()
    assert e2e.truth(broken).status is OrderStatus.ERROR
    settled = [*issued, *drafts, broken]

    def mirrored_as_the_venue_has_them() -> bool:
        assert worker.alive() and scheduler.alive()
        for order_id in settled:
            row = e2e.mirror(order_id)
            if row is None or row.status != e2e.truth(order_id).status:
                return False
        return True

    wait_until(mirrored_as_the_venue_has_them, SEEN_WITHIN, what="the settled orders mirrored")
    e2e.assert_mirrored(settled)
    assert e2e.stats()["webhooks"]["dropped"] >= 1
    assert {row.source for row in e2e.inbox()} == {"poll"}

    # Changes that fire no webhook even when webhooks work.
    confirmed, deleted_draft = drafts[0], drafts[1]
    cancelled = issued[0]
    e2e.venue.confirm_order(confirmed, "PAY-LATER")
    e2e.venue.delete_order(cancelled)
    e2e.venue.delete_order(deleted_draft)

    def changes_seen() -> bool:
        assert worker.alive() and scheduler.alive()
        confirmed_row, cancelled_row = e2e.mirror(confirmed), e2e.mirror(cancelled)
        return bool(
            confirmed_row
            and confirmed_row.status is OrderStatus.ISSUED
            and cancelled_row
            and cancelled_row.status is OrderStatus.CANCELLED
        )

    wait_until(changes_seen, SEEN_WITHIN, what="the confirm and the cancel")
    e2e.assert_mirrored([confirmed])
    assert ("Issued", "poll") in e2e.history(confirmed)
    assert ("Cancelled", "poll") in e2e.history(cancelled)
    # A deleted Draft vanishes from the feed; the watchdog re-reads open orders only every
    # open_order_recheck seconds (15 min by default), so it is still shown as Draft here.
    draft_row = e2e.mirror(deleted_draft)
    assert draft_row is not None and draft_row.status is OrderStatus.DRAFT

    assert scheduler.stop() == 0, scheduler.output()
    assert worker.stop() == 0, worker.output()
    log = scheduler.output() + worker.output()
    assert "Traceback" not in log
    for secret in ("Jane Doe", "guest@example.com", settings.connections[0].api_key):
        assert (secret if isinstance(secret, str) else secret.get_secret_value()) not in log
