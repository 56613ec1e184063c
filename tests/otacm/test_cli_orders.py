"""`otacm submit`, `otacm orders show|replace|cancel|errors` and `otacm inbox replay`
against the sandbox, over real HTTP, on a SQLite database."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner
from pydantic import SecretStr

from orders.mirror import upsert_order
from otacm.cli import main
from sandbox import SandboxConfig, SandboxServer
from storage.engine import make_engine, make_sessions
from storage.models import ChangeSource, Inbox, InboxSource, InboxState, ensure_connection
from storage.types import utcnow
from venue.client import open_client
from venue.connection import VenueConnection


@pytest.fixture
def sandbox() -> Iterator[SandboxServer]:
    """The simulated venue on a free port, settling orders only when told."""
    with SandboxServer(SandboxConfig(pickup_interval=0)) as server:
        yield server


@pytest.fixture
def env(tmp_path: Path, sandbox: SandboxServer) -> dict[str, str]:
    """otacm configured for the sandbox, on a migrated SQLite database."""
    values = {
        "OTACM_DATABASE_URL": f"sqlite:///{tmp_path / 'otacm.sqlite3'}",
        "OTACM_API_BASE_URL": sandbox.url,
        "OTACM_TENANT": sandbox.config.tenant,
        "OTACM_ENVIRONMENT": sandbox.config.environment,
        "OTACM_COMPANY": sandbox.config.company,
        "OTACM_API_KEY": sandbox.api_key,
        "OTACM_PARTNER_IDS": sandbox.config.partners[0].id,
    }
    assert run(["db", "upgrade"], values)[0] == 0
    return values


def run(args: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Exit code and standard output (logs go to standard error)."""
    result = CliRunner().invoke(main, args, env=env, catch_exceptions=False)
    return result.exit_code, result.stdout + (result.stderr if result.exit_code else "")


def order(reference: str, partner: str, item: str = "31001") -> dict[str, object]:
    visit = (dt.datetime.now(dt.UTC).date() + dt.timedelta(days=3)).isoformat()
    return {
        "partnerId": partner,
        "sellToOrderReference": reference,
        "paymentReference": f"PAY-{reference}",
        "sellToName": "Jane Doe",
        "sellToEmail": "jane@example.com",
        "amount": "200.00",
        "currency": "DKK",
        "items": [{"itemNumber": item, "visitDate": visit, "visitTime": "10:00:00", "quantity": 2}],
    }


def test_submit_then_show_tells_the_whole_story(
    tmp_path: Path, sandbox: SandboxServer, env: dict[str, str]
) -> None:
    """A submitted order is shown with its wallets, its timeline and its ledger line."""
    partner = sandbox.config.partners[0].id
    orders = tmp_path / "orders.jsonl"
    orders.write_text("\n".join(json.dumps(order(f"cli-{n}", partner)) for n in (1, 2)))

    code, output = run(["submit", str(orders), "--json"], env)
    assert code == 0, output
    outcomes = json.loads(output)
    assert [o["outcome"] for o in outcomes] == ["sent", "sent"]

    code, output = run(["orders", "show", "CLI-1"], env)
    assert code == 0, output
    assert "reference      CLI-1" in output
    assert "Submitted (submit)" in output
    assert "ledger: active sale of 2 for 200.00 DKK (submit)" in output
    assert "Jane Doe" not in output and "jane@example.com" not in output

    code, output = run(["orders", "show", outcomes[1]["orderId"], "--json"], env)
    assert code == 0
    (story,) = json.loads(output)
    assert story["sellToOrderReference"] == "CLI-2"
    assert [change["source"] for change in story["timeline"]] == ["submit"]


def test_submit_again_changes_nothing(
    tmp_path: Path, sandbox: SandboxServer, env: dict[str, str]
) -> None:
    """A file submitted twice is answered `duplicate` the second time, exit 0."""
    orders = tmp_path / "order.json"
    orders.write_text(json.dumps(order("cli-again", sandbox.config.partners[0].id)))
    assert run(["submit", str(orders)], env)[0] == 0
    code, output = run(["submit", str(orders), "--json"], env)
    assert code == 0
    assert [o["outcome"] for o in json.loads(output)] == ["duplicate"]


