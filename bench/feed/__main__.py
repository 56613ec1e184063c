"""bench/feed: one change-feed pass over 10 / 50 / 200 / 500 partners, serial and per partner.

Run it as ``.venv/bin/python bench/feed [--db sqlite|postgresql|both] [--sizes 10,50,...]
[--workers W] [--quick]`` from the repository (``bench/README.md``). It is a benchmark,
not a test: it measures and prints; the goal is a pass over 500 partners within the poll
interval (15 s) on two nodes, and one partner answering 503 delaying only itself.

The venue is the sandbox over real HTTP with P partners and no latency, behind
:class:`tests.support.partner_faults.PartnerFaultProxy` (in every run, so all figures
carry its cost), which in the ``503`` scenario answers 503 to the first partner's
listings (the client retries them for about half a minute, then gives up). Each run
starts from a fresh database (SQLite file, or a database on a throwaway PostgreSQL
server with production's durability), so every partner is due once. Per size, scenario
and way of running, one pass — every partner followed once — is timed:

- ``serial``: :func:`heartbeat.feed.run_feed` in this process, the partners one after
  the other: what the scheduler's ``change_feed`` job was before it was split;
- ``1 x W`` and ``2 x W``: one or two real ``otacm scheduler`` processes with
  ``OTACM_FEED_WORKERS=W``, the feed a unit per partner. The pass is read from the units'
  run records: from the first unit's start to the last healthy unit's end (process
  start-up is not in it).

Printed per line: the seconds of the pass over the healthy partners, its ratio to the
same way's 10-partner figure, its speed-up over ``serial`` at that size, and the floor
the venue key's limit sets: every process on the key shares it (``OTACM_VENUE_RATE_LIMIT``
per ``OTACM_VENUE_RATE_PERIOD``, 5,400 per 300 s: 18 calls/s), however many there are,
and a pass is one listing per partner at least (``serial``: its client's own throttle,
20 calls/s). The failing partner's own run is not in
the figure: it lasts its retries whichever way the feed runs; ``serial`` makes every
partner after it wait for them.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPOSITORY = HERE.parents[1]
# The PostgreSQL starter is the ingest benchmark's; one copy of it.
sys.path.insert(1, str(HERE.parent / "ingest"))
sys.path.insert(1, str(REPOSITORY))

import sqlalchemy as sa  # noqa: E402
from servers import BenchSetupError, DatabaseFactory, postgresql_server  # noqa: E402

from heartbeat.feed import run_feed  # noqa: E402
from otacm.settings import Settings  # noqa: E402
from sandbox import Faults, SandboxConfig, SandboxServer  # noqa: E402
from sandbox.config import Partner  # noqa: E402
from storage.engine import make_engine, make_sessions  # noqa: E402
from storage.migrate import upgrade  # noqa: E402
from storage.models import ensure_connection  # noqa: E402
from storage.records import JobRun  # noqa: E402
from storage.types import utcnow  # noqa: E402
from tests.support.partner_faults import PartnerFaultProxy  # noqa: E402
from venue.client import open_client  # noqa: E402
from venue.throttle import DEFAULT_PERIOD, DEFAULT_RATE, MAX_PER_SECOND  # noqa: E402

DATABASES = ("sqlite", "postgresql")
SIZES = (10, 50, 200, 500)
QUICK_SIZES = (10, 50)
SCENARIOS = ("no faults", "503")
WORKERS = 4
POLL_INTERVAL = 15.0
"""The default poll interval: the goal's bound on a pass."""
PASS_TIMEOUT = 600.0
OVERLAP = dt.timedelta(minutes=10)


@dataclass(frozen=True)
class Figure:
    """One timed pass."""

    database: str
    scenario: str
    way: str
    partners: int
    seconds: float


def partner_ids(count: int) -> list[str]:
    """``count`` partner GUIDs, the same in every run."""
    return [f"{n:08x}-0000-4000-8000-{n:012x}" for n in range(1, count + 1)]


@contextmanager
def venue(count: int) -> Iterator[tuple[SandboxServer, PartnerFaultProxy]]:
    """The sandbox knowing ``count`` partners, and the proxy otacm talks to."""
    config = SandboxConfig(
        partners=tuple(Partner(id=p) for p in partner_ids(count)),
        pickup_interval=0,
        faults=Faults(seed=1),
    )
    with SandboxServer(config) as sandbox, PartnerFaultProxy(sandbox.url) as proxy:
        yield sandbox, proxy


