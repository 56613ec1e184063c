"""The ``otacm`` command: one entry point, a subcommand per job.

Settings are loaded once, here at the edge, only when a subcommand needs them (so
``--help`` always works), and passed down. Each subcommand prints records for people by
default and for scripts with ``--json``; failures are one clear line and a non-zero exit.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click
from click.core import ParameterSource

from otacm.liveness import DEFAULT_MAX_AGE, ROLES
from otacm.logs import LOG_FORMATS, configure_logging, settings_secrets
from otacm.settings import Settings, mask_database_url
from venue.connection import SettingsError

if TYPE_CHECKING:
    from sqlalchemy import Engine
    from sqlalchemy.orm import Session, sessionmaker

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


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


class Commands(click.Group):
    """The ``otacm`` group: a database error no command answered itself ends the command
    with one line (which database, why; a schema not migrated says so), never a traceback.
    """

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except Exception as exc:
            from sqlalchemy.exc import SQLAlchemyError

            cli = ctx.find_object(CliContext)
            if cli is None or not isinstance(exc, SQLAlchemyError):
                raise
            fail(cli, describe_failed_database(cli, exc))


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


@click.group(cls=Commands, context_settings={"help_option_names": ["-h", "--help"]})
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
@click.option(
    "--log-format",
    type=click.Choice(LOG_FORMATS, case_sensitive=False),
    default="text",
    envvar="OTACM_LOG_FORMAT",
    show_default=True,
    help="text lines for people, or one JSON object per line (env: OTACM_LOG_FORMAT).",
)
@click.version_option(package_name="otacm")
@click.pass_context
def main(ctx: click.Context, config_file: Path | None, log_level: str, log_format: str) -> None:
    """otacm: the partner side of the venue's OTA Channel Manager API.

    It receives the venue's webhooks, mirrors every order in full, polls what webhooks
    miss, and reconciles the venue's orders against the shop's ledger.
    """
    log_format = log_format.lower()
    configure_logging(log_level, log_format=log_format)
    ctx.obj = CliContext(config_file=config_file, log_level=log_level, log_format=log_format)


@main.group()
def db() -> None:
    """The database: schema migrations."""


@db.command("upgrade")
@click.option(
    "--revision", default="head", show_default=True, help="Target revision: head or an id."
)
@pass_cli
def db_upgrade(cli: CliContext, revision: str) -> None:
    """Migrate the database to the latest schema (safe to run again)."""
    from storage.migrate import current_revision, known_revisions, upgrade

    # "head" or a revision id, checked before the database is touched: Alembic's other
    # spellings (relative, branch@) fail inside it with assertions, not messages.
    known = known_revisions()
    if revision != "head" and revision not in known:
        raise click.ClickException(
            f"--revision {revision!r} is not a revision of the schema: "
            f"head, or one of {', '.join(known)}"
        )
    with open_database(cli) as engine:
        upgrade(engine, revision)
        click.echo(f"database at revision {current_revision(engine)}")


@db.command("current")
@pass_cli
def db_current(cli: CliContext) -> None:
    """Print the database's schema revision and whether it is the latest."""
    from storage.migrate import current_revision, head_revision

    with open_database(cli) as engine:
        current, head = current_revision(engine), head_revision()
    state = "current" if current == head else f"behind (latest is {head})"
    click.echo(f"{current or '(empty)'}: {state}")


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
    from storage.engine import make_sessions

    with open_database(cli) as engine:
        yield make_sessions(engine, read_only=read_only)


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


@db.command("backup")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--force", is_flag=True, help="Replace FILE if it exists.")
@pass_cli
def db_backup(cli: CliContext, file: Path, force: bool) -> None:
    """Copy the SQLite database to FILE, safely while every role runs.

    SQLite's online backup API: one consistent snapshot, checked, written under a
    temporary name and renamed into place. PostgreSQL is refused with a pointer to
    pg_dump (README: Backups).
    """
    from storage.backup import BackupError, backup_sqlite

    with open_database(cli) as engine:
        try:
            result = backup_sqlite(engine, file, force=force)
        except BackupError as exc:
            raise click.ClickException(str(exc)) from None
    click.echo(f"backed up to {result.path}: {result.size} bytes, revision {result.revision}")


