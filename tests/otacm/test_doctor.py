"""``otacm doctor`` against the sandbox: which company form the venue answers, how many
orders it lists for each configured partner, and what breaks production silently (no
client state, no subscription, jobs not succeeding, dead letters), without side effects.

Over real HTTP, the doctor run as the ``otacm`` command (CliRunner) on a migrated SQLite
database (and, for what it reads from the database, on PostgreSQL too). The company form
is not decided by the vendor's source (the gateway is not in it; ``spec/API.md``,
"Addressing and auth"); the partner count follows ChannelMgrOrderAgent
ListOrdersByPartner, which only filters by the partner id. The sandbox's subscription of
the receiver's URL is made with the states the doctor's environment configures.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from pydantic import SecretStr

from otacm.cli import main
from otacm.doctor import ORDER_COUNT_CAP
from sandbox import SandboxConfig, SandboxServer
from storage.engine import make_sessions
from storage.models import (
    Inbox,
    InboxSource,
    InboxState,
    Outbox,
    OutboxOperation,
    OutboxState,
    ensure_connection,
)
from storage.records import JobRun
from storage.types import utcnow
from tests.sandbox.conftest import order_body
from venue.client import open_client
from venue.connection import COMPANY_PATH_FORMS, VenueConnection
from venue.errors import VenueNotFound
from venue.models import OrderRequest

UNKNOWN_PARTNER = "11111111-2222-3333-4444-555555555555"
CLIENT_STATE = "doctor-client-state-5e1b9c"
WEBHOOK_URL = "https://otacm.example/webhooks/ota-cm"
WRITTEN = {
    "percent": "CRONUS%20International%20Ltd.",
    "double": "CRONUS%2520International%2520Ltd.",
    "plus": "CRONUS+International+Ltd.",
}


@pytest.fixture(scope="module")
def database(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One migrated SQLite database for the module's doctor runs."""
    url = f"sqlite:///{tmp_path_factory.mktemp('doctor') / 'otacm.sqlite3'}"
    assert run(["db", "upgrade"], {"OTACM_DATABASE_URL": url})[0] == 0
    return url


@pytest.fixture
def sandbox(request: pytest.FixtureRequest) -> Iterator[SandboxServer]:
    """A sandbox answering the company form the test is parametrized with (else percent)."""
    form = getattr(request, "param", "percent")
    with SandboxServer(SandboxConfig(pickup_interval=0, company_path_form=form)) as server:
        with open_client(connection_to(server)) as client:
            client.create_subscription(WEBHOOK_URL, CLIENT_STATE)
        yield server


def connection_to(sandbox: SandboxServer) -> VenueConnection:
    """The sandbox's venue as a connection, in the form it answers."""
    config = sandbox.config
    return VenueConnection(
        api_base_url=sandbox.url,
        tenant=config.tenant,
        environment=config.environment,
        company=config.company,
        company_path_form=config.company_path_form,
        api_key=SecretStr(sandbox.api_key),
    )


def run(args: list[str], env: dict[str, str]) -> tuple[int, str]:
    result = CliRunner().invoke(main, args, env=env, catch_exceptions=False)
    return result.exit_code, result.output


def env_for(sandbox: SandboxServer, database: str, **changes: str) -> dict[str, str]:
    """otacm's environment for the sandbox's venue; ``changes`` override it."""
    config = sandbox.config
    return {
        "OTACM_DATABASE_URL": database,
        "OTACM_API_BASE_URL": sandbox.url,
        "OTACM_TENANT": config.tenant,
        "OTACM_ENVIRONMENT": config.environment,
        "OTACM_COMPANY": config.company,
        "OTACM_API_KEY": sandbox.api_key,
        "OTACM_PARTNER_IDS": config.partners[0].id,
        "OTACM_WEBHOOK_CLIENT_STATES": CLIENT_STATE,
        "OTACM_WEBHOOK_URL": WEBHOOK_URL,
        **changes,
    }


def doctor_json(env: dict[str, str]) -> tuple[int, dict[str, dict[str, Any]]]:
    """``otacm doctor --json``: the exit code and the checks by name."""
    code, output = run(["doctor", "--json"], env)
    body = json.loads(output[output.index("{") :])
    return code, {check["name"]: check for check in body["checks"]}


