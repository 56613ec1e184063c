"""bench/finance: the finance pages and report downloads at 100, 100k and 1M exceptions.

Run it as ``.venv/bin/python bench/finance [--db sqlite|postgresql|both] [--sizes
100,100000,1000000] [--quick] [--pages K] [--no-exports] [--formats csv,json,html,xlsx]``
from the repository (``bench/README.md``); ``--exports`` and ``--beside-download N``
measure other things instead (``exports.py``, ``beside.py``). It is a benchmark, not a
test: it measures and prints; the goals are a run page at 1M exceptions within twice the
time of one at 100, and every download at 1M finishing whole with the serving process
under 200 MiB.

One database per kind (a SQLite file; a throwaway PostgreSQL server with production's
durability, ``bench/ingest/servers.py``) holds one finished run per size, filled in bulk
SQL: N sales and N venue orders, and N exceptions of six categories, two currencies and
sixty days of first sightings (one in ten resolved), each with the run's ``opened``
event and the run's totals. Every run shares the database, so the run of 100 is read
beside the million others, as a run is in a year of history. PostgreSQL is then
``VACUUM ANALYZE``\\d, as autovacuum would.

``otacm web`` serves it (real gunicorn, one sync worker, its production timeout of 30
s). Signed in as a finance user, for each run:

- **page**: the run page (first page of 50), median of K after one untimed;
- **deep**: the page after the exception in the middle of the run (keyset), median;
- **filtered**: the page of resolved amount mismatches, with its count, median;
- **chart**: the chart image (one pass over the run's exceptions), median of 3;
- **runs**: the runs list, median;
- **csv**, **json**, **html**, **xlsx**: each download once, read to its end: seconds,
  megabytes, and the peak RSS of the worker that served it (its high-water mark, reset
  before each download through ``/proc/<pid>/clear_refs``). The CSV's end marker and
  row count, the JSON's parse (up to 100k rows) and the XLSX's rows (read back with
  openpyxl, up to 100k rows) are checked.

Each figure is printed with its ratio to the smallest size's, measured in the same run.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import statistics
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPOSITORY = HERE.parents[1]
# The PostgreSQL starter and the process helpers are the ingest benchmark's.
sys.path.insert(1, str(HERE.parent / "ingest"))
sys.path.insert(1, str(REPOSITORY))
sys.path.insert(1, str(HERE))  # exports.py, when this file is imported rather than run

import beside  # noqa: E402
import exports  # noqa: E402
import httpx  # noqa: E402
import sqlalchemy as sa  # noqa: E402
from servers import (  # noqa: E402
    BenchSetupError,
    DatabaseFactory,
    http_server,
    postgresql_server,
    run_checked,
)

from receiver.finance.auth import hash_password  # noqa: E402
from storage.engine import make_engine, make_sessions  # noqa: E402
from storage.models import ensure_connection  # noqa: E402

DATABASES = ("sqlite", "postgresql")
SIZES = (100, 100_000, 1_000_000)
QUICK_SIZES = (100, 10_000)
PAGES = 9
USER, PASSWORD = "bench", "bench-password-1"
NOW = "2026-12-07 12:00:00"
CHECK_UP_TO = 100_000
"""Downloads of up to this many rows are parsed back in full (JSON, XLSX)."""

CATEGORIES = (
    "amount_mismatch",
    "missing_at_venue",
    "quantity_mismatch",
    "venue_error",
    "draft_unconfirmed",
    "reference_mismatch",
)

# A row number, counted from 1, as the SQL dialect generates it (the scrape bench's).
_NUMBERS = {
    "sqlite": "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < :last) ",
    "postgresql": "WITH n(i) AS (SELECT generate_series(1, CAST(:last AS bigint))) ",
}


def _ago(dialect: str, seconds: str) -> str:
    """SQL for ``seconds`` (an SQL expression) before :data:`NOW`, as stored."""
    if dialect == "sqlite":
        return (
            f"strftime('%Y-%m-%d %H:%M:%S', '{NOW}', '-' || ({seconds}) || ' seconds') || '.000000'"
        )
    return f"(CAST('{NOW}+00' AS timestamptz) - ({seconds}) * interval '1 second')"


def fill_run(engine: sa.Engine, connection_id: int, size: int) -> int:
    """One finished run with ``size`` exceptions, their sales, orders, events and totals."""
    dialect = engine.dialect.name
    numbers = _NUMBERS[dialect]
    now = _ago(dialect, "0")
    day = _ago(dialect, "(i % 60) * 86400 + i % 86400")
    json = (
        'CAST(\'{"status": "Issued"}\' AS json)'
        if dialect == "postgresql"
        else ('\'{"status": "Issued"}\'')
    )
    category = (
        "CASE i % 6 "
        + " ".join(f"WHEN {index} THEN '{name}'" for index, name in enumerate(CATEGORIES))
        + " END"
    )
    with engine.begin() as connection:
        run_id = connection.execute(
            sa.text(
                "INSERT INTO recon_run (connection_id, started_at, finished_at, period_from, "  # noqa: S608
                f"period_to, trigger, state) VALUES (:connection, {now}, {now}, "
                f"{_ago(dialect, '86400 * 60')}, {now}, 'scheduled', 'finished') RETURNING id"
            ),
            {"connection": connection_id},
        ).scalar_one()
        tag = f"R{run_id}-"
        ledger_base = connection.execute(
            sa.text("SELECT COALESCE(MAX(id), 0) FROM ledger_line")
        ).scalar_one()
        order_base = connection.execute(
            sa.text("SELECT COALESCE(MAX(id), 0) FROM venue_order")
        ).scalar_one()
        parameters = {"last": size, "connection": connection_id, "tag": tag, "run": run_id}
        # The SQL is this module's own text, with numbers: nothing from outside.
        connection.execute(
            sa.text(
                numbers  # noqa: S608
                + f"""INSERT INTO ledger_line (connection_id, partner_id, shop_reference,
                    reference_key, sold_at, quantity, amount, currency, amount_includes_vat,
                    state, source, created_at, updated_at)
                SELECT :connection, 'partner', :tag || 'SHOP-' || i, :tag || 'SHOP-' || i,
                    {day}, 1, 100000000 + i * 10000,
                    CASE WHEN i % 3 = 0 THEN 'DKK' ELSE 'EUR' END, TRUE, 'active', 'import',
                    {now}, {now}
                FROM n"""  # noqa: S608
            ),
            parameters,
        )
        connection.execute(
            sa.text(
                numbers  # noqa: S608
                + f"""INSERT INTO venue_order (connection_id, order_id, partner_id,
                    sell_to_order_reference, buy_from_order_reference, reference_key, status,
                    status_changed_at, first_seen_at, updated_at)
                SELECT :connection, :tag || 'order-' || i, 'partner', :tag || 'SHOP-' || i,
                    'V-' || :tag || i, :tag || 'SHOP-' || i, 'Issued', {day}, {day}, {now}
                FROM n"""  # noqa: S608
            ),
            parameters,
        )
        connection.execute(
            sa.text(
                numbers  # noqa: S608
                + f"""INSERT INTO recon_exception (connection_id, category, subject_key,
                    subject_at, ledger_line_id, venue_order_id, currency, ledger_amount,
                    venue_amount, details, state, first_seen_run_id, last_seen_run_id,
                    first_seen_at, updated_at)
                SELECT :connection, {category}, 'ledger:partner:' || :tag || 'SHOP-' || i,
                    {day}, {ledger_base} + i, {order_base} + i,
                    CASE WHEN i % 3 = 0 THEN 'DKK' ELSE 'EUR' END, 100000000 + i * 10000,
                    90000000 + i * 10000, {json},
                    CASE WHEN i % 10 = 0 THEN 'resolved' ELSE 'open' END, :run, :run,
                    {day}, {now}
                FROM n"""  # noqa: S608
            ),
            parameters,
        )
        connection.execute(
            sa.text(
                "INSERT INTO exception_event (recon_exception_id, recon_run_id, action, at) "  # noqa: S608
                f"SELECT id, :run, 'opened', {now} FROM recon_exception "
                "WHERE first_seen_run_id = :run ORDER BY id"
            ),
            parameters,
        )
        connection.execute(
            sa.text(
                "INSERT INTO recon_total (recon_run_id, currency, category, count, "
                "ledger_amount, venue_amount) SELECT :run, currency, category, COUNT(*), "
                "SUM(ledger_amount), SUM(venue_amount) FROM recon_exception "
                "WHERE first_seen_run_id = :run GROUP BY currency, category"
            ),
            parameters,
        )
    return int(run_id)


def vacuum(engine: sa.Engine) -> None:
    """``VACUUM ANALYZE`` on PostgreSQL, as autovacuum would after a bulk load."""
    if engine.dialect.name != "postgresql":
        with engine.begin() as connection:
            connection.exec_driver_sql("ANALYZE")
        return
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.exec_driver_sql("VACUUM ANALYZE")


def middle_id(engine: sa.Engine, run_id: int, size: int) -> int:
    """The id of the run's exception in the middle, for the deep page."""
    with engine.connect() as connection:
        return int(
            connection.execute(
                sa.text(
                    "SELECT recon_exception_id FROM exception_event WHERE recon_run_id = :run "
                    "ORDER BY recon_exception_id LIMIT 1 OFFSET :half"
                ),
                {"run": run_id, "half": size // 2},
            ).scalar_one()
        )


# --- serving ---------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port free on loopback now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def otacm_environment(database_url: str, directory: Path) -> dict[str, str]:
    """The environment of ``otacm``: one venue and one finance user, nothing else."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTACM_")}
    metrics = directory / "metrics"
    metrics.mkdir(exist_ok=True)
    env.update(
        OTACM_DATABASE_URL=database_url,
        OTACM_TENANT="bench-tenant",
        OTACM_COMPANY="bench-company",
        OTACM_API_KEY="bench-api-key",
        OTACM_WEBHOOK_CLIENT_STATES="bench-client-state",
        OTACM_API_BASE_URL="http://127.0.0.1:9/",
        OTACM_FINANCE_USERS=f"{USER}:{hash_password(PASSWORD)}",
        OTACM_SECRETS_DIR=str(directory / "secrets"),
        PROMETHEUS_MULTIPROC_DIR=str(metrics),
        PYTHONPATH=str(REPOSITORY),
    )
    return env


def worker_pid(master: int) -> int:
    """The one gunicorn worker of ``master``."""
    children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    if len(children) != 1:
        raise BenchSetupError(f"expected one gunicorn worker, found {children}")
    return int(children[0])


def reset_peak(pid: int) -> None:
    """Reset the process's peak RSS (VmHWM) to its RSS now."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def peak_mib(pid: int) -> float:
    """The process's peak RSS since the last reset, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise BenchSetupError("no VmHWM in /proc status")


def signed_in(base: str) -> httpx.Client:
    """A client signed in to the finance pages through the form."""
    client = httpx.Client(base_url=base, timeout=httpx.Timeout(10.0, read=1800.0))
    form = client.get("/finance/sign-in").text
    token = form.split('name="csrf_token" value="', 1)[1].split('"', 1)[0]
    answer = client.post(
        "/finance/sign-in", data={"csrf_token": token, "name": USER, "password": PASSWORD}
    )
    if answer.status_code != 302:
        raise BenchSetupError(f"sign-in answered {answer.status_code}")
    return client


# --- measuring -------------------------------------------------------------------------


@dataclass(frozen=True)
class Figure:
    """One step at one size: seconds, and for downloads megabytes and peak MiB."""

    database: str
    step: str
    size: int
    seconds: float
    megabytes: float | None = None
    peak_mib: float | None = None
    note: str = ""


def timed_get(client: httpx.Client, path: str, times: int) -> float:
    """The median seconds of ``GET path`` (after one untimed), each answered 200."""

    def once() -> float:
        started = time.perf_counter()
        answer = client.get(path)
        elapsed = time.perf_counter() - started
        if answer.status_code != 200:
            raise BenchSetupError(f"{path} answered {answer.status_code}: {answer.text[:300]}")
        return elapsed

    once()
    return statistics.median(once() for _ in range(times))


def download(
    client: httpx.Client, path: str, pid: int, check: Callable[[bytes, Path], str], keep: Path
) -> tuple[float, float, float, str]:
    """Download ``path`` to a file: seconds, megabytes, the worker's peak MiB, and what
    ``check`` says of the content."""
    reset_peak(pid)
    started = time.perf_counter()
    size = 0
    tail = b""
    with client.stream("GET", path) as answer, keep.open("wb") as out:
        if answer.status_code != 200:
            raise BenchSetupError(f"{path} answered {answer.status_code}")
        for piece in answer.iter_bytes(1 << 20):
            out.write(piece)
            size += len(piece)
            tail = (tail + piece)[-256:]
    elapsed = time.perf_counter() - started
    peak = peak_mib(pid)
    return elapsed, size / 1e6, peak, check(tail, keep)


def check_csv(expected: int) -> Callable[[bytes, Path], str]:
    def check(tail: bytes, path: Path) -> str:
        marker = f'"# end of report: {expected} rows"'
        last = tail.decode("utf-8", "replace").strip().splitlines()[-1]
        if last != marker:
            raise BenchSetupError(f"the CSV ends with {last!r}, not {marker!r}")
        with path.open("rb") as content:
            lines = sum(1 for _ in content)
        if lines != expected + 2:
            raise BenchSetupError(f"the CSV has {lines} lines for {expected} rows")
        return "end marker and rows ok"

    return check


def check_json(expected: int) -> Callable[[bytes, Path], str]:
    def check(tail: bytes, path: Path) -> str:
        if not tail.rstrip().endswith(b"}"):
            raise BenchSetupError("the JSON does not end with }")
        if expected > CHECK_UP_TO:
            return "ends whole (not parsed)"
        data = json.loads(path.read_bytes())
        if len(data["exceptions"]) != expected:
            raise BenchSetupError(f"the JSON has {len(data['exceptions'])} rows")
        return "parsed, rows ok"

    return check


def check_html(expected: int) -> Callable[[bytes, Path], str]:
    def check(tail: bytes, path: Path) -> str:
        if f"end of report: {expected} rows".encode() not in tail:
            raise BenchSetupError("the HTML has no footer")
        return "footer ok"

    return check


def check_xlsx(expected: int) -> Callable[[bytes, Path], str]:
    def check(tail: bytes, path: Path) -> str:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
        if bad is not None:
            raise BenchSetupError(f"the XLSX's {bad} is damaged")
        if expected > CHECK_UP_TO:
            return "archive whole (rows not read)"
        from openpyxl import load_workbook

        book = load_workbook(io.BytesIO(path.read_bytes()), read_only=True)
        rows = sum(1 for _ in book["Exceptions"].iter_rows(min_row=2, values_only=True))
        book.close()
        if rows != expected:
            raise BenchSetupError(f"the XLSX has {rows} rows")
        return "read back, rows ok"

    return check


def fill(
    database: str, url: str, directory: Path, sizes: tuple[int, ...]
) -> dict[int, tuple[int, int]]:
    """One database with a run per size: each run's id and its middle exception's."""
    log = directory / f"otacm-{database}.log"
    env = otacm_environment(url, directory)
    run_checked([sys.executable, "-m", "otacm", "db", "upgrade"], env=env, log=log)
    engine = make_engine(url)
    runs: dict[int, tuple[int, int]] = {}
    try:
        with make_sessions(engine).begin() as session:
            connection_id = ensure_connection(session, "bench")
        for size in sizes:
            started = time.perf_counter()
            run_id = fill_run(engine, connection_id, size)
            print(f"  filled run {run_id}: {size:,} exceptions in "
                  f"{time.perf_counter() - started:.0f} s", flush=True)  # fmt: skip
            runs[size] = (run_id, 0)
        vacuum(engine)
        runs = {
            size: (run_id, middle_id(engine, run_id, size)) for size, (run_id, _) in runs.items()
        }
    finally:
        engine.dispose()
    return runs


def measure(
    database: str,
    url: str,
    directory: Path,
    sizes: tuple[int, ...],
    pages: int,
    formats: tuple[str, ...],
) -> Iterator[Figure]:
    """Fill one database with a run per size, serve it, and measure each run."""
    runs = fill(database, url, directory, sizes)
    log = directory / f"otacm-{database}.log"
    env = otacm_environment(url, directory)
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "otacm",
        "web",
        "--bind",
        f"127.0.0.1:{port}",
        "--workers",
        "1",
    ]
    with http_server(command, env=env, port=port, ready_path="/readyz", log=log) as process:
        pid = worker_pid(process.pid)
        client = signed_in(f"http://127.0.0.1:{port}")
        try:
            for size, (run_id, middle) in runs.items():
                base = f"/finance/runs/{run_id}"
                steps = {
                    "page": base,
                    "deep": f"{base}?after={middle}",
                    "filtered": f"{base}?state=resolved&category=amount_mismatch",
                    "runs": "/finance/",
                }
                for step, path in steps.items():
                    figure = Figure(database, step, size, timed_get(client, path, pages))
                    print_figure(figure)
                    yield figure
                figure = Figure(database, "chart", size, timed_get(client, f"{base}/chart.svg", 3))
                print_figure(figure)
                yield figure
                checks = {"csv": check_csv, "json": check_json, "html": check_html}
                checks["xlsx"] = check_xlsx
                for fmt in formats:
                    check = checks[fmt]
                    keep = directory / f"run-{run_id}.{fmt}"
                    seconds, megabytes, peak, note = download(
                        client, f"{base}/report.{fmt}", pid, check(size), keep
                    )
                    keep.unlink()
                    if worker_pid(process.pid) != pid:
                        raise BenchSetupError(f"the worker was replaced during the {fmt} download")
                    figure = Figure(database, fmt, size, seconds, megabytes, peak, note)
                    print_figure(figure)
                    yield figure
        finally:
            client.close()


def print_figure(figure: Figure) -> None:
    line = (
        f"{figure.database:10} {figure.step:8} {figure.size:>10,}  {figure.seconds * 1000:10.1f} ms"
    )
    if figure.megabytes is not None:
        line += f"  {figure.megabytes:9.1f} MB  peak {figure.peak_mib:6.1f} MiB  {figure.note}"
    print(line, flush=True)


def print_table(figures: list[Figure], sizes: tuple[int, ...]) -> None:
    """Milliseconds by size with each one's ratio to the smallest size's; peak MiB."""
    print(f"\nms (ratio to {sizes[0]:,} exceptions); downloads with the worker's peak RSS")
    print(f"{'database':10} {'step':8}" + "".join(f"{size:>26,}" for size in sizes))
    keys = list(dict.fromkeys((f.database, f.step) for f in figures))
    for database, step in keys:
        row = {f.size: f for f in figures if (f.database, f.step) == (database, step)}
        base = row[sizes[0]].seconds if sizes[0] in row else None
        cells = ""
        for size in sizes:
            if size not in row or not base:
                cells += f"{'':>26}"
                continue
            figure = row[size]
            text = f"{figure.seconds * 1000:.1f} ({figure.seconds / base:.1f}x)"
            if figure.peak_mib is not None:
                text += f" {figure.peak_mib:.0f}MiB"
            cells += f"{text:>26}"
        print(f"{database:10} {step:8}{cells}")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print a line per figure and a table at the end."""
    parser = argparse.ArgumentParser(prog="bench/finance", description=__doc__.split("\n")[0])
    parser.add_argument("--db", choices=[*DATABASES, "both"], default="both")
    parser.add_argument("--sizes", help="comma-separated exception counts (default 100,100k,1M)")
    parser.add_argument("--quick", action="store_true", help="100 and 10k only")
    parser.add_argument("--pages", type=int, default=PAGES, help="timed requests per page")
    parser.add_argument("--no-exports", action="store_true", help="pages only")
    parser.add_argument(
        "--formats", help="the downloads to time (comma-separated; default csv,json,html,xlsx)"
    )
    parser.add_argument(
        "--exports",
        action="store_true",
        help="instead of the pages: each export in a process of its own, this code against "
        "--baseline, in rows/s (formats read,csv,json,xlsx unless --formats)",
    )
    parser.add_argument(
        "--baseline", default=exports.BASELINE, help="the commit --exports compares against"
    )
    parser.add_argument(
        "--beside-download",
        type=int,
        metavar="EXCEPTIONS",
        help="instead of the pages: webhooks alone and beside an XLSX download of a run of "
        "EXCEPTIONS, OTACM_BATCH_NICE 0 against 10 (bench/finance/beside.py)",
    )
    parser.add_argument("--rounds", type=int, default=2, help="--beside-download's rounds (2)")
    arguments = parser.parse_args(argv)
    if arguments.sizes:
        sizes = tuple(int(size.replace("_", "")) for size in arguments.sizes.split(","))
    else:
        sizes = QUICK_SIZES if arguments.quick else SIZES
    databases = DATABASES if arguments.db == "both" else (arguments.db,)
    default_formats = exports.FORMATS if arguments.exports else ("csv", "json", "html", "xlsx")
    formats = tuple(arguments.formats.split(",")) if arguments.formats else default_formats
    figures: list[Figure] = []
    try:
        with ExitStack() as stack:
            directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="finance-")))
            baseline = exports.unpack(arguments.baseline, directory) if arguments.exports else None
            for database in databases:
                server = stack.enter_context(postgresql_server()) if database != "sqlite" else None
                factory = DatabaseFactory(database, directory, server)
                url = factory.new("bench_finance")
                if arguments.beside_download:
                    size = arguments.beside_download
                    ((run_id, _),) = fill(database, url, directory, (size,)).values()
                    print(f"{database}: webhooks beside an XLSX of {size:,} exceptions")
                    beside.measure(
                        otacm_environment(url, directory),
                        directory,
                        free_port,
                        run_id,
                        signed_in,
                        arguments.rounds,
                    )
                    continue
                if baseline is not None:
                    runs = {
                        size: run
                        for size, (run, _) in fill(database, url, directory, sizes).items()
                    }
                    compared = list(exports.compare(url, runs, formats, baseline, directory))
                    exports.print_table(database, compared, sizes)
                    continue
                figures += measure(
                    database,
                    url,
                    directory,
                    sizes,
                    arguments.pages,
                    () if arguments.no_exports else formats,
                )
    except BenchSetupError as exc:
        print(f"bench/finance: {exc}", file=sys.stderr)
        return 1
    if figures:
        print_table(figures, sizes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
