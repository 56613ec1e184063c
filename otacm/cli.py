"""The ``otacm`` command: one entry point, a subcommand per job.

Settings are loaded once, here at the edge, only when a subcommand needs them (so
``--help`` always works), and passed down. Each subcommand prints records for people by
default and for scripts with ``--json``; failures are one clear line and a non-zero exit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from otacm.logs import configure_logging
from otacm.settings import Settings, SettingsError

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


@dataclass
class CliContext:
    """What the group passes to its subcommands: where settings come from, and the log level."""

    config_file: Path | None
    log_level: str
    _settings: Settings | None = field(default=None, repr=False)

    @property
    def settings(self) -> Settings:
        """The settings, loaded on first use; a bad configuration ends the command.

        Raises:
            click.ClickException: the configuration is invalid.
        """
        if self._settings is None:
            try:
                self._settings = Settings.load(self.config_file)
            except SettingsError as exc:
                raise click.ClickException(str(exc)) from None
            secrets = [c.api_key for c in self._settings.connections] + [
                state for c in self._settings.connections for state in c.webhook_client_states
            ]
            configure_logging(self.log_level, secrets)
        return self._settings


pass_cli = click.make_pass_decorator(CliContext)


def echo_json(data: Any) -> None:
    """Print ``data`` as JSON for scripts."""
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_file",
    type=click.Path(path_type=Path, dir_okay=False),
    envvar="OTACM_CONFIG_FILE",
    help="TOML file with settings and [[connections]] (env: OTACM_CONFIG_FILE).",
)
@click.option(
    "--log-level",
    type=click.Choice(LOG_LEVELS, case_sensitive=False),
    default="INFO",
    envvar="OTACM_LOG_LEVEL",
    show_default=True,
    help="Log level of the process (env: OTACM_LOG_LEVEL).",
)
@click.version_option(package_name="otacm")
@click.pass_context
def main(ctx: click.Context, config_file: Path | None, log_level: str) -> None:
    """otacm: the partner side of the venue's OTA Channel Manager API.

    It receives the venue's webhooks, mirrors every order in full, polls what webhooks
    miss, and reconciles the venue's orders against the shop's ledger.
    """
    configure_logging(log_level)
    ctx.obj = CliContext(config_file=config_file, log_level=log_level)


@main.group()
def db() -> None:
    """The database: schema migrations."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True, help="Target revision.")
@pass_cli
def db_upgrade(cli: CliContext, revision: str) -> None:
    """Migrate the database to the latest schema (safe to run again)."""
    from storage.engine import make_engine
    from storage.migrate import current_revision, upgrade

    engine = make_engine(cli.settings.database_url)
    try:
        upgrade(engine, revision)
        click.echo(f"database at revision {current_revision(engine)}")
    finally:
        engine.dispose()


@db.command("current")
@pass_cli
def db_current(cli: CliContext) -> None:
    """Print the database's schema revision and whether it is the latest."""
    from storage.engine import make_engine
    from storage.migrate import current_revision, head_revision

    engine = make_engine(cli.settings.database_url)
    try:
        current, head = current_revision(engine), head_revision()
    finally:
        engine.dispose()
    state = "current" if current == head else f"behind (latest is {head})"
    click.echo(f"{current or '(empty)'}: {state}")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--timeout", default=10.0, show_default=True, help="Seconds per venue check.")
@pass_cli
def doctor(cli: CliContext, as_json: bool, timeout: float) -> None:
    """Print the effective configuration (secrets masked) and check what it points at.

    Checks that the database can be opened and written and is migrated, and that every
    venue connection's API answers and accepts its key. Exits non-zero on any failure.
    """
    from otacm.doctor import run_checks

    settings = cli.settings
    checks = run_checks(settings, timeout=timeout)
    if as_json:
        echo_json({"settings": settings.masked(), "checks": [c.as_dict() for c in checks]})
    else:
        echo_json(settings.masked())
        for check in checks:
            click.echo(f"{'ok  ' if check.ok else 'FAIL'} {check.name}: {check.detail}")
    if not all(check.ok for check in checks):
        raise SystemExit(1)


@main.command()
@click.option("--orders", default=20, show_default=True, help="How many sample orders to send.")
@click.option(
    "--pickup-interval",
    default=1.0,
    show_default=True,
    help="The sandbox's pickup cadence in seconds (the venue's is about 60).",
)
@click.option("--seed", type=int, default=None, help="Seed for the sample orders (repeatable).")
@click.option("--timeout", default=120.0, show_default=True, help="Seconds to wait for settling.")
@click.pass_context
def demo(
    ctx: click.Context, orders: int, pickup_interval: float, seed: int | None, timeout: float
) -> None:
    """Run the sandbox, send it sample orders through otacm, and watch them settle."""
    from otacm.demo import run_demo

    if ctx.parent and ctx.parent.get_parameter_source("log_level") is ParameterSource.DEFAULT:
        # Every call would log a line; the demo shows progress bars and a summary instead.
        configure_logging("WARNING")

    try:
        report = run_demo(
            orders=orders, pickup_interval=pickup_interval, seed=seed, timeout=timeout
        )
    except TimeoutError as exc:
        raise click.ClickException(str(exc)) from None
    for line in report.lines():
        click.echo(line)


def _register_sandbox() -> None:
    from sandbox.cli import sandbox_command

    main.add_command(sandbox_command, "sandbox")


_register_sandbox()