@db.command("restore")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--force", is_flag=True, help="Replace a database that holds rows.")
@pass_cli
def db_restore(cli: CliContext, file: Path, force: bool) -> None:
    """Copy the backup FILE into the configured SQLite database; stop every role first.

    Refused when FILE is no otacm database, or when the database holds rows (a schema
    alone is fine) unless --force. Run `otacm db upgrade` after restoring an older
    backup.
    """
    from storage.backup import BackupError, restore_sqlite

    with open_database(cli) as engine:
        try:
            result = restore_sqlite(engine, file, force=force)
        except BackupError as exc:
            raise click.ClickException(str(exc)) from None
    click.echo(f"restored from {result.path}: database at revision {result.revision}")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option(
    "--timeout",
    type=Seconds(min=0, min_open=True),
    default=10.0,
    show_default=True,
    help="Seconds per venue check.",
)
@pass_cli
def doctor(cli: CliContext, as_json: bool, timeout: float) -> None:
    """Print the effective configuration (secrets masked) and check what it points at.

    Checks that the database exists, can be written and is migrated (creating nothing),
    that every venue connection's API answers and accepts its key, which way of writing
    the company in the path the venue answers (and the setting to use), and how many
    orders the venue lists for each configured partner (WARN when none); then what breaks
    production silently: a connection without a webhook client state, its subscription
    missing or inactive at the venue, jobs not succeeding, dead letters; WARN without
    finance users or API tokens. Exits 1 on any failure (not on a warning).
    """
    from otacm.doctor import run_checks

    settings = cli.settings
    checks = run_checks(settings, timeout=timeout)
    if as_json:
        echo_json({"settings": settings.masked(), "checks": [c.as_dict() for c in checks]})
    else:
        echo_json(settings.masked())
        for check in checks:
            verdict = "FAIL" if not check.ok else "WARN" if check.warning else "ok  "
            click.echo(f"{verdict} {check.name}: {check.detail}")
    if not all(check.ok for check in checks):
        raise SystemExit(1)


@main.command()
@click.option(
    "--orders",
    type=click.IntRange(min=1),
    default=20,
    show_default=True,
    help="How many sample orders to send.",
)
@click.option(
    "--pickup-interval",
    type=Seconds(min=0),
    default=1.0,
    show_default=True,
    help="The sandbox's pickup cadence in seconds (the venue's is about 60).",
)
@click.option("--seed", type=int, default=None, help="Seed for the sample orders (repeatable).")
@click.option(
    "--timeout",
    type=Seconds(min=0, min_open=True),
    default=120.0,
    show_default=True,
    help="Seconds to wait for settling.",
)
@click.option(
    "--database-url",
    default=None,
    help="Where the demo's daemon stores everything (default: a fresh ./var/demo.sqlite3).",
)
@click.option(
    "--stay/--no-stay",
    default=None,
    help="Keep the daemon and the finance pages up after the report until Ctrl-C "
    "(default: --stay when standard input is a terminal).",
)
@click.pass_context
def demo(
    ctx: click.Context,
    orders: int,
    pickup_interval: float,
    seed: int | None,
    timeout: float,
    database_url: str | None,
    stay: bool | None,
) -> None:
    """Run the sandbox and the daemon, send sample orders, and reconcile them with a ledger.

    Starts the simulated venue, then `otacm serve` on a demo database, subscribes the
    receiver to the venue's webhook, submits orders through POST /api/orders, waits
    until the local mirror holds every order settled, and prints what it holds. Then it
    plants a few mismatches (an order placed at the venue directly; a ledger export with
    a sale the venue never got, one repriced and one refunded, imported from
    var/demo-ledger.jsonl), runs a reconciliation, prints its totals and exceptions, and
    where to open the finance pages with a demo user and a password made up for the run.
    """
    from otacm.demo import fresh_demo_database, run_demo

    if ctx.parent and ctx.parent.get_parameter_source("log_level") is ParameterSource.DEFAULT:
        # Every call would log a line; the demo shows progress bars and a summary instead.
        found = ctx.find_object(CliContext)
        configure_logging("WARNING", log_format=found.log_format if found else "text")
    run_demo(
        orders=orders,
        pickup_interval=pickup_interval,
        seed=seed,
        timeout=timeout,
        database_url=database_url or fresh_demo_database(),
        # Staying suits a person at a terminal; scripts and CI (no terminal) must not hang.
        stay=sys.stdin.isatty() if stay is None else stay,
    )


DEFAULT_BIND = "127.0.0.1:8000"


def _bind_option(function: Any) -> Any:
    return click.option(
        "--bind",
        default=DEFAULT_BIND,
        show_default=True,
        envvar="OTACM_BIND",
        help="HOST:PORT to listen on, as gunicorn's --bind (env: OTACM_BIND).",
    )(function)


def _workers_option(function: Any) -> Any:
    return click.option(
        "--workers",
        type=click.IntRange(min=1),
        default=None,
        help="gunicorn worker processes (default: two per core plus one).",
    )(function)


@main.command()
@_bind_option
@_workers_option
@pass_cli
def web(cli: CliContext, bind: str, workers: int | None) -> None:
    """Serve the receiver (webhooks, health, metrics, the API) under gunicorn."""
    from otacm.liveness import announce_web
    from otacm.processes import gunicorn_options, metrics_directory, run_web

    # Opens nothing but makes a SQLite database's directory: here, not in each worker.
    with open_database(cli):
        pass
    announce_web(cli.settings.liveness_dir, bind)
    with metrics_directory():
        run_web(cli.settings, gunicorn_options(bind, workers))


@main.command()
@pass_cli
def worker(cli: CliContext) -> None:
    """Run the inbox worker: fetch every notified order with getOrder and mirror it."""
    import threading

    from otacm.processes import run_worker, stop_on_signals

    stop = threading.Event()
    stop_on_signals(stop)
    with database_errors(cli):
        run_worker(cli.settings, stop)