def settings_for(
    url: str, sandbox: SandboxServer, proxy: PartnerFaultProxy, count: int
) -> Settings:
    """otacm configured for the proxied sandbox and its partners, on database ``url``."""
    config = sandbox.config
    return Settings(
        database_url=url,
        api_base_url=proxy.url,
        tenant=config.tenant,
        environment=config.environment,
        company=config.company,
        api_key=config.api_key,
        partner_ids=partner_ids(count),
        poll_interval=3600,  # one pass per unit in a run
    )


def environment(settings: Settings, workers: int) -> dict[str, str]:
    """The scheduler's environment: ``settings`` as ``OTACM_*``."""
    (connection,) = settings.connections
    values = {k: v for k, v in os.environ.items() if not k.startswith("OTACM_")}
    values.update(
        OTACM_DATABASE_URL=settings.database_url,
        OTACM_API_BASE_URL=connection.api_base_url,
        OTACM_TENANT=connection.tenant,
        OTACM_ENVIRONMENT=connection.environment,
        OTACM_COMPANY=connection.company,
        OTACM_API_KEY=connection.api_key.get_secret_value(),
        OTACM_PARTNER_IDS=",".join(connection.partner_ids),
        OTACM_POLL_INTERVAL=str(settings.poll_interval),
        OTACM_FEED_WORKERS=str(workers),
        OTACM_LOG_LEVEL="WARNING",
    )
    return values


def prepare(url: str, settings: Settings) -> int:
    """Migrate the database and register the connection; its id."""
    engine = make_engine(url)
    try:
        upgrade(engine)
        with make_sessions(engine).begin() as session:
            return ensure_connection(session, settings.connections[0].name)
    finally:
        engine.dispose()


def serial_pass(url: str, settings: Settings, healthy: int) -> float:
    """:func:`run_feed` over every partner in this process: seconds until the last
    healthy partner was followed (the end of the pass)."""
    connection_id = prepare(url, settings)
    (connection,) = settings.connections
    engine = make_engine(url)
    try:
        with open_client(connection) as client:
            started = time.perf_counter()
            report = run_feed(
                make_sessions(engine),
                {connection_id: client},
                {connection_id: connection.partner_ids},
                now=utcnow(),
                overlap=OVERLAP,
            )
            seconds = time.perf_counter() - started
    finally:
        engine.dispose()
    if report.partners - report.errors != healthy:
        raise BenchSetupError(f"serial pass: {report.as_dict()}, {healthy} healthy expected")
    return seconds


def scheduler_pass(
    url: str, settings: Settings, processes: int, workers: int, healthy: Sequence[str], logs: Path
) -> float:
    """``processes`` real schedulers: seconds from the first unit's start to the last
    healthy unit's end, read from the run records."""
    prepare(url, settings)
    names = {f"change_feed:{settings.connections[0].name}:{p}" for p in healthy}
    env = environment(settings, workers)
    engine = make_engine(url)
    sessions = make_sessions(engine, read_only=True)
    children: list[subprocess.Popen[bytes]] = []
    try:
        for old in logs.glob("scheduler-*.log"):
            old.unlink()
        for n in range(processes):
            with (logs / f"scheduler-{processes}-{n}.log").open("ab") as log:
                children.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "otacm", "scheduler"],
                        cwd=REPOSITORY,
                        env=env,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                )
        deadline = time.monotonic() + PASS_TIMEOUT
        while True:
            with sessions.begin() as session:
                query = sa.select(JobRun.name, JobRun.started_at, JobRun.finished_at).where(
                    JobRun.name.startswith("change_feed:")
                )
                rows = session.execute(query).all()
            ended = [row.finished_at for row in rows if row.name in names and row.finished_at]
            if len(ended) == len(names):
                first = min(row.started_at for row in rows)
                return float((max(ended) - first).total_seconds())
            if any(child.poll() is not None for child in children):
                tail = "".join(log.read_text()[-2000:] for log in logs.glob("scheduler-*.log"))
                raise BenchSetupError(f"a scheduler exited early:\n{tail}")
            if time.monotonic() > deadline:
                raise BenchSetupError(f"no full pass within {PASS_TIMEOUT:.0f} s; see {logs}")
            time.sleep(0.2)
    finally:
        for child in children:
            child.terminate()
        for child in children:
            try:
                child.wait(timeout=60)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        engine.dispose()


