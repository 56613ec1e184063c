"""One venue limit per API key, shared by every process through the database.

The limiter (:mod:`storage.venue_limits`) on SQLite (flock files beside the database) and
PostgreSQL (advisory locks and the ``venue_rate`` row): real processes calling a sandbox
whose gateway enforces small limits and counts what it saw; a ``Retry-After`` one process
got holds the others; a holder killed mid-request frees its place.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from sandbox import Faults, SandboxConfig, SandboxServer
from sandbox.config import DEFAULT_PARTNERS
from sandbox.limits import identity_label
from storage.venue_limits import close_shared_throttles, shared_throttle
from venue.client import open_client
from venue.connection import VenueConnection
from venue.errors import VenueRateLimited
from venue.retry import RetryPolicy
from venue.throttle import HeldOff, Limits, NoPlaceFree, next_start

ROOT = Path(__file__).resolve().parents[2]
PARTNER = DEFAULT_PARTNERS[0].id


@pytest.fixture(autouse=True)
def _fresh_throttles() -> Iterator[None]:
    """Throttles are kept per process; each test starts and ends without any."""
    close_shared_throttles()
    yield
    close_shared_throttles()


def _connection(server: SandboxServer, limits: Limits, key: str | None = None) -> VenueConnection:
    config = server.config
    return VenueConnection(
        api_base_url=server.url,
        tenant=config.tenant,
        environment=config.environment,
        company=config.company,
        api_key=key or config.api_key.get_secret_value(),
        partner_ids=[PARTNER],
        venue_max_in_flight=limits.max_in_flight,
        venue_rate_limit=limits.rate,
        venue_rate_period=limits.period,
    )


def _caller(url: str, connection: VenueConnection, **arguments: Any) -> subprocess.Popen[str]:
    fields = connection.model_dump(mode="json")
    fields["api_key"] = connection.api_key.get_secret_value()
    payload = json.dumps({"url": url, "connection": fields, **arguments})
    environment = {k: v for k, v in os.environ.items() if not k.startswith("OTACM_")}
    return subprocess.Popen(
        [sys.executable, "-m", "tests.storage.venue_limits_caller", payload],
        cwd=ROOT,
        env=environment,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _url(engine: sa.Engine) -> str:
    return engine.url.render_as_string(hide_password=False)


def _counters(server: SandboxServer) -> dict[str, int]:
    snapshot = server.runtime.limits.snapshot()["identities"]
    return dict(snapshot[identity_label(server.api_key)])


def _gateway(max_in_flight: int, rate: int, period: float, latency_ms: int) -> SandboxConfig:
    return SandboxConfig(
        pickup_interval=0,
        gateway_max_in_flight=max_in_flight,
        gateway_rate_limit=rate,
        gateway_rate_period=period,
        faults=Faults(latency_ms=latency_ms),
    )


def _run_two(url: str, connection: VenueConnection, **arguments: Any) -> None:
    callers = [_caller(url, connection, **arguments) for _ in range(2)]
    for caller in callers:
        out, err = caller.communicate(timeout=120)
        assert caller.returncode == 0, err
        assert out.strip() == "done 0 failed", out + err


@pytest.mark.process
def test_two_processes_share_one_limit_as_the_gateway_counts_it(
    migrated_engine: sa.Engine,
) -> None:
    """Two processes of four threads each stay within 2 in flight and 14 per 2 s together.

    The sandbox would refuse beyond 2 in flight or 16 per 2 s; it counts every call that
    reaches it, refused or not, so an overrun shows in its counters.
    """
    limits = Limits(max_in_flight=2, rate=14, period=2.0)
    with SandboxServer(_gateway(2, 16, 2.0, latency_ms=100)) as server:
        _run_two(_url(migrated_engine), _connection(server, limits), calls=15, threads=4)
        counters = _counters(server)

    assert counters["requests"] == 30
    assert counters["throttled"] == 0
    assert counters["maxInFlight"] <= 2
    assert counters["maxInWindow"] <= 14


@pytest.mark.process
def test_without_sharing_the_same_two_processes_overrun_the_gateway(tmp_path: Path) -> None:
    """Control: each process keeping the limit alone, the gateway sees more than it allows."""
    limits = Limits(max_in_flight=2, rate=14, period=2.0)
    with SandboxServer(_gateway(2, 16, 2.0, latency_ms=100)) as server:
        _run_two(
            f"sqlite:///{tmp_path / 'unused.sqlite3'}",
            _connection(server, limits),
            calls=15,
            threads=4,
            local=True,
        )
        counters = _counters(server)

    assert counters["maxInFlight"] > 2
    assert counters["throttled"] > 0


@pytest.mark.process
def test_a_retry_after_holds_every_process_of_the_key(migrated_engine: sa.Engine) -> None:
    """A 429 with Retry-After 30 in one process: another process's next call is not sent."""
    limits = Limits(max_in_flight=2, rate=100, period=1.0)
    config = SandboxConfig(pickup_interval=0, faults=Faults(rate_429=1.0, retry_after_seconds=30))
    with SandboxServer(config) as server:
        connection = _connection(server, limits)
        first = _caller(_url(migrated_engine), connection, mode="once")
        out, err = first.communicate(timeout=60)
        assert json.loads(out) == {"status": 429, "retry_after": 30.0, "sent": True}, err
        server.runtime.faults.update({"rate429": 0.0})

        second = _caller(_url(migrated_engine), connection, mode="once")
        out, err = second.communicate(timeout=60)
        outcome = json.loads(out)
        calls = server.runtime.stats.snapshot()["calls"]

    assert outcome["sent"] is False, err
    assert outcome["status"] is None
    assert 20 < outcome["retry_after"] <= 30
    assert calls == {"listOrdersByPartner": {"429": 1}}