@main.command()
@pass_cli
def scheduler(cli: CliContext) -> None:
    """Run the scheduled jobs in this process: change feed, watchdog, outbox retries,
    lost submissions, draft confirms, subscription checks (see `otacm poll --help`).

    Any number of schedulers may share one database: each job runs at most once at a
    time, and once per interval, across all of them.
    """
    import threading

    from otacm.processes import run_scheduler, stop_on_signals

    stop = threading.Event()
    stop_on_signals(stop)
    with database_errors(cli):
        run_scheduler(cli.settings, stop)


@main.command()
@click.option(
    "--job",
    "jobs",
    multiple=True,
    metavar="NAME",
    help="Only this job (repeatable): change_feed, watchdog, retry_outbox, "
    "lost_submissions, confirm_drafts, check_subscriptions.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the outcomes as JSON.")
@pass_cli
def poll(cli: CliContext, jobs: tuple[str, ...], as_json: bool) -> None:
    """Run the scheduled jobs once now, due or not, and print what each did.

    The same jobs as the scheduler (change feed, watchdog, outbox retries, lost
    submissions, draft confirmation, subscription check), through the same locks: a job
    a scheduler is running right now is reported busy, not run twice. One line per job
    (`name: outcome key=value ...`). Exits 1 if any job failed.
    """
    from heartbeat.coordination import JobOutcome
    from otacm.processes import UnknownJobError, run_poll

    try:
        with database_errors(cli):
            results = run_poll(cli.settings, jobs)
    except UnknownJobError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        echo_json([result.as_dict() for result in results])
    else:
        for result in results:
            click.echo(result.line())
    if any(result.outcome is JobOutcome.FAILED for result in results):
        raise SystemExit(1)


@main.command()
@click.option("--role", "roles", multiple=True, type=click.Choice(ROLES), help="Only this role.")
@click.option(
    "--max-age",
    type=Seconds(min=0, min_open=True),
    default=DEFAULT_MAX_AGE,
    show_default=True,
    help="Seconds a pass may be old.",
)
@pass_cli
def health(cli: CliContext, roles: tuple[str, ...], max_age: float) -> None:
    """Check the roles running here through their liveness files (OTACM_LIVENESS_DIR):
    web answers /readyz, worker and scheduler passed within --max-age seconds. Without
    --role, every role that keeps a file there. One line per role; exit 1 if one is not.
    """
    from otacm.liveness import check

    directory = cli.settings.liveness_dir
    if directory is None:
        raise click.ClickException("OTACM_LIVENESS_DIR is not set: no role keeps a liveness file")
    verdicts = check(directory, roles, max_age=max_age)
    if not verdicts:
        raise click.ClickException(f"no role has started here (no liveness file in {directory})")
    for verdict in verdicts:
        click.echo(verdict.line())
    if not all(verdict.healthy for verdict in verdicts):
        raise SystemExit(1)


@main.command()
@_bind_option
@_workers_option
@pass_cli
def serve(cli: CliContext, bind: str, workers: int | None) -> None:
    """Everything on one box: migrate (once the database answers), then run web, worker
    and scheduler together."""
    import threading

    from otacm.processes import metrics_directory, otacm_command, stop_on_signals
    from otacm.processes import serve as serve_roles
    from storage.engine import WaitStopped, retry_while_unavailable
    from storage.migrate import upgrade

    stop = threading.Event()
    stop_on_signals(stop)
    with open_database(cli) as engine:
        try:
            retry_while_unavailable(lambda: upgrade(engine), stop=stop, what="serve")
        except WaitStopped:
            return
    config = str(cli.config_file) if cli.config_file else None
    with metrics_directory():
        status = serve_roles(otacm_command(config, cli.log_level, cli.log_format), bind, workers)
    raise SystemExit(status)


@main.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the outcomes as JSON.")
@pass_cli
def submit(cli: CliContext, file: Path, as_json: bool) -> None:
    """Record the orders in FILE in the ledger, then send each to the venue.

    FILE holds the venue's order request as JSON (one object, an array, or JSON lines),
    each optionally with "amount", "currency", "amountIncludesVat" and "connection".
    The sale is recorded first: an order the venue cannot take now stays queued and is
    retried by the scheduler. Exits 1 if any order was refused or is only queued.
    """
    from contextlib import ExitStack

    from orders.submission import SubmissionError, SubmissionsRefused
    from orders.submit import SUBMIT_NOW_RETRY, SubmitStatus, submit_file
    from storage.types import utcnow
    from venue.client import open_client

    settings = cli.settings
    with ExitStack() as stack:
        sessions = stack.enter_context(open_sessions(cli))
        clients = {
            c.name: stack.enter_context(open_client(c, retry=SUBMIT_NOW_RETRY))
            for c in settings.connections
        }
        try:
            outcomes = submit_file(
                settings.connections,
                file,
                sessions=sessions,
                clients=clients,
                now=utcnow(),
                lease_seconds=settings.outbox_lease_seconds,
            )
        except SubmissionsRefused as refused:
            for exc in refused.refusals:  # one line per refused order
                click.echo(f"Error: {file}: {exc}", err=True)
            raise SystemExit(1) from None
        except SubmissionError as exc:
            raise click.ClickException(f"{file}: {exc}") from None
    if as_json:
        echo_json([outcome.to_json() for outcome in outcomes])
    else:
        for outcome in outcomes:
            click.echo(outcome.describe())
    done = (SubmitStatus.SENT, SubmitStatus.DUPLICATE)
    if any(outcome.status not in done for outcome in outcomes):
        raise SystemExit(1)


