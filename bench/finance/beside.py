"""``bench/finance --beside-download``: the webhooks' answers while a report downloads.

A report download computes for tens of seconds in a gunicorn worker of ``otacm web``,
the processes that answer the venue's webhooks; it computes at ``OTACM_BATCH_NICE``
(:func:`receiver.finance.streaming.at_batch_priority`: a thread of its own, lowered).
For ``OTACM_BATCH_NICE`` 0 (as before) and 10 (the default), in turns: ``otacm web``
with two sync workers, pinned to one core with ``taskset`` (as on a box whose cores are
busy: on an idle machine the download and the webhooks would each have a core), serves
webhooks POSTed at :data:`RATE` a second by a process of their own
(``bench/history/prober.py``, each timed from when it was due), first for
:data:`IDLE_SECONDS` alone, then while a signed-in client downloads the run's XLSX
report to its end. Printed per round: the webhooks' median and p99 alone and beside the
download, and the download's seconds; then each setting's figures over every round and
the p99's ratio, lowered against as before, measured in the same run.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

import httpx
from bodies import CLIENT_STATE, WEBHOOK_PATH
from servers import BenchSetupError, http_server

sys.path.insert(1, str(Path(__file__).resolve().parents[1] / "history"))
from prober import Prober

RATE = 50.0
IDLE_SECONDS = 5.0
NICES = (0, 10)


def _summary(prober: Prober) -> str:
    return f"median {prober.median_ms:.1f} ms, p99 {prober.p99_ms:.1f} ms"


def one_round(
    env: dict[str, str],
    log: Path,
    port: int,
    run_id: int,
    sign_in: Callable[[str], httpx.Client],
) -> tuple[Prober, Prober, float]:
    """``otacm web`` (``env`` says at which nice), its webhooks timed alone and beside
    one XLSX download: alone, beside, the download's seconds."""
    base = f"http://127.0.0.1:{port}"
    command = ["taskset", "-c", "0", sys.executable, "-m", "otacm", "web", "--bind",
               f"127.0.0.1:{port}", "--workers", "2"]  # fmt: skip
    env = {**env, "OTACM_WEBHOOK_CLIENT_STATES": CLIENT_STATE}
    alone, beside = Prober(base + WEBHOOK_PATH, RATE), Prober(base + WEBHOOK_PATH, RATE)
    with (
        http_server(command, env=env, port=port, ready_path="/readyz", log=log),
        closing(sign_in(base)) as client,
    ):
        Prober(base + WEBHOOK_PATH, RATE).run_for(1.0)  # each worker's first requests
        alone.run_for(IDLE_SECONDS)
        with beside.running():
            started = time.perf_counter()
            with client.stream("GET", f"/finance/runs/{run_id}/report.xlsx") as answer:
                if answer.status_code != 200:
                    raise BenchSetupError(f"the report answered {answer.status_code}")
                for _ in answer.iter_raw(1 << 20):
                    pass
            took = time.perf_counter() - started
    return alone, beside, took


def measure(
    env: dict[str, str],
    directory: Path,
    port: Callable[[], int],
    run_id: int,
    sign_in: Callable[[str], httpx.Client],
    rounds: int,
) -> None:
    """Every round of every setting, in turns; then the table."""
    alone: dict[int, list[Prober]] = {nice: [] for nice in NICES}
    beside: dict[int, list[Prober]] = {nice: [] for nice in NICES}
    downloads: dict[int, list[float]] = {nice: [] for nice in NICES}
    for number in range(rounds):
        for nice in NICES:
            log = directory / f"web-beside-{nice}.log"
            found_alone, found_beside, took = one_round(
                {**env, "OTACM_BATCH_NICE": str(nice)}, log, port(), run_id, sign_in
            )
            alone[nice].append(found_alone)
            beside[nice].append(found_beside)
            downloads[nice].append(took)
            print(f"  round {number + 1}, OTACM_BATCH_NICE={nice}: webhooks alone "
                  f"{_summary(found_alone)}; beside the download {_summary(found_beside)} "
                  f"(download {took:.1f} s)", flush=True)  # fmt: skip
    print(f"\n{'OTACM_BATCH_NICE':18} {'alone':>28} {'beside the download':>30} "
          f"{'download s':>12} {'not 200':>8}")  # fmt: skip
    p99: dict[int, float] = {}
    for nice in NICES:
        pooled_alone, pooled_beside = Prober.pooled(alone[nice]), Prober.pooled(beside[nice])
        p99[nice] = pooled_beside.p99_ms
        took = ", ".join(f"{seconds:.1f}" for seconds in downloads[nice])
        print(f"{nice:<18} {_summary(pooled_alone):>28} {_summary(pooled_beside):>30} "
              f"{took:>12} {pooled_alone.failed + pooled_beside.failed:>8}")  # fmt: skip
    lowered, before = p99[NICES[-1]], p99[NICES[0]]
    print(f"p99 beside the download, {NICES[-1]} against {NICES[0]}: {lowered / before:.2f}")
