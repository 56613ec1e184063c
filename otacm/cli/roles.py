"""The processes otacm runs as: ``web``, ``worker``, ``scheduler``, and ``serve`` (all
three on one box); ``poll`` (the scheduled jobs once, now) and ``health`` (the roles
running here, from their liveness files).
"""

from __future__ import annotations

from typing import Any

import click

from otacm.cli.context import (
    CliContext,
    Seconds,
    database_errors,
    echo_json,
    open_database,
    pass_cli,
)
from otacm.liveness import DEFAULT_MAX_AGE, ROLES

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


@click.command()
@_bind_option
@_workers_option
@pass_cli
def web(cli: CliContext, bind: str, workers: int | None) -> None:
    """Serve the receiver (webhooks, health, metrics, the API) under gunicorn."""
    from otacm.liveness import announce_web
    from otacm.metrics_dir import metrics_directory
    from otacm.web import gunicorn_options, run_web

    # Opens nothing but makes a SQLite database's directory: here, not in each worker.
    with open_database(cli):
        pass
    announce_web(cli.settings.liveness_dir, bind)
    with metrics_directory():
        run_web(cli.settings, gunicorn_options(bind, workers))


@click.command()
@pass_cli
def worker(cli: CliContext) -> None:
    """Run the inbox worker: fetch every notified order with getOrder and mirror it."""
    import threading

    from otacm.processes import run_worker, stop_on_signals

    stop = threading.Event()
    stop_on_signals(stop)
    with database_errors(cli):
        run_worker(cli.settings, stop)


@click.command()
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


@click.command()
@click.option(
    "--job",
    "jobs",
    multiple=True,
    metavar="NAME",
    help="Only this job (repeatable): change_feed, watchdog, retry_outbox, "
    "lost_submissions, confirm_drafts, check_subscriptions; or one partner's feed, "
    "change_feed:CONNECTION:PARTNER.",
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


@click.command()
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


@click.command()
@_bind_option
@_workers_option
@pass_cli
def serve(cli: CliContext, bind: str, workers: int | None) -> None:
    """Everything on one box: migrate (once the database answers), then run web, worker
    and scheduler together."""
    import threading

    from otacm.metrics_dir import metrics_directory
    from otacm.processes import otacm_command, stop_on_signals
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
