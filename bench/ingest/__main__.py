"""bench/ingest: how many webhook notifications ``otacm web`` takes in per second, and how fast.

Run it as ``.venv/bin/python bench/ingest [--db sqlite|postgresql|both] [--seconds S]
[--quick] [--out results.json]`` from the repository (``bench/README.md``). It is a
benchmark, not a test: it measures, prints a table per database, and judges the goals.

For each database (a fresh SQLite file; a throwaway PostgreSQL server with production
durability), in one run:

1. **bare**: the stack's own limit. A bare Flask endpoint under the same gunicorn
   options and engine settings that only inserts one row per POST (:mod:`bare`), driven
   closed-loop as fast as it answers.
2. **single**: ``otacm web`` (``otacm db upgrade`` first, configured through ``OTACM_*``
   variables only) with one notification per POST, as fast as it answers. The bare and
   otacm maxima are measured in alternating rounds (:data:`ROUNDS` each), so that each
   otacm round sees about the same machine as the bare one before it; the ratio is the
   median of the rounds' ratios. Then open-loop at rising rates, fractions of the bare
   limit (the median of its rounds); at the goal's rate (80 %) the bare endpoint is
   driven open-loop too, just before otacm, so a p99 that misses shows whether the
   stack itself missed it there.
3. **batch20**: twenty notifications per POST, as fast as it answers (the median of
   :data:`ROUNDS` rounds), then open-loop at fractions of that.

Every stage is a separate load generator process (:mod:`loadgen`) sending distinct
notifications (:mod:`bodies`) on loopback; it waits for every answer, and then the rows
stored during the stage are counted and compared with what was acknowledged (POSTs
answered 200 times notifications per POST). A stage where they differ is VOID: the run
then exits 1. Non-200 answers past saturation (503) are fine as long as nothing
acknowledged is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bodies import CLIENT_STATE
from loadgen import LoadResult, LoadSpec, machine_cpu_seconds
from servers import (
    BenchSetupError,
    DatabaseFactory,
    count_rows,
    free_port,
    http_server,
    postgresql_server,
    run_checked,
    tree_cpu_seconds,
)

from otacm.processes import gunicorn_options

HERE = Path(__file__).resolve().parent
"""This folder: run as ``python bench/ingest``, its modules import each other by name."""
REPOSITORY = HERE.parents[1]

DATABASES = ("sqlite", "postgresql")
BATCH = 20
CLOSED_LOOP_CONCURRENCY = 16
SINGLE_FRACTIONS = (0.25, 0.5, 0.8, 1.0, 1.5)
"""Open-loop rates of single-notification POSTs, as fractions of the bare limit."""
BATCH_FRACTIONS = (0.25, 0.5, 0.75, 1.0, 1.5)
"""Open-loop rates of batches, as fractions of otacm's own batch maximum."""
QUICK_SINGLE_FRACTIONS = (0.8, 1.5)
QUICK_BATCH_FRACTIONS = (1.5,)
"""--quick: the goal's rate and one past saturation; for batches, past saturation only."""

GOAL_SINGLE_RATIO = 0.80
GOAL_SINGLE_P99_MS = 50.0
GOAL_BATCH_NOTIFICATIONS = 10_000.0
ROUNDS = 3
"""Closed-loop rounds of each of the bare endpoint and otacm's single POSTs, alternating."""
KEPT_UP = 0.95
"""An open-loop stage kept up when it achieved this share of the offered rate."""


