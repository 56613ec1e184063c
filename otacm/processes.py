"""otacm's processes: the inbox worker, the scheduler, and ``serve``, which runs all three
roles on one box (the web app under gunicorn is :mod:`otacm.web`).

Each role is a separate entry point (``otacm web``, ``otacm worker``, ``otacm
scheduler``) so a scaled deployment runs as many of each as it needs, on any number of
nodes sharing one PostgreSQL database; ``otacm serve`` starts one of each as child
processes and stops them together. APScheduler runs only in the scheduler role, never
inside gunicorn's workers (each worker would run every job again).

The worker and scheduler build their engine and venue clients here and close them when
they stop; the jobs themselves are plain functions of their inputs
(:func:`orders.worker.run_once`, :func:`orders.sender.run_outbox_once`, the
heartbeat's), listed with their intervals by :func:`scheduled_jobs`. Any number of
schedulers, on any number of nodes, may share one database: every run goes through
:func:`heartbeat.coordination.run_job`, which keeps each job to one run at a time (a
database lock that dies with its holder) and one run per interval (the job's run record).
Work found by the jobs is shared with the workers through the inbox's claims.
``otacm poll`` (:func:`run_poll`) runs the same jobs once, now.
"""

from __future__ import annotations

import datetime as dt
import logging
import random
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from heartbeat.coordination import (
    JobOutcome,
    ScheduledJob,
    describe_error,
    log_outcome,
    report_dict,
    run_job,
)
from heartbeat.split_jobs import SplitJob
from otacm.batch import as_batch_work
from otacm.settings import Settings
from venue.client import VenueClient
from venue.connection import VenueConnection
from venue.throttle import SharedThrottle

logger = logging.getLogger(__name__)

OUTBOX_RETRY_SECONDS = 10.0
"""How often the scheduler sends outbox rows whose earlier attempt failed."""

LOST_SUBMISSIONS_SECONDS = 60.0
"""How often the scheduler looks for submissions the venue never answered for."""

PERSONAL_DATA_SECONDS = 3600.0
"""How often the scheduler erases customers' names and e-mails past their retention."""

PRUNE_SECONDS = 3600.0
"""How often the scheduler prunes the rows past their retention (heartbeat.retention)."""

SCHEDULER_JITTER = 0.05
"""A random delay of up to this share of a job's interval is added to each tick, so that
several nodes' schedulers do not all fire in the same millisecond..."""

