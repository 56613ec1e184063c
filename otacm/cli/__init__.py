"""The ``otacm`` command: one entry point, a subcommand per job.

Settings are loaded once, at the edge, only when a subcommand needs them (so ``--help``
always works), and passed down. Each subcommand prints records for people by default and
for scripts with ``--json``; failures are one clear line and a non-zero exit.

This module owns the root group, :func:`main` (the ``otacm`` console script and
``python -m otacm``), and nothing else. Each command family lives in a module named by
its concept, which defines its commands without knowing the root; the list at the end
of this module adds them to :func:`main`. What every command shares (the
:class:`~otacm.cli.context.CliContext`, opening the database, failing with one line)
lives in :mod:`otacm.cli.context`, below all of them, so every import points one way:

- :mod:`otacm.cli.context`: the context, settings, the database, one-line failures.
- :mod:`otacm.cli.db`: ``db upgrade``, ``current``, ``backup``, ``restore``.
- :mod:`otacm.cli.doctor`: ``doctor``.
- :mod:`otacm.cli.demo`: ``demo`` (the demo itself is :mod:`otacm.demo`).
- :mod:`otacm.cli.roles`: the processes ``web``, ``worker``, ``scheduler``, ``serve``;
  ``poll`` and ``health``.
- :mod:`otacm.cli.orders`: ``submit``, ``subscribe``, ``orders show``, ``replace``,
  ``cancel``, ``errors``, and ``inbox list`` and ``replay``.
- :mod:`otacm.cli.finance`: ``ledger import``, ``reconcile``, ``report``, ``runs list``,
  ``exceptions list``, ``resolve`` and ``accept``, and the finance pages' users
  (``finance``).
- :mod:`otacm.cli.privacy`: ``privacy erase``.

``sandbox`` comes from :mod:`sandbox.cli`, the simulated venue's own package.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from otacm.cli import db, deliveries, demo, doctor, finance, orders, privacy, roles
from otacm.cli.context import CliContext, describe_failed_database, fail
from otacm.logs import LOG_FORMATS, configure_logging
from sandbox.cli import sandbox_command

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


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


# The order in which ``main.commands`` holds them (``--help`` lists them by name).
for _command in (
    db.db,
    doctor.doctor,
    demo.demo,
    roles.web,
    roles.worker,
    roles.scheduler,
    roles.poll,
    roles.health,
    roles.serve,
    orders.submit,
    orders.subscribe_command,
    orders.orders,
    finance.ledger,
    finance.report,
    orders.inbox,
    deliveries.deliveries,
    finance.finance,
    finance.reconcile_command,
    finance.exceptions,
    finance.runs,
    privacy.privacy,
):
    main.add_command(_command)
main.add_command(sandbox_command, "sandbox")
