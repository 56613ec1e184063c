"""The demo from start to end: :func:`run_demo`, on :func:`fresh_demo_database` unless
told another.
"""

from __future__ import annotations

import random
import secrets
from contextlib import ExitStack
from pathlib import Path

import click
import httpx

from otacm.demo.daemon import (
    connection_from_sandbox,
    daemon_environment,
    free_port,
    otacm_command_line,
    running_daemon,
    stay_until_interrupted,
    wait_for,
)
from otacm.demo.events import deliveries_settled, demo_shop
from otacm.demo.finance import (
    FINANCE_CONFIG,
    FINANCE_USER,
    LEDGER_EXPORT,
    REOPEN_BIND,
    FinanceAccess,
    plant_mismatches,
    reconcile_demo,
    run_lines,
    write_finance_config,
)
from otacm.demo.mirror import DemoReport, mirror_report, settled_count
from otacm.demo.shop import sample_orders, submit_order

DEMO_DATABASE = Path("var") / "demo.sqlite3"


def run_demo(
    *,
    orders: int,
    pickup_interval: float,
    seed: int | None,
    timeout: float,
    database_url: str,
    stay: bool = False,
) -> DemoReport:
    """Run sandbox and daemon, send ``orders`` sample orders, report the local mirror and
    the events its shop endpoint received (:mod:`otacm.demo.events`), plant mismatches,
    reconcile, and print the run and where its finance pages are.

    With ``stay``, the daemon and the sandbox keep running after the report until Ctrl-C.

    Raises:
        click.ClickException: the daemon did not start, or orders did not settle in time.
    """
    from sandbox import SandboxConfig, SandboxServer
    from storage.engine import make_engine, make_sessions
    from storage.models import ensure_connection
    from storage.types import utcnow
    from venue.client import open_client

    started = utcnow()
    rng = random.Random(seed)  # noqa: S311 - sample orders, not secrets
    run_tag = f"{rng.randrange(16**4):04X}"
    report = DemoReport(database_url=database_url)
    api_token = secrets.token_urlsafe(24)
    finance = FinanceAccess.generate()
    with ExitStack() as stack:
        sandbox = stack.enter_context(SandboxServer(SandboxConfig(pickup_interval=pickup_interval)))
        click.echo(f"sandbox (the simulated venue) on {sandbox.url}")
        http = stack.enter_context(httpx.Client(timeout=30))
        connection = connection_from_sandbox(sandbox.url, http)
        venue_config = http.get(f"{sandbox.url}/_sandbox/config").json()
        catalog = venue_config["catalog"]["items"]

        bind = f"127.0.0.1:{free_port()}"
        log = Path("var") / "demo-serve.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        shop = stack.enter_context(demo_shop())
        environment = daemon_environment(connection, database_url, api_token, finance)
        environment.update(shop.environment())
        daemon = stack.enter_context(running_daemon(environment, bind, log))
        click.echo(f"otacm serve (web, worker, scheduler) on {daemon}; its log: {log}")

        client = stack.enter_context(open_client(connection))
        state = connection.webhook_client_states[0]
        client.create_subscription(f"{daemon}/webhooks/ota-cm", state)
        click.echo("subscribed the receiver to ota_cm_order_processed")

        samples = sample_orders(
            catalog,
            venue_config["currencyCode"],
            connection.partner_ids[0],
            orders,
            rng=rng,
            today=started.date(),
            run_tag=run_tag,
        )
        with click.progressbar(samples, label="submitting orders to otacm ") as bar:
            for request, charged, currency in bar:
                body = {**request.to_wire(), "amount": str(charged), "currency": currency}
                submit_order(http, daemon, api_token, body, log=log)
        report.submitted = len(samples)
        references = {request.sell_to_order_reference.upper() for request, _, _ in samples}

        engine = make_engine(database_url)
        stack.callback(engine.dispose)
        with click.progressbar(
            length=len(references), label="settled in the local mirror"
        ) as settling:
            seen = 0

            def all_settled() -> bool:
                nonlocal seen
                now = settled_count(engine, references)
                settling.update(now - seen)
                seen = now
                return now == len(references)

            wait_for(all_settled, timeout=timeout, what="the orders to settle locally")
        mirror_report(engine, references, report)
        # The calls of otacm's own orders, before the demo places one behind its back.
        stats = http.get(f"{sandbox.url}/_sandbox/stats").json()
        report.venue_calls = {
            name: sum(by_status.values()) for name, by_status in stats["calls"].items()
        }
        report.webhooks_sent = int(stats["webhooks"]["sent"])
        for line in report.lines():
            click.echo(line)
        wait_for(lambda: deliveries_settled(engine), timeout=timeout, what="the shop's events")
        for line in shop.lines():
            click.echo(line)

        with make_sessions(engine).begin() as session:
            connection_id = ensure_connection(session, connection.name)
        planted, imported = plant_mismatches(
            client=client,
            engine=engine,
            connection_id=connection_id,
            references=references,
            plantable=report.plantable,
            catalog=catalog,
            currency=venue_config["currencyCode"],
            partner_id=connection.partner_ids[0],
            run_tag=run_tag,
            rng=rng,
            timeout=timeout,
        )
        click.echo("planted for the reconciliation:")
        for plant in planted:
            click.echo(f"  {plant.category:<22} {plant.reference:<18} {plant.how}")
        click.echo(
            f"imported the shop's ledger export {LEDGER_EXPORT}: {imported.inserted} inserted, "
            f"{imported.updated} updated, {imported.unchanged} unchanged, {imported.bad} bad"
        )

        run_id, run_report = reconcile_demo(engine, connection_id, started=started)
        for line in run_lines(run_report):
            click.echo(line)

        write_finance_config(FINANCE_CONFIG, database_url, finance)
        click.echo(
            f"finance pages: {daemon}/finance/  (user {FINANCE_USER}, password {finance.password})"
        )
        click.echo(f"this run's page: {daemon}/finance/runs/{run_id}")
        reopen = f"{otacm_command_line()} --config {FINANCE_CONFIG} web --bind {REOPEN_BIND}"
        if stay:
            click.echo(
                "the daemon and the sandbox keep running for the pages; Ctrl-C ends the demo"
            )
            click.echo(f"later, reopen them on this database (same user and password): {reopen}")
            stay_until_interrupted()
        else:
            click.echo("the pages close with the demo (--stay keeps them open until Ctrl-C);")
            click.echo(f"reopen them on this database (same user and password): {reopen}")
    return report


def fresh_demo_database() -> str:
    """The demo's own SQLite file under ./var/, emptied so each run starts clean."""
    DEMO_DATABASE.parent.mkdir(parents=True, exist_ok=True)
    for suffix in ("", "-wal", "-shm"):
        Path(f"{DEMO_DATABASE}{suffix}").unlink(missing_ok=True)
    return f"sqlite:///{DEMO_DATABASE.resolve()}"