@dataclass
class Stage:
    """One row of the table: a load against one endpoint, and what it proved."""

    database: str
    mode: str
    """``bare``, ``single`` or ``batch20``."""
    load: str
    """``warm-up``, ``max`` (closed loop) or the open-loop rate as a share, ``80%``."""
    batch: int
    offered_posts: float | None
    """Open loop: POSTs per second offered; closed loop: ``None``."""
    result: LoadResult
    stored: int
    """Rows the stage added to the table."""
    web_cpu: float = 0.0
    """CPU seconds of the gunicorn processes (master and workers) during the stage."""
    database_cpu: float = 0.0
    """CPU seconds of the PostgreSQL server's processes (SQLite runs inside the workers)."""
    other_cpu: float = 0.0
    """CPU seconds the rest of the machine used meanwhile: noise when it is large."""

    @property
    def acked(self) -> int:
        """Notifications acknowledged: POSTs answered 200, times notifications per POST."""
        return self.result.ok * self.batch

    @property
    def balanced(self) -> bool:
        """Every acknowledged notification stored, and nothing stored unacknowledged."""
        return self.stored == self.acked

    @property
    def posts_per_second(self) -> float:
        return self.result.ok / self.result.elapsed

    @property
    def notifications_per_second(self) -> float:
        return self.acked / self.result.elapsed

    @property
    def offered_notifications(self) -> float | None:
        return None if self.offered_posts is None else self.offered_posts * self.batch

    @property
    def kept_up(self) -> bool:
        """Open loop: every POST acknowledged, at (almost) the offered rate."""
        return (
            self.offered_posts is not None
            and self.result.ok == self.result.sent
            and self.posts_per_second >= KEPT_UP * self.offered_posts
        )

    def cpu_ms_per_post(self, seconds: float) -> float:
        """``seconds`` of CPU per POST answered (any answer), in milliseconds."""
        answered = sum(self.result.statuses.values())
        return 1000.0 * seconds / answered if answered else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "database": self.database,
            "mode": self.mode,
            "load": self.load,
            "batch": self.batch,
            "offered_posts_per_second": self.offered_posts,
            "offered_notifications_per_second": self.offered_notifications,
            "posts_per_second": round(self.posts_per_second, 1),
            "notifications_per_second": round(self.notifications_per_second, 1),
            "acked": self.acked,
            "stored": self.stored,
            "balanced": self.balanced,
            "kept_up": self.kept_up if self.offered_posts is not None else None,
            "cpu_ms_per_post": {
                "web": round(self.cpu_ms_per_post(self.web_cpu), 3),
                "database": round(self.cpu_ms_per_post(self.database_cpu), 3),
                "load_generator": round(self.cpu_ms_per_post(self.result.cpu_seconds), 3),
            },
            "other_cpu_seconds": round(self.other_cpu, 2),
            **asdict(self.result),
        }


@dataclass
class Goal:
    name: str
    met: bool
    detail: str


@dataclass
class DatabaseReport:
    database: str
    stages: list[Stage] = field(default_factory=list)
    goals: list[Goal] = field(default_factory=list)
    ratio: float | None = None
    """otacm's single-notification maximum over the bare limit: the median of the rounds'."""
    bare_limit: float | None = None
    """The bare endpoint's maximum, POSTs/s: the median of the rounds."""
    single_max: float | None = None
    """otacm's single-notification maximum, POSTs/s: the median of the rounds."""
    batch_max: float | None = None
    """otacm's maximum with batches of twenty, POSTs/s: the median of the rounds."""


@dataclass(frozen=True)
class Plan:
    seconds: float
    warmup: float
    single_fractions: Sequence[float]
    batch_fractions: Sequence[float]
    workers: int | None
    rounds: int
    """Alternating closed-loop rounds of the bare endpoint and of otacm's single POSTs."""


# --- one stage ------------------------------------------------------------------------


def run_load(spec: LoadSpec) -> LoadResult:
    """Run one stage of load in a load generator process of its own."""
    done = subprocess.run(
        [sys.executable, str(HERE / "loadgen.py"), json.dumps(asdict(spec))],
        capture_output=True,
        text=True,
        check=False,
        timeout=spec.seconds + spec.timeout + 120,
    )
    if done.returncode != 0:
        raise BenchSetupError(f"the load generator failed ({done.returncode}):\n{done.stderr}")
    return LoadResult(**json.loads(done.stdout))


