"""Finance's actions on exceptions (resolve, accept: a note, who and when) and the run list."""

from __future__ import annotations

import datetime as dt
import json

import pytest
import sqlalchemy as sa
from click.testing import CliRunner, Result
from sqlalchemy.orm import Session, sessionmaker

from otacm.cli import main
from reconciler.exceptions import (
    ExceptionNotFound,
    ExceptionNotOpen,
    NoteRequired,
    accept,
    list_runs,
    resolve,
)
from storage.models import LedgerLine, ensure_connection
from storage.records import ReconException, ReconRun
from tests.reconciler.test_engine import (
    NOW,
    PARTNER,
    PERIOD_FROM,
    exceptions_by_key,
    ledger_key,
    plant_every_case,
    run,
)

LATER = NOW + dt.timedelta(hours=2)


def test_resolve_and_accept_keep_the_note_the_actor_and_the_time(
    sessions: sessionmaker[Session],
) -> None:
    """An open exception becomes resolved / accepted, with an event saying who, when, why."""
    planted = plant_every_case(sessions)
    run(sessions, planted.connection_id)
    with sessions.begin() as session:
        found = exceptions_by_key(session, planted.connection_id)
        amount_id, orphan_id = found[ledger_key("AMOUNT")].id, found[planted.orphan_key].id
        resolve(session, amount_id, actor="alice", note="  refunded the difference ", now=LATER)
        accept(session, orphan_id, actor="bob", note="test order by the venue", now=LATER)

    with sessions() as session:
        resolved = session.get(ReconException, amount_id)
        accepted = session.get(ReconException, orphan_id)
        assert resolved is not None and accepted is not None
        assert (resolved.state, accepted.state) == ("resolved", "accepted")
        last = resolved.events[-1]
        assert (last.action, last.actor, last.note, last.at, last.recon_run_id) == (
            "resolved",
            "alice",
            "refunded the difference",
            LATER,
            None,
        )
        assert (accepted.events[-1].action, accepted.events[-1].actor) == ("accepted", "bob")


@pytest.mark.parametrize("note", ["", "   "])
def test_a_blank_note_is_refused(sessions: sessionmaker[Session], note: str) -> None:
    """Resolving or accepting without a note raises NoteRequired and changes nothing."""
    planted = plant_every_case(sessions)
    run(sessions, planted.connection_id)
    with sessions.begin() as session:
        exception_id = exceptions_by_key(session, planted.connection_id)[ledger_key("QTY")].id
        with pytest.raises(NoteRequired):
            resolve(session, exception_id, actor="alice", note=note, now=LATER)
        with pytest.raises(NoteRequired):
            accept(session, exception_id, actor="alice", note=note, now=LATER)
    with sessions() as session:
        row = session.get(ReconException, exception_id)
        assert row is not None
        assert row.state == "open"
        assert [event.action for event in row.events] == ["opened"]


def test_unknown_and_not_open_exceptions_are_refused(sessions: sessionmaker[Session]) -> None:
    """An unknown id raises ExceptionNotFound; a resolved one cannot be accepted."""
    planted = plant_every_case(sessions)
    run(sessions, planted.connection_id)
    with sessions.begin() as session:
        with pytest.raises(ExceptionNotFound):
            resolve(session, 987654, actor="alice", note="why", now=LATER)
        exception_id = exceptions_by_key(session, planted.connection_id)[ledger_key("QTY")].id
        resolve(session, exception_id, actor="alice", note="fixed", now=LATER)
        with pytest.raises(ExceptionNotOpen, match="resolved"):
            accept(session, exception_id, actor="bob", note="fine", now=LATER)


def test_runs_keep_finance_s_state_and_close_what_is_gone(
    sessions: sessionmaker[Session],
) -> None:
    """A resolved exception found again stays resolved; once gone, the run closes it."""
    planted = plant_every_case(sessions)
    run(sessions, planted.connection_id)
    with sessions.begin() as session:
        exception_id = exceptions_by_key(session, planted.connection_id)[ledger_key("QTY")].id
        resolve(session, exception_id, actor="alice", note="venue re-issues", now=LATER)

    run(sessions, planted.connection_id, now=LATER)
    with sessions() as session:
        row = session.get(ReconException, exception_id)
        assert row is not None and row.state == "resolved"

    with sessions.begin() as session:
        line = session.scalars(sa.select(LedgerLine).where(LedgerLine.reference_key == "QTY")).one()
        line.quantity = 2
        line.amount = line.amount - 10
    closing = run(sessions, planted.connection_id, now=LATER)
    with sessions() as session:
        row = session.get(ReconException, exception_id)
        assert row is not None
        assert (row.state, row.closed_run_id) == ("closed", closing)
        assert [event.action for event in row.events] == ["opened", "resolved", "seen", "closed"]


