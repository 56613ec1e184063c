"""``otacm privacy erase``: one person's names and e-mail addresses erased from their
orders in the mirror, their sales in the ledger, and the calls and notifications about
them.
"""

from __future__ import annotations

import click

from otacm.cli.context import (
    CliContext,
    echo_json,
    open_sessions,
    pass_cli,
)
from venue.connection import SettingsError


@click.group()
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
