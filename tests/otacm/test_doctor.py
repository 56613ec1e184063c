"""``otacm doctor`` against the sandbox: which company form the venue answers, and how
many orders it lists for each configured partner.

Over real HTTP, the doctor run as the ``otacm`` command (CliRunner) on a migrated SQLite
database. The company form is not decided by the vendor's source (the gateway is not in
it; ``spec/API.md``, "Addressing and auth"); the partner count follows ChannelMgrOrderAgent
ListOrdersByPartner, which only filters by the partner id.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from click.testing import CliRunner
from pydantic import SecretStr

from otacm.cli import main
from otacm.doctor import ORDER_COUNT_CAP
from otacm.settings import COMPANY_PATH_FORMS, VenueConnection
from sandbox import SandboxConfig, SandboxServer
from tests.sandbox.conftest import order_body
from venue.client import open_client
from venue.errors import VenueNotFound
from venue.models import OrderRequest

UNKNOWN_PARTNER = "11111111-2222-3333-4444-555555555555"
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
        yield server


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
