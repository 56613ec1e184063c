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

import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from bodies import CLIENT_STATE, WEBHOOK_PATH
from servers import BenchSetupError, http_server

PROBER = Path(__file__).resolve().parents[1] / "history" / "prober.py"
RATE = 50.0
IDLE_SECONDS = 5.0
NICES = (0, 10)


@dataclass
class Probed:
    """Webhook latencies (seconds) and the answers other than 200."""

    latencies: list[float] = field(default_factory=list)
    failed: int = 0
    downloads: list[float] = field(default_factory=list)

    def add(self, other: Probed) -> None:
        self.latencies += other.latencies
        self.failed += other.failed

    def summary(self) -> str:
        return f"median {statistics.median(self.latencies) * 1000:.1f} ms, p99 {self.p99:.1f} ms"

    @property
    def p99(self) -> float:
        """The 99th percentile, in ms."""
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000


@contextmanager
def probing(url: str) -> Iterator[Probed]:
    """Webhooks POSTed to ``url`` while the block runs; their latencies once it ends."""
    process = subprocess.Popen(
        [sys.executable, str(PROBER), url, str(RATE)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdin is not None and process.stdout is not None
    found = Probed()
    try:
        if process.stdout.readline().strip() != "ready":
            raise BenchSetupError("the webhook prober did not start")
        yield found
    finally:
        process.stdin.close()
        line = process.stdout.readline()
        process.wait(timeout=120)
    if not line:
        raise BenchSetupError("the webhook prober gave no result")
    data = json.loads(line)
    found.latencies, found.failed = data["latencies"], data["failed"]


def one_round(
    env: dict[str, str],
    log: Path,
    port: int,
    run_id: int,
    sign_in: Callable[[str], httpx.Client],
) -> tuple[Probed, Probed, float]:
    """``otacm web`` (``env`` says at which nice), its webhooks timed alone and beside
    one XLSX download: alone, beside, the download's seconds."""
    base = f"http://127.0.0.1:{port}"
    command = ["taskset", "-c", "0", sys.executable, "-m", "otacm", "web", "--bind",
               f"127.0.0.1:{port}", "--workers", "2"]  # fmt: skip
    env = {**env, "OTACM_WEBHOOK_CLIENT_STATES": CLIENT_STATE}
    with (
        http_server(command, env=env, port=port, ready_path="/readyz", log=log),
        closing(sign_in(base)) as client,
    ):
        with probing(base + WEBHOOK_PATH):
            time.sleep(1.0)  # each worker's first requests: not timed
        with probing(base + WEBHOOK_PATH) as alone:
            time.sleep(IDLE_SECONDS)
        with probing(base + WEBHOOK_PATH) as beside:
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
    alone = {nice: Probed() for nice in NICES}
    beside = {nice: Probed() for nice in NICES}
    for number in range(rounds):
        for nice in NICES:
            log = directory / f"web-beside-{nice}.log"
            found_alone, found_beside, took = one_round(
                {**env, "OTACM_BATCH_NICE": str(nice)}, log, port(), run_id, sign_in
            )
            alone[nice].add(found_alone)
            beside[nice].add(found_beside)
            beside[nice].downloads.append(took)
            print(f"  round {number + 1}, OTACM_BATCH_NICE={nice}: webhooks alone "
                  f"{found_alone.summary()}; beside the download {found_beside.summary()} "
                  f"(download {took:.1f} s)", flush=True)  # fmt: skip
    print(f"\n{'OTACM_BATCH_NICE':18} {'alone':>28} {'beside the download':>30} "
          f"{'download s':>12} {'not 200':>8}")  # fmt: skip
    for nice in NICES:
        downloads = ", ".join(f"{took:.1f}" for took in beside[nice].downloads)
        print(f"{nice:<18} {alone[nice].summary():>28} {beside[nice].summary():>30} "
              f"{downloads:>12} {alone[nice].failed + beside[nice].failed:>8}")  # fmt: skip
    lowered, before = beside[NICES[-1]].p99, beside[NICES[0]].p99
    print(f"p99 beside the download, {NICES[-1]} against {NICES[0]}: {lowered / before:.2f}")