class Target:
    """A started server under load: where it listens, where it stores, its processes."""

    def __init__(
        self,
        database: str,
        table: str,
        port: int,
        database_url: str,
        *,
        web_pid: int,
        database_pid: int | None,
    ) -> None:
        self.database = database
        self.table = table
        self.port = port
        self.database_url = database_url
        self.web_pid = web_pid
        self.database_pid = database_pid

    def cpu(self) -> tuple[float, float]:
        """CPU seconds so far of the gunicorn tree and of the database server's."""
        database = 0.0 if self.database_pid is None else tree_cpu_seconds(self.database_pid)
        return tree_cpu_seconds(self.web_pid), database

    def measure(
        self, mode: str, load: str, *, batch: int, seconds: float, rate: float | None
    ) -> Stage:
        """Run one stage and count what it stored."""
        before = count_rows(self.database_url, self.table)
        spec = LoadSpec(
            host="127.0.0.1",
            port=self.port,
            batch=batch,
            seconds=seconds,
            rate=rate,
            concurrency=CLOSED_LOOP_CONCURRENCY,
        )
        web0, database0 = self.cpu()
        result = run_load(spec)
        web1, database1 = self.cpu()
        stored = count_rows(self.database_url, self.table) - before
        web, database = web1 - web0, database1 - database0
        # The servers are idle outside the load generator's run, which saw the machine's.
        other = max(0.0, result.machine_cpu_seconds - web - database - result.cpu_seconds)
        stage = Stage(self.database, mode, load, batch, rate, result, stored, web, database, other)
        print(format_row(stage), flush=True)
        return stage


# --- the servers ----------------------------------------------------------------------


