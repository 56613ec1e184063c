"""bench/quota: otacm's venue API calls per settled order, and how soon it knows each one.

Run it as ``.venv/bin/python bench/quota [--quick] [--orders N] [--window SECONDS]
[--seed S] [--out results.json]`` from the repository (``bench/README.md``). It is a
benchmark, not a test: it measures, prints a table, and judges the goals.

The simulated venue (the sandbox, over real HTTP) receives 1,000 orders arriving over
ten virtual minutes and picks them up at its 60-second cadence, in virtual time
(:mod:`harness`), in four scenarios played from the same seeded workload
(:mod:`workload`):

- **(a) webhooks**: every webhook delivered;
- **(b) 30% dropped**: the venue drops 30 % of the webhook notifications;
- **(c) all dropped**: no webhook ever arrives; the change feed alone finds the orders;
- **baseline**: no otacm at all: getOrder for every order every 15 s until it shows it
  settled, the venue's suggested polling.

For each: the partner's venue calls per settled order, and the delay from the venue
settling an order to the partner knowing it (p50, p95, max). The goals (from the
issue): (a) at most 1.05 calls per order; (c) every order known within two poll
intervals (30 s), with at least 10 times fewer calls than the baseline.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The PostgreSQL starter is the ingest benchmark's; one copy of it.
sys.path.insert(1, str(Path(__file__).resolve().parent.parent / "ingest"))

from harness import Result, Timing, run_baseline, run_otacm, scratch_directory
from servers import BenchSetupError, DatabaseFactory, postgresql_server
from shared import HEADER as SHARED_HEADER
from shared import LATENCY_MS, SharedResult, run_scenario
from shared import SCENARIOS as SHARED_SCENARIOS
from shared import format_row as format_shared_row
from workload import plan

from heartbeat.metric_figures import quantile

HERE = Path(__file__).resolve().parent
"""This folder: run as ``python bench/quota``, its modules import each other by name."""

SEED = 20260527
ORDERS, WINDOW = 1000, 600
QUICK_ORDERS, QUICK_WINDOW = 100, 60
"""1,000 orders over ten minutes (100 a minute); --quick keeps the rate, for a minute."""
TAIL = 1800
"""Virtual seconds after the arrival window before a scenario gives up on stragglers."""

SCENARIOS = (("a", "a) webhooks", 0.0), ("b", "b) 30% dropped", 0.3), ("c", "c) all dropped", 1.0))
"""Each scenario: its key, its label in the table, the share of webhooks the venue drops."""
GOAL_CALLS_PER_ORDER = 1.05
GOAL_KNOWN_WITHIN_INTERVALS = 2
GOAL_FEWER_CALLS = 10.0
SHARED_ORDERS, QUICK_SHARED_ORDERS = 400, 60
"""Orders each shared-key scenario drains (real time, 200 ms a call)."""
GOAL_SPEED_UP = 3.0
"""One worker keeping several getOrder calls in flight against one at a time."""


@dataclass
class Goal:
    name: str
    met: bool
    detail: str


def statistics(result: Result) -> dict[str, Any]:
    """The numbers of one row of the table."""
    delays = result.delays
    settled = len(result.settled)
    return {
        "orders_settled": settled,
        "orders_known": len(result.known.keys() & result.settled.keys()),
        "calls": result.total_calls,
        "calls_by_endpoint": dict(sorted(result.calls.items())),
        "calls_per_order": result.total_calls / settled if settled else None,
        "delay_p50": quantile(delays, 0.5) if delays else None,
        "delay_p95": quantile(delays, 0.95) if delays else None,
        "delay_max": delays[-1] if delays else None,
        "virtual_seconds": result.virtual_seconds,
        "wall_seconds": round(result.wall_seconds, 1),
    }


HEADER = (
    f"{'scenario':<16} {'settled':>7} {'calls':>6} {'calls/order':>11} {'p50 s':>6} "
    f"{'p95 s':>6} {'max s':>6} {'<=30 s':>7} {'unknown':>7} {'vs baseline':>12}  calls by endpoint"
)


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def format_row(result: Result, baseline: Result | None, limit: float) -> str:
    """One line of the table."""
    numbers = statistics(result)
    within = sum(1 for delay in result.delays if delay <= limit)
    ratio = "-"
    if baseline is not None and result is not baseline and result.total_calls:
        ratio = f"{baseline.total_calls / result.total_calls:.1f}x fewer"
    per_order = numbers["calls_per_order"]
    endpoints = ", ".join(f"{name} {count}" for name, count in numbers["calls_by_endpoint"].items())
    return (
        f"{result.scenario:<16} {numbers['orders_settled']:>7} {numbers['calls']:>6} "
        f"{'-' if per_order is None else f'{per_order:.3f}':>11} "
        f"{_seconds(numbers['delay_p50']):>6} {_seconds(numbers['delay_p95']):>6} "
        f"{_seconds(numbers['delay_max']):>6} {within:>7} {result.unknown:>7} {ratio:>12}  "
        f"{endpoints}"
    )


def judge(results: dict[str, Result], baseline: Result, timing: Timing) -> list[Goal]:
    """The issue's goals, each met or missed, with the numbers that decided it."""
    goals = []
    webhooks = results["a"]
    per_order = webhooks.total_calls / max(len(webhooks.settled), 1)
    goals.append(
        Goal(
            f"(a) at most {GOAL_CALLS_PER_ORDER} calls per order",
            per_order <= GOAL_CALLS_PER_ORDER and webhooks.unknown == 0,
            f"{webhooks.total_calls} calls for {len(webhooks.settled)} orders = {per_order:.3f}"
            + (f"; {webhooks.unknown} never known" if webhooks.unknown else ""),
        )
    )
    blind = results["c"]
    limit = GOAL_KNOWN_WITHIN_INTERVALS * timing.poll_interval
    late = [delay for delay in blind.delays if delay > limit]
    worst = blind.delays[-1] if blind.delays else None
    goals.append(
        Goal(
            f"(c) every order known within {GOAL_KNOWN_WITHIN_INTERVALS} poll intervals "
            f"({limit} s)",
            not late and blind.unknown == 0,
            f"max {_seconds(worst)} s; {len(late)} later, {blind.unknown} never known",
        )
    )
    fewer = baseline.total_calls / blind.total_calls if blind.total_calls else float("inf")
    goals.append(
        Goal(
            f"(c) at least {GOAL_FEWER_CALLS:.0f}x fewer calls than the baseline",
            fewer >= GOAL_FEWER_CALLS,
            f"{blind.total_calls} calls vs the baseline's {baseline.total_calls} = "
            f"{fewer:.1f}x fewer",
        )
    )
    return goals


