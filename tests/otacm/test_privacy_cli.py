"""``otacm privacy erase``: a person's request, as the operator runs it, on both databases."""

from __future__ import annotations

import json

import pytest
import sqlalchemy as sa
from click.testing import CliRunner, Result
from sqlalchemy.orm import Session, sessionmaker

from heartbeat.privacy import email_hash
from otacm.cli import main
from storage.models import Outbox
from storage.records import ErasureKind, PrivacyErasure
from tests.support.database import texts_in_database
from tests.support.personal import OTHER, PARTNER, PERSON, plant


@pytest.fixture
def env(migrated_engine: sa.Engine) -> dict[str, str]:
    return {
        "OTACM_DATABASE_URL": migrated_engine.url.render_as_string(hide_password=False),
        "OTACM_TENANT": "privacy-test",
        "OTACM_COMPANY": "CRONUS International Ltd.",
        "OTACM_API_KEY": "privacy-test-key",
        "OTACM_PARTNER_IDS": PARTNER,
    }


def erase(env: dict[str, str], *args: str) -> Result:
    return CliRunner().invoke(main, ["privacy", "erase", *args], env=env)


def records(sessions: sessionmaker[Session]) -> list[PrivacyErasure]:
    with sessions.begin() as session:
        return list(session.scalars(sa.select(PrivacyErasure).order_by(PrivacyErasure.id)))


def test_erase_by_email_erases_that_person_everywhere_and_records_it(
    sessions: sessionmaker[Session], env: dict[str, str]
) -> None:
    """The address in any case: the person's order, line, wallet, sale and sent call lose
    every name and e-mail, the other customer's stay; the record keeps the actor, the
    address's SHA-256 (never the address) and the counts; references and ticket numbers
    stay."""
    plant(sessions, "SHOP-1", PERSON, "11111111-1111-4111-8111-111111111111")
    plant(sessions, "SHOP-2", OTHER, "22222222-2222-4222-8222-222222222222")

    result = erase(env, "--email", "ADA.Customer@Example.com", "--actor", "dpo")

    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == (
        "erased: 1 order(s), 1 sale(s), 1 call(s), 0 notification(s) (record 1)"
    )
    stored = texts_in_database(sessions)
    assert not any(text in stored for text in PERSON)
    assert PERSON[1] not in stored.lower()
    assert all(text in stored for text in OTHER)
    for kept in ("SHOP-1", "V-SHOP-1", "W-SHOP-1", "EXT-SHOP-1", "T-SHOP-1", "PAY-SHOP-1"):
        assert kept in stored
    (record,) = records(sessions)
    assert (record.kind, record.actor, record.selector) == (
        ErasureKind.EMAIL,
        "dpo",
        email_hash(PERSON[1]),
    )
    assert record.counts == {
        "orders": 1,
        "ledger_lines": 1,
        "outbox_rows": 1,
        "inbox_rows": 0,
        "kept_unsent": 0,
    }


def test_an_address_never_stored_is_met_with_nothing_erased_and_recorded(
    sessions: sessionmaker[Session], env: dict[str, str]
) -> None:
    """Exit 0 and "nothing stored": the request is met (a repeat after an erasure finds
    nothing either); the record says zero rows, and nothing else changed."""
    plant(sessions, "SHOP-1", PERSON, "11111111-1111-4111-8111-111111111111")
    result = erase(env, "--email", "nobody@example.com", "--actor", "dpo", "--json")

    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    assert answer["orders"] == answer["ledger_lines"] == answer["outbox_rows"] == 0
    assert answer["selector"] == email_hash("nobody@example.com")
    text = erase(env, "--email", "nobody@example.com", "--actor", "dpo")
    assert (
        text.stdout.strip() == "nothing stored for that e-mail address: nothing erased (record 2)"
    )
    assert [r.counts["orders"] for r in records(sessions)] == [0, 0]
    after = texts_in_database(sessions)
    assert all(text in after for text in PERSON)


def test_a_call_still_to_be_sent_keeps_its_body_and_is_reported(
    sessions: sessionmaker[Session], env: dict[str, str]
) -> None:
    """By reference: the pending createOrder keeps the request the venue must get, and
    the command says so on stderr; the rest is erased."""
    plant(sessions, "SHOP-3", PERSON, "33333333-3333-4333-8333-333333333333", sent=False)

    result = erase(env, "--reference", "shop-3", "--actor", "dpo")

    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == (
        "erased: 1 order(s), 1 sale(s), 0 call(s), 0 notification(s) (record 1)"
    )
    assert "1 call(s) still to be sent keep their body" in result.stderr
    with sessions.begin() as session:
        (call,) = session.scalars(sa.select(Outbox)).all()
        assert call.request is not None and call.request["sellToEmail"] == PERSON[1]
    assert records(sessions)[0].counts["kept_unsent"] == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "name the person by exactly one of an e-mail address or a reference"),
        (["--email", "a@b.c", "--reference", "R"], "exactly one of"),
        (["--email", "   "], "is empty"),
        (["--email", "no-at-sign"], "an e-mail address has an @"),
        (["--reference", "R" * 101], "at most 100 characters"),
        (["--email", "a@b.c", "--actor", "x" * 101], "the actor is 1 to 100 characters"),
        (["--email", "a@b.c", "--connection", "nope"], "nope"),
    ],
)
def test_a_bad_request_is_one_line_exit_1_and_records_nothing(
    sessions: sessionmaker[Session], env: dict[str, str], args: list[str], message: str
) -> None:
    """Every refusal: one `Error:` line naming the problem, exit 1, no record, no change."""
    plant(sessions, "SHOP-1", PERSON, "11111111-1111-4111-8111-111111111111")
    before = texts_in_database(sessions)

    result = erase(env, *args)

    assert result.exit_code == 1
    (error,) = result.stderr.strip().splitlines()
    assert error.startswith("Error: ") and message in error
    assert records(sessions) == []
    assert texts_in_database(sessions) == before
