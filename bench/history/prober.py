"""Webhooks POSTed at a steady rate from a process of its own: ``bench/history``'s prober.

The venue sends its webhooks from machines of its own. Timed from the benchmark's own
process, a latency would also hold that process's waits for its GIL, behind the sandbox
serving the worker's getOrder calls and the threads watching the commands; timed from
here it is otacm's answer and the machine's, as the venue would see them.

``python prober.py URL RATE``: prints ``ready`` once its clients are made, POSTs until its
standard input closes, then prints one JSON object: ``latencies`` (seconds, each from when
its POST was due, so that a stall shows in full) and ``failed`` (not answered 200).
Driven by :class:`Prober` (``bench/history``, ``bench/finance --beside-download``).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent
for entry in (HERE.parents[1], HERE.parent / "ingest"):
    if str(entry) not in sys.path:
        sys.path.insert(1, str(entry))

import httpx  # noqa: E402
from bodies import webhook_bodies  # noqa: E402

THREADS = 4
"""POSTs in flight at most: a stalled answer does not delay the next ones' sending."""

_JSON = {"Content-Type": "application/json"}


class Prober:
    """Webhooks POSTed to ``url`` at ``rate`` a second by this file run as a process of its
    own; the latencies of every time it probed."""

    def __init__(self, url: str, rate: float) -> None:
        self.url = url
        self.rate = rate
        self.latencies: list[float] = []
        self.failed = 0

    @classmethod
    def pooled(cls, probers: Iterable[Prober]) -> Prober:
        """One prober holding what ``probers`` (of one URL and rate) timed."""
        probers = list(probers)
        pooled = cls(probers[0].url, probers[0].rate)
        for prober in probers:
            pooled.latencies += prober.latencies
            pooled.failed += prober.failed
        return pooled

    def run_for(self, seconds: float) -> None:
        """Probe for ``seconds``."""
        with self.running():
            time.sleep(seconds)

    @contextmanager
    def running(self) -> Iterator[None]:
        """Probing while the block runs; the latencies are this prober's once it ends."""
        process = subprocess.Popen(
            [sys.executable, __file__, self.url, str(self.rate)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert process.stdin is not None and process.stdout is not None
        try:
            if process.stdout.readline().strip() != "ready":
                raise RuntimeError("the webhook prober did not start")
            yield
        finally:
            process.stdin.close()
            result = process.stdout.readline()
            process.wait(timeout=120)
        if not result:
            raise RuntimeError(f"the webhook prober ended {process.returncode} with no result")
        data = json.loads(result)
        self.latencies.extend(data["latencies"])
        self.failed += data["failed"]

    @property
    def p99_ms(self) -> float:
        """The 99th percentile, in ms (``nan`` when nothing was timed)."""
        ordered = sorted(self.latencies)
        if not ordered:
            return float("nan")
        return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000

    @property
    def median_ms(self) -> float:
        """The median, in ms (``nan`` when nothing was timed)."""
        return statistics.median(self.latencies) * 1000 if self.latencies else float("nan")

    def summary(self) -> str:
        """p99, median, longest, how many POSTs and how many not answered 200."""
        longest = max(self.latencies) * 1000 if self.latencies else float("nan")
        return (
            f"p99 {self.p99_ms:.1f} ms (median {self.median_ms:.1f}, max {longest:.1f}; "
            f"{len(self.latencies)} POSTs, {self.failed} not 200)"
        )


class _Loop:
    """The POSTing threads' shared schedule and results."""

    def __init__(self, url: str, rate: float) -> None:
        self.url = url
        self.rate = rate
        self.latencies: list[float] = []
        self.failed = 0
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self._bodies: Iterator[bytes] = webhook_bodies(1)
        self._next = 0
        self.start = 0.0

    def run(self, client: httpx.Client) -> None:
        while not self.stop.is_set():
            with self._lock:
                due = self.start + self._next / self.rate
                self._next += 1
                body = next(self._bodies)
            wait = due - time.perf_counter()
            if wait > 0 and self.stop.wait(wait):
                return
            try:
                ok = client.post(self.url, content=body).status_code == 200
            except httpx.HTTPError:
                ok = False
            done = time.perf_counter() - due
            with self._lock:
                self.latencies.append(done)
                self.failed += not ok


def main(argv: list[str]) -> int:
    url, rate = argv[0], float(argv[1])
    loop = _Loop(url, rate)
    # The clients first: making one (its TLS context) takes tenths of a second, which
    # would otherwise show as the first POSTs' latency.
    with ExitStack() as clients:
        threads = [
            threading.Thread(
                target=loop.run,
                args=(clients.enter_context(httpx.Client(timeout=60, headers=_JSON)),),
            )
            for _ in range(THREADS)
        ]
        print("ready", flush=True)
        loop.start = time.perf_counter()
        for thread in threads:
            thread.start()
        sys.stdin.read()  # until the benchmark closes it
        loop.stop.set()
        for thread in threads:
            thread.join()
    print(json.dumps({"latencies": loop.latencies, "failed": loop.failed}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