@main.command("subscribe")
@click.option("--url", required=True, help="The receiver's public webhook URL (http or https).")
@click.option("--connection", "connection_name", default=None, help="The venue connection's name.")
@click.option(
    "--new-state",
    is_flag=True,
    help="Rotate: a new client state, a new subscription, the old ones deleted.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@pass_cli
def subscribe_command(
    cli: CliContext, url: str, connection_name: str | None, new_state: bool, as_json: bool
) -> None:
    """Subscribe URL to the venue's ota_cm_order_processed webhook.

    Does nothing when a usable subscription for URL exists. A connection with no client
    state gets a generated one, kept in OTACM_SECRETS_DIR (default var/secrets) as
    <connection>.webhook-client-states, readable by the owner only, and accepted by the
    receiver without a restart; the state itself is never printed. --connection is
    needed when several venues are configured. Exits 1 on failure, and when something
    is left for a person to do (printed as warnings).
    """
    from heartbeat.subscriptions import COMMAND_RETRY, SubscriptionError, subscribe
    from venue.client import open_client
    from venue.connection import check_webhook_url
    from venue.errors import VenueAuthError, VenueError, VenueUnavailable

    try:
        url = check_webhook_url(url)
    except ValueError as exc:
        raise click.ClickException(f"--url: {exc}") from None
    settings = cli.settings
    try:
        connection = settings.one_connection(connection_name)
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None
    try:
        with open_client(connection, retry=COMMAND_RETRY) as client:
            result = subscribe(
                connection,
                client,
                url=url,
                secrets_dir=settings.secrets_dir,
                new_state=new_state,
            )
    except SubscriptionError as exc:
        raise click.ClickException(str(exc)) from None
    except VenueUnavailable as exc:
        raise click.ClickException(
            f"the venue of {connection.name} is unreachable: {exc}"
        ) from None
    except VenueAuthError as exc:
        raise click.ClickException(
            f"the venue of {connection.name} refused the API key: {exc}"
        ) from None
    except VenueError as exc:
        raise click.ClickException(f"the venue of {connection.name} refused: {exc}") from None
    if as_json:
        echo_json(result.to_json())
    else:
        click.echo(result.describe())
        for warning in result.warnings:
            click.echo(f"warning: {warning}", err=True)
    if result.warnings:
        raise SystemExit(1)


@main.group()
def orders() -> None:
    """Orders as the local mirror knows them."""


def _check_key(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """An order's key as typed: text a query can carry (bytes that are not UTF-8 in the
    command line arrive as unpaired surrogates, which no database takes)."""
    from storage.types import text_problem

    problem = text_problem(value)
    if problem is not None:
        raise click.ClickException(f"{(param.metavar or param.name or 'KEY').upper()} {problem}")
    return value


@orders.command("show")
@click.argument("key", callback=_check_key)
@click.option("--json", "as_json", is_flag=True, help="Print the order(s) as JSON.")
@pass_cli
def orders_show(cli: CliContext, key: str, as_json: bool) -> None:
    """Print the order(s) named by KEY (orderId, shop reference or venue reference).

    Shows the header, every line with its wallets and assets, the full timeline of
    status changes with their source, and the ledger line. Exits 1 if none is found.
    """
    from orders.story import find_orders, order_story, story_lines

    with open_sessions(cli, read_only=True) as sessions, sessions.begin() as session:
        stories = [order_story(session, order) for order in find_orders(session, key)]
    if not stories:
        raise click.ClickException(f"no stored order has the orderId or reference {key!r}")
    if as_json:
        echo_json(stories)
        return
    for story in stories:
        for line in story_lines(story):
            click.echo(line)


def _order_action(cli: CliContext, connection: str | None, act: Any) -> Any:
    """Run ``act(sessions, clients)`` with the database and every connection's client."""
    from contextlib import ExitStack

    from orders.actions import OrderActionError
    from orders.submit import SUBMIT_NOW_RETRY
    from venue.client import open_client

    settings = cli.settings
    if connection is not None:
        try:
            settings.connection(connection)  # an unknown name is an error, not "no order"
        except SettingsError as exc:
            raise click.ClickException(str(exc)) from None
    with ExitStack() as stack:
        sessions = stack.enter_context(open_sessions(cli))
        clients = {
            c.name: stack.enter_context(open_client(c, retry=SUBMIT_NOW_RETRY))
            for c in settings.connections
        }
        try:
            return act(sessions, clients)
        except OrderActionError as exc:
            raise click.ClickException(str(exc)) from None


def _print_action(outcome: Any, as_json: bool) -> None:
    """Print an ``orders replace``/``cancel`` outcome; exit 1 unless the venue did it."""
    if as_json:
        echo_json(outcome.to_json())
    else:
        click.echo(outcome.describe())
    if not outcome.done:
        raise SystemExit(1)


@orders.command("replace")
@click.argument("key", metavar="REF", callback=_check_key)
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--connection", default=None, help="The venue connection, when several have REF.")
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as JSON.")
@pass_cli
def orders_replace(
    cli: CliContext, key: str, file: Path, connection: str | None, as_json: bool
) -> None:
    """Replace the order REF names now with the order request in FILE (replaceOrder).

    REF is the shop's reference, the venue's reference or the orderId. FILE holds one
    order request as `otacm submit` reads it; its partnerId and sellToOrderReference must
    be the order's. Only a Draft or Error order can be replaced: the venue is asked
    whatever the local mirror shows, and its refusal is printed. The order then goes
    through the venue's pipeline again. Exits 1 unless the venue took the replacement
    (refused, or queued for the scheduler to retry).
    """
    from orders.actions import read_replacement, replace_order
    from orders.submission import SubmissionError
    from storage.types import utcnow

    try:
        replacement = read_replacement(file)
    except SubmissionError as exc:
        raise click.ClickException(f"{file}: {exc}") from None
    outcome = _order_action(
        cli,
        connection or replacement.connection,
        lambda sessions, clients: replace_order(
            sessions,
            clients,
            key,
            replacement,
            now=utcnow(),
            connection=connection,
            lease_seconds=cli.settings.outbox_lease_seconds,
        ),
    )
    _print_action(outcome, as_json)


@orders.command("cancel")
@click.argument("key", metavar="REF", callback=_check_key)
@click.option("--connection", default=None, help="The venue connection, when several have REF.")
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as JSON.")
@pass_cli
def orders_cancel(cli: CliContext, key: str, connection: str | None, as_json: bool) -> None:
    """Cancel the order REF names now at the venue (deleteOrder).

    An Issued order is kept by the venue as Cancelled, its wallets destroyed; a Draft or
    Error order is removed outright. The venue refuses an order still in flight
    (Submitted, Scheduled, Processing): run the command again once it has settled.
    Exits 1 unless the order is now cancelled or removed.
    """
    from orders.actions import cancel_order
    from storage.types import utcnow

    outcome = _order_action(
        cli,
        connection,
        lambda sessions, clients: cancel_order(
            sessions,
            clients,
            key,
            now=utcnow(),
            connection=connection,
            lease_seconds=cli.settings.outbox_lease_seconds,
        ),
    )
    _print_action(outcome, as_json)


@orders.command("errors")
@click.option("--connection", default=None, help="Only orders of this venue connection.")
@click.option("--json", "as_json", is_flag=True, help="Print the orders as JSON.")
@pass_cli
def orders_errors(cli: CliContext, connection: str | None, as_json: bool) -> None:
    """List the orders the venue left in Error, with its reason, oldest first.

    Each shows the shop's and the venue's reference, since when it is in Error, and
    whether the ledger has the sale. Fix one with `otacm orders replace`, or drop it
    with `otacm orders cancel`.
    """
    import sqlalchemy as sa

    from heartbeat.actions import error_orders
    from storage.models import VenueConnection

    if connection is not None:
        try:
            cli.settings.connection(connection)  # an unknown name is an error, not "none"
        except SettingsError as exc:
            raise click.ClickException(str(exc)) from None
    with open_sessions(cli, read_only=True) as sessions, sessions.begin() as session:
        connection_id = None
        if connection is not None:
            connection_id = session.scalar(
                sa.select(VenueConnection.id).where(VenueConnection.name == connection)
            )
        found = (
            []
            if connection is not None and connection_id is None
            else error_orders(session, connection_id)
        )
    if as_json:
        echo_json([order.to_json() for order in found])
        return
    for order in found:
        click.echo(order.describe())
    click.echo(f"{len(found)} order(s) in Error")


@main.group()
def ledger() -> None:
    """The shop's ledger: the sales finance expects the venue to have."""


LEDGER_BAD_SHOWN = 50
"""Bad rows `otacm ledger import` prints; the rest are counted."""


@ledger.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--connection", default=None, help="The venue connection (needed if several).")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["csv", "jsonl"]),
    default=None,
    help="The file's format; by default from its extension (.csv, .jsonl, .ndjson).",
)
@click.option("--skip-bad", is_flag=True, help="Import the good rows even if some are bad.")
@click.option("--json", "as_json", is_flag=True, help="Print the counts as JSON.")
@pass_cli
def ledger_import(
    cli: CliContext,
    file: Path,
    connection: str | None,
    fmt: str | None,
    skip_bad: bool,
    as_json: bool,
) -> None:
    """Import the shop's sales from FILE (CSV or JSON lines) into the ledger.

    Columns: docs/ledger-format.md. A sale is known by its partner and reference
    (case-insensitive): importing again updates it, never doubles it. Bad rows are
    printed with their line, column and reason (the first 50, then a count); a file
    with any bad row changes nothing (exit 1) unless --skip-bad imports the others
    (exit 0). Prints how many sales were inserted, updated, unchanged, and bad.
    """
    from reconciler.ledger import LedgerFileError, import_ledger
    from storage.types import utcnow

    settings = cli.settings
    try:
        name = settings.one_connection(connection).name
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None
    with open_sessions(cli) as sessions:
        try:
            result = import_ledger(
                sessions, file, connection_name=name, now=utcnow(), fmt=fmt, skip_bad=skip_bad
            )
        except LedgerFileError as exc:
            raise click.ClickException(f"{file}: {exc}") from None
    if as_json:
        echo_json(result.to_json(limit=LEDGER_BAD_SHOWN))
    else:
        for bad in result.bad_rows[:LEDGER_BAD_SHOWN]:
            click.echo(f"bad: {bad.describe()}")
        if result.bad > LEDGER_BAD_SHOWN:
            click.echo(f"bad: ... and {result.bad - LEDGER_BAD_SHOWN} more")
        click.echo(
            f"{result.inserted} inserted, {result.updated} updated, "
            f"{result.unchanged} unchanged, {result.bad} bad"
        )
    if not result.written:
        click.echo(
            f"nothing imported: {result.bad} bad row(s); fix them, or import the others "
            "with --skip-bad",
            err=True,
        )
        raise SystemExit(1)


# The formats of reconciler.report_formats.REPORT_FORMATS, named here so --help loads no renderer.
REPORT_FORMAT_NAMES = ("csv", "xlsx", "html", "json")


@main.command()
@click.argument("run_id", metavar="RUN", type=int)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(REPORT_FORMAT_NAMES),
    default="csv",
    show_default=True,
    help="csv: the exception table; xlsx: summary and exception sheets; "
    "html: one self-contained page with a chart; json: everything, for scripts.",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    default=None,
    help="Write to FILE instead of standard output (needed for xlsx on a terminal).",
)
@pass_cli
def report(cli: CliContext, run_id: int, fmt: str, output: Path | None) -> None:
    """Write the report of reconciliation run RUN: its totals and its exceptions.

    Ages are counted to now. xlsx is binary: it goes to FILE, or to standard output
    only when that is redirected. Exits 1 if no run has the id RUN.
    """
    from reconciler.report import RunNotFound, load_run_report
    from reconciler.report_formats import render_report
    from storage.types import ID_MAX, utcnow

    if fmt == "xlsx" and output is None and sys.stdout.isatty():
        raise click.UsageError("xlsx is a binary file: name it with -o FILE, or redirect stdout")
    if not 0 < run_id <= ID_MAX:  # no row has it, and no query could take it
        raise click.ClickException(str(RunNotFound(run_id)))
    with open_sessions(cli, read_only=True) as sessions:
        try:
            with sessions.begin() as session:
                data = load_run_report(session, run_id, now=utcnow())
        except RunNotFound as exc:
            raise click.ClickException(str(exc)) from None
    content = render_report(data, fmt)
    if output is None:
        click.echo(content, nl=False)  # bytes go to the binary stream as they are
        return
    try:
        output.write_bytes(content)
    except OSError as exc:  # a missing folder, no permission, a full disk
        raise click.ClickException(f"cannot write {output}: {exc.strerror or exc}") from None
    click.echo(f"wrote the {fmt} report of run {run_id} to {output}", err=True)


