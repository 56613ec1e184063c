"""Orders from the shop's side: ``submit`` (a file of orders, recorded then sent),
``subscribe`` (the receiver to the venue's webhook), ``orders show``, ``replace``,
``cancel`` and ``errors``, and ``inbox list`` and ``replay`` (webhook notifications,
those given up on among them).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from otacm.cli.context import (
    CliContext,
    echo_json,
    open_sessions,
    pass_cli,
    stored_connection_id,
)
from venue.connection import SettingsError

if TYPE_CHECKING:
    from collections.abc import Sequence
    from contextlib import ExitStack

    from sqlalchemy.orm import Session, sessionmaker

    from venue.client import VenueClient
    from venue.connection import VenueConnection


@click.command()
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
    from orders.submit import SubmitStatus, submit_file
    from storage.types import utcnow

    settings = cli.settings
    with ExitStack() as stack:
        sessions = stack.enter_context(open_sessions(cli))
        clients = open_clients(stack, sessions, settings.connections)
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


@click.command("subscribe")
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


@click.group()
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

    settings = cli.settings
    if connection is not None:
        try:
            settings.connection(connection)  # an unknown name is an error, not "no order"
        except SettingsError as exc:
            raise click.ClickException(str(exc)) from None
    with ExitStack() as stack:
        sessions = stack.enter_context(open_sessions(cli))
        clients = open_clients(stack, sessions, settings.connections)
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


@click.group()
def inbox() -> None:
    """The webhook inbox: notifications waiting, done, or dead-lettered."""


@inbox.command("list")
@click.option("--dead", is_flag=True, help="Only dead-lettered rows (same as --state dead).")
@click.option(
    "--state",
    type=click.Choice(["pending", "leased", "done", "dead"]),
    default=None,
    help="Only rows in this state.",
)
@click.option("--connection", default=None, help="Only rows of this venue connection.")
@click.option(
    "--limit", type=click.IntRange(1, 1000), default=50, show_default=True, help="Rows shown."
)
@click.option("--before", type=click.IntRange(1), default=None, help="Rows listed after this id.")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON.")
@pass_cli
def inbox_list(
    cli: CliContext,
    dead: bool,
    state: str | None,
    connection: str | None,
    limit: int,
    before: int | None,
    as_json: bool,
) -> None:
    """List inbox rows, newest first: what each announced, its state, attempts and error.

    With a state, the rows are ordered by when they are (or were last) due, and the
    count of all rows in that state is printed; --before ID pages on from a listed row.
    """
    import sqlalchemy as sa

    from orders.inbox import count_rows, list_rows, row_json
    from storage.models import Inbox, InboxState, VenueConnection
    from storage.types import ID_MAX

    wanted = InboxState.DEAD if dead else (InboxState(state) if state else None)
    if dead and state not in (None, "dead"):
        raise click.ClickException("--dead and --state name different states")
    with open_sessions(cli) as sessions, sessions() as session:
        connection_id = stored_connection_id(cli, session, connection)
        names = {c.id: c.name for c in session.scalars(sa.select(VenueConnection))}
        total: int | None = None
        if connection_id == -1:
            rows = []  # configured, but nothing stored for it yet
        else:
            after = None
            if before is not None:
                row = session.get(Inbox, before) if before <= ID_MAX else None
                if row is None:
                    raise click.ClickException(f"--before {before}: no inbox row has that id")
                after = (row.next_attempt_at, row.id)
            rows = list_rows(
                session, state=wanted, connection_id=connection_id, before=after, limit=limit
            )
            total = count_rows(session, wanted, connection_id) if wanted else None
    if as_json:
        echo_json(
            {"rows": [row_json(r, names.get(r.connection_id, "?")) for r in rows], "total": total}
        )
        return
    for r in rows:
        error = f"  {r.last_error[:120]}" if r.last_error else ""
        click.echo(
            f"{r.id}  {names.get(r.connection_id, '?')}  {r.received_at:%Y-%m-%d %H:%M:%S}  "
            f"{r.source.value}  {r.order_id or '-'}  {r.state.value}  "
            f"attempts {r.attempts}{error}"
        )
    if total is not None:
        click.echo(f"{len(rows)} of {total} {wanted} row(s)")
    else:
        click.echo(f"{len(rows)} row(s)")


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


def open_clients(
    stack: ExitStack, sessions: sessionmaker[Session], connections: Sequence[VenueConnection]
) -> dict[str, VenueClient]:
    """Every connection's client, closed with ``stack``, within its key's limit shared with
    every other process using the database of ``sessions`` (:mod:`storage.venue_limits`)."""
    from orders.submit import SUBMIT_NOW_RETRY
    from storage.venue_limits import shared_throttle
    from venue.client import open_client

    engine = sessions.kw["bind"]
    return {
        c.name: stack.enter_context(
            open_client(c, retry=SUBMIT_NOW_RETRY, throttle=shared_throttle(engine, c))
        )
        for c in connections
    }
