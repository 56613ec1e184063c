"""The scheduled erasure of personal data (``erase_personal_data``), job by job, on both
databases: what waits, what is bounded, what goes from the inbox."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from heartbeat.privacy import erase_due, without_personal_data
from otacm.settings import Settings
from storage.models import (
    Inbox,
    InboxSource,
    InboxState,
    LedgerLine,
    Outbox,
    OutboxState,
    VenueOrder,
)
from tests.support.database import texts_in_database
from tests.support.personal import OTHER, PARTNER, PERSON, plant
from tests.support.processes import ROOT
from venue.connection import SettingsError

# The planted sales visit on 2027-01-10: 90 days later is 2027-04-10.
PAST = dt.datetime(2027, 4, 12, tzinfo=dt.UTC)
BEFORE = dt.datetime(2027, 4, 9, tzinfo=dt.UTC)


def test_nothing_is_erased_before_its_horizon(sessions: sessionmaker[Session]) -> None:
    """A day before visit + 90 days, the run erases nothing and records nothing."""
    plant(sessions, "SHOP-1", PERSON, "11111111-1111-4111-8111-111111111111")

    report = erase_due(sessions, now=BEFORE, keep_days=90)

    assert report.erased == 0
    assert all(text in texts_in_database(sessions) for text in PERSON)


def test_a_sale_whose_call_is_still_to_be_sent_waits_for_it(
    sessions: sessionmaker[Session],
) -> None:
    """Past the horizon, a sale whose createOrder is pending keeps its request (and so does
    the call: the venue must get it); the run after it was sent erases both."""
    plant(sessions, "SHOP-1", PERSON, "11111111-1111-4111-8111-111111111111", sent=False)

    first = erase_due(sessions, now=PAST, keep_days=90)

    assert (first.orders, first.ledger_lines, first.outbox_rows) == (1, 0, 0)
    with sessions.begin() as session:
        (line,) = session.scalars(sa.select(LedgerLine)).all()
        assert line.request is not None and line.request["sellToName"] == PERSON[0]
        assert line.personal_data_erased_at is None
        session.execute(sa.update(Outbox).values(state=OutboxState.SENT))

    second = erase_due(sessions, now=PAST, keep_days=90)

    assert (second.orders, second.ledger_lines, second.outbox_rows) == (0, 1, 1)
    assert not any(text in texts_in_database(sessions) for text in PERSON)


def test_a_run_is_bounded_and_the_next_one_goes_on(sessions: sessionmaker[Session]) -> None:
    """With one batch of one row a run, three sales past the horizon take three runs, each
    erasing one order and one sale; then nothing is left."""
    for number, person in enumerate((PERSON, OTHER, ("Cy", "cy@example.com", "Cy H"))):
        plant(sessions, f"SHOP-{number}", person, f"{number}1111111-1111-4111-8111-111111111111")

    counts = [
        erase_due(sessions, now=PAST, keep_days=90, batch_size=1, max_batches=1).as_dict()
        for _ in range(4)
    ]

    assert [(c["orders"], c["ledger_lines"]) for c in counts] == [(1, 1)] * 3 + [(0, 0)]
    with sessions.begin() as session:
        erased = session.scalars(sa.select(VenueOrder.personal_data_erased_at)).all()
    assert erased == [PAST] * 3


def test_processed_notifications_go_after_the_horizon_and_the_others_stay(
    sessions: sessionmaker[Session],
) -> None:
    """Done rows last due before now - 90 days are deleted; a newer done row, a pending
    and a dead row (replay needs it) stay."""
    plant(sessions, "SHOP-1", PERSON, "11111111-1111-4111-8111-111111111111")
    old = PAST - dt.timedelta(days=91)
    rows = {
        "old-done": (InboxState.DONE, old),
        "new-done": (InboxState.DONE, PAST - dt.timedelta(days=89)),
        "old-pending": (InboxState.PENDING, old),
        "old-dead": (InboxState.DEAD, old),
    }
    with sessions.begin() as session:
        for key, (state, due) in rows.items():
            session.add(
                Inbox(
                    connection_id=1,
                    source=InboxSource.WEBHOOK,
                    event_name="ota_cm_order_processed",
                    order_id=key,
                    received_at=due,
                    payload={"payload": {"orderId": key}},
                    dedup_key=key,
                    state=state,
                    next_attempt_at=due,
                )
            )

    report = erase_due(sessions, now=PAST, keep_days=90)

    assert report.inbox_rows == 1
    with sessions.begin() as session:
        left = set(session.scalars(sa.select(Inbox.order_id)))
    assert left == {"new-done", "old-pending", "old-dead"}


def test_personal_keys_go_from_json_at_any_depth_and_nothing_else() -> None:
    """sellToName, sellToEmail (any case) and wallet names go, wherever they are; an
    address asked for goes under any key; references, items and dates stay."""
    body = {
        "sellToOrderReference": "R-1",
        "SellToEmail": "a@example.com",
        "sellToName": "A",
        "items": [
            {
                "visitDate": "2027-01-10",
                "sellToName": "B",
                "wallet": {"names": ["B"], "externalReferenceNumbers": ["E-1"]},
                "note": "Ask@Example.com ",
            }
        ],
    }

    assert without_personal_data(body, also={"ask@example.com"}) == {
        "sellToOrderReference": "R-1",
        "items": [{"visitDate": "2027-01-10", "wallet": {"externalReferenceNumbers": ["E-1"]}}],
    }


@pytest.mark.process
@pytest.mark.parametrize(("days", "erased"), [("5", True), (None, False)])
def test_the_scheduled_job_keeps_the_configured_number_of_days(
    sessions: sessionmaker[Session],
    migrated_engine: sa.Engine,
    days: str | None,
    erased: bool,
) -> None:
    """`otacm poll --job erase_personal_data` with a sale visited ten days ago:
    erased under OTACM_PERSONAL_DATA_DAYS=5, kept under the default 90."""
    plant(sessions, "SHOP-1", PERSON, "11111111-1111-4111-8111-111111111111")
    visited = (dt.datetime.now(dt.UTC) - dt.timedelta(days=10)).date()
    with sessions.begin() as session:
        session.execute(sa.update(VenueOrder).values(last_visit_date=visited))
        session.execute(sa.update(LedgerLine).values(last_visit_date=visited))
        session.execute(sa.update(Outbox).values(state=OutboxState.SENT))
    environment = {
        "OTACM_DATABASE_URL": migrated_engine.url.render_as_string(hide_password=False),
        "OTACM_TENANT": "privacy-test",
        "OTACM_COMPANY": "CRONUS International Ltd.",
        "OTACM_API_KEY": "privacy-test-key",
        "OTACM_PARTNER_IDS": PARTNER,
        **({"OTACM_PERSONAL_DATA_DAYS": days} if days else {}),
    }
    done = subprocess.run(
        [sys.executable, "-m", "otacm", "poll", "--job", "erase_personal_data", "--json"],
        cwd=ROOT,
        env={**os.environ, **environment},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert done.returncode == 0, done.stderr
    (result,) = json.loads(done.stdout)
    assert result["outcome"] == "ran"
    assert result["report"]["orders"] == result["report"]["ledger_lines"] == int(erased)
    stored = texts_in_database(sessions)
    assert all((text in stored) is not erased for text in PERSON)


def test_the_retention_is_a_positive_number_of_days(monkeypatch: pytest.MonkeyPatch) -> None:
    """OTACM_PERSONAL_DATA_DAYS=0 is refused naming the setting: 0 would erase the names of
    orders whose visit is today."""
    monkeypatch.setenv("OTACM_PERSONAL_DATA_DAYS", "0")
    with pytest.raises(SettingsError, match="personal_data_days"):
        Settings.load()