def test_a_short_retry_after_is_waited_out_then_the_call_goes(migrated_engine: sa.Engine) -> None:
    """A hold within the call's longest wait: the other client waits for it, then sends."""
    limits = Limits(max_in_flight=2, rate=100, period=1.0)
    with SandboxServer(SandboxConfig(pickup_interval=0)) as server:
        connection = _connection(server, limits)
        throttle = shared_throttle(migrated_engine, connection)
        once = RetryPolicy(attempts=1, wait_max=5.0)
        with open_client(connection, throttle=throttle, retry=once) as client:
            started = time.monotonic()
            throttle.hold_off(1.0)
            page = client.orders_page(PARTNER, page_size=1)
            waited = time.monotonic() - started

    assert page.data == []
    assert waited >= 0.9  # the hold, less the clock's rounding


def test_a_long_hold_is_refused_without_waiting(migrated_engine: sa.Engine) -> None:
    """A hold longer than the caller would wait raises HeldOff, naming the seconds left."""
    limits = Limits(max_in_flight=1, rate=10, period=1.0)
    with SandboxServer(SandboxConfig(pickup_interval=0)) as server:
        throttle = shared_throttle(migrated_engine, _connection(server, limits))
        throttle.hold_off(60)
        with pytest.raises(HeldOff) as held, throttle.slot(max_hold=5):
            pass  # pragma: no cover - never entered

    assert 50 < held.value.seconds <= 60


def test_the_identity_is_stored_under_a_hash_never_the_key(migrated_engine: sa.Engine) -> None:
    """What the database (or the lock directory) holds names no API key."""
    key = "a-very-secret-api-key"
    limits = Limits(max_in_flight=1, rate=10, period=1.0)
    with SandboxServer(SandboxConfig(pickup_interval=0, api_key=key)) as server:
        throttle = shared_throttle(migrated_engine, _connection(server, limits, key=key))
        throttle.hold_off(1)
        with throttle.slot(max_hold=5):
            pass
    if migrated_engine.dialect.name == "postgresql":
        with migrated_engine.connect() as db:
            stored = [tuple(row) for row in db.execute(sa.text("SELECT * FROM venue_rate"))]
        assert len(stored) == 1
        assert key not in repr(stored)
    else:
        directory = Path(str(migrated_engine.url.database) + ".locks")
        names = [path.name for path in directory.iterdir()]
        assert names and not any(key in name for name in names)
        files = [path for path in directory.iterdir() if path.is_file()]
        assert not any(key.encode() in path.read_bytes() for path in files)


@contextmanager
def _holder(url: str, connection: VenueConnection) -> Iterator[subprocess.Popen[str]]:
    """A process holding one place in flight of ``connection``'s key until it is killed."""
    holder = _caller(url, connection, mode="hold")
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "held", holder.stderr
        yield holder
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.communicate(timeout=30)


