"""otacm's processes: the web app under gunicorn, the inbox worker, the scheduler, and
``serve``, which runs all three on one box.

Each role is a separate entry point (``otacm web``, ``otacm worker``, ``otacm
scheduler``) so a scaled deployment runs as many of each as it needs, on any number of
nodes sharing one PostgreSQL database; ``otacm serve`` starts one of each as child
processes and stops them together. APScheduler runs only in the scheduler role, never
inside gunicorn's workers (each worker would run every job again).

The worker and scheduler build their engine and venue clients here and close them when
they stop; the jobs themselves are plain functions of their inputs
(:func:`receiver.worker.run_once`, :func:`receiver.outbox.run_outbox_once`).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from otacm.settings import Settings, VenueConnection
from venue.client import VenueClient

logger = logging.getLogger(__name__)

OUTBOX_RETRY_SECONDS = 10.0
"""How often the scheduler sends outbox rows whose earlier attempt failed."""


def gunicorn_options(bind: str, workers: int | None = None) -> dict[str, Any]:
    """The production gunicorn settings for the receiver (also ``deploy/gunicorn.conf.py``).

    Sync workers, about two per core plus one: each request is short (parse, one INSERT,
    commit) and the commit waits on the disk, so a few more processes than cores keep the
    cores busy. Requests never wait on the venue: that work is the worker's.
    """
    return {
        "bind": bind,
        "workers": workers or (2 * (os.cpu_count() or 1) + 1),
        "worker_class": "sync",
        "timeout": 30,
        "graceful_timeout": 20,
        # Webhooks are small; a request line or header beyond these is not the venue.
        "limit_request_line": 8190,
        "limit_request_fields": 100,
        "accesslog": None,
        "errorlog": "-",
        "loglevel": "info",
        "proc_name": "otacm-web",
    }


def run_web(settings: Settings, options: dict[str, Any]) -> None:
    """Serve ``receiver.create_app(settings)`` under gunicorn until it is stopped."""
    from gunicorn.app.base import BaseApplication

    from receiver import create_app

    class WebApplication(BaseApplication):  # type: ignore[misc]
        def load_config(self) -> None:
            for key, value in options.items():
                self.cfg.set(key, value)

        def load(self) -> Any:
            return create_app(settings)

    WebApplication().run()


@dataclass
class Runtime:
    """What the worker and scheduler roles share: the database and each connection's client.

    ``connections`` and ``clients`` are keyed by the connection's row id.
    """

    engine: Engine
    sessions: sessionmaker[Session]
    clients: dict[int, VenueClient]
    connections: dict[int, VenueConnection]


@contextmanager
def open_runtime(settings: Settings) -> Iterator[Runtime]:
    """The engine, sessions and venue clients of a worker or scheduler; closed on exit.

    Raises:
        SchemaNotCurrentError: the database is not migrated; the role cannot start.
    """
    from receiver.metrics import VenueCallMetrics
    from storage.engine import make_engine, make_sessions
    from storage.migrate import is_current
    from storage.models import ensure_connection
    from venue.client import open_client

    engine = make_engine(settings.database_url)
    venue_calls = VenueCallMetrics(registry=None)
    with ExitStack() as stack:
        stack.callback(engine.dispose)
        if not is_current(engine):
            raise SchemaNotCurrentError(
                "the database schema is not current: run `otacm db upgrade`"
            )
        sessions = make_sessions(engine)
        clients: dict[int, VenueClient] = {}
        with sessions.begin() as session:
            ids = {c.name: ensure_connection(session, c.name) for c in settings.connections}
        for connection in settings.connections:
            clients[ids[connection.name]] = stack.enter_context(
                open_client(connection, observer=venue_calls.observe)
            )
        yield Runtime(
            engine=engine,
            sessions=sessions,
            clients=clients,
            connections={ids[c.name]: c for c in settings.connections},
        )


class SchemaNotCurrentError(RuntimeError):
    """A worker or scheduler started on a database that is not migrated."""


def run_worker(settings: Settings, stop: threading.Event) -> None:
    """The inbox worker: fetch every notified order and mirror it, until ``stop``."""
    from receiver.worker import new_owner, run_forever

    with open_runtime(settings) as runtime:
        run_forever(
            runtime.sessions,
            runtime.clients,
            owner=new_owner(),
            stop=stop,
            batch_size=settings.worker_batch_size,
            lease_seconds=settings.inbox_lease_seconds,
            max_attempts=settings.inbox_max_attempts,
        )


def scheduled_jobs(
    settings: Settings, runtime: Runtime
) -> list[tuple[str, float, Callable[[], None]]]:
    """The scheduler's jobs as (name, interval in seconds, function of nothing)."""
    from receiver.outbox import run_outbox_once
    from receiver.worker import new_owner
    from storage.types import utcnow

    owner = new_owner()

    def retry_outbox() -> None:
        report = run_outbox_once(runtime.sessions, runtime.clients, owner=owner, now=utcnow())
        if report.claimed:
            logger.info("outbox pass: %s", report.as_dict())

    return [("retry_outbox", OUTBOX_RETRY_SECONDS, retry_outbox)]


