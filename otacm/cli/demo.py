"""``otacm demo``: its options and logging; the demo itself is :mod:`otacm.demo`."""

from __future__ import annotations

import sys

import click
from click.core import ParameterSource

from otacm.cli.context import (
    CliContext,
    Seconds,
)
from otacm.logs import configure_logging


@click.command()
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
    from otacm.demo.run import fresh_demo_database, run_demo

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
