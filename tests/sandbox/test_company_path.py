"""The company in the path: the sandbox answers exactly one way of writing it.

The vendor's source routes below the company (ChannelMgrApi Handle) but the gateway that
reads the company from the URL is not in it, and the vendor's pages disagree: the seeds
write a space as ``%2520``, the URL page as ``%20``, the "API URL" page as ``+``
(``spec/API.md``, "Addressing and auth"). So the sandbox can be started to accept any
one of them, and otacm must find out which (``otacm doctor``).
"""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest
from click.testing import CliRunner

from sandbox.cli import build_config, sandbox_command
from tests.sandbox.conftest import PARTNER, Venue
from venue.connection import COMPANY_PATH_FORMS

WRITTEN = {
    "percent": "CRONUS%20International%20Ltd.",
    "double": "CRONUS%2520International%2520Ltd.",
    "plus": "CRONUS+International+Ltd.",
}


def status_for(venue: Venue, company: str) -> int:
    """The status of a list call with the company written as ``company``."""
    config = venue.server.config
    url = f"{venue.server.url}/{config.tenant}/{config.environment}/{company}"
    response = httpx.get(
        f"{url}/channelManager/orders/{PARTNER}", headers={"x-np-api-key": venue.server.api_key}
    )
    if response.status_code == 404:
        assert response.json()["code"] == "resource_not_found"
    return response.status_code


@pytest.mark.parametrize("form", COMPANY_PATH_FORMS)
def test_the_sandbox_answers_exactly_one_form(make_venue: Callable[..., Venue], form: str) -> None:
    """Started with a form, the sandbox answers that one and 404s the other two, as an
    unknown company (ChannelMgrApi Handle: everything below the company)."""
    venue = make_venue(company_path_form=form)
    answers = {written: status_for(venue, company) for written, company in WRITTEN.items()}
    assert answers == {written: 200 if written == form else 404 for written in WRITTEN}
    assert venue.server.base_url.endswith("/" + WRITTEN[form])
    shown = venue.admin.get("/config").json()
    assert shown["companyPathForm"] == form and shown["baseUrl"] == venue.server.base_url


def test_default_form_is_percent(venue: Venue) -> None:
    """By default the company is written once percent-encoded (%20), as the tests'
    clients write it."""
    assert venue.server.config.company_path_form == "percent"
    assert status_for(venue, WRITTEN["percent"]) == 200
    assert status_for(venue, "cronus%20international%20ltd.") == 404, "compared exactly"
    assert status_for(venue, "CRONUS%20International%20Ltd%2E") == 200, "an unreserved escape"


def test_form_from_the_command_line_and_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """--company-path-form and OTACM_SANDBOX_COMPANY_PATH_FORM set it, the command line
    winning; another value is refused."""

    def form(*args: str) -> str:
        context = sandbox_command.make_context("sandbox", list(args))
        return build_config(context.params).company_path_form

    assert form() == "percent"
    monkeypatch.setenv("OTACM_SANDBOX_COMPANY_PATH_FORM", "double")
    assert form() == "double"
    assert form("--company-path-form", "plus") == "plus"
    result = CliRunner().invoke(sandbox_command, ["--company-path-form", "spaces"])
    assert result.exit_code == 2 and "'spaces' is not one of" in result.output