def describe_metrics(result: Result) -> str:
    """otacm's own delivery-health view of a scenario, as ``GET /metrics`` showed it."""
    shown = ", ".join(
        f"{key} {value:g}"
        for key, value in sorted(result.metrics.items())
        if not math.isnan(value)  # a lag over no orders
    )
    return f"  {result.scenario:<16} /metrics: {shown or '-'}"


def parse_arguments(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/quota", description=__doc__.splitlines()[0] if __doc__ else None
    )
    parser.add_argument(
        "--quick", action="store_true", help=f"a smoke run: {QUICK_ORDERS} orders in a minute"
    )
    parser.add_argument("--orders", type=int, default=None, help=f"orders (default {ORDERS})")
    parser.add_argument(
        "--window",
        type=int,
        default=None,
        help=f"virtual seconds over which the orders arrive (default {WINDOW})",
    )
    parser.add_argument("--seed", type=int, default=SEED, help="the random seed (workload, faults)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument(
        "--shared-orders",
        type=int,
        default=None,
        help=f"orders per shared-key scenario (default {SHARED_ORDERS}; "
        f"{QUICK_SHARED_ORDERS} with --quick; 0 skips them)",
    )
    parser.add_argument(
        "--only-shared",
        action="store_true",
        help="run only the shared-key scenarios, not the virtual-time ones",
    )
    parser.add_argument(
        "--shared-db",
        choices=("sqlite", "postgresql", "both"),
        default="sqlite",
        help="the database of the shared-key scenarios (default sqlite)",
    )
    return parser.parse_args(argv)


def run_shared(orders: int, databases: Sequence[str], scratch: Path) -> list[SharedResult]:
    """Every shared-key scenario on each database (see :mod:`shared`)."""
    results = []
    with ExitStack() as stack:
        for database in databases:
            factory = DatabaseFactory(
                database,
                scratch,
                stack.enter_context(postgresql_server()) if database == "postgresql" else None,
            )
            for number, scenario in enumerate(SHARED_SCENARIOS):
                url = factory.new(f"shared_{database}_{number}")
                logs = scratch / f"logs-{database}-{number}"
                logs.mkdir()
                result = run_scenario(
                    scenario, orders=orders, database=database, url=url, logs=logs
                )
                results.append(result)
                print(
                    f"  shared key, {scenario.name} ({database}): {result.done} orders "
                    f"in {result.seconds:.0f} s",
                    flush=True,
                )
    return results


def judge_shared(results: Sequence[SharedResult]) -> list[Goal]:
    """The shared key's goals: within the limits always; several in flight pays."""
    overrun = [f"{r.scenario} ({r.database})" for r in results if not r.within]
    unfinished = [f"{r.scenario} ({r.database})" for r in results if r.done < r.orders]
    goals = [
        Goal(
            "(shared) the key's limits never exceeded, as the sandbox counted",
            not overrun,
            "every scenario within 5 in flight and 100 per 5 s, no 429"
            if not overrun
            else "over in " + ", ".join(overrun),
        ),
        Goal(
            "(shared) every order mirrored",
            not unfinished,
            "all" if not unfinished else "unfinished: " + ", ".join(unfinished),
        ),
    ]
    for database in sorted({r.database for r in results}):
        one = [r for r in results if r.database == database and r.workers == 1]
        before = next((r for r in one if r.fetch_concurrency == 1), None)
        after = next((r for r in one if r.fetch_concurrency > 1), None)
        if before is None or after is None or not before.per_second:
            continue
        ratio = after.per_second / before.per_second
        goals.append(
            Goal(
                f"(shared) one worker with several calls in flight at least "
                f"{GOAL_SPEED_UP:.0f}x one at a time ({database})",
                ratio >= GOAL_SPEED_UP,
                f"{after.per_second:.1f} vs {before.per_second:.1f} orders/s = {ratio:.1f}x",
            )
        )
    return goals