def otacm_environment(database_url: str, directory: Path) -> dict[str, str]:
    """The environment of ``otacm``: one venue from ``OTACM_*`` variables, nothing else."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTACM_")}
    metrics = directory / "metrics"
    metrics.mkdir(exist_ok=True)
    env.update(
        OTACM_DATABASE_URL=database_url,
        OTACM_TENANT="bench-tenant",
        OTACM_COMPANY="bench-company",
        OTACM_API_KEY="bench-api-key",
        OTACM_WEBHOOK_CLIENT_STATES=CLIENT_STATE,
        # The web role never calls the venue; an address on loopback that nothing serves.
        OTACM_API_BASE_URL="http://127.0.0.1:9/",
        PROMETHEUS_MULTIPROC_DIR=str(metrics),
        PYTHONPATH=str(REPOSITORY),
    )
    return env


@contextmanager
def bare_target(
    database: str, factory: DatabaseFactory, directory: Path, workers: int | None
) -> Iterator[Target]:
    from bare import TABLE

    url = factory.new("bench_bare")
    port = free_port()
    command = [
        sys.executable,
        str(HERE / "bare.py"),
        "--database-url",
        url,
        "--bind",
        f"127.0.0.1:{port}",
    ]
    if workers:
        command += ["--workers", str(workers)]
    env = {**os.environ, "PYTHONPATH": str(REPOSITORY)}
    log = directory / "bare.log"
    with http_server(command, env=env, port=port, ready_path="/readyz", log=log) as process:
        yield Target(
            database, TABLE, port, url, web_pid=process.pid, database_pid=factory.server_pid
        )


@contextmanager
def otacm_target(
    database: str, factory: DatabaseFactory, directory: Path, workers: int | None
) -> Iterator[Target]:
    url = factory.new("bench_otacm")
    env = otacm_environment(url, directory)
    log = directory / "otacm-web.log"
    otacm = [sys.executable, "-m", "otacm"]
    run_checked([*otacm, "db", "upgrade"], env=env, log=log)
    port = free_port()
    command = [*otacm, "web", "--bind", f"127.0.0.1:{port}"]
    if workers:
        command += ["--workers", str(workers)]
    with http_server(command, env=env, port=port, ready_path="/readyz", log=log) as process:
        yield Target(
            database, "inbox", port, url, web_pid=process.pid, database_pid=factory.server_pid
        )


@contextmanager
def database_factory(database: str, directory: Path) -> Iterator[DatabaseFactory]:
    if database == "sqlite":
        yield DatabaseFactory("sqlite", directory)
        return
    with postgresql_server() as server:
        yield DatabaseFactory("postgresql", directory, server)


# --- one database ---------------------------------------------------------------------


def bench_database(database: str, plan: Plan) -> DatabaseReport:
    """Every stage on one kind of database; see the module docstring."""
    report = DatabaseReport(database)
    print(f"\n=== {database} ===", flush=True)
    print(HEADER, flush=True)
    with ExitStack() as stack:
        directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="otacm-bench-")))
        factory = stack.enter_context(database_factory(database, directory))

        bare = stack.enter_context(bare_target(database, factory, directory, plan.workers))
        web = stack.enter_context(otacm_target(database, factory, directory, plan.workers))
        stages = report.stages
        stages.append(bare.measure("bare", "warm-up", batch=1, seconds=plan.warmup, rate=None))
        stages.append(web.measure("single", "warm-up", batch=1, seconds=plan.warmup, rate=None))
        # Both maxima in alternating rounds, each otacm round right after a bare one:
        # this machine's speed drifts over seconds, and a pair of neighbours sees
        # about the same machine. The ratio is the median of the pairs' ratios.
        bare_rounds: list[Stage] = []
        single_rounds: list[Stage] = []
        for number in range(1, plan.rounds + 1):
            load = f"max#{number}"
            bare_rounds.append(bare.measure("bare", load, batch=1, seconds=plan.seconds, rate=None))
            single_rounds.append(
                web.measure("single", load, batch=1, seconds=plan.seconds, rate=None)
            )
        stages += bare_rounds + single_rounds
        report.bare_limit = statistics.median(s.posts_per_second for s in bare_rounds)
        report.single_max = statistics.median(s.posts_per_second for s in single_rounds)
        report.ratio = statistics.median(
            single.posts_per_second / bare_stage.posts_per_second
            for bare_stage, single in zip(bare_rounds, single_rounds, strict=True)
        )
        for fraction in plan.single_fractions:
            rate = fraction * report.bare_limit
            load = f"{fraction:.0%}"
            if fraction != GOAL_SINGLE_RATIO:
                stages.append(web.measure("single", load, batch=1, seconds=plan.seconds, rate=rate))
                continue
            # At the goal's rate, rounds as for the maxima (a p99 of seconds of load moves
            # with the machine's speed), each right after the stack's own at that rate: a
            # miss by both is the machine's, by otacm alone otacm's.
            for number in range(1, plan.rounds + 1):
                for target, mode in ((bare, "bare"), (web, "single")):
                    stages.append(
                        target.measure(
                            mode, f"{load}#{number}", batch=1, seconds=plan.seconds, rate=rate
                        )
                    )
        batch_rounds = [
            web.measure(
                f"batch{BATCH}", f"max#{number}", batch=BATCH, seconds=plan.seconds, rate=None
            )
            for number in range(1, plan.rounds + 1)
        ]
        stages += batch_rounds
        report.batch_max = statistics.median(s.posts_per_second for s in batch_rounds)
        for fraction in plan.batch_fractions:
            rate = fraction * report.batch_max
            stages.append(
                web.measure(
                    f"batch{BATCH}",
                    f"{fraction:.0%}",
                    batch=BATCH,
                    seconds=plan.seconds,
                    rate=rate,
                )
            )
    report.goals = judge(report)
    return report


def judge(report: DatabaseReport) -> list[Goal]:
    """The issue's goals, each met or missed, with the numbers that decided it."""
    assert report.ratio is not None and report.bare_limit is not None
    assert report.single_max is not None and report.batch_max is not None
    goals: list[Goal] = []
    ratio_met = report.ratio >= GOAL_SINGLE_RATIO
    detail = (
        f"max {report.single_max:,.0f}/s, bare {report.bare_limit:,.0f}/s (medians of "
        f"{sum(s.load.startswith('max#') for s in report.stages if s.mode == 'bare')} rounds); "
        f"ratio {report.ratio:.2f} (median of the rounds' ratios; goal >= {GOAL_SINGLE_RATIO:.2f})"
    )
    goal_load = f"{GOAL_SINGLE_RATIO:.0%}#"
    at_goal = [s for s in report.stages if s.mode == "single" and s.load.startswith(goal_load)]
    stack = [s for s in report.stages if s.mode == "bare" and s.load.startswith(goal_load)]
    met = [
        s
        for s in at_goal
        if s.kept_up and s.result.p99_ms is not None and s.result.p99_ms < GOAL_SINGLE_P99_MS
    ]
    # Met in most rounds: the median round meets it, as the maxima are medians of rounds.
    p99_met = bool(at_goal) and 2 * len(met) > len(at_goal)
    if at_goal:
        detail += (
            f"; offered {at_goal[0].offered_posts:,.0f}/s ({GOAL_SINGLE_RATIO:.0%}) in "
            f"{len(at_goal)} rounds: p99 {', '.join(_ms(s.result.p99_ms) for s in at_goal)} ms, "
            f"{len(met)} of {len(at_goal)} under {GOAL_SINGLE_P99_MS:.0f} ms with every POST "
            f"acknowledged at the offered rate (most rounds must be); the bare endpoint just "
            f"before each: p99 {', '.join(_ms(s.result.p99_ms) for s in stack)} ms"
        )
    goals.append(Goal("single >= 80% of bare, p99 < 50 ms", ratio_met and p99_met, detail))
    batch_rate = report.batch_max * BATCH
    goals.append(
        Goal(
            f"batch{BATCH} >= {GOAL_BATCH_NOTIFICATIONS:,.0f} notifications/s",
            batch_rate >= GOAL_BATCH_NOTIFICATIONS,
            f"max {batch_rate:,.0f} notifications/s ({report.batch_max:,.0f} POSTs/s, "
            "median of the rounds)",
        )
    )
    void = [s for s in report.stages if not s.balanced]
    goals.append(
        Goal(
            "no loss at any rate",
            not void,
            f"{len(report.stages) - len(void)} of {len(report.stages)} stages balanced"
            + "".join(
                f"; VOID {s.mode} {s.load}: acked {s.acked}, stored {s.stored}" for s in void
            ),
        )
    )
    return goals


