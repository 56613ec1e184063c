"""``otacm sandbox`` as an operator runs it: options, environment, and a real process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from sandbox.cli import sandbox_command

ROOT = Path(__file__).resolve().parents[2]


def test_help_lists_the_options_and_their_variables() -> None:
    """--help shows the documented options and their OTACM_SANDBOX_* variables."""
    result = CliRunner().invoke(sandbox_command, ["--help"])
    assert result.exit_code == 0
    for option in ("--host", "--port", "--pickup-interval", "--state", "--catalog", "--seed"):
        assert option in result.output
    assert "OTACM_SANDBOX_PICKUP_INTERVAL" in result.output
    assert "OTACM_SANDBOX_DROP_RATE" in result.output


def test_broken_catalog_is_a_clear_error(tmp_path: Path) -> None:
    """A catalog that is not JSON stops the command with a message naming the file."""
    catalog = tmp_path / "catalog.json"
    catalog.write_text("{", encoding="utf-8")
    result = CliRunner().invoke(sandbox_command, ["--catalog", str(catalog), "--port", "0"])
    assert result.exit_code == 1
    assert "is not JSON" in result.output


def test_bad_partner_state_is_a_clear_error() -> None:
    """A partner flag other than active/inactive/no-template is refused."""
    result = CliRunner().invoke(sandbox_command, ["--partners", "abc:sleeping"])
    assert result.exit_code == 1
    assert "partner flags must be" in result.output


@pytest.mark.process
def test_command_serves_until_sigterm(tmp_path: Path) -> None:
    """The command serves the sandbox, takes settings from the environment, stops on SIGTERM."""
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OTACM_SANDBOX_PICKUP_INTERVAL": "0.5",
        "OTACM_SANDBOX_COMPANY": "Demo Venue A/S",
    }
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from sandbox.cli import sandbox_command; sandbox_command()",
            "--port",
            "0",
            "--state",
            str(tmp_path / "state.sqlite3"),
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert process.stdout is not None
        first = process.stdout.readline().strip()
        assert first.startswith("Sandbox listening on http://127.0.0.1:")
        url = first.rsplit(" ", 1)[1]
        config = httpx.get(f"{url}/_sandbox/config").json()
        assert config["pickupInterval"] == 0.5
        assert config["company"] == "Demo Venue A/S"
        listed = httpx.get(
            f"{config['baseUrl']}/channelManager/orders/{config['partners'][0]['id']}",
            headers={"x-np-api-key": config["apiKey"]},
        )
        assert listed.status_code == 200
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=10)
        assert process.stdout is not None
        process.stdout.close()
    assert process.returncode == 0
    assert "Sandbox stopped" in output
