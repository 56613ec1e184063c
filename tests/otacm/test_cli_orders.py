"""`otacm submit`, `otacm orders show` and `otacm inbox replay` against the sandbox."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from otacm.cli import main
from sandbox import SandboxConfig, SandboxServer


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
    orders.write_text(json.dumps({"partnerId": "p", "sellToOrderReference": "x", "items": []}))
    code, output = run(["submit", str(orders)], env)
    assert code == 1
    assert "items" in output


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