@pytest.mark.parametrize("sandbox", COMPANY_PATH_FORMS, indirect=True)
@pytest.mark.parametrize("given", [*WRITTEN.values(), "CRONUS International Ltd."])
def test_otacm_talks_to_the_venue_in_each_form(sandbox: SandboxServer, given: str) -> None:
    """However the company is configured (raw, %20, %2520, +), otacm with the venue's
    form set creates and reads an order; with another form set the venue says 404."""
    form = sandbox.config.company_path_form
    connection = VenueConnection(
        api_base_url=sandbox.url,
        tenant=sandbox.config.tenant,
        environment=sandbox.config.environment,
        company=given,
        company_path_form=form,
        api_key=SecretStr(sandbox.api_key),
    )
    assert connection.base_url.endswith("/" + WRITTEN[form])
    with open_client(connection) as client:
        made = client.create_order(OrderRequest.model_validate(order_body()))
        assert client.get_order(made.order_id).order_id == made.order_id
    other = next(f for f in COMPANY_PATH_FORMS if f != form)
    with (
        open_client(connection.model_copy(update={"company_path_form": other})) as client,
        pytest.raises(VenueNotFound),
    ):
        client.get_order(made.order_id)


@pytest.mark.parametrize("sandbox", COMPANY_PATH_FORMS, indirect=True)
def test_doctor_finds_the_form_and_names_the_setting(sandbox: SandboxServer, database: str) -> None:
    """With the default (percent) configured, the doctor passes against a percent venue
    and otherwise fails naming company_path_form and OTACM_COMPANY_PATH_FORM with the
    form the venue answers; set so, it passes."""
    form = sandbox.config.company_path_form
    env = env_for(sandbox, database)
    code, output = run(["doctor"], env)
    (line,) = [x for x in output.splitlines() if "venue default company path:" in x]
    if form == "percent":
        assert code == 0, output
        assert line.startswith("ok   ") and "written as percent (%20)" in line
    else:
        assert code == 1
        assert line.startswith("FAIL ")
        assert f'set company_path_form = "{form}"' in line
        assert f"OTACM_COMPANY_PATH_FORM={form}" in line
        assert "FAIL venue default: " in output and "does not know this tenant/company" in output
    code, checks = doctor_json(env)
    facts = checks["venue default company path"]["facts"]
    assert facts == {"configured": "percent", "answered": [form], "use": form}

    code, output = run(["doctor"], {**env, "OTACM_COMPANY_PATH_FORM": form})
    assert code == 0, output
    assert f"ok   venue default company path: the venue answers the company written as {form}" in (
        output
    )


def test_doctor_says_when_no_form_is_answered(sandbox: SandboxServer, database: str) -> None:
    """A company the venue does not know in any form: one line says so and what to check."""
    code, output = run(["doctor"], env_for(sandbox, database, OTACM_COMPANY="Other Company"))
    assert code == 1
    (line,) = [x for x in output.splitlines() if "venue default company path:" in x]
    assert "answers the company 'Other Company' in no form (percent: 404" in line
    assert "check the tenant, environment and company name" in line


def test_doctor_counts_each_partners_orders(sandbox: SandboxServer, database: str) -> None:
    """Per configured partner, the orders the venue lists: exact up to the cap, "at least"
    beyond it, and a WARN for none, since an unknown partner id also lists nothing
    (ChannelMgrOrderAgent ListOrdersByPartner). Warnings do not fail the doctor."""
    busy, quiet, idle = (p.id for p in sandbox.config.partners[:3])
    for number in range(ORDER_COUNT_CAP + 1):
        sandbox.runtime.orders.create(order_body(f"BUSY-{number}", partner=busy))
    for number in range(3):
        sandbox.runtime.orders.create(order_body(f"QUIET-{number}", partner=quiet))
    partners = ",".join([busy, quiet, "{" + UNKNOWN_PARTNER.upper() + "}", idle])
    env = env_for(sandbox, database, OTACM_PARTNER_IDS=partners)

    code, output = run(["doctor"], env)
    assert code == 0, output
    lines = {x.split(":", 1)[0]: x for x in output.splitlines() if " partner " in x}
    assert lines[f"ok   venue default partner {busy}"].endswith(
        f"the venue lists at least {ORDER_COUNT_CAP} orders (counted up to {ORDER_COUNT_CAP}:"
        " one page, one call)"
    )
    assert lines[f"ok   venue default partner {quiet}"].endswith("the venue lists 3 order(s)")
    for silent in (UNKNOWN_PARTNER, idle):
        assert "lists no order for this partner" in lines[f"WARN venue default partner {silent}"]
        assert "check the id with the venue" in lines[f"WARN venue default partner {silent}"]

    code, checks = doctor_json(env)
    assert code == 0
    facts = {
        name.rsplit(" ", 1)[1]: (check["facts"]["orders"], check["facts"]["atLeast"])
        for name, check in checks.items()
        if " partner " in name
    }
    assert facts == {
        busy: (ORDER_COUNT_CAP, True),
        quiet: (3, False),
        UNKNOWN_PARTNER: (0, False),
        idle: (0, False),
    }
    assert checks[f"venue default partner {idle}"]["warning"] is True