@main.group()
def inbox() -> None:
    """The webhook inbox: notifications waiting, done, or dead-lettered."""


@inbox.command("replay")
@click.option("--id", "ids", type=int, multiple=True, help="Only this inbox row (repeatable).")
@click.option("--connection", default=None, help="Only rows of this venue connection.")
@pass_cli
def inbox_replay(cli: CliContext, ids: tuple[int, ...], connection: str | None) -> None:
    """Put dead-lettered inbox rows back in the queue for the worker to try again."""
    from orders.inbox import replay_dead
    from storage.models import ensure_connection
    from storage.types import ID_MAX, utcnow

    if connection is not None:
        try:
            cli.settings.connection(connection)  # an unknown name is an error, not "0 rows"
        except SettingsError as exc:
            raise click.ClickException(str(exc)) from None
    # Ids no row can have (beyond a BIGINT) match nothing, and no query could take them;
    # when only such ids were given, nothing is replayed (not every row, as without --id).
    wanted = tuple(row_id for row_id in ids if 0 < row_id <= ID_MAX)
    count = 0
    if wanted or not ids:
        with open_sessions(cli) as sessions, sessions.begin() as session:
            connection_id = ensure_connection(session, connection) if connection else None
            count = replay_dead(
                session, now=utcnow(), connection_id=connection_id, ids=wanted or None
            )
    click.echo(f"{count} dead-lettered inbox row(s) queued again")


