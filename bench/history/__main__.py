"""bench/history: every cost of otacm's that could grow with its history, in one run.

Run it as ``.venv/bin/python bench/history [--db sqlite|postgresql|both] [--sizes
10k,100k,1M] [--cache-dir DIR] [--only FIGURE,...] [--import-lines N] [--out FILE]``
from the repository (``bench/README.md``). It is a benchmark, not a test: it measures and
prints; the goals are figures that stay flat as the history grows.

For each database and size N, a year of history of N orders (:mod:`build`: the mirror,
inbox, outbox, status changes, ledger, daily reconciliation runs with their exceptions,
and runs of 100 / 100k / 1M exceptions) is built once and cached under ``--cache-dir``
(SQLite files; a PostgreSQL server's data directory with a template database per size),
then copied for the measurements (:mod:`figures`), which write. Printed per size as it
goes, then a table of every figure by size with its ratio to the smallest size's, and
each run page's and export's ratio to the 100-exception one of the same size.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from contextlib import ExitStack
from functools import partial
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPOSITORY = HERE.parents[1]
# The PostgreSQL starter and the webhook bodies are the ingest benchmark's; one copy each.
sys.path.insert(1, str(HERE.parent / "ingest"))
sys.path.insert(1, str(HERE))
sys.path.insert(1, str(REPOSITORY))

import sqlalchemy as sa  # noqa: E402
from build import VERSION, History, build  # noqa: E402
from figures import FIGURES, IMPORT_LINES, Measured, measure_apart  # noqa: E402
from servers import BenchSetupError  # noqa: E402
from stack import Cache, cached_postgresql  # noqa: E402

DATABASES = ("sqlite", "postgresql")
SIZES = (10_000, 100_000, 1_000_000)
CACHE_DIR = REPOSITORY / "var" / "bench-history"
ROWS = (
    "claim ms",
    "webhook p99 idle ms",
    "webhook p99 busy ms",
    "webhook failed busy",
    "metric_figures job s",
    "scrape ms",
    "feed pass s",
    "reconcile 7 days s",
    "run page 100 s",
    "run page 100k s",
    "run page 1M s",
    "command start s",
    "export 100 s",
    "export 100k s",
    "export 1M s",
    "export 100 MiB",
    "export 100k MiB",
    "export 1M MiB",
    "reconcile during s",
    "import during s",
)
"""The table's rows, in order: a figure's name ends with its unit."""


def size_of(text: str) -> int:
    """``10k``, ``1M``, ``200`` or ``1_000`` as a number."""
    text = text.strip().replace("_", "")
    factor = {"k": 1_000, "M": 1_000_000}.get(text[-1:], 1)
    return int(text[:-1] if factor > 1 else text) * factor


def label(size: int) -> str:
    """A size as ``--sizes`` writes it."""
    for factor, suffix in ((1_000_000, "M"), (1_000, "k")):
        if size >= factor and size % factor == 0:
            return f"{size // factor}{suffix}"
    return str(size)


def main(argv: list[str] | None = None) -> int:
    """Build what is not cached, measure every size on every database, print the table."""
    parser = argparse.ArgumentParser(prog="bench/history", description=__doc__.split("\n")[0])
    parser.add_argument("--db", choices=[*DATABASES, "both"], default="both")
    parser.add_argument("--sizes", default="10k,100k,1M", help="orders of history, e.g. 10k,1M")
    parser.add_argument("--cache-dir", type=Path, default=CACHE_DIR, help="built histories")
    parser.add_argument("--only", help=f"comma-separated figures of {', '.join(FIGURES)}")
    parser.add_argument("--import-lines", type=int, default=IMPORT_LINES)
    parser.add_argument("--out", type=Path, help="write the figures as JSON too")
    arguments = parser.parse_args(argv)
    try:
        sizes = tuple(size_of(size) for size in arguments.sizes.split(","))
    except ValueError:
        parser.error(f"--sizes takes order counts like 10k,100k,1M, not {arguments.sizes!r}")
    if min(sizes) < 1:
        parser.error("--sizes: a history holds at least one order")
    only = set(FIGURES if not arguments.only else arguments.only.split(","))
    if only - set(FIGURES):
        parser.error(f"--only takes {', '.join(FIGURES)}")
    databases = DATABASES if arguments.db == "both" else (arguments.db,)

    results: dict[str, dict[int, Measured]] = {}
    try:
        for database in databases:
            results[database] = run_database(database, sizes, arguments, only)
    except BenchSetupError as exc:
        print(f"bench/history: {exc}", file=sys.stderr)
        return 1
    for database, measured in results.items():
        print_table(database, measured, sizes)
    if arguments.out is not None:
        arguments.out.write_text(
            json.dumps(
                {db: {str(size): m.values for size, m in by.items()} for db, by in results.items()},
                indent=1,
            )
        )
    return 0


def run_database(
    database: str, sizes: tuple[int, ...], arguments: argparse.Namespace, only: set[str]
) -> dict[int, Measured]:
    """Every size on one database: built (or found in the cache), copied, measured."""
    measured: dict[int, Measured] = {}
    with ExitStack() as stack:
        directory = arguments.cache_dir / database
        directory.mkdir(parents=True, exist_ok=True)
        server = None
        if database == "postgresql":
            server = stack.enter_context(cached_postgresql(directory / "server"))
        cache = Cache(database, directory, server)
        for size in sizes:
            meta = cache.built(size, VERSION)
            if meta is None:
                started = time.perf_counter()
                meta = cache.build(size, VERSION, partial(_fill, size=size))
                took = time.perf_counter() - started
                print(
                    f"{database} {label(size)}: built in {took:.0f} s: {meta['rows']}", flush=True
                )
            history = History.from_dict(meta)
            # The machine may be shared: its load says how far to trust the figures.
            load = ", ".join(f"{figure:.1f}" for figure in os.getloadavg())
            print(f"{database} {label(size)}: measuring (load average {load})", flush=True)
            scratch = Path(tempfile.mkdtemp(prefix="otacm-bench-history-"))
            try:
                with cache.copy(size) as url:
                    measured[size] = measure_apart(
                        url, history, scratch, only, arguments.import_lines
                    )
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
    return measured


def _fill(engine: sa.Engine, *, size: int) -> dict[str, object]:
    """Build the history of ``size`` into ``engine``; what it holds, for the cache."""
    return build(engine, size).as_dict()


def print_table(database: str, measured: dict[int, Measured], sizes: tuple[int, ...]) -> None:
    """Every figure by size, with its ratio to the smallest size's."""
    print(f"\n{database}: figure by orders of history (ratio to {label(sizes[0])})")
    print(f"{'figure':24}" + "".join(f"{label(size):>20}" for size in sizes))
    for row in ROWS:
        values = {size: m.values[row] for size, m in measured.items() if row in m.values}
        if not values:
            continue
        base = values.get(sizes[0])
        cells = []
        for size in sizes:
            if size not in values:
                cells.append(f"{'-':>20}")
                continue
            ratio = f" ({values[size] / base:5.1f}x)" if base else " " * 9
            cells.append(f"{values[size]:>11.2f}{ratio}")
        print(f"{row:24}" + "".join(cells))
    for kind in ("run page", "export"):
        for size, m in measured.items():
            small = m.values.get(f"{kind} 100 s")
            ratios = [
                f"{count}: {m.values[f'{kind} {count} s'] / small:.1f}x"
                for count in ("100k", "1M")
                if small and f"{kind} {count} s" in m.values
            ]
            if ratios:
                print(f"{kind} at {label(size)} orders, to 100 exceptions: {', '.join(ratios)}")


if __name__ == "__main__":
    sys.exit(main())