def _line(process: subprocess.Popen[str]) -> str:
    assert process.stdout is not None
    return process.stdout.readline().strip()


@pytest.mark.process
def test_a_holder_killed_mid_request_frees_its_place(migrated_engine: sa.Engine) -> None:
    """One place in flight, taken by a process that is then killed: the place is free again."""
    limits = Limits(max_in_flight=1, rate=100, period=1.0)
    with SandboxServer(SandboxConfig(pickup_interval=0)) as server:
        connection = _connection(server, limits)
        throttle = shared_throttle(migrated_engine, connection)
        with _holder(_url(migrated_engine), connection):
            assert throttle._wait_for_place(0) is None  # the only place is the holder's
        place = throttle._wait_for_place(30)
        assert place is not None
        with place:
            pass


@pytest.mark.process
def test_a_waiter_gets_the_place_of_a_holder_killed_while_it_waited(
    migrated_engine: sa.Engine,
) -> None:
    """A process waiting for the only place, held by another that is then killed: no
    release wakes it, yet it gets the place well within its minute of waiting."""
    limits = Limits(max_in_flight=1, rate=100, period=1.0)
    url = _url(migrated_engine)
    with SandboxServer(SandboxConfig(pickup_interval=0)) as server:
        connection = _connection(server, limits)
        with _holder(url, connection) as holder:
            waiter = _caller(url, connection, mode="wait", max_wait=60)
            assert _line(waiter) == "waiting", waiter.stderr
            time.sleep(1)  # let it queue; were it slower, the test would only prove less
            assert waiter.poll() is None  # still waiting: the place is held
            holder.send_signal(signal.SIGKILL)
            out, err = waiter.communicate(timeout=30)

    assert out.strip() == "got", err


def test_a_waiter_is_woken_when_a_place_frees(migrated_engine: sa.Engine) -> None:
    """A thread waiting (without a limit) for the only place gets it once its holder, in
    another throttle as another process would have, lets it go."""
    from storage.locks import default_lock_dir
    from storage.venue_limits import FileThrottle, PostgresThrottle

    limits = Limits(max_in_flight=1, rate=10_000, period=1.0)
    identity = "b" * 64

    def make() -> Any:
        if migrated_engine.dialect.name == "postgresql":
            return PostgresThrottle(migrated_engine.url, identity, limits)
        return FileThrottle(default_lock_dir(migrated_engine), identity, limits)

    holder, waiter = make(), make()
    got = threading.Event()

    def wait() -> None:
        with waiter.slot():
            got.set()

    try:
        with holder.slot():
            thread = threading.Thread(target=wait)
            thread.start()
            assert not got.wait(0.5)  # the place is held: the waiter waits
        assert got.wait(30)
        thread.join(30)
    finally:
        holder.close()
        waiter.close()


@pytest.mark.process
def test_a_waiter_gives_up_after_its_longest_wait_as_rate_limited(
    migrated_engine: sa.Engine,
) -> None:
    """The only place held by another process for longer than the call would wait: the
    call is not sent and fails as rate limited, naming why, after the policy's wait."""
    limits = Limits(max_in_flight=1, rate=100, period=1.0)
    once = RetryPolicy(attempts=1, deadline=30.0, wait_initial=0.0, wait_max=1.0, wait_jitter=0.0)
    with SandboxServer(SandboxConfig(pickup_interval=0)) as server:
        connection = _connection(server, limits)
        throttle = shared_throttle(migrated_engine, connection)
        with open_client(connection, throttle=throttle, retry=once) as client:
            with _holder(_url(migrated_engine), connection):
                with pytest.raises(VenueRateLimited) as limited:
                    client.orders_page(PARTNER, page_size=1)
                calls = server.runtime.stats.snapshot()["calls"]
            # Once the holder is gone, the same client's call goes through.
            page = client.orders_page(PARTNER, page_size=1)

    assert isinstance(limited.value.__cause__, NoPlaceFree)
    assert "no place in flight" in str(limited.value)
    assert calls == {}
    assert page.data == []


