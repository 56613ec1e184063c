"""``otacm deliveries``: the shop's events, each delivery to each shop endpoint.

``list`` shows them, newest first (``--state``, ``--endpoint``, ``--json``); ``replay``
puts a dead one (by id) or every dead one (``--dead``, of one endpoint with
``--endpoint``) back in the queue, with the same event id (:mod:`orders.shop_delivery`).
"""

from __future__ import annotations

import click

from otacm.cli.context import CliContext, echo_json, fail, open_sessions, pass_cli
from storage.records import DeliveryState

_STATES = [state.value for state in DeliveryState]


@click.group()
def deliveries() -> None:
    """The shop's events: each delivery to each shop endpoint."""


@deliveries.command("list")
@click.option("--state", type=click.Choice(_STATES), default=None, help="Only deliveries in it.")
@click.option("--endpoint", default=None, help="Only deliveries to this shop endpoint.")
@click.option(
    "--limit",
    type=click.IntRange(1, 10_000),
    default=100,
    show_default=True,
    help="The newest this many.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@pass_cli
def deliveries_list(
    cli: CliContext, state: str | None, endpoint: str | None, limit: int, as_json: bool
) -> None:
    """The deliveries of events to the shop, newest first."""
    from orders.shop_replay import list_deliveries

    with open_sessions(cli, read_only=True) as sessions, sessions() as session:
        rows = list_deliveries(
            session,
            state=None if state is None else DeliveryState(state),
            endpoint=endpoint,
            limit=limit,
        )
    if as_json:
        echo_json([row.as_dict() for row in rows])
        return
    if not rows:
        click.echo("no deliveries")
        return
    for row in rows:
        answer = row.last_error or (str(row.last_status) if row.last_status else "-")
        click.echo(
            f"{row.id}  {row.endpoint}  {row.state}  {row.type}  {row.event_id}  "
            f"{row.reference or '-'} #{row.order_seq}  attempts {row.attempts}  {answer}"
        )


@deliveries.command("replay")
@click.argument("delivery_id", metavar="ID", type=int, required=False)
@click.option("--dead", "all_dead", is_flag=True, help="Every dead delivery.")
@click.option("--endpoint", default=None, help="Only deliveries to this shop endpoint.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@pass_cli
def deliveries_replay(
    cli: CliContext, delivery_id: int | None, all_dead: bool, endpoint: str | None, as_json: bool
) -> None:
    """Send dead deliveries again: one by ID, or every one with --dead (same event id)."""
    from orders.shop_replay import ReplayRefused, replay
    from storage.types import ID_MAX, utcnow

    if (delivery_id is None) == (not all_dead):
        fail(cli, "name one delivery ID, or --dead for every dead one")
    known = [e.name for e in cli.settings.shop_endpoints]
    if endpoint is not None and endpoint not in known:
        # Its deliveries would wait for a sender that never comes.
        fail(cli, f"no shop endpoint named {endpoint!r} (known: {', '.join(known) or 'none'})")
    if delivery_id is not None and not 0 < delivery_id <= ID_MAX:
        fail(cli, f"no shop delivery {delivery_id}")
    try:
        with open_sessions(cli) as sessions, sessions.begin() as session:
            replayed = replay(session, delivery_id=delivery_id, endpoint=endpoint, now=utcnow())
    except ReplayRefused as exc:
        fail(cli, str(exc))
    if as_json:
        echo_json({"replayed": replayed})
    else:
        click.echo(f"{len(replayed)} dead deliveries queued again")
