"""The ingest benchmark's load generator: webhook POSTs at a fixed rate, or as fast as answered.

Run as a process of its own (``python loadgen.py SPEC_JSON``; it prints a
:class:`LoadResult` as JSON), so that nothing else shares its loop. It speaks HTTP/1.1
on non-blocking sockets under one ``epoll`` loop, one connection per POST
(``Connection: close``, as gunicorn's sync workers answer anyway), every body distinct
(:mod:`bodies`). It is written against the socket calls rather than asyncio because it
shares two cores with the server it measures: a POST costs it about a third of what it
costs under asyncio, so it takes less from the server and keeps its schedule.

Two shapes of load:

- **open loop** (``rate`` set): POST number *i* is due at ``t0 + i / rate``, whether or
  not earlier ones were answered; its latency is counted from the time it was *due*, not
  from when it went out, so a generator or a server that falls behind shows as latency
  (no coordinated omission). ``lag`` reports how late the generator itself sent.
- **closed loop** (``rate`` unset): ``concurrency`` POSTs in flight, each sent when the
  previous one was answered, until ``seconds`` have passed: the server's maximum.

Either way every POST sent is waited for (up to ``timeout``) before the result is
reported, so the benchmark can compare what was acknowledged with what was stored.
"""

from __future__ import annotations

import errno
import gc
import json
import os
import resource
import select
import socket
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bodies import WEBHOOK_PATH, http_requests

_TICK = 0.001
"""The shortest wait of the loop: never spin a core that the server needs."""
_SWEEP_EVERY = 0.1
"""How often POSTs past their timeout are looked for."""
_RECV_BYTES = 65536


@dataclass(frozen=True)
class LoadSpec:
    """One stage of load against one endpoint."""

    host: str
    port: int
    batch: int
    seconds: float
    rate: float | None = None
    """POSTs per second (open loop); ``None``: closed loop at ``concurrency``."""
    concurrency: int = 16
    timeout: float = 60.0
    path: str = WEBHOOK_PATH


@dataclass
class LoadResult:
    """What one stage did: POSTs sent and answered, and how long the answers took."""

    sent: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    """Answers by HTTP status."""
    errors: dict[str, int] = field(default_factory=dict)
    """POSTs without an answer, by reason (refused, reset, timeout)."""
    ok: int = 0
    """POSTs answered 200: acknowledged."""
    elapsed: float = 0.0
    """Seconds from the first POST due to the last answer."""
    p50_ms: float | None = None
    p99_ms: float | None = None
    max_ms: float | None = None
    lag_p99_ms: float | None = None
    """How late the generator sent, 99th percentile (open loop)."""
    lag_max_ms: float | None = None
    cpu_seconds: float = 0.0
    """The generator's own CPU time for the stage."""
    machine_cpu_seconds: float = 0.0
    """CPU time the whole machine spent in processes meanwhile (all cores)."""


def machine_cpu_seconds() -> float:
    """CPU seconds all processes of the machine have run (user, nice, system; since boot).

    Interrupt time is left out: it is not charged to any process, so leaving it out
    lets the benchmark tell its own processes' time from everyone else's.
    """
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    return sum(int(x) for x in fields[1:4]) / os.sysconf("SC_CLK_TCK")


def percentile(ordered: list[float], fraction: float) -> float | None:
    """The nearest-rank percentile of an ascending list; ``None`` when it is empty."""
    if not ordered:
        return None
    rank = max(1, min(len(ordered), round(fraction * len(ordered) + 0.5)))
    return ordered[rank - 1]


class _Post:
    """One POST on its own connection: connect, write the request, read until closed."""

    __slots__ = ("due", "head", "request", "sock", "started", "written")

    def __init__(self, sock: socket.socket, request: bytes, due: float, started: float) -> None:
        self.sock = sock
        self.request = request
        self.due = due
        self.started = started
        self.written = -1  # bytes of the request written; -1 while connecting
        self.head = b""