# --- output ---------------------------------------------------------------------------

HEADER = (
    f"{'mode':<8} {'load':>7} {'offered/s':>9} {'notif/s':>8} {'POSTs/s':>8} "
    f"{'p50 ms':>7} {'p99 ms':>7} {'acked':>7} {'stored':>7} {'balanced':>8} "
    f"{'CPU ms/POST web+db+gen':>22}  notes"
)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def format_row(stage: Stage) -> str:
    """One line of the table."""
    offered = stage.offered_notifications
    others = {k: v for k, v in stage.result.statuses.items() if k != "200"}
    others.update(stage.result.errors)
    notes = ", ".join(f"{k}: {v}" for k, v in others.items())
    notes_list = [notes] if notes else []
    if stage.result.lag_p99_ms is not None and stage.result.lag_p99_ms > 5.0:
        notes_list.append(f"generator late p99 {stage.result.lag_p99_ms:.0f} ms")
    if stage.other_cpu > 0.1 * stage.result.elapsed:
        notes_list.append(f"other processes used {stage.other_cpu / stage.result.elapsed:.0%} CPU")
    cpu = "+".join(
        f"{stage.cpu_ms_per_post(seconds):.2f}"
        for seconds in (stage.web_cpu, stage.database_cpu, stage.result.cpu_seconds)
    )
    return (
        f"{stage.mode:<8} {stage.load:>7} "
        f"{'-' if offered is None else f'{offered:,.0f}':>9} "
        f"{stage.notifications_per_second:>8,.0f} {stage.posts_per_second:>8,.0f} "
        f"{_ms(stage.result.p50_ms):>7} {_ms(stage.result.p99_ms):>7} "
        f"{stage.acked:>7} {stage.stored:>7} {'yes' if stage.balanced else 'VOID':>8} "
        f"{cpu:>22}  {'; '.join(notes_list)}"
    ).rstrip()


