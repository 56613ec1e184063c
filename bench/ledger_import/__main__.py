"""bench/ledger_import: how fast ``otacm ledger import`` stores the shop's export, and how
long it holds SQLite's write lock.

Run it as ``.venv/bin/python bench/ledger_import [--db sqlite|postgresql|both]
[--lines N] [--quick] [--seed S] [--out results.json]`` from the repository
(``bench/README.md``). It is a benchmark, not a test: it measures, prints, and judges the
goals: at least 10,000 lines/s on each database, and on SQLite no write transaction of
the import longer than 200 ms (so that a webhook beside it never waits longer).

A seeded CSV export of N sales in the shop's format (``docs/ledger-format.md``) is
written once. Then:

1. **check** (the baseline, no database): :func:`reconciler.ledger_file.read_ledger` over the
   file, every row parsed and checked; the ceiling any import can reach.
2. For each database (a fresh SQLite file; a throwaway PostgreSQL server with its
   default configuration and production durability, ``bench/ingest/servers.py``),
   migrated with ``storage.migrate.upgrade``, :func:`reconciler.ledger.import_ledger`
   in this process, as the command calls it:

   - **first**: into an empty ledger (every sale inserted);
   - **re-import**: the same file again (every sale unchanged, nothing written);
   - **update**: the file with every tenth sale changed (its amount).

For each import: wall time and lines/s, the write transactions it ran and the longest
(from ``BEGIN`` to the end of ``COMMIT``, timed by SQLAlchemy's connection events; on
SQLite only those that take the write lock, i.e. not ``BEGIN DEFERRED``), and on SQLite a
probe process's longest wait for the write lock while the import ran (it takes and
releases the lock every 10 ms, as a webhook's insert would need it). The summary prints
the ratio PostgreSQL / SQLite of each import's lines/s. Exit status: 0 when every
import stored what the file holds (goals met or not), 1 otherwise.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import platform
import random
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPOSITORY = HERE.parents[1]
# The PostgreSQL starter is the ingest benchmark's; one copy of it.
sys.path.insert(1, str(HERE.parent / "ingest"))
sys.path.insert(1, str(REPOSITORY))

import sqlalchemy as sa  # noqa: E402
from servers import (  # noqa: E402
    BenchSetupError,
    DatabaseFactory,
    server_for,
    tree_cpu_seconds,
)

from reconciler.ledger import ImportResult, import_ledger  # noqa: E402
from reconciler.ledger_file import COLUMNS, read_ledger  # noqa: E402
from storage.engine import SQLITE_BEGIN_OPTION, make_engine, make_sessions  # noqa: E402
from storage.migrate import upgrade  # noqa: E402

DATABASES = ("sqlite", "postgresql")
LINES, QUICK_LINES = 100_000, 20_000
SEED = 20261207
NOW = dt.datetime(2026, 12, 7, 12, 0, tzinfo=dt.UTC)
GOAL_LINES_PER_SECOND = 10_000
GOAL_WRITE_SECONDS = 0.200
PARTNERS = 40
PROBE_EVERY = 0.010
IMPORTS = ("first", "re-import", "update")
HOUR = dt.timedelta(hours=1)

# The probe: a separate process that takes and releases SQLite's write lock every
# PROBE_EVERY seconds until its stdin closes, then prints its longest wait and the count.
PROBE = """
import sqlite3, sys, threading, time
done = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
db = sqlite3.connect(sys.argv[1], timeout=60, isolation_level=None)
waits = []
while not done.wait(float(sys.argv[2])):
    started = time.perf_counter()
    db.execute("BEGIN IMMEDIATE")
    waits.append(time.perf_counter() - started)
    db.execute("ROLLBACK")
