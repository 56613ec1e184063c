"""Finance from the command line: ``ledger import`` (the shop's sales), ``reconcile``
(the ledger against the venue's orders), ``report`` (a run's totals and exceptions),
``exceptions resolve`` and ``accept``, and the finance pages' users (``finance
hash-password``, ``sign-out-all``).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from otacm.cli.context import (
    CliContext,
    echo_json,
    open_sessions,
    pass_cli,
    stored_connection_id,
)
from venue.connection import SettingsError


@click.group()
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
    (exit 0). Prints how many sales were inserted, updated, unchanged, and bad. When the
    database fails part-way, the batches written before stay (exit 1, the line says
    through which line; with --json the counts come with ``interrupted``); importing the
    file again finishes it.
    """
    from otacm.batch import as_batch_work

    as_batch_work(cli.settings.batch_nice)
    from reconciler.ledger import ImportInterrupted, import_ledger
    from reconciler.ledger_file import LedgerFileError
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
        except ImportInterrupted as exc:
            if as_json:
                # A script learns what is stored, as from a whole import, and why it stopped.
                interrupted = {"stored_through": exc.stored_through, "reason": exc.reason}
                echo_json(
                    {**exc.result.to_json(limit=LEDGER_BAD_SHOWN), "interrupted": interrupted}
                )
            raise click.ClickException(f"{file}: {exc}") from None
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