def test_submit_refused_by_the_venue_exits_1_with_its_reason(
    tmp_path: Path, sandbox: SandboxServer, env: dict[str, str]
) -> None:
    """An unknown item is refused by the venue: the reason is printed and the exit is 1."""
    orders = tmp_path / "order.json"
    orders.write_text(json.dumps(order("cli-bad", sandbox.config.partners[0].id, "99999")))
    code, output = run(["submit", str(orders)], env)
    assert code == 1
    assert "Unknown item '99999'" in output


def test_submit_of_an_invalid_file_names_the_field(tmp_path: Path, env: dict[str, str]) -> None:
    """A file that is not an order request is refused whole, naming the field; exit 1."""
    orders = tmp_path / "order.json"
    partner = "21e8c1d2-3f4a-4c5b-9e6d-7f8a9b0c1d2e"
    orders.write_text(json.dumps({"partnerId": partner, "sellToOrderReference": "x", "items": []}))
    code, output = run(["submit", str(orders)], env)
    assert code == 1
    assert "items" in output


def test_submit_refuses_each_order_the_venue_would_refuse_one_line_each(
    tmp_path: Path, sandbox: SandboxServer, env: dict[str, str]
) -> None:
    """ChannelMgrOrderAgent GetRequiredTimeField / TryParseWalletBlock: `otacm submit`
    refuses first what the venue would refuse, one line per refused order naming its
    field, exit 1, and records and sends nothing."""
    partner = sandbox.config.partners[0].id
    good = order("cli-fine", partner)
    no_time = order("cli-no-time", partner)
    del no_time["items"][0]["visitTime"]  # type: ignore[index]
    short_time = order("cli-short-time", partner)
    short_time["items"][0]["visitTime"] = "10:00"  # type: ignore[index]
    no_names = order("cli-no-names", partner)
    no_names["items"][0]["wallet"] = {"names": []}  # type: ignore[index]
    orders = tmp_path / "orders.json"
    orders.write_text(json.dumps([good, no_time, short_time, no_names]))

    code, output = run(["submit", str(orders)], env)

    assert code == 1
    refusals = [line for line in output.splitlines() if line.startswith("Error: ")]
    assert refusals == [
        f"Error: {orders}: [1].items[0].visitTime: Field required",
        f"Error: {orders}: [2].items[0].visitTime: must be a time as HH:mm:ss",
        f"Error: {orders}: [3].items[0].wallet.names: List should have at least 1 item"
        " after validation, not 0",
    ]
    assert run(["orders", "show", "CLI-FINE"], env)[0] == 1  # nothing recorded nor sent


def test_submit_refuses_text_the_venue_would_cut_and_a_partner_that_is_no_guid(
    tmp_path: Path, sandbox: SandboxServer, env: dict[str, str]
) -> None:
    """ChannelMgrOrderAgent TryParseHeader ("partnerId is not a valid GUID"; CopyStr to
    CMOrder's Text[100]), TryParseItem (CMOrderLine) and TryParseComponentScheduleEntry:
    `otacm submit` refuses each such order in one line naming its field, exit 1, and
    records and sends nothing."""
    partner = sandbox.config.partners[0].id
    good = order("cli-cut-fine", partner)
    not_guid = order("cli-cut-partner", "partner-one")
    long_email = order("cli-cut-email", partner)
    long_email["sellToEmail"] = "j" * 89 + "@example.com"
    long_line_name = order("cli-cut-line", partner)
    long_line_name["items"][0]["sellToName"] = "N" * 101  # type: ignore[index]
    bad_schedule = order("cli-cut-schedule", partner)
    bad_schedule["items"][0]["wallet"] = {  # type: ignore[index]
        "componentSchedule": [{"itemNumber": "31002", "visitDate": "2099-01-01"}]
    }
    orders = tmp_path / "orders.json"
    orders.write_text(json.dumps([good, not_guid, long_email, long_line_name, bad_schedule]))

    code, output = run(["submit", str(orders)], env)

    assert code == 1
    refusals = [line for line in output.splitlines() if line.startswith("Error: ")]
    cut = "at most 100 characters: the venue would cut the rest"
    assert refusals == [
        f"Error: {orders}: [1].partnerId: is not a valid GUID",
        f"Error: {orders}: [2].sellToEmail: {cut}",
        f"Error: {orders}: [3].items[0].sellToName: {cut}",
        f"Error: {orders}: [4].items[0].wallet.componentSchedule[0].visitTime: Field required",
    ]
    assert run(["orders", "show", "CLI-CUT-FINE"], env)[0] == 1  # nothing recorded nor sent