@main.group()
def finance() -> None:
    """The finance pages' users (/finance/)."""


@finance.command("hash-password")
@click.option("--name", prompt="User name", help="The finance user's name.")
def finance_hash_password(name: str) -> None:
    """Make a finance user's entry for OTACM_FINANCE_USERS: name:password-hash.

    The password is read twice from the terminal, never echoed, and only its salted
    scrypt hash is printed: add the line to OTACM_FINANCE_USERS (comma-separated) or to
    the config file's finance_users list.
    """
    from receiver.finance.auth import hash_password

    name = name.strip()
    if not name or ":" in name or "," in name:
        raise click.ClickException("a user name is not empty and has no ':' or ','")
    password = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    if not password:
        raise click.ClickException("the password is empty")
    click.echo(f"{name}:{hash_password(password)}")


@finance.command("sign-out-all")
@click.option("--user", default=None, help="Only this user's sign-ins (default: everyone's).")
@pass_cli
def finance_sign_out_all(cli: CliContext, user: str | None) -> None:
    """End finance sign-ins now: every copy of their cookies is refused from then on."""
    from sqlalchemy.exc import SQLAlchemyError

    from receiver.errors import describe_database_error
    from receiver.finance.auth import lifetimes
    from receiver.finance.signins import revoke_all
    from storage.types import utcnow

    settings = cli.settings
    with open_sessions(cli) as sessions:
        try:
            with sessions.begin() as session:
                idle = lifetimes(settings).idle
                count = revoke_all(session, now=utcnow(), idle=idle, user=user)
        except SQLAlchemyError as exc:
            raise click.ClickException(
                "cannot end the finance sign-ins: the database is unreachable or not migrated"
                f" ({describe_database_error(exc)}; `otacm db upgrade` migrates it)"
            ) from None
    whose = f"of {user} " if user is not None else ""
    click.echo(f"{count} finance sign-in(s) {whose}ended")


