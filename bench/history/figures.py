"""Each figure of ``bench/history``, measured through the entry point an operator uses.

- **claim**: the worker's 50-row claim of the inbox (:func:`orders.worker.claim_batch`,
  filtered by connection as the worker's pass is), median of :data:`CLAIMS`, commit
  included.
- **jobs**: the scheduler's own jobs (:func:`otacm.processes.scheduled_jobs`, each run
  through :func:`heartbeat.coordination.run_job` as the scheduler and ``otacm poll`` run
  it, with the history's "now"): ``metric_figures``, the change feed (every job whose
  name starts with ``change_feed``) against the sandbox holding :data:`FEED_ORDERS`
  settled orders, and the 7-day ``reconcile``.
- **scrape**: ``GET /metrics`` from ``otacm web`` (gunicorn), median of :data:`SCRAPES`.
- **run page**: ``GET /finance/runs/<id>`` (signed in) of the runs holding 100 / 100k /
  1M exceptions, to its last byte; gunicorn's worker timeout applies, as in production.
- **export**: ``otacm report RUN --format xlsx``, a process of its own: wall time and its
  peak RSS (its own ``VmHWM``, read as it runs).
- **webhook p99**: webhooks POSTed at :data:`WEBHOOK_RATE` a second to ``otacm web``, each
  latency counted from when it was due (so a stall shows in full); first with nothing
  else running, then beside ``otacm worker`` (fetching every webhook's order from the
  sandbox), ``otacm reconcile`` of the whole year and ``otacm ledger import`` of
  :data:`IMPORT_LINES` new sales, all at once, until the last two have ended; again
  until :data:`BUSY_POSTS` were timed (:func:`beside_load`). The webhooks come from a
  process of their own (``prober.py``), as the venue's come from its machines.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack, closing
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Run as a process of its own (see main): the same path as the benchmark's.
for entry in (HERE.parents[1], HERE, HERE.parent / "ingest"):
    if str(entry) not in sys.path:
        sys.path.insert(1, str(entry))

import httpx  # noqa: E402
from bodies import WEBHOOK_PATH  # noqa: E402
from build import NOW, PARTNERS, SPAN, History  # noqa: E402
from prober import Prober  # noqa: E402
from stack import (  # noqa: E402
    otacm_environment,
    otacm_settings,
    role,
    run_command,
    signed_in,
    utc_text,
    venue,
    web,
)

from heartbeat.coordination import JobOutcome, ScheduledJob, run_job  # noqa: E402
from orders.worker import claim_batch  # noqa: E402
from otacm.processes import open_runtime, scheduled_jobs  # noqa: E402
from sandbox import SandboxServer  # noqa: E402
from storage.engine import make_engine, make_sessions  # noqa: E402
from storage.models import VenueConnection  # noqa: E402
from venue.models import OrderRequest  # noqa: E402

CLAIMS = 20
BATCH = 50
SCRAPES = 10
FEED_ORDERS = 200
WEBHOOK_RATE = 20.0
IDLE_SECONDS = 10.0
IMPORT_LINES = 100_000
BUSY_POSTS = 1_000
"""Webhooks the busy p99 is taken over, at least: over the 150-300 of one round beside a
small history's short reconciliation, a p99 is the second or third slowest POST."""
BUSY_ROUNDS = 5
EXPORT_TIMEOUT = 1800.0
"""Seconds an export may take before it is killed (and printed so): room for a million
rows on a loaded machine."""
FIGURES = ("claim", "scrape", "run_page", "export", "feed", "reconcile", "webhook")
"""What ``--only`` can pick; each measures the figures of that name."""


@dataclass
class Measured:
    """One size's figures: name -> value, in the unit the name's row says."""

    values: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def measure_apart(
    url: str,
    history: History,
    directory: Path,
    only: set[str],
    import_lines: int,
) -> Measured:
    """:func:`measure` in a process of its own, which prints its notes as it goes.

    otacm's roles are built once per process (their metrics register globally), and a
    fresh process per size leaves nothing of one size's caches to the next.

    Raises:
        RuntimeError: the measurement failed; its traceback was printed.
    """
    out = directory / "figures.json"
    request = {
        "url": url,
        "history": history.as_dict(),
        "directory": str(directory),
        "only": sorted(only),
        "import_lines": import_lines,
        "out": str(out),
    }
    done = subprocess.run([sys.executable, __file__, json.dumps(request)], check=False)
    if done.returncode != 0 or not out.exists():
        raise RuntimeError(f"the measurement failed (exit {done.returncode})")
    values = json.loads(out.read_text())
    return Measured(values={str(k): float(v) for k, v in values.items()})


