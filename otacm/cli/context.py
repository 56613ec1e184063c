"""What every ``otacm`` command shares: the :class:`CliContext` the root group passes
down (settings loaded on first use), the :class:`Seconds` parameter type, opening the
configured database for one command (:func:`open_database`, :func:`open_sessions`), and
ending a command with one line (:func:`fail`) or printing JSON for scripts
(:func:`echo_json`).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click

from otacm.logs import configure_logging, settings_secrets
from otacm.settings import Settings, mask_database_url
from venue.connection import SettingsError

if TYPE_CHECKING:
    from sqlalchemy import Engine
    from sqlalchemy.orm import Session, sessionmaker


@dataclass
class CliContext:
    """What the group passes to its subcommands: where settings come from, and the logs'
    level and format."""

    config_file: Path | None
    log_level: str
    log_format: str = "text"
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
            configure_logging(self.log_level, settings_secrets(self._settings), self.log_format)
        return self._settings


pass_cli = click.make_pass_decorator(CliContext)


class Seconds(click.FloatRange):
    """A duration in seconds, finite and in range: click's range lets NaN and infinity
    through (no comparison fails on them), and a timer or timeout given one fails late,
    with a traceback."""

    name = "seconds"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        seconds = super().convert(value, param, ctx)
        if not math.isfinite(seconds):
            self.fail(f"{value!r} is not a finite number of seconds", param, ctx)
        return seconds


def describe_failed_database(cli: CliContext, exc: BaseException) -> str:
    """One line for an operator: the database (password masked) and what failed there;
    a table that does not exist means the schema was never migrated."""
    from storage.engine import database_error_reason, describe_database_error

    shown = mask_database_url(cli.settings.database_url)
    reason = database_error_reason(exc)
    if "no such table" in reason or describe_database_error(exc) == "UndefinedTable":
        return f"database {shown} is not migrated ({reason}): run `otacm db upgrade`"
    return f"database {shown}: {reason}"


def echo_json(data: Any) -> None:
    """Print ``data`` as JSON for scripts."""
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


@contextmanager
def database_errors(cli: CliContext) -> Iterator[None]:
    """A database that cannot be used, or is not migrated, ends the command with one line
    saying which and why (:func:`fail`).

    Raises:
        click.ClickException: the database is unreachable, cannot be opened or written,
            or is not migrated (a role's start).
        SystemExit: the same, as a log line, when the logs are JSON.
    """
    from otacm.processes import SchemaNotCurrentError
    from storage.engine import DATABASE_UNAVAILABLE, DatabaseUnusable

    try:
        yield
    except (DatabaseUnusable, SchemaNotCurrentError) as exc:
        fail(cli, str(exc))
    except DATABASE_UNAVAILABLE as exc:
        fail(cli, describe_failed_database(cli, exc))


@contextmanager
def open_database(cli: CliContext) -> Iterator[Engine]:
    """The configured database's engine for one command, disposed when the block ends.

    Every command opens its database here, so that none forgets to dispose of the engine
    or to answer a database that cannot be used with one line (:func:`database_errors`,
    which also covers the block). A command that answers some database errors itself
    catches them inside the block.

    Raises:
        click.ClickException: the database cannot be used, or is not migrated.
        SystemExit: the same, as a log line, when the logs are JSON.
    """
    from storage.engine import make_engine

    with database_errors(cli):
        engine = make_engine(cli.settings.database_url)
        try:
            yield engine
        finally:
            engine.dispose()


@contextmanager
def open_sessions(cli: CliContext, *, read_only: bool = False) -> Iterator[sessionmaker[Session]]:
    """The session factory of :func:`open_database`'s engine (``read_only``: see
    :func:`storage.engine.make_sessions`)."""
    from orders.shop_events import deliver_to
    from storage.engine import make_sessions

    with open_database(cli) as engine:
        sessions = make_sessions(engine, read_only=read_only)
        # What a command changes in the mirror tells the shop too.
        deliver_to(sessions, cli.settings.shop_endpoint_names())
        yield sessions


def stored_connection_id(cli: CliContext, session: Session, name: str | None) -> int | None:
    """The stored id of the configured venue connection ``name``, for a list's filter.

    Returns:
        None when no name is given (every connection); -1 for a configured connection
        nothing is stored for yet (it matches no row).

    Raises:
        click.ClickException: no configured connection has that name.
    """
    import sqlalchemy as sa

    from storage.models import VenueConnection

    if name is None:
        return None
    try:
        cli.settings.connection(name)
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None
    found = session.scalar(sa.select(VenueConnection.id).where(VenueConnection.name == name))
    return -1 if found is None else int(found)


def fail(cli: CliContext, message: str) -> NoReturn:
    """End the command with ``message``: click's ``Error:`` line, or, when the logs are
    JSON, a log record, so that a role's standard error stays one JSON object per line.

    Raises:
        click.ClickException: the logs are text.
        SystemExit: exit status 1, the logs being JSON.
    """
    if cli.log_format == "json":
        logging.getLogger("otacm").error("%s", message)
        raise SystemExit(1)
    raise click.ClickException(message)