print(max(waits, default=0.0), len(waits))
"""


@dataclass
class Measured:
    """One import, measured."""

    label: str
    seconds: float
    inserted: int
    updated: int
    unchanged: int
    write_transactions: int
    longest_write_seconds: float
    cpu_seconds: float = 0.0
    """CPU of this process (the import, and SQLite's work in it) and of the PostgreSQL
    server's processes: a figure the other users of a shared machine disturb less."""
    probe_longest_wait_seconds: float | None = None
    probe_samples: int = 0

    def lines_per_second(self, lines: int) -> float:
        return lines / self.seconds


@dataclass
class Result:
    """One database's imports."""

    database: str
    imports: list[Measured] = field(default_factory=list)
    error: str | None = None


def write_export(path: Path, lines: int, seed: int, changed_every: int | None = None) -> None:
    """A CSV export of ``lines`` sales (seeded); every ``changed_every``-th one repriced."""
    rng = random.Random(seed)
    partners = [
        f"{rng.getrandbits(32):08x}-{rng.getrandbits(16):04x}-4{rng.getrandbits(12):03x}-"
        f"a{rng.getrandbits(12):03x}-{rng.getrandbits(48):012x}"
        for _ in range(PARTNERS)
    ]
    start = NOW - dt.timedelta(days=7)
    with path.open("w", encoding="utf-8", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(COLUMNS)
        for n in range(lines):
            sold_at = start + dt.timedelta(seconds=rng.randrange(7 * 86_400))
            cents = rng.randrange(500, 90_000)
            if changed_every and n % changed_every == 0:
                cents += 100
            state = rng.choices(("active", "cancelled", "refunded"), (94, 3, 3))[0]
            writer.writerow(
                (
                    partners[n % PARTNERS],
                    f"WEB-{n:08d}",
                    sold_at.isoformat().replace("+00:00", "Z"),
                    rng.randint(1, 6),
                    f"{cents // 100}.{cents % 100:02d}",
                    rng.choice(("EUR", "DKK", "GBP")),
                    "no" if rng.random() < 0.1 else "",
                    f"PAY-{n:08d}" if rng.random() < 0.7 else "",
                    f"V{n:09d}" if rng.random() < 0.2 else "",
                    f"E{n}-1;E{n}-2" if rng.random() < 0.3 else "",
                    state if state != "active" else "",
                )
            )


@contextmanager
def write_transactions(engine: sa.Engine) -> Iterator[list[float]]:
    """The duration of every write transaction on ``engine`` while the block runs.

    From the ``begin`` event (after otacm's SQLite engine has sent ``BEGIN IMMEDIATE``
    and so holds the write lock) to the return of the driver's commit or rollback, which
    releases it. On SQLite a transaction begun ``DEFERRED`` takes the write lock only when
    it writes a table of the database: it counts from ``BEGIN`` if it ran an INSERT,
    UPDATE or DELETE on a table that is not ``temp.``.
    """
    durations: list[float] = []
    begun: dict[int, float] = {}
    writes: set[int] = set()
    sqlite = engine.dialect.name == "sqlite"
    dialect = engine.dialect
    original = dialect.do_commit, dialect.do_rollback

    def begin(connection: sa.Connection) -> None:
        key = id(connection.connection)
        begun[key] = time.perf_counter()
        mode = str(connection.get_execution_options().get(SQLITE_BEGIN_OPTION, "IMMEDIATE"))
        if not sqlite or mode.upper() != "DEFERRED":
            writes.add(key)

    def statement(connection: sa.Connection, cursor: Any, sql: str, *args: Any) -> None:
        if WRITE.match(sql):
            writes.add(id(connection.connection))

    def ended(key: int) -> None:
        started = begun.pop(key, None)
        if started is not None and key in writes:
            durations.append(time.perf_counter() - started)
        writes.discard(key)

    # Called with the pool's proxy of the driver connection, as Connection.connection is.
    def do_commit(proxied: Any) -> None:
        original[0](proxied)
        ended(id(proxied))

    def do_rollback(proxied: Any) -> None:
        original[1](proxied)
        ended(id(proxied))

    sa.event.listen(engine, "begin", begin)
    sa.event.listen(engine, "before_cursor_execute", statement)
    dialect.do_commit, dialect.do_rollback = do_commit, do_rollback  # type: ignore[method-assign,assignment]
    try:
        yield durations
    finally:
        dialect.do_commit, dialect.do_rollback = original  # type: ignore[method-assign]
        sa.event.remove(engine, "begin", begin)
        sa.event.remove(engine, "before_cursor_execute", statement)


WRITE = re.compile(r"\s*(INSERT\s+INTO|UPDATE|DELETE\s+FROM)\s+(?!temp\.)", re.IGNORECASE)
"""A statement that writes a table of the database (not a temporary one)."""


@contextmanager
def lock_probe(url: str) -> Iterator[list[float]]:
    """On SQLite, a process taking the write lock every 10 ms while the block runs.

    The list holds, after the block, the probe's longest wait in seconds and its number of
    attempts; it stays empty on PostgreSQL.
    """
    found: list[float] = []
    if not url.startswith("sqlite"):
        yield found
        return
    path = sa.make_url(url).database or ""
    probe = subprocess.Popen(
        [sys.executable, "-c", PROBE, path, str(PROBE_EVERY)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    time.sleep(0.2)  # started and waiting before the import begins
    try:
        yield found
    finally:
        out, _ = probe.communicate("", timeout=120)
        longest, samples = out.split()
        found.extend((float(longest), float(samples)))


def bench_database(kind: str, exports: dict[str, Path], lines: int, scratch: Path) -> Result:
    """The three imports on one kind of database."""
    result = Result(kind)
    try:
        with server_for(kind) as server:
            factory = DatabaseFactory(kind, scratch, server)
            url = factory.new("bench_ledger_import")
            upgrade(url)
            engine = make_engine(url)
            try:
                sessions = make_sessions(engine)
                for label in IMPORTS:
                    measured = measure(
                        engine, sessions, url, label, exports[label], factory.server_pid
                    )
                    result.imports.append(measured)
                    print(
                        f"{kind}: {label}: {measured.seconds:.2f} s, "
                        f"{measured.lines_per_second(lines):,.0f} lines/s",
                        flush=True,
                    )
            finally:
                engine.dispose()
    except BenchSetupError as exc:
        result.error = str(exc)
    return result


def measure(
    engine: sa.Engine, sessions: Any, url: str, label: str, path: Path, server_pid: int | None
) -> Measured:
    """One import of ``path``, as ``otacm ledger import`` runs it."""

    def cpu() -> float:
        server = 0.0 if server_pid is None else tree_cpu_seconds(server_pid)
        return time.process_time() + server

    with lock_probe(url) as probe, write_transactions(engine) as durations:
        cpu_started, started = cpu(), time.perf_counter()
        imported: ImportResult = import_ledger(
            sessions, path, connection_name="bench", now=NOW + IMPORTS.index(label) * HOUR
        )
        seconds = time.perf_counter() - started
        cpu_seconds = cpu() - cpu_started
    measured = Measured(
        label,
        seconds,
        imported.inserted,
        imported.updated,
        imported.unchanged,
        len(durations),
        max(durations, default=0.0),
        cpu_seconds,
    )
    if probe:
        measured.probe_longest_wait_seconds, measured.probe_samples = probe[0], int(probe[1])
    return measured


def expected(label: str, lines: int, changed_every: int) -> tuple[int, int, int]:
    """What each import must report: (inserted, updated, unchanged)."""
    if label == "first":
        return lines, 0, 0
    if label == "re-import":
        return 0, 0, lines
    changed = len(range(0, lines, changed_every))
    return 0, changed, lines - changed


def verdict(met: bool) -> str:
    return "PASS" if met else "FAIL"


def report(
    results: list[Result], lines: int, check_seconds: float, check_cpu: float
) -> tuple[list[str], bool]:
    """The printed table and goals; whether every import stored what it should."""
    out = [
        f"check only (parse + validate, no database): {check_seconds:.2f} s, "
        f"{lines / check_seconds:,.0f} lines/s; cpu {check_cpu:.2f} s, "
        f"{lines / check_cpu:,.0f} lines/cpu-s",
        "",
        f"{'database':<11}{'import':<10}{'seconds':>8}{'lines/s':>9}{'cpu s':>7}"
        f"{'lines/cpu-s':>12}{'ins':>8}{'upd':>8}{'same':>8}{'write tx':>9}{'longest ms':>11}"
        f"{'probe wait ms':>14}",
    ]
    valid = True
    for result in results:
        if result.error is not None:
            out.append(f"{result.database:<11}VOID: {result.error}")
            valid = False
            continue
        for m in result.imports:
            counts = (m.inserted, m.updated, m.unchanged)
            ok = counts == expected(m.label, lines, CHANGED_EVERY)
            valid = valid and ok
            probe = (
                "-"
                if m.probe_longest_wait_seconds is None
                else f"{m.probe_longest_wait_seconds * 1000:,.0f}"
            )
            out.append(
                f"{result.database:<11}{m.label:<10}{m.seconds:>8.2f}"
                f"{m.lines_per_second(lines):>9,.0f}{m.cpu_seconds:>7.2f}"
                f"{lines / m.cpu_seconds:>12,.0f}{m.inserted:>8,}{m.updated:>8,}"
                f"{m.unchanged:>8,}{m.write_transactions:>9,}"
                f"{m.longest_write_seconds * 1000:>11,.0f}{probe:>14}"
                + ("" if ok else "  <-- counts differ from the file")
            )
    out.append("")
    by_db = {result.database: result for result in results if result.error is None}
    if len(by_db) == 2:
        for sqlite_run, pg_run in zip(
            by_db["sqlite"].imports, by_db["postgresql"].imports, strict=True
        ):
            ratio = sqlite_run.seconds / pg_run.seconds
            out.append(f"PostgreSQL / SQLite lines/s, {sqlite_run.label}: {ratio:.2f}")
        out.append("")
    for result in by_db.values():
        for m in result.imports:
            rate = m.lines_per_second(lines)
            out.append(
                f"{verdict(rate >= GOAL_LINES_PER_SECOND)}  {result.database} {m.label}: "
                f">= {GOAL_LINES_PER_SECOND:,} lines/s ({rate:,.0f})"
            )
        if result.database == "sqlite":
            longest = max(m.longest_write_seconds for m in result.imports)
            waited = max(m.probe_longest_wait_seconds or 0.0 for m in result.imports)
            out.append(
                f"{verdict(longest < GOAL_WRITE_SECONDS)}  sqlite: no write transaction over "
                f"{GOAL_WRITE_SECONDS * 1000:.0f} ms (longest {longest * 1000:,.0f} ms; "
                f"the probe waited at most {waited * 1000:,.0f} ms for the lock)"
            )
    return out, valid


CHANGED_EVERY = 10


def main() -> int:
    parser = argparse.ArgumentParser(prog="bench/ledger_import", description=__doc__.split("\n")[0])
    parser.add_argument("--db", choices=(*DATABASES, "both"), default="both")
    parser.add_argument("--lines", type=int, default=None, help=f"default {LINES:,}")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_LINES:,} lines")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--out", type=Path, help="write the results as JSON too")
    args = parser.parse_args()
    lines = args.lines or (QUICK_LINES if args.quick else LINES)
    print(
        f"bench/ledger_import: {lines:,} lines, seed {args.seed}; {platform.system()} "
        f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"SQLAlchemy {sa.__version__}",
        flush=True,
    )
    kinds = DATABASES if args.db == "both" else (args.db,)
    with tempfile.TemporaryDirectory(prefix="otacm-bench-ledger-") as scratch:
        first = Path(scratch) / "export.csv"
        changed = Path(scratch) / "export-changed.csv"
        write_export(first, lines, args.seed)
        write_export(changed, lines, args.seed, changed_every=CHANGED_EVERY)
        exports = {"first": first, "re-import": first, "update": changed}
        started, cpu_started = time.perf_counter(), time.process_time()
        checked = sum(1 for item in read_ledger(first) if isinstance(item, tuple))
        check_seconds = time.perf_counter() - started
        check_cpu = time.process_time() - cpu_started
        if checked != lines:
            print(f"the generated export has {lines - checked} bad rows", file=sys.stderr)
            return 1
        results = [bench_database(kind, exports, lines, Path(scratch)) for kind in kinds]
    print()
    out, valid = report(results, lines, check_seconds, check_cpu)
    print("\n".join(out))
    if args.out is not None:
        args.out.write_text(
            json.dumps(
                {
                    "lines": lines,
                    "check_seconds": check_seconds,
                    "check_cpu_seconds": check_cpu,
                    "results": [asdict(result) for result in results],
                },
                indent=2,
            )
        )
    return 0 if valid else 1


if __name__ == "__main__":
    sys.exit(main())