def main(argv: list[str]) -> int:
    """The process :func:`measure_apart` starts: one JSON argument, the figures to a file."""
    request = json.loads(argv[0])
    measured = measure(
        request["url"],
        History.from_dict(request["history"]),
        Path(request["directory"]),
        set(request["only"]),
        int(request["import_lines"]),
        lambda text: print(text, flush=True),
    )
    Path(request["out"]).write_text(json.dumps(measured.values))
    return 0


def measure(
    url: str,
    history: History,
    directory: Path,
    only: set[str],
    import_lines: int,
    note: Callable[[str], None],
) -> Measured:
    """Every figure in ``only`` on the working copy at ``url``."""
    out = Measured()

    def record(name: str, value: float, text: str) -> None:
        out.values[name] = value
        note(f"  {name:28} {text}")

    with ExitStack() as stack:
        sandbox = stack.enter_context(venue())
        settings = otacm_settings(url, sandbox, directory)
        environment = otacm_environment(settings, directory)
        if "claim" in only:
            claim = claim_ms(url, history)
            record("claim ms", claim, f"{claim:.2f} ms")
        runtime = stack.enter_context(open_runtime(settings))
        # A job done as units of work (one per partner, say) is run unit by unit: a pass.
        jobs = [unit for job in scheduled_jobs(settings, runtime) for unit in _units(job)]

        def job_seconds(prefix: str) -> float:
            chosen = [job for job in jobs if job.name.startswith(prefix)]
            if not chosen:
                raise RuntimeError(f"no scheduled job is named {prefix}")
            started = time.perf_counter()
            for job in chosen:
                outcome, report = run_job(
                    runtime.engine, runtime.sessions, job, owner="bench", now=NOW, force=True
                )
                if outcome is not JobOutcome.RAN:
                    raise RuntimeError(f"job {job.name}: {outcome} {report}")
            return time.perf_counter() - started

        if only & {"scrape", "run_page"}:
            figures = job_seconds("metric_figures")
            record("metric_figures job s", figures, f"{figures:.2f} s")
            base = stack.enter_context(web(environment, directory / "web.log"))
            if "scrape" in only:
                scrape = scrape_ms(base)
                record("scrape ms", scrape, f"{scrape:.2f} ms")
            if "run_page" in only:
                with closing(signed_in(base)) as client:
                    for count, run_id in history.exception_runs.items():
                        seconds, text = run_page(client, run_id)
                        record(f"run page {_short(count)} s", seconds, text)
        if "export" in only:
            # What any command costs before it does anything: a report of no run.
            _, start, _ = run_command(
                ["report", "0", "--format", "xlsx", "-o", str(directory / "none.xlsx")],
                environment,
                directory / "report.log",
            )
            record("command start s", start, f"{start:.2f} s (otacm report of no run)")
            for count, run_id in history.exception_runs.items():
                seconds, rss, text = export(run_id, environment, directory)
                record(f"export {_short(count)} s", seconds, text)
                out.values[f"export {_short(count)} MiB"] = rss
        if "feed" in only:
            settle_orders(sandbox, FEED_ORDERS)
            seconds = job_seconds("change_feed")
            record("feed pass s", seconds, f"{seconds:.2f} s ({FEED_ORDERS} orders at the venue)")
        if "reconcile" in only:
            seconds = job_seconds("reconcile")
            record("reconcile 7 days s", seconds, f"{seconds:.2f} s")
        if "webhook" in only:
            base = stack.enter_context(web(environment, directory / "web-webhooks.log"))
            url = base + WEBHOOK_PATH
            # Each gunicorn worker's first requests: not timed.
            Prober(url, WEBHOOK_RATE).run_for(1.0)
            idle = Prober(url, WEBHOOK_RATE)
            idle.run_for(IDLE_SECONDS)
            record("webhook p99 idle ms", idle.p99_ms, idle.summary())
            busy, load = beside_load(base, environment, directory, import_lines)
            record("webhook p99 busy ms", busy.p99_ms, busy.summary())
            out.values["webhook failed busy"] = float(busy.failed)
            for name, value in load.items():
                record(name, value, f"{value:.0f}" if name == "busy rounds" else f"{value:.2f} s")
    return out