def test_doctor_refuses_a_partner_id_that_is_not_a_guid(
    sandbox: SandboxServer, database: str
) -> None:
    """A partner id the venue would refuse ("Invalid partnerId") stops the doctor at the
    settings, naming it, with no traceback."""
    code, output = run(["doctor"], env_for(sandbox, database, OTACM_PARTNER_IDS="partner-1"))
    assert code == 1
    assert "partner id 'partner-1' is not a GUID" in output and "Traceback" not in output


# --- what breaks production silently ---------------------------------------------------


def test_doctor_creates_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the defaults (./var/otacm.sqlite3, ./var/secrets) in an empty directory, the
    doctor reports the missing database with the command that makes it, and leaves the
    directory empty: no database, no directory, no secrets file."""
    monkeypatch.chdir(tmp_path)
    env = {"OTACM_TENANT": "t", "OTACM_COMPANY": "c", "OTACM_API_KEY": "doctor-key-1"}
    code, output = run(["doctor", "--timeout", "1"], env)
    assert code == 1
    (line,) = [x for x in output.splitlines() if x.startswith("FAIL database")]
    assert "var/otacm.sqlite3 does not exist: run `otacm db upgrade` to create it" in line
    assert os.listdir(tmp_path) == []


def test_doctor_fails_a_connection_without_a_client_state(
    sandbox: SandboxServer, database: str, tmp_path: Path
) -> None:
    """No client state configured nor generated: every webhook would be refused; FAIL,
    naming both ways to get one. The states file is looked for, not created."""
    secrets_dir = tmp_path / "secrets"
    env = env_for(
        sandbox, database, OTACM_WEBHOOK_CLIENT_STATES="", OTACM_SECRETS_DIR=str(secrets_dir)
    )
    code, checks = doctor_json(env)
    assert code == 1
    check = checks["venue default webhook client states"]
    assert not check["ok"] and "every webhook is refused" in check["detail"]
    assert "otacm subscribe --url URL" in check["detail"]
    assert "OTACM_WEBHOOK_CLIENT_STATES" in check["detail"]
    assert not secrets_dir.exists()


def test_doctor_checks_the_subscription_at_the_venue(sandbox: SandboxServer, database: str) -> None:
    """The subscription of OTACM_WEBHOOK_URL: ok when active; FAIL when the venue lists it
    inactive, or lists none for the URL; WARN when no URL is configured to compare with."""
    env = env_for(sandbox, database)
    code, checks = doctor_json(env)
    (subscription,) = sandbox.runtime.store.subscriptions()
    assert code == 0
    assert checks["venue default subscription"]["ok"]
    assert subscription.id in checks["venue default subscription"]["detail"]

    code, checks = doctor_json(env_for(sandbox, database, OTACM_WEBHOOK_URL=""))
    assert code == 0
    check = checks["venue default subscription"]
    assert check["warning"] and "OTACM_WEBHOOK_URL is not set" in check["detail"]

    other = "https://elsewhere.example/webhooks/ota-cm"
    code, checks = doctor_json(env_for(sandbox, database, OTACM_WEBHOOK_URL=other))
    assert code == 1
    check = checks["venue default subscription"]
    assert not check["ok"]
    assert f"no subscription sends ota_cm_order_processed to {other}" in check["detail"]
    assert f"otacm subscribe --url {other}" in check["detail"]

    admin = httpx.post(
        f"{sandbox.url}/_sandbox/webhooks/{subscription.id}/state",
        json={"subscriptionState": "Inactive"},
    )
    assert admin.status_code == 200, admin.text
    code, checks = doctor_json(env)
    assert code == 1
    assert "are inactive or carry a client state" in checks["venue default subscription"]["detail"]


def test_doctor_warns_of_closed_finance_pages_and_api(
    sandbox: SandboxServer, database: str
) -> None:
    """No finance user, no API token: WARN each (the pages or /api/ are closed), exit 0;
    configured: ok, with their count and never a value."""
    code, checks = doctor_json(env_for(sandbox, database))
    assert code == 0
    assert (
        checks["finance users"]["warning"]
        and "pages are closed" in (checks["finance users"]["detail"])
    )
    assert checks["api tokens"]["warning"] and "/api/ is closed" in checks["api tokens"]["detail"]

    env = env_for(sandbox, database, OTACM_API_TOKENS="doctor-token-1,doctor-token-2")
    code, output = run(["doctor"], env)
    assert code == 0
    assert "ok   api tokens: 2 configured" in output and "doctor-token-1" not in output


def _doctor_on(engine: sa.Engine) -> dict[str, dict[str, Any]]:
    """``otacm doctor --json`` on ``engine``'s database, with no venue: the checks by name."""
    url = engine.url.render_as_string(hide_password=False)
    code, checks = doctor_json({"OTACM_DATABASE_URL": url})
    assert code == 1  # no venue configured
    return checks