class _Stage:
    def __init__(self, spec: LoadSpec) -> None:
        self.spec = spec
        self.address = (spec.host, spec.port)
        self.requests: Iterator[bytes] = http_requests(spec.host, spec.port, spec.batch, spec.path)
        self.poller = select.epoll()
        self.open: dict[int, _Post] = {}
        self.outcomes: Counter[int | str] = Counter()
        self.latencies: list[float] = []
        self.lags: list[float] = []
        self.last_answer = 0.0

    def start(self, due: float) -> None:
        """Open the connection of one POST due at ``due`` (monotonic seconds)."""
        now = time.monotonic()
        self.lags.append(now - due)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        code = sock.connect_ex(self.address)
        if code not in (0, errno.EINPROGRESS):
            sock.close()
            self.finish_without_answer(errno.errorcode.get(code, str(code)))
            return
        post = _Post(sock, next(self.requests), due, now)
        self.open[sock.fileno()] = post
        self.poller.register(sock.fileno(), select.EPOLLOUT)

    def finish_without_answer(self, reason: str) -> None:
        self.outcomes[reason] += 1
        self.last_answer = time.monotonic()

    def close(self, fd: int, post: _Post) -> None:
        del self.open[fd]
        self.poller.unregister(fd)
        post.sock.close()

    def on_event(self, fd: int, events: int) -> None:
        """Move one POST on: connected → write; readable → read; closed → record."""
        post = self.open[fd]
        sock = post.sock
        if post.written < 0:
            code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                self.close(fd, post)
                self.finish_without_answer(errno.errorcode.get(code, str(code)))
                return
            post.written = 0
        if post.written < len(post.request):
            try:
                post.written += sock.send(post.request[post.written :])
            except BlockingIOError:
                return
            except OSError as exc:
                self.close(fd, post)
                self.finish_without_answer(type(exc).__name__)
                return
            if post.written == len(post.request):
                self.poller.modify(fd, select.EPOLLIN)
            return
        while True:
            try:
                data = sock.recv(_RECV_BYTES)
            except BlockingIOError:
                return
            except OSError as exc:
                self.close(fd, post)
                self.answered(post, None, type(exc).__name__)
                return
            if not data:
                break
            if len(post.head) < 12:
                post.head += data
        self.close(fd, post)
        self.answered(post, post.head, "closed without answer")

    def answered(self, post: _Post, head: bytes | None, otherwise: str) -> None:
        now = time.monotonic()
        self.last_answer = max(self.last_answer, now)
        if head is not None and head.startswith(b"HTTP/1.") and len(head) >= 12:
            status = int(head[9:12])
            self.outcomes[status] += 1
            if status == 200:
                self.latencies.append(now - post.due)
        else:
            self.outcomes[otherwise] += 1

    def sweep(self, now: float) -> None:
        """Give up on POSTs that have waited longer than the timeout."""
        expired = [fd for fd, post in self.open.items() if now - post.started > self.spec.timeout]
        for fd in expired:
            self.close(fd, self.open[fd])
            self.finish_without_answer("timeout")

    def poll(self, timeout: float) -> None:
        for fd, events in self.poller.poll(timeout):
            self.on_event(fd, events)

    def run(self) -> tuple[float, int]:
        """Run the stage; returns its start (monotonic seconds) and POSTs started."""
        rate = self.spec.rate
        start = time.monotonic() + 0.01
        started = 0
        next_sweep = start + _SWEEP_EVERY
        if rate is not None:
            total = max(1, round(rate * self.spec.seconds))
            while started < total or self.open:
                now = time.monotonic()
                while started < total and start + started / rate <= now:
                    self.start(start + started / rate)
                    started += 1
                if now >= next_sweep:
                    self.sweep(now)
                    next_sweep = now + _SWEEP_EVERY
                wait = start + started / rate - time.monotonic() if started < total else 0.05
                self.poll(max(_TICK, wait))
        else:
            deadline = start + self.spec.seconds
            while True:
                now = time.monotonic()
                while now < deadline and len(self.open) < self.spec.concurrency:
                    self.start(now)
                    started += 1
                if now >= next_sweep:
                    self.sweep(now)
                    next_sweep = now + _SWEEP_EVERY
                if not self.open and now >= deadline:
                    break
                self.poll(0.05)
        self.poller.close()
        return start, started

    def result(self, start: float, cpu_seconds: float) -> LoadResult:
        latencies = sorted(self.latencies)
        lags = sorted(self.lags) if self.spec.rate is not None else []

        def ms(value: float | None) -> float | None:
            return None if value is None else round(value * 1000.0, 3)

        return LoadResult(
            sent=sum(self.outcomes.values()),
            statuses={
                str(k): v for k, v in sorted(self.outcomes.items(), key=str) if isinstance(k, int)
            },
            errors={k: v for k, v in self.outcomes.items() if isinstance(k, str)},
            ok=self.outcomes.get(200, 0),
            elapsed=max(self.last_answer - start, 1e-9),
            p50_ms=ms(percentile(latencies, 0.50)),
            p99_ms=ms(percentile(latencies, 0.99)),
            max_ms=ms(latencies[-1] if latencies else None),
            lag_p99_ms=ms(percentile(lags, 0.99)),
            lag_max_ms=ms(lags[-1] if lags else None),
            cpu_seconds=round(cpu_seconds, 3),
        )


def run(spec: LoadSpec) -> LoadResult:
    """Run one stage of load in this process and report it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    stage = _Stage(spec)
    gc.disable()  # no collector pauses in the middle of the schedule
    cpu, machine = time.process_time(), machine_cpu_seconds()
    try:
        start, _ = stage.run()
    finally:
        gc.enable()
    result = stage.result(start, time.process_time() - cpu)
    result.machine_cpu_seconds = round(machine_cpu_seconds() - machine, 3)
    return result


def main(argv: list[str]) -> int:
    """``loadgen.py SPEC_JSON``: run the stage, print its :class:`LoadResult` as JSON."""
    fields: dict[str, Any] = json.loads(argv[1])
    result = run(LoadSpec(**fields))
    print(json.dumps(asdict(result)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
