"""The ``otacm`` command as an operator meets it: help everywhere, doctor's verdicts."""

from __future__ import annotations

import socket
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from otacm.cli import main
from storage.migrate import head_revision


def all_commands(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = []
    for name, command in group.commands.items():
        path = (*prefix, name)
        found.append(path)
        if isinstance(command, click.Group):
            found.extend(all_commands(command, path))
    return found


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def run(args: list[str], env: dict[str, str]) -> tuple[int, str]:
    result = CliRunner().invoke(main, args, env=env, catch_exceptions=False)
    return result.exit_code, result.output


def test_every_subcommand_has_help() -> None:
    """`otacm --help` and `--help` on every subcommand print usage and exit 0."""
    commands = all_commands(main)
    assert {("doctor",), ("db",), ("db", "upgrade")} <= set(commands)
    for path in [(), *commands]:
        code, output = run([*path, "--help"], env={})
        assert code == 0, path
        assert "Usage: " in output


def venue_env(tmp_path: Path, base_url: str) -> dict[str, str]:
    return {
        "OTACM_DATABASE_URL": f"sqlite:///{tmp_path / 'otacm.sqlite3'}",
        "OTACM_API_BASE_URL": base_url,
        "OTACM_TENANT": "t",
        "OTACM_COMPANY": "CRONUS International Ltd.",
        "OTACM_API_KEY": "doctor-secret-key",
        "OTACM_WEBHOOK_CLIENT_STATES": "doctor-client-state",
    }


def test_doctor_names_an_unreachable_venue(tmp_path: Path) -> None:
    """A venue URL where nothing listens gives one FAIL line naming it, and exit 1."""
    env = venue_env(tmp_path, f"http://127.0.0.1:{closed_port()}")
    assert run(["db", "upgrade"], env)[0] == 0
    code, output = run(["doctor", "--timeout", "2"], env)
    assert code == 1
    failures = [line for line in output.splitlines() if line.startswith("FAIL")]
    assert len(failures) == 1
    assert "cannot reach http://127.0.0.1:" in failures[0]
    assert "ok   database:" in output
    assert "doctor-secret-key" not in output


def test_doctor_names_an_unusable_database_path(tmp_path: Path) -> None:
    """A database path whose parent is a file cannot be created: one clear line, exit 1."""
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    env = {"OTACM_DATABASE_URL": f"sqlite:///{blocker / 'otacm.sqlite3'}"}
    code, output = run(["doctor"], env)
    assert code == 1
    (line,) = [line for line in output.splitlines() if line.startswith("FAIL database")]
    assert "cannot use sqlite:///" in line
    assert "not-a-directory" in line


def test_doctor_says_when_the_schema_is_not_migrated(tmp_path: Path) -> None:
    """An empty database is reported with the command that fixes it."""
    env = {"OTACM_DATABASE_URL": f"sqlite:///{tmp_path / 'fresh.sqlite3'}"}
    code, output = run(["doctor"], env)
    assert code == 1
    assert "run `otacm db upgrade`" in output
    assert "FAIL venues: no venue connection configured" in output


def test_bad_configuration_is_one_line_and_exit_1(tmp_path: Path) -> None:
    """An invalid setting ends any command with a message naming it, never a traceback."""
    code, output = run(["doctor"], {"OTACM_POLL_INTERVAL": "1"})
    assert code == 1
    assert "poll_interval" in output
    assert "Traceback" not in output


@pytest.mark.parametrize("url", ["sqlite:///{tmp}/a.sqlite3"])
def test_db_upgrade_is_repeatable(tmp_path: Path, url: str) -> None:
    """`otacm db upgrade` twice leaves the database at the latest revision both times."""
    env = {"OTACM_DATABASE_URL": url.format(tmp=tmp_path)}
    first = run(["db", "upgrade"], env)
    second = run(["db", "upgrade"], env)
    assert first[0] == second[0] == 0
    latest = f"database at revision {head_revision()}"
    assert first[1].splitlines()[-1] == second[1].splitlines()[-1] == latest
    code, output = run(["db", "current"], env)
    assert code == 0 and output.strip().endswith(": current")


def test_doctor_names_a_refused_api_key(tmp_path: Path) -> None:
    """Against the sandbox over HTTP, a wrong key gives one FAIL line saying so, and exit 1."""
    from sandbox import SandboxConfig, SandboxServer

    with SandboxServer(SandboxConfig(pickup_interval=0)) as sandbox:
        env = venue_env(tmp_path, sandbox.url)
        env["OTACM_TENANT"] = sandbox.config.tenant
        env["OTACM_ENVIRONMENT"] = sandbox.config.environment
        env["OTACM_COMPANY"] = sandbox.config.company
        assert run(["db", "upgrade"], env)[0] == 0
        code, output = run(["doctor"], env)
        assert code == 1
        (failure,) = [line for line in output.splitlines() if line.startswith("FAIL")]
        assert failure.startswith("FAIL venue default:")
        assert "refused the API key" in failure
        assert "doctor-secret-key" not in output

        env["OTACM_API_KEY"] = sandbox.api_key
        env["OTACM_PARTNER_IDS"] = sandbox.config.partners[0].id
        code, output = run(["doctor"], env)
        assert code == 1  # the key works, but the venue sends no webhook yet
        assert "ok   venue default:" in output
        assert "FAIL venue default subscription: no active subscription" in output

        env["OTACM_WEBHOOK_URL"] = "https://otacm.example/webhooks/ota-cm"
        assert run(["subscribe", "--url", env["OTACM_WEBHOOK_URL"]], env)[0] == 0
        code, output = run(["doctor"], env)
        assert code == 0, output
        assert "ok   venue default subscription: " in output


@pytest.mark.process
def test_demo_settles_every_order_in_the_local_mirror(tmp_path: Path) -> None:
    """`otacm demo`, the README's main job: sandbox + daemon as real processes, every order
    notified by webhook, fetched once, and settled in the local mirror."""
    import subprocess
    import sys

    result = subprocess.run(
        [
            *(sys.executable, "-m", "otacm", "demo", "--orders", "8", "--pickup-interval", "0.3"),
            "--no-stay",  # a terminal on stdin would otherwise keep the demo up until Ctrl-C
        ],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "orders submitted through otacm: 8" in result.stdout
    statuses = {
        line.split()[0]: int(line.split()[1])
        for line in result.stdout.splitlines()
        if line.startswith("  ") and line.split()[0] in ("Issued", "Error", "Draft")
    }
    assert sum(statuses.values()) == 8, result.stdout
    assert statuses["Error"] == 1
    assert "The capacity for 31099 has been exceeded" in result.stdout
    # One getOrder an order, however the machine's load shifts the timing: a create's
    # answer applied after the webhook's fetch no longer sends the order back in flight
    # for the change feed to fetch again (tests/e2e/test_answer_order.py).
    assert "getOrder calls per order: 1.00" in result.stdout, result.stdout
    # ...and one event an order for the shop: each settled once.
    assert "the shop's endpoint received 8 events" in result.stdout, result.stdout
    assert (tmp_path / "var" / "demo.sqlite3").exists()