def print_summary(report: DatabaseReport) -> None:
    assert report.ratio is not None and report.bare_limit is not None
    print(
        f"{report.database}: otacm single-notification throughput / bare limit = {report.ratio:.2f}"
    )
    for goal in report.goals:
        print(f"  {'PASS' if goal.met else 'MISS'}  {goal.name}: {goal.detail}")


def machine_busy(seconds: float = 1.0) -> float:
    """The share of the machine's CPU that was busy over the next ``seconds`` (0..1)."""
    before = machine_cpu_seconds()
    time.sleep(seconds)
    return (machine_cpu_seconds() - before) / (seconds * (os.cpu_count() or 1))


def parse_arguments(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/ingest", description=__doc__.splitlines()[0] if __doc__ else None
    )
    parser.add_argument("--db", choices=[*DATABASES, "both"], default="both")
    parser.add_argument(
        "--seconds", type=float, default=None, help="seconds per stage (6; 1.5 with --quick)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a short smoke run: fewer, shorter stages (under a minute)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="gunicorn workers (default: otacm's, two per core plus one)",
    )
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    return parser.parse_args(argv)


def main(argv: Sequence[str]) -> int:
    """Run the benchmark; 1 when a stage is VOID or a server cannot be started."""
    args = parse_arguments(argv)
    seconds = args.seconds or (1.5 if args.quick else 6.0)
    plan = Plan(
        seconds=seconds,
        warmup=1.0 if args.quick else 2.0,
        single_fractions=QUICK_SINGLE_FRACTIONS if args.quick else SINGLE_FRACTIONS,
        batch_fractions=QUICK_BATCH_FRACTIONS if args.quick else BATCH_FRACTIONS,
        workers=args.workers,
        rounds=1 if args.quick else ROUNDS,
    )
    databases = DATABASES if args.db == "both" else (args.db,)
    options = gunicorn_options("127.0.0.1:0", args.workers)
    busy = machine_busy()
    print(
        f"otacm ingest benchmark: {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"gunicorn {options['workers']} {options['worker_class']} workers; "
        f"{seconds:g} s per stage, closed loop at {CLOSED_LOOP_CONCURRENCY} in flight; "
        f"machine {busy:.0%} busy before the run"
    )
    if busy > 0.15:
        print("warning: something else is using the CPU: the numbers will be low and noisy")
    started = time.monotonic()
    reports: list[DatabaseReport] = []
    try:
        for database in databases:
            reports.append(bench_database(database, plan))
    except BenchSetupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print()
    for report in reports:
        print_summary(report)
    print(f"({time.monotonic() - started:.0f} s)")
    if args.out is not None:
        args.out.write_text(
            json.dumps(
                {
                    "cpus": os.cpu_count(),
                    "python": platform.python_version(),
                    "gunicorn": {k: v for k, v in options.items() if k != "bind"},
                    "seconds_per_stage": seconds,
                    "closed_loop_concurrency": CLOSED_LOOP_CONCURRENCY,
                    "machine_busy_before": round(busy, 3),
                    "databases": {
                        r.database: {
                            "bare_limit_posts_per_second": r.bare_limit,
                            "single_max_posts_per_second": r.single_max,
                            "single_over_bare": r.ratio,
                            "batch_max_posts_per_second": r.batch_max,
                            "goals": [asdict(g) for g in r.goals],
                            "stages": [s.as_dict() for s in r.stages],
                        }
                        for r in reports
                    },
                },
                indent=2,
            )
            + "\n"
        )
    return 0 if all(s.balanced for r in reports for s in r.stages) else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