def test_orders_show_of_an_unknown_key_exits_1(env: dict[str, str]) -> None:
    """Nothing stored under the key: one line saying so, exit 1."""
    code, output = run(["orders", "show", "NOPE-1"], env)
    assert code == 1
    assert "no stored order" in output


def test_inbox_replay_reports_how_many_rows(env: dict[str, str]) -> None:
    """With nothing dead-lettered, replay says 0 rows; an unknown connection is an error."""
    code, output = run(["inbox", "replay"], env)
    assert code == 0
    assert "0 dead-lettered inbox row(s) queued again" in output
    code, output = run(["inbox", "replay", "--connection", "elsewhere"], env)
    assert code == 1
    assert "no venue connection named 'elsewhere'" in output


def test_inbox_list_shows_rows_newest_first_and_the_dead_ones_with_their_count(
    env: dict[str, str],
) -> None:
    """Five rows, two dead-lettered: all newest first; --dead the two with "2 of 2";
    --before pages on; --json for scripts; an unknown --before id is one line, exit 1."""
    engine = make_engine(env["OTACM_DATABASE_URL"])
    try:
        with make_sessions(engine).begin() as session:
            connection_id = ensure_connection(session, "default")
            now = utcnow()
            for n in range(5):
                session.add(
                    Inbox(
                        connection_id=connection_id,
                        source=InboxSource.WEBHOOK,
                        event_name="ota_cm_order_processed",
                        order_id=f"0000000{n}-0000-4000-8000-000000000000",
                        received_at=now + dt.timedelta(seconds=n),
                        payload={},
                        dedup_key=f"key-{n}",
                        state=InboxState.DEAD if n in (1, 3) else InboxState.DONE,
                        attempts=8 if n in (1, 3) else 1,
                        next_attempt_at=now + dt.timedelta(seconds=n),
                        last_error="getOrder answered 500" if n in (1, 3) else None,
                    )
                )
    finally:
        engine.dispose()
    code, output = run(["inbox", "list"], env)
    assert code == 0
    lines = output.splitlines()
    assert [line.split()[0] for line in lines[:-1]] == ["5", "4", "3", "2", "1"]
    assert lines[-1] == "5 row(s)"
    code, output = run(["inbox", "list", "--dead"], env)
    assert [line.split()[0] for line in output.splitlines()[:-1]] == ["4", "2"]
    assert "getOrder answered 500" in output
    assert output.splitlines()[-1] == "2 of 2 dead row(s)"
    code, output = run(["inbox", "list", "--dead", "--before", "4", "--json"], env)
    listed = json.loads(output)
    assert ([row["id"] for row in listed["rows"]], listed["total"]) == ([2], 2)
    assert listed["rows"][0]["state"] == "dead"
    code, output = run(["inbox", "list", "--before", "99"], env)
    assert (code, "--before 99: no inbox row has that id" in output) == (1, True)


# --- orders replace, cancel, errors ----------------------------------------------------------


def faults(sandbox: SandboxServer, **changes: object) -> None:
    """``POST /_sandbox/faults``."""
    response = httpx.post(f"{sandbox.url}/_sandbox/faults", json=changes, timeout=10)
    assert response.status_code == 200, response.text