def run(
    database: str, sizes: Sequence[int], workers: int, directory: Path, factory: DatabaseFactory
) -> list[Figure]:
    """Every scenario, size and way on one kind of database; each figure printed as made."""
    figures: list[Figure] = []
    ways = [("serial", 0), (f"1 x {workers}", 1), (f"2 x {workers}", 2)]
    for scenario in SCENARIOS:
        for size in sizes:
            with venue(size) as (sandbox, proxy):
                everyone = partner_ids(size)
                if scenario == "503":
                    proxy.failing.add(everyone[0])
                healthy = [p for p in everyone if p not in proxy.failing]
                for way, processes in ways:
                    name = f"feed_{len(figures)}"
                    url = factory.new(name)
                    settings = settings_for(url, sandbox, proxy, size)
                    if processes == 0:
                        seconds = serial_pass(url, settings, len(healthy))
                    else:
                        seconds = scheduler_pass(
                            url, settings, processes, workers, healthy, directory
                        )
                    figure = Figure(database, scenario, way, size, seconds)
                    figures.append(figure)
                    print(
                        f"  {database:10} {scenario:9} {way:7} {size:4} partners: {seconds:6.2f} s",
                        flush=True,
                    )
    return figures


def table(figures: Sequence[Figure]) -> str:
    """The figures with their ratios: to the way's 10-partner pass, and serial over it."""
    lines = [
        f"{'database':10} {'scenario':9} {'way':7} {'partners':>8} {'pass s':>7} "
        f"{'vs 10':>6} {'serial/it':>9} {'floor s':>7} {'<= 15 s':>7}"
    ]
    by_key = {(f.database, f.scenario, f.way, f.partners): f for f in figures}
    for f in figures:
        smallest = min(
            g.partners
            for g in figures
            if (g.database, g.scenario, g.way) == (f.database, f.scenario, f.way)
        )
        base = by_key[(f.database, f.scenario, f.way, smallest)].seconds
        serial = by_key.get((f.database, f.scenario, "serial", f.partners))
        # serial: this process's client and its own throttle, as the job was.
        rate = MAX_PER_SECOND if f.way == "serial" else DEFAULT_RATE / DEFAULT_PERIOD
        floor = f.partners / rate
        speedup = f"{serial.seconds / f.seconds:8.1f}x" if serial else "-"
        lines.append(
            f"{f.database:10} {f.scenario:9} {f.way:7} {f.partners:8d} {f.seconds:7.2f} "
            f"{f.seconds / base:5.1f}x {speedup:>9} {floor:7.1f} "
            f"{'yes' if f.seconds <= POLL_INTERVAL else 'no':>7}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; 0 when every pass completed, 1 when one could not run."""
    parser = argparse.ArgumentParser(prog="bench/feed", description=__doc__.splitlines()[0])
    parser.add_argument("--db", choices=(*DATABASES, "both"), default="sqlite")
    parser.add_argument("--sizes", help="partner counts, comma-separated (default 10,50,200,500)")
    parser.add_argument("--workers", type=int, default=WORKERS, help="feed workers per process")
    parser.add_argument("--quick", action="store_true", help=f"only {QUICK_SIZES}")
    arguments = parser.parse_args(argv)
    sizes = (
        tuple(int(s) for s in arguments.sizes.split(","))
        if arguments.sizes
        else (QUICK_SIZES if arguments.quick else SIZES)
    )
    databases = DATABASES if arguments.db == "both" else (arguments.db,)
    # The sandbox's server logs each request; the client logs the 503s it retries.
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # it sets INFO when unset
    print(
        f"bench/feed on {platform.node()} ({os.cpu_count()} cores), Python "
        f"{platform.python_version()}: sizes {sizes}, {arguments.workers} feed workers a process"
    )
    figures: list[Figure] = []
    try:
        with ExitStack() as stack:
            directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="otacm-feed-")))
            for database in databases:
                server = stack.enter_context(postgresql_server()) if database != "sqlite" else None
                factory = DatabaseFactory(database, directory, server)
                figures += run(database, sizes, arguments.workers, directory, factory)
    except BenchSetupError as exc:
        print(f"bench/feed: {exc}", file=sys.stderr)
        if figures:
            print(table(figures))
        return 1
    print()
    print(table(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