def run_scheduler(settings: Settings, stop: threading.Event) -> None:
    """APScheduler in this process only, running :func:`scheduled_jobs` until ``stop``."""
    from apscheduler.schedulers.background import BackgroundScheduler

    with open_runtime(settings) as runtime:
        scheduler = BackgroundScheduler(timezone="UTC")
        for name, seconds, job in scheduled_jobs(settings, runtime):
            # One run at a time; runs missed while one was slow are merged, not queued.
            scheduler.add_job(
                job, "interval", seconds=seconds, id=name, max_instances=1, coalesce=True
            )
        scheduler.start()
        logger.info(
            "scheduler started with jobs: %s", ", ".join(j.id for j in scheduler.get_jobs())
        )
        try:
            stop.wait()
        finally:
            scheduler.shutdown(wait=True)


def stop_on_signals(stop: threading.Event) -> None:
    """SIGTERM and SIGINT set ``stop``, so a role finishes its pass and exits cleanly."""

    def handle(signum: int, frame: Any) -> None:
        logger.info("signal %s: stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)


def serve(base_command: Sequence[str], bind: str, workers: int | None) -> int:
    """Run web, worker and scheduler as child processes; stop all when one stops.

    Args:
        base_command: how to call ``otacm`` with this process's global options.
        bind: where the web role listens.
        workers: gunicorn worker processes (``None``: two per core plus one).

    Returns:
        The exit status: 0 after a requested stop, 1 when a role died on its own.
    """
    web = [*base_command, "web", "--bind", bind]
    if workers:
        web += ["--workers", str(workers)]
    roles = {
        "web": web,
        "worker": [*base_command, "worker"],
        "scheduler": [*base_command, "scheduler"],
    }
    stop = threading.Event()
    stop_on_signals(stop)
    # One metrics directory for the three roles, so the web role's /metrics shows the
    # worker's and scheduler's venue calls too.
    environment = dict(os.environ)
    metrics_directory = tempfile.mkdtemp(prefix="otacm-metrics-")
    environment["PROMETHEUS_MULTIPROC_DIR"] = metrics_directory
    children = {name: subprocess.Popen(command, env=environment) for name, command in roles.items()}
    logger.info("serve: web on %s, worker and scheduler started", bind)
    died: str | None = None
    while not stop.is_set() and died is None:
        for name, child in children.items():
            if child.poll() is not None:
                died = name
                logger.error("serve: the %s role exited with %s", name, child.returncode)
                break
        stop.wait(0.5)
    for child in children.values():
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    for child in children.values():
        try:
            child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    shutil.rmtree(metrics_directory, ignore_errors=True)
    return 0 if died is None else 1


def otacm_command(config_file: str | None, log_level: str) -> list[str]:
    """How a child process calls ``otacm`` with the parent's global options."""
    command = [sys.executable, "-m", "otacm", "--log-level", log_level]
    if config_file:
        command += ["--config", config_file]
    return command
