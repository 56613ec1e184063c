"""``otacm doctor``: the effective configuration, and checks of what it points at (the
checks themselves are :mod:`otacm.doctor`).
"""

from __future__ import annotations

import click

from otacm.cli.context import (
    CliContext,
    Seconds,
    echo_json,
    pass_cli,
)


@click.command()
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