def _utc_moment(value: str | None, option: str) -> Any:
    """An ISO date or datetime from the command line, in UTC (naive means UTC)."""
    import datetime as dt

    if value is None:
        return None
    try:
        moment = dt.datetime.fromisoformat(value)
        return moment.replace(tzinfo=dt.UTC) if moment.tzinfo is None else moment.astimezone(dt.UTC)
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is not an ISO date or datetime", param_hint=option
        ) from None
    except OverflowError:  # within hours of year 1 or 9999, the offset takes it out of range
        raise click.BadParameter(f"{value!r} is out of range in UTC", param_hint=option) from None


def _check_actor(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """``--actor`` as its column keeps it: one line of error otherwise, before any work."""
    from storage.models import ACTOR
    from storage.types import text_problem

    problem = None if value is None else text_problem(value, ACTOR.length)
    if problem is not None:
        raise click.ClickException(f"--actor {problem}")
    return value


@main.command("reconcile")
@click.option("--from", "period_from", default=None, help="Start (ISO date/datetime, UTC).")
@click.option("--to", "period_to", default=None, help="End, exclusive (default: now).")
@click.option("--connection", default=None, help="Only this venue connection.")
@click.option(
    "--actor", default=None, callback=_check_actor, help="Who runs it (default: the OS user)."
)
@click.option("--json", "as_json", is_flag=True, help="Print the runs and totals as JSON.")
@pass_cli
def reconcile_command(
    cli: CliContext,
    period_from: str | None,
    period_to: str | None,
    connection: str | None,
    actor: str | None,
    as_json: bool,
) -> None:
    """Reconcile the ledger with the venue's orders over a period, and print the totals.

    The period defaults to the last OTACM_RECON_LOOKBACK_DAYS days ending now. Each
    connection gets a run; re-running a period is safe. Exits 1 if a run failed.
    """
    import datetime as dt
    import getpass

    import sqlalchemy as sa

    from reconciler.engine import reconcile_connections
    from storage.models import ensure_connection
    from storage.records import ReconRun, ReconTotal, ReconTrigger
    from storage.types import utcnow

    settings = cli.settings
    try:
        names = [settings.connection(connection).name] if connection else None
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None
    now = utcnow()
    end = _utc_moment(period_to, "--to") or now
    try:
        start = _utc_moment(period_from, "--from") or end - dt.timedelta(
            days=settings.recon_lookback_days
        )
    except OverflowError:
        raise click.BadParameter(
            f"the {settings.recon_lookback_days} days before it start before year 1: give --from",
            param_hint="--to",
        ) from None
    if start >= end:
        raise click.BadParameter("--from must be before --to", param_hint="--from")
    with open_sessions(cli) as sessions:
        with sessions.begin() as session:
            chosen = {
                ensure_connection(session, c.name): c
                for c in settings.connections
                if names is None or c.name in names
            }
        ids = {connection_id: c.name for connection_id, c in chosen.items()}
        report = reconcile_connections(
            sessions,
            sorted(ids),
            partners={connection_id: c.partner_ids for connection_id, c in chosen.items()},
            period_from=start,
            period_to=end,
            now=now,
            trigger=ReconTrigger.MANUAL,
            actor=actor or getpass.getuser(),
            grace=dt.timedelta(seconds=settings.recon_grace),
            tolerance=settings.recon_amount_tolerance,
        )
        with sessions() as session:
            runs: list[dict[str, Any]] = []
            for connection_id, run_id in sorted(report.runs.items()):
                run = session.get(ReconRun, run_id)
                totals = session.scalars(
                    sa.select(ReconTotal)
                    .where(ReconTotal.recon_run_id == run_id)
                    .order_by(ReconTotal.currency, ReconTotal.category)
                ).all()
                runs.append(
                    {
                        "run": run_id,
                        "connection": ids[connection_id],
                        "state": str(run.state) if run else None,
                        "error": run.error if run else None,
                        "period_from": start.isoformat(),
                        "period_to": end.isoformat(),
                        "totals": [
                            {
                                "currency": t.currency,
                                "category": t.category,
                                "count": t.count,
                                "ledger_amount": str(t.ledger_amount),
                                "venue_amount": str(t.venue_amount),
                            }
                            for t in totals
                        ],
                    }
                )
    if as_json:
        echo_json(runs)
    else:
        for entry in runs:
            click.echo(
                f"run {entry['run']} ({entry['connection']}, {start.isoformat()} to "
                f"{end.isoformat()}): {entry['state']}"
                + (f": {entry['error']}" if entry["error"] else "")
            )
            for t in entry["totals"]:
                click.echo(
                    f"  {t['currency']} {t['category']}: {t['count']} "
                    f"ledger {t['ledger_amount']} venue {t['venue_amount']}"
                )
    if report.failures:
        raise SystemExit(1)


@main.group()
def exceptions() -> None:
    """Reconciliation exceptions: resolve or accept them, with a note."""


def _exception_action(
    cli: CliContext, action: str, exception_id: int, note: str | None, actor: str | None
) -> None:
    import getpass

    from reconciler import exceptions as actions
    from storage.types import utcnow

    act = actions.resolve if action == "resolve" else actions.accept
    with open_sessions(cli) as sessions:
        try:
            with sessions.begin() as session:
                row = act(
                    session,
                    exception_id,
                    actor=actor or getpass.getuser(),
                    note=note or "",
                    now=utcnow(),
                )
                state = str(row.state)
        except (
            actions.NoteRequired,
            actions.TextRefused,
            actions.ExceptionNotOpen,
            actions.ExceptionNotFound,
        ) as exc:
            raise click.ClickException(str(exc).strip("'\"")) from None
    click.echo(f"exception {exception_id}: {state}")


def _exception_options(function: Any) -> Any:
    function = click.option(
        "--actor", default=None, callback=_check_actor, help="Who (default: the OS user)."
    )(function)
    function = click.option("--note", default=None, help="Why; required.")(function)
    return click.argument("exception_id", type=int, metavar="ID")(function)


@exceptions.command("resolve")
@_exception_options
@pass_cli
def exceptions_resolve(
    cli: CliContext, exception_id: int, note: str | None, actor: str | None
) -> None:
    """Mark open exception ID resolved (the difference was fixed); --note is required."""
    _exception_action(cli, "resolve", exception_id, note, actor)


@exceptions.command("accept")
@_exception_options
@pass_cli
def exceptions_accept(
    cli: CliContext, exception_id: int, note: str | None, actor: str | None
) -> None:
    """Mark open exception ID accepted (the difference is right); --note is required."""
    _exception_action(cli, "accept", exception_id, note, actor)


@main.group()
def privacy() -> None:
    """Customers' personal data: erase one person's names and e-mails on request."""


@privacy.command("erase")
@click.option("--email", default=None, help="The person's e-mail address (any case).")
@click.option(
    "--reference", default=None, help="An order's shop reference, venue reference or orderId."
)
@click.option("--connection", default=None, help="Only this venue connection's data.")
@click.option("--actor", default=None, help="Who carries the request out (default: the OS user).")
@click.option("--json", "as_json", is_flag=True, help="Print the counts as JSON.")
@pass_cli
def privacy_erase(
    cli: CliContext,
    email: str | None,
    reference: str | None,
    connection: str | None,
    actor: str | None,
    as_json: bool,
) -> None:
    """Erase the names and e-mails of one person's orders everywhere, now.

    Name the person by --email or an order by --reference. Their orders in the mirror,
    their sales in the ledger, the calls and notifications about them lose every name
    and e-mail; amounts, references and ticket numbers stay. The erasure is recorded
    (who, when, the address's SHA-256, never the address, and the counts). Finding
    nothing is no failure (exit 0): the request is met, and running it again finds
    nothing left. Calls still waiting to be sent keep their body: run it again once
    they are sent.
    """
    import getpass

    from heartbeat.privacy import ErasureRefused, erase_subject
    from storage.models import ensure_connection
    from storage.types import utcnow

    settings = cli.settings
    try:
        name = settings.connection(connection).name if connection else None
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None
    with open_sessions(cli) as sessions:
        try:
            connection_id = None
            if name is not None:
                with sessions.begin() as session:
                    connection_id = ensure_connection(session, name)
            done = erase_subject(
                sessions,
                email=email,
                reference=reference,
                connection_id=connection_id,
                actor=actor or getpass.getuser(),
                now=utcnow(),
            )
        except ErasureRefused as exc:
            raise click.ClickException(str(exc)) from None
    report = done.report
    if as_json:
        echo_json({"record": done.record_id, "selector": done.selector, **report.as_dict()})
        return
    what = "e-mail address" if email is not None else "reference"
    if not report.erased and not report.kept_unsent:
        click.echo(f"nothing stored for that {what}: nothing erased (record {done.record_id})")
        return
    click.echo(
        f"erased: {report.orders} order(s), {report.ledger_lines} sale(s), "
        f"{report.outbox_rows} call(s), {report.inbox_rows} notification(s)"
        f" (record {done.record_id})"
    )
    if report.kept_unsent:
        click.echo(
            f"{report.kept_unsent} call(s) still to be sent keep their body: run this again"
            " once they are sent",
            err=True,
        )


def _register_sandbox() -> None:
    from sandbox.cli import sandbox_command

    main.add_command(sandbox_command, "sandbox")


_register_sandbox()