def test_doctor_fails_jobs_that_have_not_succeeded_lately(migrated_engine: sa.Engine) -> None:
    """From the job_run records: a job whose last success is older than three of its
    intervals, or that never succeeded, fails with its last error; none run yet is a
    WARN (no scheduler has started)."""
    assert _doctor_on(migrated_engine)["jobs"]["warning"]

    now = utcnow()
    fresh = {
        "change_feed",
        "watchdog",
        "lost_submissions",
        "metric_figures",
        "confirm_drafts",
        "reconcile",
        "erase_personal_data",
        "prune",
    }
    with make_sessions(migrated_engine).begin() as session:
        for name in fresh:
            session.add(_job_run(name, now=now, last_success=now - dt.timedelta(seconds=5)))
        # Every 10 s, last success 2 minutes ago (more than three intervals).
        late = _job_run("retry_outbox", now=now, last_success=now - dt.timedelta(minutes=2))
        late.failures, late.last_error = 12, "OperationalError: the server closed the connection"
        session.add(late)

    check = _doctor_on(migrated_engine)["jobs"]
    assert not check["ok"]
    assert (
        "retry_outbox (every 10 s) last succeeded 2 min ago: OperationalError" in (check["detail"])
    )
    assert set(check["facts"]["late"]) == {"retry_outbox"}

    with make_sessions(migrated_engine).begin() as session:
        session.get_one(JobRun, "retry_outbox").last_success_at = now
        session.delete(session.get_one(JobRun, "reconcile"))
    check = _doctor_on(migrated_engine)["jobs"]
    assert not check["ok"] and "reconcile (every 1 d) never succeeded" in check["detail"]

    with make_sessions(migrated_engine).begin() as session:
        session.add(_job_run("reconcile", now=now, last_success=now - dt.timedelta(days=2)))
    check = _doctor_on(migrated_engine)["jobs"]
    assert check["ok"] and not check["warning"]


def _job_run(name: str, *, now: dt.datetime, last_success: dt.datetime) -> JobRun:
    return JobRun(
        name=name,
        owner="doctor-test",
        started_at=last_success,
        finished_at=last_success,
        last_success_at=last_success,
        next_due_at=now,
        runs=1,
        failures=0,
    )


def test_doctor_fails_on_dead_letters(migrated_engine: sa.Engine) -> None:
    """Inbox rows dead-lettered and outbox rows given up fail the doctor, counted, with
    what to do; none is ok."""
    check = _doctor_on(migrated_engine)["dead letters"]
    assert check["ok"] and check["facts"] == {"inbox": 0, "outbox": 0}

    now = utcnow()
    with make_sessions(migrated_engine).begin() as session:
        connection_id = ensure_connection(session, "default")
        for number in range(2):
            session.add(
                Inbox(
                    connection_id=connection_id,
                    source=InboxSource.WEBHOOK,
                    event_name="ota_cm_order_processed",
                    received_at=now,
                    payload={},
                    dedup_key=f"dead-{number}",
                    state=InboxState.DEAD,
                    next_attempt_at=now,
                )
            )
        session.add(
            Outbox(
                connection_id=connection_id,
                operation=OutboxOperation.CREATE,
                state=OutboxState.DEAD,
                next_attempt_at=now,
            )
        )

    check = _doctor_on(migrated_engine)["dead letters"]
    assert not check["ok"] and check["facts"] == {"inbox": 2, "outbox": 1}
    assert "2 inbox row(s) dead-lettered" in check["detail"]
    assert "`otacm inbox replay`" in check["detail"]
    assert "1 outbox row(s) given up" in check["detail"]