SCHEDULER_MAX_JITTER = 2.0
"""...but never more than this many seconds."""


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
def open_runtime(
    settings: Settings, *, stop: threading.Event | None = None, role: str = "otacm"
) -> Iterator[Runtime]:
    """The engine, sessions and venue clients of a worker or scheduler; closed on exit.

    With ``stop``, a database that cannot be reached is waited for, with backoff and one
    log line per attempt (:func:`storage.engine.retry_while_unavailable`), until it
    answers or ``stop`` is set; without it (``otacm poll``), its error is raised at once.

    Raises:
        SchemaNotCurrentError: the database is not migrated; the role cannot start.
        storage.engine.WaitStopped: ``stop`` was set while waiting for the database.
        storage.engine.DatabaseUnusable: a SQLite database whose directory cannot be made.
        sqlalchemy.exc.SQLAlchemyError: the database failed otherwise (a SQLite file that
            cannot be opened or written), or is unreachable and there is no ``stop``.
    """
    from orders.mirror import foreign_partners, forget_foreign_orders
    from orders.shop_events import deliver_to
    from receiver.metrics import VenueCallMetrics
    from storage.connections import connection_ids
    from storage.engine import (
        SQLITE_BEGIN_OPTION,
        make_engine,
        make_sessions,
        retry_while_unavailable,
    )
    from storage.migrate import is_current
    from storage.types import utcnow
    from storage.venue_limits import close_shared_throttles
    from storage.venue_limits import shared_throttle as limit
    from venue.client import open_client

    engine = make_engine(settings.database_url)
    venue_calls = VenueCallMetrics(registry=None)
    with ExitStack() as stack:
        stack.callback(engine.dispose)
        sessions = make_sessions(engine)
        deliver_to(sessions, settings.shop_endpoint_names())

        def prepare() -> dict[str, int]:
            if not is_current(engine):
                raise SchemaNotCurrentError(
                    "the database schema is not current: run `otacm db upgrade`"
                )
            ids = connection_ids(sessions, (c.name for c in settings.connections))
            # Orders of partners the settings no longer (or never) configured, mirrored
            # before: erased at every start, so that neither reconciliation nor finance
            # sees them and their customers' data does not stay. Partners change only with
            # the settings, that is with a restart. Looked for first without the write
            # lock, which a cold process would hold for tenths of a second.
            with sessions() as session:
                session.connection(execution_options={SQLITE_BEGIN_OPTION: "DEFERRED"})
                foreign = any(
                    foreign_partners(session, ids[c.name], c.partner_ids)
                    for c in settings.connections
                )
            if not foreign:
                return ids
            with sessions.begin() as session:
                for connection in settings.connections:
                    erased = forget_foreign_orders(
                        session, ids[connection.name], connection.partner_ids, utcnow()
                    )
                    if erased:
                        logger.warning(
                            "connection %s: %d mirrored orders of partners not configured "
                            "for it erased",
                            connection.name,
                            erased,
                        )
            return ids

        ids = prepare() if stop is None else retry_while_unavailable(prepare, stop=stop, what=role)
        # The keys' limits, kept with every other process and node (storage.venue_limits):
        # their waits cancelled at once on stop, their store released when the runtime
        # exits, after the clients (by then no call holds a place).
        throttles = {
            connection.name: limit(engine, connection) for connection in settings.connections
        }
        stack.callback(close_shared_throttles, throttles.values())
        if stop is not None:
            stack.enter_context(_cancelling_on(stop, throttles.values()))
        clients: dict[int, VenueClient] = {}
        for connection in settings.connections:
            throttle = throttles[connection.name]
            clients[ids[connection.name]] = stack.enter_context(
                open_client(connection, observer=venue_calls.observe, throttle=throttle)
            )
        yield Runtime(
            engine=engine,
            sessions=sessions,
            clients=clients,
            connections={ids[c.name]: c for c in settings.connections},
        )


STOP_LOOK = 0.5
"""How often the watcher of a runtime's stop looks whether the runtime has exited without
being stopped (an error), so that its thread ends with it."""