def test_list_runs_newest_first_per_connection(sessions: sessionmaker[Session]) -> None:
    """list_runs gives the latest runs first, optionally of one connection."""
    planted = plant_every_case(sessions)
    with sessions.begin() as session:
        other = ensure_connection(session, "other")
    first = run(sessions, planted.connection_id)
    second = run(sessions, planted.connection_id, now=LATER)
    third = run(sessions, other, now=LATER + dt.timedelta(minutes=1))
    with sessions() as session:
        assert [r.id for r in list_runs(session)] == [third, second, first]
        assert [r.id for r in list_runs(session, planted.connection_id)] == [second, first]
        assert [r.id for r in list_runs(session, limit=1)] == [third]
        assert list_runs(session)[0].period_from == PERIOD_FROM


def _otacm(sessions: sessionmaker[Session], *args: str) -> Result:
    engine = sessions.kw["bind"]
    env = {
        "OTACM_DATABASE_URL": engine.url.render_as_string(hide_password=False),
        "OTACM_TENANT": "tenant",
        "OTACM_COMPANY": "company",
        "OTACM_API_KEY": "key",
        "OTACM_PARTNER_IDS": PARTNER,
    }
    return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)


def test_the_cli_reconciles_a_period_and_resolves_with_a_note(
    sessions: sessionmaker[Session],
) -> None:
    """`otacm reconcile` prints the run's totals; `otacm exceptions` needs --note."""
    planted = plant_every_case(sessions, "default")
    args = ("reconcile", "--from", "2026-05-01", "--to", "2026-05-08T00:00:00Z", "--json")
    first = _otacm(sessions, *args)
    assert first.exit_code == 0, first.output
    (report,) = json.loads(first.stdout)
    assert (report["connection"], report["state"]) == ("default", "finished")
    counts = {t["category"]: t["count"] for t in report["totals"]}
    assert counts["matched"] == 4 and counts["orphan"] == 1
    assert sum(counts.values()) == len(planted.expected) + 5
    again = json.loads(_otacm(sessions, *args).stdout)
    assert again[0]["totals"] == report["totals"] and again[0]["run"] != report["run"]

    with sessions() as session:
        exception_id = exceptions_by_key(session, planted.connection_id)[ledger_key("QTY")].id
    refused = _otacm(sessions, "exceptions", "resolve", str(exception_id))
    assert refused.exit_code == 1 and "note is required" in refused.output
    done = _otacm(
        sessions, "exceptions", "accept", str(exception_id), "--note", "ok", "--actor", "carol"
    )
    assert done.exit_code == 0, done.output
    assert f"exception {exception_id}: accepted" in done.output
    missing = _otacm(sessions, "exceptions", "resolve", "999999", "--note", "x")
    assert missing.exit_code == 1 and "no reconciliation exception 999999" in missing.output
    with sessions() as session:
        row = session.get(ReconException, exception_id)
        assert row is not None
        assert (row.state, row.events[-1].actor, row.events[-1].note) == ("accepted", "carol", "ok")


def test_the_cli_reports_a_failed_run_and_exits_1(sessions: sessionmaker[Session]) -> None:
    """`otacm reconcile` prints the run that failed, with its error, and exits 1."""
    plant_every_case(sessions, "default")
    with sessions.begin() as session:
        session.execute(sa.text("ALTER TABLE ledger_line RENAME TO ledger_elsewhere"))
    args = ("reconcile", "--from", "2026-05-01", "--to", "2026-05-08T00:00:00Z")
    failed = _otacm(sessions, *args, "--json")
    assert failed.exit_code == 1, failed.output
    (report,) = json.loads(failed.stdout)
    assert (report["connection"], report["state"], report["totals"]) == ("default", "failed", [])
    assert "ledger_line" in report["error"]
    with sessions() as session:
        (run_row,) = session.scalars(sa.select(ReconRun)).all()
        assert (run_row.id, run_row.state) == (report["run"], "failed")
    printed = _otacm(sessions, *args)
    assert printed.exit_code == 1
    line = printed.stdout.splitlines()[0]  # the error may run over several lines
    assert line.startswith("run ") and "(default, 2026-05-01T00:00:00+00:00 to " in line
    assert ": failed: " in line and "ledger_line" in line