def submitted(tmp_path: Path, env: dict[str, str], body: dict[str, object]) -> str:
    """``otacm submit`` of one order; its orderId."""
    path = tmp_path / f"{body['sellToOrderReference']}.json"
    path.write_text(json.dumps(body))
    code, output = run(["submit", str(path), "--json"], env)
    assert code == 0, output
    (outcome,) = json.loads(output)
    return str(outcome["orderId"])


def mirror_from_venue(env: dict[str, str], order_id: str) -> None:
    """What the worker does after a webhook: getOrder, and the answer into the mirror."""
    connection = VenueConnection(
        name="default",
        api_base_url=env["OTACM_API_BASE_URL"],
        tenant=env["OTACM_TENANT"],
        environment=env["OTACM_ENVIRONMENT"],
        company=env["OTACM_COMPANY"],
        api_key=SecretStr(env["OTACM_API_KEY"]),
    )
    engine = make_engine(env["OTACM_DATABASE_URL"])
    try:
        with open_client(connection) as client, make_sessions(engine).begin() as session:
            upsert_order(
                session,
                ensure_connection(session, "default"),
                client.get_order(order_id),
                source=ChangeSource.FETCH,
                observed_at=utcnow(),
            )
    finally:
        engine.dispose()


def test_orders_replace_sends_a_fixed_order_whatever_the_mirror_shows(
    tmp_path: Path, sandbox: SandboxServer, env: dict[str, str]
) -> None:
    """The venue put the order in Error (the mirror still says Submitted): the fixed
    request from FILE is sent, the order is Submitted again with the new lines, and the
    sale's ledger line takes the new amount."""
    partner = sandbox.config.partners[0].id
    faults(sandbox, errorRate=1.0)
    order_id = submitted(tmp_path, env, order("cli-err", partner))
    sandbox.tick()
    faults(sandbox, errorRate=0.0)
    fixed = tmp_path / "fixed.json"
    fixed.write_text(json.dumps({**order("CLI-ERR", partner, "31002"), "amount": "100.00"}))

    code, output = run(["orders", "replace", "CLI-ERR", str(fixed), "--json"], env)

    assert code == 0, output
    outcome = json.loads(output)
    assert (outcome["outcome"], outcome["status"]) == ("replaced", "Submitted")
    assert outcome["orderId"] == order_id
    code, output = run(["orders", "show", "CLI-ERR"], env)
    assert "2 x 31002" in output  # the mirror holds the venue's answer: the new lines
    assert "ledger: active sale of 2 for 100.00 DKK (submit)" in output


def test_orders_replace_refuses_what_cannot_be_sent_naming_the_problem(
    tmp_path: Path, sandbox: SandboxServer, env: dict[str, str]
) -> None:
    """A file that is not JSON, holds two orders, or changes the partner or reference is
    refused before anything is sent; an unknown REF too; an Issued order is refused by
    the venue with its reason. Each: exit 1 and one line naming the problem."""
    partner = sandbox.config.partners[0].id
    other_partner = sandbox.config.partners[1].id
    submitted(tmp_path, env, order("cli-issued", partner))
    sandbox.tick()
    files = {
        "not-json": "{nope",
        "two": json.dumps([order("CLI-ISSUED", partner), order("CLI-ISSUED", partner)]),
        "reference": json.dumps(order("CLI-OTHER", partner)),
        "partner": json.dumps(order("CLI-ISSUED", other_partner)),
        "good": json.dumps(order("CLI-ISSUED", partner, "31002")),
        "time": json.dumps(order("CLI-ISSUED", partner, "31002")).replace("10:00:00", "10:00"),
        "cut": json.dumps(order("CLI-ISSUED", partner, "31002")).replace(
            "jane@example.com", "j" * 89 + "@example.com"
        ),
    }
    for name, text in files.items():
        (tmp_path / f"{name}.json").write_text(text)

    def replace(ref: str, name: str) -> tuple[int, str]:
        return run(["orders", "replace", ref, str(tmp_path / f"{name}.json")], env)

    cases = [
        (replace("CLI-ISSUED", "not-json"), "not valid JSON"),
        (replace("CLI-ISSUED", "two"), "a replacement is one order, and the file holds 2"),
        (replace("CLI-ISSUED", "reference"), "sellToOrderReference 'CLI-OTHER' in the file"),
        (replace("CLI-ISSUED", "partner"), f"partnerId '{other_partner}' in the file"),
        (replace("NOPE-1", "good"), "no stored order under 'NOPE-1'"),
        # ChannelMgrOrderAgent GetRequiredTimeField: refused before the venue is asked.
        (replace("CLI-ISSUED", "time"), "items[0].visitTime: must be a time as HH:mm:ss"),
        # ChannelMgrOrderAgent TryParseHeader: CopyStr to CMOrder.SellToEmail's Text[100].
        (replace("CLI-ISSUED", "cut"), "sellToEmail: at most 100 characters"),
        (replace("CLI-ISSUED", "good"), "refused  order"),
    ]
    for (code, output), problem in cases:
        assert code == 1, output
        assert problem in output, output
    assert "Order cannot be replaced in status Issued" in cases[-1][0][1]


