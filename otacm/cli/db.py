"""``otacm db``: the database's schema migrations (``upgrade``, ``current``), its
backup and restore, and the pruning of rows past their retention (``prune``).
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import click

from otacm.cli.context import (
    CliContext,
    echo_json,
    fail,
    open_database,
    pass_cli,
)


@click.group()
def db() -> None:
    """The database: schema migrations, backups, pruning."""


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


@db.command("prune")
@click.option("--dry-run", is_flag=True, help="Say what would go; delete nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the counts as JSON.")
@pass_cli
def db_prune(cli: CliContext, dry_run: bool, as_json: bool) -> None:
    """Delete the rows past their retention now: processed notifications, sent calls,
    old status changes, delivered events to the shop (OTACM_RETAIN_*_DAYS; README:
    Retention).

    Per table, how many rows went (or, with --dry-run, would go) and before which time.
    Runs until every due row is gone, in short transactions; refused while the
    scheduler's prune job runs.
    """
    from otacm.batch import as_batch_work

    as_batch_work(cli.settings.batch_nice)
    from heartbeat.coordination import job_lock
    from heartbeat.retention import JOB, Retention, describe, prune
    from storage.engine import make_sessions
    from storage.types import utcnow

    retention = Retention.of(cli.settings)
    with open_database(cli) as engine:
        sessions = make_sessions(engine)
        # A dry run only reads; a run takes the job's lock, as the scheduler does.
        lock = nullcontext(True) if dry_run else job_lock(engine, JOB)
        with lock as held:
            if not held:
                fail(cli, "the scheduler's prune job is running now: try again when it ends")
            report = prune(
                sessions, now=utcnow(), retention=retention, dry_run=dry_run, max_batches=None
            )
    if as_json:
        echo_json(report.as_dict())
        return
    for line in describe(report):
        click.echo(line)