def main(argv: Sequence[str]) -> int:
    """Run the benchmark; 1 when a scenario could not run."""
    args = parse_arguments(argv)
    # The jobs log what they did every pass, and the worker warns of each order that
    # ended in Error, as the workload means some to: the table says it better.
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    # werkzeug sets its own logger to INFO (a line per request) unless told otherwise.
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    orders = args.orders or (QUICK_ORDERS if args.quick else ORDERS)
    window = args.window or (QUICK_WINDOW if args.quick else WINDOW)
    horizon = window + TAIL
    timing = Timing()
    workload = plan(orders, window, seed=args.seed, horizon=horizon)
    outcomes = ", ".join(f"{count} {outcome}" for outcome, count in workload.outcomes().items())
    print(
        f"otacm quota benchmark: Python {platform.python_version()}, {os.cpu_count()} CPUs; "
        f"{orders} orders over {window} virtual s ({outcomes}), seed {args.seed}; "
        f"venue pickup every ~60 s; otacm's feed and watchdog every {timing.poll_interval} s, "
        f"worker at most 20 getOrder per virtual second; SQLite",
        flush=True,
    )
    shared_orders = (
        args.shared_orders
        if args.shared_orders is not None
        else (QUICK_SHARED_ORDERS if args.quick else SHARED_ORDERS)
    )
    databases = ("sqlite", "postgresql") if args.shared_db == "both" else (args.shared_db,)
    shared: list[SharedResult] = []
    started = time.monotonic()
    results: dict[str, Result] = {}
    limit = GOAL_KNOWN_WITHIN_INTERVALS * timing.poll_interval
    baseline: Result | None = None
    try:
        with scratch_directory() as scratch:
            for key, label, drop_rate in () if args.only_shared else SCENARIOS:
                result = run_otacm(
                    label,
                    workload,
                    drop_rate=drop_rate,
                    seed=args.seed,
                    horizon=horizon,
                    database=Path(scratch) / f"{key}.sqlite3",
                )
                results[key] = result
                print(f"  {label}: done in {result.wall_seconds:.0f} s", flush=True)
            if not args.only_shared:
                baseline = run_baseline(
                    workload, seed=args.seed, horizon=horizon, poll_interval=timing.poll_interval
                )
                print(f"  baseline: done in {baseline.wall_seconds:.0f} s", flush=True)
            if shared_orders > 0:
                shared = run_shared(shared_orders, databases, Path(scratch))
    except (RuntimeError, BenchSetupError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    goals: list[Goal] = []
    played = [*results.values(), *([baseline] if baseline is not None else [])]
    if baseline is not None:
        print()
        print(HEADER)
        for result in played:
            print(format_row(result, baseline, limit))
        print()
        print("otacm's own view of each run (delivery health in GET /metrics):")
        for result in results.values():
            print(describe_metrics(result))
        print()
        goals = judge(results, baseline, timing)
    if shared:
        print()
        print(
            f"One API key shared by every process ({shared_orders} orders a scenario, "
            f"{LATENCY_MS} ms a call; the sandbox's gateway: 5 in flight, 100 per 5 s; "
            f"otacm: 4 in flight, 90 per 5 s; 2 schedulers beside the workers):"
        )
        print(SHARED_HEADER)
        for item in shared:
            print(format_shared_row(item))
        print()
        goals += judge_shared(shared)
    for goal in goals:
        print(f"  {'MET   ' if goal.met else 'MISSED'}  {goal.name}: {goal.detail}")
    print(f"({time.monotonic() - started:.0f} s)")
    if args.out is not None:
        args.out.write_text(
            json.dumps(
                {
                    "python": platform.python_version(),
                    "seed": args.seed,
                    "orders": orders,
                    "window_seconds": window,
                    "outcomes": {str(k): v for k, v in workload.outcomes().items()},
                    "poll_interval": timing.poll_interval,
                    "scenarios": {
                        result.scenario: {
                            **statistics(result),
                            "webhooks": result.webhooks,
                            "metrics": result.metrics,
                        }
                        for result in played
                    },
                    "shared_key": {
                        f"{item.scenario} ({item.database})": item.as_dict() for item in shared
                    },
                    "goals": [goal.__dict__ for goal in goals],
                },
                indent=2,
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