def test_orders_cancel_cancels_removes_or_says_why_not(
    tmp_path: Path, sandbox: SandboxServer, env: dict[str, str]
) -> None:
    """In flight: refused with the venue's reason, exit 1 (an unknown connection too).
    Issued: Cancelled. A Draft: removed."""
    partner = sandbox.config.partners[0].id
    submitted(tmp_path, env, order("cli-cancel", partner))
    unpaid = {k: v for k, v in order("cli-draft", partner).items() if k != "paymentReference"}
    submitted(tmp_path, env, unpaid)

    code, output = run(["orders", "cancel", "CLI-CANCEL"], env)
    assert code == 1
    assert "refused" in output and "mid-flight (status Submitted)" in output
    code, output = run(["orders", "cancel", "CLI-CANCEL", "--connection", "elsewhere"], env)
    assert code == 1
    assert "no venue connection named 'elsewhere'" in output

    sandbox.tick()
    code, output = run(["orders", "cancel", "CLI-CANCEL", "--json"], env)
    assert code == 0, output
    assert (json.loads(output)["outcome"], json.loads(output)["status"]) == (
        "cancelled",
        "Cancelled",
    )
    code, output = run(["orders", "cancel", "cli-draft"], env)
    assert code == 0, output
    assert output.startswith("CLI-DRAFT  removed  order ")
    assert "Jane Doe" not in output


def test_orders_errors_lists_the_venues_reasons(
    tmp_path: Path, sandbox: SandboxServer, env: dict[str, str]
) -> None:
    """Orders the mirror has in Error, with the venue's reason; --json for scripts; an
    unknown connection is an error."""
    faults(sandbox, errorRate=1.0)
    order_id = submitted(tmp_path, env, order("cli-broken", sandbox.config.partners[0].id))
    sandbox.tick()
    mirror_from_venue(env, order_id)

    code, output = run(["orders", "errors"], env)
    assert code == 0, output
    assert output.startswith(f"CLI-BROKEN  order {order_id}  CM-")
    assert "Import header for JobId TM-IMPORT-" in output
    assert output.rstrip().endswith("1 order(s) in Error")

    code, output = run(["orders", "errors", "--json", "--connection", "default"], env)
    assert code == 0, output
    (listed,) = json.loads(output)
    assert (listed["orderId"], listed["inLedger"]) == (order_id, True)
    assert "Jane Doe" not in output and "jane@example.com" not in output

    code, output = run(["orders", "errors", "--connection", "elsewhere"], env)
    assert code == 1
    assert "no venue connection named 'elsewhere'" in output


@pytest.mark.parametrize("command", ["replace", "cancel", "errors"])
def test_each_orders_command_explains_itself(command: str) -> None:
    """``--help`` works without any configuration."""
    result = CliRunner().invoke(main, ["orders", command, "--help"])
    assert result.exit_code == 0
    assert "--json" in result.output and "--connection" in result.output