@click.command()
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

    Ages are counted to now. The report streams: its exceptions are read a batch at a
    time, so memory does not grow with them. xlsx is binary: it goes to FILE, or to
    standard output only when that is redirected. FILE is written beside itself first
    and renamed once whole, so a failed report leaves no file that looks complete.
    Exits 1 if no run has the id RUN.
    """
    from otacm.batch import as_batch_work

    as_batch_work(cli.settings.batch_nice)
    from reconciler.report import RunNotFound, open_run_report
    from reconciler.report_formats import stream_report
    from storage.types import ID_MAX, utcnow

    if fmt == "xlsx" and output is None and sys.stdout.isatty():
        raise click.UsageError("xlsx is a binary file: name it with -o FILE, or redirect stdout")
    if not 0 < run_id <= ID_MAX:  # no row has it, and no query could take it
        raise click.ClickException(str(RunNotFound(run_id)))
    with open_sessions(cli, read_only=True) as sessions:
        try:
            data = open_run_report(sessions, run_id, now=utcnow())
        except RunNotFound as exc:
            raise click.ClickException(str(exc)) from None
        pieces = stream_report(data, fmt)
        if output is None:
            for piece in pieces:
                click.echo(piece, nl=False)  # bytes go to the binary stream as they are
            return
        partial = output.with_name(f".{output.name}.part")
        try:
            with partial.open("wb") as target:
                for piece in pieces:
                    target.write(piece)
            partial.replace(output)
        except OSError as exc:  # a missing folder, no permission, a full disk
            partial.unlink(missing_ok=True)
            raise click.ClickException(f"cannot write {output}: {exc.strerror or exc}") from None
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
    click.echo(f"wrote the {fmt} report of run {run_id} to {output}", err=True)


@click.group()
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


@click.command("reconcile")
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
    from otacm.batch import as_batch_work

    as_batch_work(cli.settings.batch_nice)
    import datetime as dt
    import getpass

    import sqlalchemy as sa

    from reconciler.engine import reconcile_connections
    from storage.connections import connection_ids
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
        picked = [c for c in settings.connections if names is None or c.name in names]
        found = connection_ids(sessions, (c.name for c in picked))
        chosen = {found[c.name]: c for c in picked}
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


@click.group()
def runs() -> None:
    """Reconciliation runs: list them."""


@runs.command("list")
@click.option("--connection", default=None, help="Only this venue connection's runs.")
@click.option(
    "--limit", type=click.IntRange(1, 1000), default=20, show_default=True, help="Runs shown."
)
@click.option("--after", type=click.IntRange(1), default=None, help="Runs older than this one.")
@click.option("--json", "as_json", is_flag=True, help="Print the runs as JSON.")
@pass_cli
def runs_list(
    cli: CliContext, connection: str | None, limit: int, after: int | None, as_json: bool
) -> None:
    """List reconciliation runs, newest first: period, trigger, state, and how many of
    all there are; --after ID pages on from a listed run."""
    from reconciler.exceptions import count_runs, runs_page
    from storage.models import VenueConnection
    from storage.types import ID_MAX

    with open_sessions(cli) as sessions, sessions() as session:
        connection_id = stored_connection_id(cli, session, connection)
        if after is not None and after > ID_MAX:
            raise click.ClickException(f"--after {after}: no run has that id")
        page = runs_page(session, connection_id=connection_id, after=after, size=limit)
        total = count_runs(session, connection_id)
        names = {c.id: c.name for c in session.query(VenueConnection)}
    listed: list[dict[str, Any]] = [
        {
            "id": run.id,
            "connection": names.get(run.connection_id, "?"),
            "period_from": run.period_from.isoformat(),
            "period_to": run.period_to.isoformat(),
            "started_at": run.started_at.isoformat(),
            "finished_at": None if run.finished_at is None else run.finished_at.isoformat(),
            "trigger": str(run.trigger),
            "actor": run.actor,
            "state": str(run.state),
            "error": run.error,
        }
        for run in page.runs
    ]
    if as_json:
        echo_json({"runs": listed, "total": total, "more": page.more_after})
        return
    for entry in listed:
        click.echo(
            f"{entry['id']}  {entry['connection']}  {entry['period_from'][:10]} to "
            f"{entry['period_to'][:10]}  {entry['trigger']}  {entry['state']}  "
            f"started {entry['started_at'][:19]}"
            + (f"  {entry['error']}" if entry["error"] else "")
        )
    click.echo(
        f"{len(listed)} of {total} run(s)"
        + (f"; more: --after {listed[-1]['id']}" if page.more_after else "")
    )


@click.group()
def exceptions() -> None:
    """Reconciliation exceptions: resolve or accept them, with a note."""


@exceptions.command("list")
@click.option(
    "--run", "run_id", type=click.IntRange(1), default=None, help="The run (default: the latest)."
)
@click.option("--state", default=None, help="Only exceptions in this state (open, resolved...).")
@click.option("--category", default=None, help="Only exceptions of this category.")
@click.option("--closed", is_flag=True, help="The exceptions the run closed, not those it saw.")
@click.option(
    "--limit", type=click.IntRange(1, 1000), default=50, show_default=True, help="Rows shown."
)
@click.option("--after", type=click.IntRange(1), default=None, help="Exceptions after this id.")
@click.option("--json", "as_json", is_flag=True, help="Print the exceptions as JSON.")
@pass_cli
def exceptions_list(
    cli: CliContext,
    run_id: int | None,
    state: str | None,
    category: str | None,
    closed: bool,
    limit: int,
    after: int | None,
    as_json: bool,
) -> None:
    """List a reconciliation run's exceptions (the latest run's by default), oldest
    first, filtered by state or category, with "n of N"; --after ID pages on."""
    import sqlalchemy as sa

    from reconciler.categories import Category
    from reconciler.report import Listing, RunNotFound, count_exceptions, exception_page, load_run
    from reconciler.report_filter import ExceptionFilter
    from reconciler.report_formats import exception_json
    from storage.records import ExceptionState, ReconRun
    from storage.types import ID_MAX, utcnow

    if state is not None and state not in {s.value for s in ExceptionState}:
        known = ", ".join(s.value for s in ExceptionState)
        raise click.ClickException(f"--state {state!r}: one of {known}")
    if category is not None and category not in {c.value for c in Category}:
        known = ", ".join(c.value for c in Category)
        raise click.ClickException(f"--category {category!r}: one of {known}")
    chosen = ExceptionFilter(category=category or "", state=state or "")
    listing = Listing.CLOSED if closed else Listing.SEEN
    now = utcnow()
    with open_sessions(cli) as sessions, sessions() as session:
        if run_id is None:
            run_id = session.scalar(
                sa.select(ReconRun.id).order_by(ReconRun.started_at.desc(), ReconRun.id.desc())
            )
            if run_id is None:
                raise click.ClickException("no reconciliation run yet: run `otacm reconcile`")
        try:
            if run_id > ID_MAX:
                raise RunNotFound(run_id)
            run = load_run(session, run_id)
        except RunNotFound as exc:
            raise click.ClickException(str(exc)) from None
        page = exception_page(
            session,
            run_id,
            now=now,
            listing=listing,
            chosen=chosen,
            after=None if after is None else min(after, ID_MAX),
            size=limit,
            look_back=False,
        )
        total = count_exceptions(session, run_id, now=now, listing=listing, chosen=chosen)
    if as_json:
        echo_json(
            {
                "run": run.id,
                "connection": run.connection,
                "exceptions": [exception_json(row) for row in page.rows],
                "total": total,
                "more": page.more_after,
            }
        )
        return
    for row in page.rows:
        reference = row.shop_reference or row.order_id or row.subject_key
        click.echo(
            f"{row.id}  {row.category}  {row.state}  {reference}  "
            f"{row.currency or ''} ledger {row.ledger_amount} venue {row.venue_amount}  "
            f"{row.age_days} day(s)"
        )
    more = f"; more: --after {page.rows[-1].id}" if page.more_after and page.rows else ""
    what = "closed by" if closed else "seen by"
    click.echo(
        f"{len(page.rows)} of {total} exception(s) {what} run {run.id} ({run.connection}){more}"
    )


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