@pytest.mark.process
def test_closing_the_throttle_ends_a_wait_at_once(migrated_engine: sa.Engine) -> None:
    """A thread waiting (without a limit) for a place another process holds ends with
    NoPlaceFree when its process closes the throttle, as it does when it stops."""
    limits = Limits(max_in_flight=1, rate=100, period=1.0)
    with SandboxServer(SandboxConfig(pickup_interval=0)) as server:
        connection = _connection(server, limits)
        throttle = shared_throttle(migrated_engine, connection)
        outcome: list[BaseException] = []

        def wait() -> None:
            try:
                with throttle.slot():
                    pass  # pragma: no cover - the place stays held
            except NoPlaceFree as exc:
                outcome.append(exc)

        with _holder(_url(migrated_engine), connection):
            thread = threading.Thread(target=wait)
            thread.start()
            thread.join(0.5)
            assert thread.is_alive()  # waiting: the place is held
            close_shared_throttles()
            thread.join(30)
            assert not thread.is_alive()

    assert len(outcome) == 1


@pytest.mark.process
def test_waiters_of_two_processes_take_turns_at_one_place(migrated_engine: sa.Engine) -> None:
    """Two processes of three threads each, one place in flight between them: every call
    waits its turn and goes (none gives up, none refused), the gateway never sees two at
    once, and neither process is kept waiting while the other makes all its calls."""
    limits = Limits(max_in_flight=1, rate=1000, period=1.0)
    url = _url(migrated_engine)
    with SandboxServer(_gateway(1, 1000, 1.0, latency_ms=50)) as server:
        connection = _connection(server, limits)
        callers = [
            _caller(url, connection, calls=12, threads=3, stamps=True, together=True)
            for _ in range(2)
        ]
        for caller in callers:
            assert _line(caller) == "ready"
        for caller in callers:  # both start calling at once
            assert caller.stdin is not None
            caller.stdin.write("go\n")
            caller.stdin.flush()
        ended = []
        for caller in callers:
            out, err = caller.communicate(timeout=120)
            assert caller.returncode == 0, err
            stamps, done = out.strip().splitlines()
            assert done == "done 0 failed", out + err
            ended.append(json.loads(stamps))
        counters = _counters(server)

    assert counters["requests"] == 24
    assert counters["throttled"] == 0
    assert counters["maxInFlight"] == 1
    # Both were waiting from the start: the one that finished first did not make all
    # its calls before the other made any.
    first, second = sorted(ended, key=lambda stamps: stamps[-1])
    assert second[0] < first[-1]


def test_the_rate_keeps_every_window_within_the_limit() -> None:
    """The cell rate algorithm, called as fast as it allows: no window of the period holds
    more than the rate, and the long-run pace is the rate."""
    limits = Limits(max_in_flight=4, rate=20, period=2.0)
    now, tat, starts = 0.0, 0.0, []
    while len(starts) < 200:
        wait, new_tat = next_start(tat, now, limits)
        if wait > 0:
            now += wait
            continue
        tat = new_tat
        starts.append(now)
    for index, start in enumerate(starts):
        in_window = [s for s in starts[index:] if s - start <= limits.period]
        assert len(in_window) <= limits.rate
    assert starts[:4] == [0.0] * 4  # a burst of one per place, not delayed
    assert (starts[-1] - starts[0]) / len(starts) == pytest.approx(limits.interval, rel=0.05)


def test_threads_of_two_throttles_on_one_database_share_the_places(
    migrated_engine: sa.Engine, tmp_path: Path
) -> None:
    """Two throttles as two processes would have (their own in-process bounds of 3), on one
    database: never more than 3 places held together."""
    from storage.locks import default_lock_dir
    from storage.venue_limits import FileThrottle, PostgresThrottle

    limits = Limits(max_in_flight=3, rate=10_000, period=1.0)
    identity = "a" * 64

    def make() -> Any:
        if migrated_engine.dialect.name == "postgresql":
            return PostgresThrottle(migrated_engine.url, identity, limits)
        return FileThrottle(default_lock_dir(migrated_engine), identity, limits)

    throttles = [make(), make()]
    lock = threading.Lock()
    held = peak = 0

    def work(throttle: Any) -> None:
        nonlocal held, peak
        for _ in range(5):
            with throttle.slot():
                with lock:
                    held += 1
                    peak = max(peak, held)
                time.sleep(0.01)
                with lock:
                    held -= 1

    threads = [threading.Thread(target=work, args=(t,)) for t in throttles for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for throttle in throttles:
        throttle.close()

    assert 1 <= peak <= 3
