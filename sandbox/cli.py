"""``otacm sandbox``: run the simulated venue from the command line until stopped.

Every option also reads an ``OTACM_SANDBOX_*`` environment variable (shown in
``--help``); the command line wins. The command prints the API base and the sandbox's
own endpoints, then serves until Ctrl-C or SIGTERM. Clients learn the key, partners and
catalog from ``GET /_sandbox/config``.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import Any

import click
from pydantic import SecretStr, ValidationError

from sandbox.catalog import CatalogError, load_catalog
from sandbox.config import (
    DEFAULT_API_KEY,
    DEFAULT_COMPANY,
    DEFAULT_ENVIRONMENT,
    DEFAULT_PARTNERS,
    DEFAULT_PICKUP_INTERVAL,
    DEFAULT_TENANT,
    GATEWAY_MAX_IN_FLIGHT,
    GATEWAY_RATE_LIMIT,
    GATEWAY_RATE_PERIOD,
    MEMORY,
    Partner,
    SandboxConfig,
)
from sandbox.faults import Faults
from sandbox.server import SandboxServer
from venue.connection import COMPANY_PATH_FORMS

DEFAULT_PORT = 8765
_RATE = click.FloatRange(0.0, 1.0)
_FAULT_OPTIONS = (
    "drop_rate",
    "duplicate_rate",
    "delay_seconds",
    "reorder",
    "envelope",
    "rate_429",
    "rate_503",
    "latency_ms",
    "stall_scheduled_rate",
    "stall_processing_rate",
    "error_rate",
    "hold_commit_seconds",
    "webhook_jitter_seconds",
    "webhook_concurrency",
    "retry_after_seconds",
    "answer_lost_rate",
    "answer_lost_count",
    "answer_lost_after_seconds",
    "seed",
)


def _env(name: str) -> dict[str, Any]:
    return {"envvar": f"OTACM_SANDBOX_{name}", "show_envvar": True}


@click.command("sandbox")
@click.option("--host", default="127.0.0.1", show_default=True, **_env("HOST"))
@click.option(
    "--port", type=click.IntRange(0, 65535), default=DEFAULT_PORT, show_default=True, **_env("PORT")
)
@click.option(
    "--pickup-interval",
    "pickup_interval",
    metavar="SECONDS",
    type=click.FloatRange(min=0),
    default=DEFAULT_PICKUP_INTERVAL,
    show_default=True,
    help="Seconds between pickup cycles; 0: only POST /_sandbox/tick.",
    **_env("PICKUP_INTERVAL"),
)
@click.option(
    "--state",
    "state",
    metavar="FILE",
    type=click.Path(dir_okay=False, path_type=Path),
    help="SQLite file keeping orders and subscriptions across restarts (default: in memory).",
    **_env("STATE"),
)
@click.option(
    "--catalog",
    "catalog",
    metavar="FILE",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Catalog JSON (default: the one shipped with the sandbox).",
    **_env("CATALOG"),
)
@click.option("--tenant", default=DEFAULT_TENANT, show_default=True, **_env("TENANT"))
@click.option(
    "--environment", default=DEFAULT_ENVIRONMENT, show_default=True, **_env("ENVIRONMENT")
)
@click.option("--company", default=DEFAULT_COMPANY, show_default=True, **_env("COMPANY"))
@click.option(
    "--company-path-form",
    type=click.Choice(COMPANY_PATH_FORMS),
    default="percent",
    show_default=True,
    help="The one way of writing the company in the path that is answered: "
    "percent (%20), double (%2520) or plus (+).",
    **_env("COMPANY_PATH_FORM"),
)
@click.option(
    "--currency-code",
    default="DKK",
    show_default=True,
    help="The company's local currency (its LCY Code, up to 10 characters): every wallet's.",
    **_env("CURRENCY_CODE"),
)
@click.option("--api-key", "api_key", default=DEFAULT_API_KEY, show_default=True, **_env("API_KEY"))
@click.option(
    "--partners",
    metavar="ID[:inactive][:no-template][=NAME],...",
    default=",".join(p.to_text() for p in DEFAULT_PARTNERS),
    show_default=True,
    help="Partners the venue knows: id, flags (inactive; no-template: no design"
    " template, so no manifests) and name.",
    **_env("PARTNERS"),
)
@click.option(
    "--legacy-sync/--no-legacy-sync",
    default=False,
    show_default=True,
    help="Answer like the older synchronous API version.",
    **_env("LEGACY_SYNC"),
)
@click.option(
    "--webhook-max-batch",
    type=click.IntRange(min=1),
    default=100,
    show_default=True,
    **_env("WEBHOOK_MAX_BATCH"),
)
@click.option(
    "--webhook-max-attempts",
    type=click.IntRange(min=1),
    default=5,
    show_default=True,
    **_env("WEBHOOK_MAX_ATTEMPTS"),
)
@click.option(
    "--webhook-backoff",
    metavar="SECONDS",
    type=click.FloatRange(min=0),
    default=1.0,
    show_default=True,
    help="Wait before the first webhook retry; doubles.",
    **_env("WEBHOOK_BACKOFF"),
)
@click.option(
    "--webhook-create-empty-body/--no-webhook-create-empty-body",
    default=False,
    show_default=True,
    help="Answer POST /webhook with 201 and an empty body.",
    **_env("WEBHOOK_CREATE_EMPTY_BODY"),
)
@click.option(
    "--webhook-list-paths",
    type=click.Choice(["both", "webhooks", "webhook"]),
    default="both",
    show_default=True,
    help="Which of GET /webhooks and GET /webhook list the subscriptions.",
    **_env("WEBHOOK_LIST_PATHS"),
)
@click.option(
    "--webhook-deactivate-after",
    metavar="N",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Make a subscription inactive after N consecutive refused (4xx) deliveries; 0: never.",
    **_env("WEBHOOK_DEACTIVATE_AFTER"),
)
@click.option(
    "--gateway-max-in-flight",
    metavar="N",
    type=click.IntRange(min=0),
    default=GATEWAY_MAX_IN_FLIGHT,
    show_default=True,
    help="Calls of one API key in process at once; more are answered 429. 0: no bound.",
    **_env("GATEWAY_MAX_IN_FLIGHT"),
)
@click.option(
    "--gateway-rate-limit",
    metavar="N",
    type=click.IntRange(min=0),
    default=GATEWAY_RATE_LIMIT,
    show_default=True,
    help="Calls of one API key per rate period (sliding); more are answered 429. 0: no limit.",
    **_env("GATEWAY_RATE_LIMIT"),
)
@click.option(
    "--gateway-rate-period",
    metavar="SECONDS",
    type=click.FloatRange(min=0, min_open=True),
    default=GATEWAY_RATE_PERIOD,
    show_default=True,
    help="The window of --gateway-rate-limit.",
    **_env("GATEWAY_RATE_PERIOD"),
)
@click.option(
    "--drop-rate", type=_RATE, default=0.0, help="Share of webhooks dropped.", **_env("DROP_RATE")
)
@click.option(
    "--duplicate-rate",
    type=_RATE,
    default=0.0,
    help="Share of webhooks sent twice.",
    **_env("DUPLICATE_RATE"),
)
@click.option(
    "--delay-seconds",
    type=click.FloatRange(0, 600),
    default=0.0,
    help="Wait before each webhook POST.",
    **_env("DELAY_SECONDS"),
)
@click.option(
    "--reorder/--no-reorder",
    default=False,
    help="Shuffle webhook notifications.",
    **_env("REORDER"),
)
@click.option(
    "--envelope",
    type=click.Choice(["value", "values", "bare"]),
    default="value",
    show_default=True,
    help="Webhook body shape.",
    **_env("ENVELOPE"),
)
@click.option(
    "--webhook-jitter-seconds",
    type=click.FloatRange(0, 600),
    default=0.0,
    help="Each webhook notification waits its own random time up to this, and goes alone.",
    **_env("WEBHOOK_JITTER_SECONDS"),
)
@click.option(
    "--webhook-concurrency",
    type=click.IntRange(1, 32),
    default=1,
    show_default=True,
    help="Webhook POSTs in flight at once.",
    **_env("WEBHOOK_CONCURRENCY"),
)
@click.option(
    "--rate-429",
    "rate_429",
    type=_RATE,
    default=0.0,
    help="Share of API calls answered 429.",
    **_env("RATE_429"),
)
@click.option(
    "--rate-503",
    "rate_503",
    type=_RATE,
    default=0.0,
    help="Share of API calls answered 503.",
    **_env("RATE_503"),
)
@click.option(
    "--retry-after-seconds",
    type=click.IntRange(0, 86_400),
    default=None,
    help="Retry-After header on the 429 and 503 faults (default: none).",
    **_env("RETRY_AFTER_SECONDS"),
)
@click.option(
    "--answer-lost-rate",
    type=_RATE,
    default=0.0,
    help="Share of successful create/confirm/replace/delete/getOrder answers lost after the work.",
    **_env("ANSWER_LOST_RATE"),
)
@click.option(
    "--answer-lost-count",
    type=click.IntRange(0, 1_000_000),
    default=0,
    help="Lose the next this many of those answers.",
    **_env("ANSWER_LOST_COUNT"),
)
@click.option(
    "--answer-lost-after-seconds",
    type=click.FloatRange(0, 600),
    default=0.0,
    help="Silence before a lost answer's connection is cut (past the client's timeout: a timeout).",
    **_env("ANSWER_LOST_AFTER_SECONDS"),
)
@click.option(
    "--latency-ms",
    type=click.IntRange(0, 600_000),
    default=0,
    help="Added to every API call.",
    **_env("LATENCY_MS"),
)
@click.option(
    "--stall-scheduled-rate",
    type=_RATE,
    default=0.0,
    help="Share of orders left in Scheduled.",
    **_env("STALL_SCHEDULED_RATE"),
)
@click.option(
    "--stall-processing-rate",
    type=_RATE,
    default=0.0,
    help="Share of orders left in Processing.",
    **_env("STALL_PROCESSING_RATE"),
)
@click.option(
    "--error-rate",
    type=_RATE,
    default=0.0,
    help="Share of processing runs ending in Error.",
    **_env("ERROR_RATE"),
)
@click.option(
    "--hold-commit-seconds",
    type=click.FloatRange(0.0, 86_400.0),
    default=0.0,
    help="Hold each processing run's last change this long before it is seen (a late commit).",
    **_env("HOLD_COMMIT_SECONDS"),
)
@click.option(
    "--seed",
    type=int,
    default=None,
    help="Seed for the fault dice (repeatable runs).",
    **_env("SEED"),
)
def sandbox_command(**options: Any) -> None:
    """Run a simulation of the venue's OTA Channel Manager API, with fault injection."""
    config = build_config(options)
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
    try:
        server = SandboxServer(config, host=options["host"], port=options["port"]).start()
    except OSError as exc:
        where = f"{options['host']}:{options['port']}"
        raise click.ClickException(f"cannot listen on {where}: {exc.strerror}") from exc
    try:
        click.echo(f"Sandbox listening on {server.url}")
        click.echo(f"Venue API base: {server.base_url}")
        click.echo(
            f"Sandbox endpoints: {server.url}/_sandbox/ (config, stats, faults, tick, clock)"
        )
        _wait_for_stop()
    finally:
        server.stop()
        click.echo("Sandbox stopped")