def _units(job: object) -> list[ScheduledJob]:
    """A scheduled job's units of work, or the job itself when it has none."""
    units = getattr(job, "units", None)
    if units:
        return list(units)
    assert isinstance(job, ScheduledJob)
    return [job]


def _short(count: int) -> str:
    return (
        f"{count // 1_000_000}M"
        if count >= 1_000_000
        else (f"{count // 1000}k" if count >= 1000 else str(count))
    )


# --- claim -----------------------------------------------------------------------------------


def claim_ms(url: str, history: History) -> float:
    """The median milliseconds of a 50-row claim, after one untimed claim."""
    engine = make_engine(url)
    try:
        sessions = make_sessions(engine)
        with sessions.begin() as session:
            scope = set(session.scalars(VenueConnection.__table__.select().with_only_columns(
                VenueConnection.id)))  # fmt: skip
        claims = max(min(CLAIMS, history.pending_inbox // BATCH - 1), 1)
        times = []
        for number in range(claims + 1):
            started = time.perf_counter()
            taken = claim_batch(
                sessions, owner=f"bench-{number}", now=dt.datetime.now(dt.UTC), limit=BATCH,
                lease_seconds=600, connection_ids=scope, max_attempts=8,
            )  # fmt: skip
            if number:
                times.append(time.perf_counter() - started)
            if not taken:
                raise RuntimeError("a claim found no due inbox row")
        return statistics.median(times) * 1000
    finally:
        engine.dispose()


# --- /metrics, the finance pages, the export -----------------------------------------------------


def scrape_ms(base: str) -> float:
    """The median milliseconds of ``GET /metrics``, after one untimed scrape."""
    times = []
    with httpx.Client(base_url=base, timeout=120) as client:
        for number in range(SCRAPES + 1):
            started = time.perf_counter()
            answer = client.get("/metrics")
            if number:
                times.append(time.perf_counter() - started)
            answer.raise_for_status()
    return statistics.median(times) * 1000


def run_page(client: httpx.Client, run_id: int) -> tuple[float, str]:
    """Seconds to read a run's page to its end; and how it ended."""
    started = time.perf_counter()
    size = 0
    status = 0
    try:
        with client.stream("GET", f"/finance/runs/{run_id}") as answer:
            status = answer.status_code
            for chunk in answer.iter_bytes():
                size += len(chunk)
        ended = "ok" if status == 200 else f"HTTP {status}"
    except httpx.HTTPError as exc:  # the worker killed mid-page: a cut answer
        ended = f"cut ({type(exc).__name__})"
    seconds = time.perf_counter() - started
    return seconds, f"{seconds:.2f} s, {size / 1024:,.0f} KiB, {ended}"


def export(run_id: int, environment: dict[str, str], directory: Path) -> tuple[float, float, str]:
    """``otacm report RUN --format xlsx``: seconds, peak RSS in MiB, and how it ended."""
    target = directory / f"run-{run_id}.xlsx"
    status, seconds, rss = run_command(
        ["report", str(run_id), "--format", "xlsx", "-o", str(target)],
        environment,
        directory / "report.log",
        timeout=EXPORT_TIMEOUT,
        capped=True,
    )
    size = target.stat().st_size if target.exists() else 0
    target.unlink(missing_ok=True)
    if status is None:
        ended = f"killed after {EXPORT_TIMEOUT:.0f} s"
    else:
        ended = "ok" if status == 0 else f"failed (exit {status}; see report.log)"
    mib = rss / 1_048_576
    return (
        seconds,
        mib,
        f"{seconds:.2f} s, peak {mib:.0f} MiB, {size / 1024:,.0f} KiB file, {ended}",
    )


# --- the venue --------------------------------------------------------------------------------


def settle_orders(server: SandboxServer, count: int) -> None:
    """``count`` orders created at the venue and settled (one pickup), for the feed to read."""
    from venue.client import open_client
    from venue.connection import VenueConnection as Connection
    from venue.throttle import Throttle

    config = server.config
    connection = Connection(
        api_base_url=server.url, tenant=config.tenant, environment=config.environment,
        company=config.company, api_key=config.api_key, partner_ids=[],
    )  # fmt: skip
    visit = (dt.datetime.now(dt.UTC) + dt.timedelta(days=30)).date().isoformat()
    with open_client(connection, throttle=Throttle(max_in_flight=5, rate=1_000_000)) as client:
        for number in range(count):
            client.create_order(
                OrderRequest.model_validate(
                    {
                        "partnerId": PARTNERS[number % 2],
                        "sellToOrderReference": f"FEED-{number:05d}",
                        "paymentReference": f"PAY-FEED-{number:05d}",
                        "items": [
                            {
                                "itemNumber": "31001",
                                "visitDate": visit,
                                "visitTime": "10:00:00",
                                "quantity": 1,
                            }
                        ],
                    }
                )
            )
    server.tick()


# --- webhooks beside the work -------------------------------------------------------------------


def write_import(path: Path, lines: int, revision: int = 0) -> None:
    """A CSV export of ``lines`` new sales of the history's partners, in its last week;
    each ``revision`` the same sales at other amounts (an import that updates them all)."""
    from reconciler.ledger_file import COLUMNS

    start = NOW - dt.timedelta(days=7)
    with path.open("w", encoding="utf-8", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(COLUMNS)
        for n in range(lines):
            sold = start + dt.timedelta(seconds=n * 7 * 86_400 // max(lines, 1))
            cents = 500 + (n * 7919 + revision * 101) % 9500
            writer.writerow(
                (PARTNERS[n % 2], f"IMP-{n:08d}", sold.isoformat().replace("+00:00", "Z"),
                 1 + n % 3, f"{cents // 100}.{cents % 100:02d}", "EUR", "", f"PAY-IMP-{n:08d}",
                 "", "", "")
            )  # fmt: skip


def beside_load(
    base: str, environment: dict[str, str], directory: Path, import_lines: int
) -> tuple[Prober, dict[str, float]]:
    """Webhooks probed while a worker runs and a year's reconciliation and an import go on.

    The load is run again until :data:`BUSY_POSTS` webhooks were timed beside it,
    :data:`BUSY_ROUNDS` times at most: the import's sales again, each at another amount,
    so that every line is updated and the ledger the year's reconciliation reads stays
    the same size; the year's reconciliation again. Each command's figure is its mean
    over the rounds.
    """
    seconds: dict[str, list[float]] = {}
    failures: list[str] = []

    def command(name: str, args: list[str]) -> None:
        status, took, _ = run_command(args, environment, directory / f"{name}.log")
        seconds.setdefault(f"{name} during s", []).append(took)
        if status != 0:
            failures.append(f"{name} ended {status}")

    prober = Prober(base + WEBHOOK_PATH, WEBHOOK_RATE)
    rounds = 0
    with role(["worker"], environment, directory / "worker.log"):
        time.sleep(2)  # the worker's first claims, of the history's backlog
        while rounds < BUSY_ROUNDS and not failures and len(prober.latencies) < BUSY_POSTS:
            ledger = directory / f"import-{rounds}.csv"
            write_import(ledger, import_lines, rounds)
            rounds += 1
            with prober.running():
                threads = [
                    threading.Thread(
                        target=command,
                        args=("reconcile", ["reconcile", "--from", utc_text(NOW - dt.timedelta(
                            seconds=SPAN)), "--to", utc_text(NOW)]),
                    ),
                    threading.Thread(target=command, args=("import", ["ledger", "import",
                                                                      str(ledger)])),
                ]  # fmt: skip
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join()
            ledger.unlink(missing_ok=True)
    if failures:
        raise RuntimeError("; ".join(failures))
    figures = {name: statistics.mean(values) for name, values in seconds.items()}
    figures["busy rounds"] = float(rounds)
    return prober, figures


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