@contextmanager
def _cancelling_on(stop: threading.Event, throttles: Iterable[SharedThrottle]) -> Iterator[None]:
    """Cancel ``throttles`` as soon as ``stop`` is set, while the context lasts.

    A call waiting for a place of the venue's key that another process holds (or for the
    rate, or a ``Retry-After``) then ends at once, unsent
    (:class:`venue.throttle.ThrottleClosed`), instead of waiting its longest wait, so a
    stopping worker or scheduler exits promptly.
    """
    from storage.venue_limits import cancel_shared_throttles

    exited = threading.Event()

    def watch() -> None:
        # The stop is waited for in slices only so that the thread ends with the runtime
        # when that exits on an error: a stop is seen at once.
        while not exited.is_set():
            if stop.wait(STOP_LOOK):
                cancel_shared_throttles(throttles)
                return

    watcher = threading.Thread(target=watch, name="venue-limit-stop", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        exited.set()
        watcher.join()


class SchemaNotCurrentError(RuntimeError):
    """A worker or scheduler started on a database that is not migrated."""


def run_worker(settings: Settings, stop: threading.Event) -> None:
    """The inbox worker: fetch every notified order and mirror it, until ``stop``; beside
    it, a thread per shop endpoint sends the shop's events (:mod:`otacm.shop_senders`).

    It waits for a database that cannot be reached, at start as while running.
    """
    from orders.worker import run_forever
    from otacm.liveness import beater
    from otacm.shop_senders import shop_senders
    from storage.engine import WaitStopped
    from storage.lease import new_owner

    beat = beater(settings.liveness_dir, "worker")
    try:
        with (
            open_runtime(settings, stop=stop, role="worker") as runtime,
            # Left before the runtime: the senders settle their last POSTs on the way out.
            shop_senders(settings, runtime.engine, runtime.sessions, stop),
        ):
            run_forever(
                runtime.sessions,
                runtime.clients,
                owner=new_owner(),
                stop=stop,
                batch_size=settings.worker_batch_size,
                lease_seconds=settings.inbox_lease_seconds,
                max_attempts=settings.inbox_max_attempts,
                fetch_concurrency=settings.worker_fetch_concurrency,
                on_pass=beat,
            )
    except WaitStopped:
        logger.info("worker stopped before it could start")


def scheduled_jobs(settings: Settings, runtime: Runtime) -> list[ScheduledJob | SplitJob]:
    """The scheduler's jobs, each a thin closure over ``runtime``; see the module docstring.

    Jobs that the settings switch off (``confirm_drafts`` without
    ``auto_confirm_drafts``, ``check_subscriptions`` without ``webhook_url``) are left out.
    """
    from heartbeat.actions import confirm_paid_drafts
    from heartbeat.feed import feed_job
    from heartbeat.submissions import find_lost_submissions
    from heartbeat.subscriptions import check_subscriptions, record_checks
    from heartbeat.watchdog import check_orders
    from orders.sender import run_outbox_once
    from storage.lease import new_owner

    owner = new_owner()

    def watchdog(now: dt.datetime) -> object:
        return check_orders(
            runtime.sessions,
            now=now,
            in_flight_after=dt.timedelta(seconds=settings.in_flight_check_after),
            open_recheck=dt.timedelta(seconds=settings.open_order_recheck),
            recheck_horizon=dt.timedelta(days=settings.recheck_horizon_days),
            stuck_after=dt.timedelta(seconds=settings.stuck_after),
            connection_ids=runtime.clients.keys(),
        )

    def retry_outbox(now: dt.datetime) -> object:
        return run_outbox_once(
            runtime.sessions,
            runtime.clients,
            owner=owner,
            now=now,
            lease_seconds=settings.outbox_lease_seconds,
        )

    def lost_submissions(now: dt.datetime) -> object:
        return find_lost_submissions(
            runtime.sessions,
            runtime.clients,
            now=now,
            grace=dt.timedelta(seconds=settings.submission_grace),
        )

    def confirm_drafts(now: dt.datetime) -> object:
        return confirm_paid_drafts(
            runtime.sessions,
            runtime.clients,
            owner=owner,
            now=now,
            lease_seconds=settings.outbox_lease_seconds,
        )

    def metric_figures(now: dt.datetime) -> object:
        from heartbeat.metric_figures import refresh_figures
        from storage.engine import make_sessions

        refresh_figures(
            runtime.sessions,
            make_sessions(runtime.engine, read_only=True),
            now=now,
            stuck_after=dt.timedelta(seconds=settings.stuck_after),
        )
        return None

    change_feed = feed_job(
        runtime.sessions,
        runtime.clients,
        runtime.connections,
        interval=settings.poll_interval,
        overlap=settings.feed_overlap,
        workers=settings.feed_workers,
    )
    jobs: list[ScheduledJob | SplitJob] = [
        change_feed,
        ScheduledJob("watchdog", settings.poll_interval, watchdog),
        ScheduledJob("retry_outbox", OUTBOX_RETRY_SECONDS, retry_outbox),
        ScheduledJob("lost_submissions", LOST_SUBMISSIONS_SECONDS, lost_submissions),
        ScheduledJob("metric_figures", settings.metric_figures_interval, metric_figures),
    ]
    if settings.auto_confirm_drafts:
        jobs.append(ScheduledJob("confirm_drafts", settings.poll_interval, confirm_drafts))

    def reconcile(now: dt.datetime) -> object:
        from reconciler.engine import reconcile_connections
        from storage.records import ReconTrigger

        report = reconcile_connections(
            runtime.sessions,
            sorted(runtime.connections),
            period_from=now - dt.timedelta(days=settings.recon_lookback_days),
            period_to=now,
            now=now,
            trigger=ReconTrigger.SCHEDULED,
            actor=None,
            grace=dt.timedelta(seconds=settings.recon_grace),
            tolerance=settings.recon_amount_tolerance,
            partners={cid: conn.partner_ids for cid, conn in runtime.connections.items()},
        )
        # Once every connection has run: the job's run record shows the failure.
        report.raise_first_failure()
        return report

    jobs.append(ScheduledJob("reconcile", settings.recon_interval, reconcile))

    def erase_personal_data(now: dt.datetime) -> object:
        from heartbeat.privacy import erase_due

        return erase_due(runtime.sessions, now=now, keep_days=settings.personal_data_days)

    jobs.append(ScheduledJob("erase_personal_data", PERSONAL_DATA_SECONDS, erase_personal_data))

    def prune(now: dt.datetime) -> object:
        from heartbeat.retention import Retention, prune

        return prune(runtime.sessions, now=now, retention=Retention.of(settings))

    jobs.append(ScheduledJob("prune", PRUNE_SECONDS, prune))
    if settings.webhook_url:
        url = settings.webhook_url

        def subscriptions(now: dt.datetime) -> object:
            report = check_subscriptions(
                runtime.connections, runtime.clients, url=url, secrets_dir=settings.secrets_dir
            )
            record_checks(runtime.sessions, report, now=now)
            return report

        jobs.append(
            ScheduledJob("check_subscriptions", settings.subscription_check_interval, subscriptions)
        )
    return jobs


def run_scheduled(
    runtime: Runtime, job: ScheduledJob | SplitJob, *, owner: str, force: bool = False
) -> tuple[JobOutcome, object | None]:
    """Run one job through :func:`~heartbeat.coordination.run_job` now, and log the outcome.

    A run that did something is logged at INFO; a run that found nothing to do, a busy
    or not-due job, at DEBUG. A failure has been logged at ERROR, with its traceback, by
    ``run_job``.
    """
    from storage.types import utcnow

    outcome, report = run_job(
        runtime.engine, runtime.sessions, job, owner=owner, now=utcnow(), force=force
    )
    log_outcome(job.name, outcome, report)
    return outcome, report


def run_scheduler(settings: Settings, stop: threading.Event) -> None:
    """APScheduler in this process, running :func:`scheduled_jobs` until ``stop``.

    Every job is an interval job calling :func:`run_scheduled`; any number of schedulers
    may run against one database (:mod:`heartbeat.coordination` keeps each job to one
    run at a time and one run per interval). The first ticks come within a few seconds of
    the start, so a restarted scheduler catches up with jobs that are due. A database
    that cannot be reached is waited for at start; while running, a job that finds it
    away fails that tick, in one log line, and the next tick tries again.
    """
    from otacm.liveness import beater
    from storage.engine import WaitStopped
    from storage.lease import new_owner

    as_batch_work(settings.batch_nice)

    owner = new_owner()
    beat = beater(settings.liveness_dir, "scheduler")

    def tick(runtime: Runtime, job: ScheduledJob | SplitJob) -> None:
        # A tick that ran (whatever the job's outcome) shows the scheduler is alive.
        run_scheduled(runtime, job, owner=owner)
        beat()

    if not logger.isEnabledFor(logging.DEBUG):
        # APScheduler logs every tick at INFO; run_scheduled logs the outcomes that matter.
        logging.getLogger("apscheduler.executors").setLevel(logging.WARNING)
    try:
        with open_runtime(settings, stop=stop, role="scheduler") as runtime:
            _run_jobs(settings, runtime, tick=tick, owner=owner, stop=stop)
    except WaitStopped:
        logger.info("scheduler stopped before it could start")


def _run_jobs(
    settings: Settings,
    runtime: Runtime,
    *,
    tick: Callable[[Runtime, ScheduledJob | SplitJob], None],
    owner: str,
    stop: threading.Event,
) -> None:
    """:func:`run_scheduler`'s APScheduler, on an open runtime, calling ``tick`` for
    each due job until ``stop``."""
    from apscheduler.schedulers.background import BackgroundScheduler

    from storage.types import utcnow

    scheduler = BackgroundScheduler(timezone="UTC")
    jobs = scheduled_jobs(settings, runtime)
    for job in jobs:
        # A split job ticks more often than its units' interval: see coordination.
        jitter = min(job.tick * SCHEDULER_JITTER, SCHEDULER_MAX_JITTER)
        # One run at a time; ticks missed while one was slow are merged, not queued;
        # the jitter keeps several nodes from firing in the same millisecond.
        scheduler.add_job(
            tick,
            "interval",
            args=(runtime, job),
            seconds=job.tick,
            jitter=jitter,
            next_run_time=utcnow() + dt.timedelta(seconds=random.uniform(0, jitter)),  # noqa: S311
            id=job.name,
            name=job.name,
            max_instances=1,
            coalesce=True,
        )
    scheduler.start()
    logger.info(
        "scheduler %s started with jobs: %s",
        owner,
        ", ".join(j.id for j in scheduler.get_jobs()),
    )
    try:
        stop.wait()
    finally:
        scheduler.shutdown(wait=True)
        for job in jobs:
            job.close()


@dataclass(frozen=True)
class PollResult:
    """What one job did in ``otacm poll``.

    Attributes:
        job: the job's name.
        outcome: ran, busy (a scheduler is running it right now) or failed.
        report: the job's report as a dict (``{"error": ...}`` when it failed).
    """

    job: str
    outcome: JobOutcome
    report: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        """For ``--json``."""
        return {"job": self.job, "outcome": str(self.outcome), "report": self.report}

    def line(self) -> str:
        """One line for people: ``name: outcome key=value ...``."""
        details = " ".join(f"{key}={value}" for key, value in self.report.items())
        return f"{self.job}: {self.outcome}" + (f" {details}" if details else "")


def run_poll(settings: Settings, names: Sequence[str] = ()) -> list[PollResult]:
    """Run the scheduled jobs once now (``otacm poll``), whether due or not.

    Each job goes through :func:`~heartbeat.coordination.run_job` with ``force``: the
    run is recorded and the lock applies, so a job a scheduler is running right now is
    reported busy rather than run twice.

    Args:
        settings: the configuration.
        names: the jobs to run (default: every job the settings enable).

    Returns:
        One result per job, in the scheduler's order.

    Raises:
        SchemaNotCurrentError: the database is not migrated.
        UnknownJobError: a name is not one of the enabled jobs.
    """
    from storage.lease import new_owner

    with open_runtime(settings) as runtime:
        jobs = scheduled_jobs(settings, runtime)
        known = [job.name for job in jobs]
        unknown = [name for name in names if not any(name in job.names() for job in jobs)]
        if unknown:
            raise UnknownJobError(
                f"unknown or disabled job(s): {', '.join(unknown)} (jobs: {', '.join(known)})"
            )
        owner = new_owner()
        results = []
        for job in jobs:
            selected = job.only(names) if names else job
            if selected is None:
                continue
            outcome, report = run_scheduled(runtime, selected, owner=owner, force=True)
            if outcome is JobOutcome.FAILED:
                details = {"error": describe_error(_exception(report))}
            else:
                details = report_dict(report)
            results.append(PollResult(job.name, outcome, details))
        return results


class UnknownJobError(ValueError):
    """``otacm poll --job`` named a job that does not exist or is switched off."""


def _exception(report: object) -> BaseException:
    # run_job's companion of FAILED is the exception.
    return report if isinstance(report, BaseException) else RuntimeError(str(report))


def stop_on_signals(stop: threading.Event) -> None:
    """SIGTERM and SIGINT set ``stop``, so a role finishes its pass and exits cleanly."""

    def handle(signum: int, frame: Any) -> None:
        logger.info("signal %s: stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)


def serve(base_command: Sequence[str], bind: str, workers: int | None) -> int:
    """Run web, worker and scheduler as child processes; stop all when one stops.

    The roles inherit this process's ``PROMETHEUS_MULTIPROC_DIR`` (the caller enters
    :func:`metrics_directory`), so the web role's ``/metrics`` shows the worker's and
    scheduler's venue calls too.

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
    children = {name: subprocess.Popen(command) for name, command in roles.items()}
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
    return 0 if died is None else 1


def otacm_command(config_file: str | None, log_level: str, log_format: str = "text") -> list[str]:
    """How a child process calls ``otacm`` with the parent's global options."""
    command = [sys.executable, "-m", "otacm", "--log-level", log_level, "--log-format", log_format]
    if config_file:
        command += ["--config", config_file]
    return command