def build_config(options: dict[str, Any]) -> SandboxConfig:
    """The :class:`SandboxConfig` the command's options describe.

    Raises:
        click.ClickException: the catalog, the partners or another value is invalid.
    """
    try:
        partners = tuple(
            Partner.parse(text) for text in options["partners"].split(",") if text.strip()
        )
        faults = Faults(**{name: options[name] for name in _FAULT_OPTIONS})
        extra: dict[str, Any] = {}
        if options["catalog"] is not None:
            extra["catalog"] = load_catalog(options["catalog"])
        return SandboxConfig(
            tenant=options["tenant"],
            environment=options["environment"],
            company=options["company"],
            company_path_form=options["company_path_form"],
            currency_code=options["currency_code"],
            api_key=SecretStr(options["api_key"]),
            partners=partners,
            pickup_interval=options["pickup_interval"],
            state_path=str(options["state"]) if options["state"] else MEMORY,
            legacy_sync=options["legacy_sync"],
            faults=faults,
            webhook_max_batch=options["webhook_max_batch"],
            webhook_max_attempts=options["webhook_max_attempts"],
            webhook_backoff=options["webhook_backoff"],
            webhook_create_empty_body=options["webhook_create_empty_body"],
            webhook_list_paths=options["webhook_list_paths"],
            webhook_deactivate_after=options["webhook_deactivate_after"],
            gateway_max_in_flight=options["gateway_max_in_flight"],
            gateway_rate_limit=options["gateway_rate_limit"],
            gateway_rate_period=options["gateway_rate_period"],
            **extra,
        )
    except CatalogError as exc:
        raise click.ClickException(str(exc)) from exc
    except (ValidationError, ValueError) as exc:
        raise click.ClickException(f"invalid sandbox configuration: {exc}") from exc


def _wait_for_stop() -> None:
    """Block until Ctrl-C or SIGTERM."""
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
