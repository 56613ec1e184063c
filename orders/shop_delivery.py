"""Sending the shop's events, after commit: one sender per endpoint, signed, in order.

Each configured shop endpoint has its own :class:`EndpointSender` (a thread of the worker
role, :func:`start_senders`), so a slow or dead endpoint delays only its own deliveries:
never another endpoint's, the worker's getOrder loop, or the webhook. A pass:

1. claims up to :data:`BATCH_SIZE` due deliveries of its endpoint
   (:mod:`orders.shop_leases`): due, and no earlier event of the same order in flight
   to the same endpoint, so an order's events arrive in their sequence. On PostgreSQL
   a claim leases the rows in one short transaction, after a read-only look found one
   due; on SQLite the endpoint's one sender (a file lock) claims by reading, and takes
   no write lock for it;
2. POSTs them at once, a few at a time (:data:`POOL_SIZE`), with no transaction open:
   the body is the event (``type``, ``timestamp``, ``sequence``, ``data``: the order),
   signed per the Standard Webhooks specification with the ``standardwebhooks`` library
   by every secret the endpoint has (several signatures during a change-over), with
   ``webhook-id`` the event's id, the same on every attempt;
3. settles them, each only while still the sender's: a 2xx answer is ``delivered``;
   408, 429, a 5xx, a timeout or a connection that failed is tried again after an
   exponential backoff with jitter (:func:`storage.lease.backoff`, 5 s doubling up to
   an hour), until the retry horizon (3 days by default) has passed, then ``dead``; any
   other answer is ``dead`` at once (the shop refused the event). In the worker
   (:meth:`EndpointSender.run_forever`) a thread of the sender's own settles, as many
   passes in one transaction as have waited, while the next pass claims and POSTs, so
   the path from a commit to the shop never waits for SQLite's write lock.

A 429 or 503 with a ``Retry-After`` (seconds or an HTTP-date; at most
:data:`RETRY_CAP_SECONDS`) holds the whole endpoint: the pass starts no further POST, the
delivery waits at least that long (dead if that is past its retry horizon), the
endpoint's other pending deliveries are moved to the hold's end, and no sender claims
until then: the hold is stored with the answer (``shop_endpoint_hold``) and every sender
of the endpoint, in any process or started later, reads it before it claims. A malformed
one leaves the delivery to the backoff.

Told to stop (SIGTERM), a sender starts no further POST, gives those in flight up to
:attr:`EndpointSender.stop_grace` to answer, settles the pass (the unsent and unanswered
back to pending) and ends; the worker joins it (:func:`join_senders`) before it exits,
so a stop leaves no delivered event leased, to be sent again. A sender that dies
mid-pass loses nothing: its leases expire (on SQLite: its file lock goes) and the
deliveries are claimed again; the shop may then receive an event twice, with the same
``webhook-id``.
``otacm deliveries list`` and ``replay`` (:mod:`orders.shop_replay`) show
them and put dead ones back.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import json
import logging
import queue
import re
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

import httpx
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker
from standardwebhooks.webhooks import Webhook

from orders.shop_delivery_metrics import count_settled
from orders.shop_leases import DeliveryClaim, Leases, RowLeases, SoleSender
from storage.lease import LAST_ERROR_MAX_CHARS, NO_SYNC, backoff
from storage.models import IN_FLIGHT
from storage.records import DeliveryState, ShopDelivery, ShopEndpointHold
from storage.types import utcnow

logger = logging.getLogger(__name__)

BATCH_SIZE = 64
"""Deliveries one pass of an endpoint's sender claims at most: a backlog drains in passes
of this many, each costing two short transactions (the claim, the settlement)."""

POOL_SIZE = 16
"""POSTs in flight at once to one endpoint."""

IDLE_SECONDS = 0.1
"""How long a sender waits after a pass that found nothing due: the most an event waits
between its commit and its sender noticing it (the rest is one HTTP round trip)."""

RETRY_BASE_SECONDS = 5.0
"""The delay before a failed delivery's second attempt; it doubles with each failure..."""

RETRY_CAP_SECONDS = 3600.0
"""...up to an hour between attempts; and the longest ``Retry-After`` an endpoint is
taken at its word for."""

RETRY_AFTER_STATUSES = frozenset({429, 503})
"""The answers whose ``Retry-After`` header the sender honours (RFC 9110, RFC 6585)."""

STOP_POLL_SECONDS = 0.2
"""How often a pass waiting for its POSTs looks whether the sender was told to stop."""

UNSETTLED_MAX = 4 * BATCH_SIZE
"""Deliveries sent whose settlement may wait behind the database's write lock while the
sender goes on (:meth:`EndpointSender.run_forever`); beyond it the sender waits."""

SETTLE_SECONDS = 10.0
"""What a stopping sender may spend settling its last pass (the database's lock wait
included), beyond its stop grace: :func:`join_senders` waits that long on top."""

Clock = Callable[[], dt.datetime]


@dataclass(frozen=True)
class Endpoint:
    """A shop endpoint as its sender needs it (from the settings, built by the caller).

    Attributes:
        name: the endpoint's name, as its deliveries carry it.
        url: where to POST.
        secrets: the Standard Webhooks secrets that sign each event (``whsec_…``).
    """

    name: str
    url: str
    secrets: tuple[str, ...]


class Outcome:
    """What one POST came to, as :func:`classify` reads it."""

    DELIVERED = "delivered"
    RETRY = "retry"
    REFUSED = "refused"
    UNSENT = "unsent"
    """Not POSTed: the endpoint asked to wait, or the sender is stopping."""
    ABANDONED = "abandoned"
    """POSTed, and no answer before the stopping sender's grace ran out."""


@dataclass(frozen=True)
class Attempt:
    """One POST of a claimed delivery and what came of it."""

    claim: DeliveryClaim
    outcome: str
    status: int | None
    error: str | None
    retry_after: dt.timedelta | None = None


@dataclass
class PassReport:
    """What one pass of an endpoint's sender did."""

    claimed: int = 0
    delivered: int = 0
    retrying: int = 0
    dead: int = 0
    released: int = 0
    lease_lost: int = 0


def event_body(claim: DeliveryClaim) -> bytes:
    """The body POSTed for an event: the same bytes on every attempt."""
    document = {
        "type": claim.type,
        "timestamp": claim.created_at.isoformat().replace("+00:00", "Z"),
        "sequence": claim.order_seq,
        "data": claim.payload,
    }
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def signed_headers(
    signers: Sequence[Webhook], event_id: str, body: bytes, at: dt.datetime
) -> dict[str, str]:
    """The Standard Webhooks headers of one attempt: one signature per secret."""
    signatures = " ".join(signer.sign(event_id, at, body) for signer in signers)
    return {
        "content-type": "application/json",
        "webhook-id": event_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": signatures,
    }


def parse_retry_after(value: str | None, now: dt.datetime) -> dt.timedelta | None:
    """How long a ``Retry-After`` header asks to wait, at most :data:`RETRY_CAP_SECONDS`.

    Args:
        value: the header: delay-seconds (``120``) or an HTTP-date
            (``Wed, 21 Oct 2026 07:28:00 GMT``); ``None`` when absent.
        now: the real time the answer came, against which a date is read.

    Returns:
        The wait (zero for a date already past), or ``None`` for an absent or malformed
        header, which leaves the delivery to the backoff.
    """
    if value is None:
        return None
    text = value.strip()
    if re.fullmatch(r"[0-9]+", text):
        # Digits beyond the cap's are the cap (int() refuses very long ones).
        seconds = float(text) if len(text) <= 12 else RETRY_CAP_SECONDS
    else:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:  # "-0000": an HTTP-date is GMT anyway
            when = when.replace(tzinfo=dt.UTC)
        seconds = max(0.0, (when - now).total_seconds())
    return dt.timedelta(seconds=min(seconds, RETRY_CAP_SECONDS))


def classify(status: int) -> str:
    """What an endpoint's answer means: received, worth another try, or refused."""
    if 200 <= status < 300:
        return Outcome.DELIVERED
    if status in (408, 429) or status >= 500:
        return Outcome.RETRY
    return Outcome.REFUSED


@dataclass
class EndpointSender:
    """The sender of one shop endpoint's deliveries (module docstring).

    Attributes:
        endpoint: where and how to send.
        sessions: the session factory (settlements; on PostgreSQL claims).
        read_sessions: a read-only factory, the same database (the idle look; on
            SQLite claims).
        owner: the lease owner name (:func:`storage.lease.new_owner`).
        horizon: how long after it was recorded (or replayed) a delivery is retried.
        timeout: seconds one POST may take.
        clock: the current time for claims, backoff and the horizon (tests move it);
            the signatures' timestamps are always the real time.
        lease_seconds: how long a claim holds its rows: longer than a pass can take.
        stop_grace: how long, once told to stop, a pass waits for the answers of POSTs
            in flight (0: the timeout and a second) before it puts them back to pending.
    """

    endpoint: Endpoint
    sessions: sessionmaker[Session]
    read_sessions: sessionmaker[Session]
    owner: str
    horizon: dt.timedelta
    timeout: float
    clock: Clock = utcnow
    lease_seconds: float = 0.0
    stop_grace: float = 0.0
    _signers: list[Webhook] = field(init=False)
    _client: httpx.Client = field(init=False)
    _pool: ThreadPoolExecutor = field(init=False)
    _hold_lock: threading.Lock = field(init=False, default_factory=threading.Lock)
    _held_until: dt.datetime | None = field(init=False, default=None)
    _hold_unrecorded: bool = field(init=False, default=False)
    _leases: Leases = field(init=False)
    _settles: queue.Queue[list[Attempt] | None] = field(init=False, default_factory=queue.Queue)
    _unsettled: set[int] = field(init=False, default_factory=set)
    _settled: list[int] = field(init=False, default_factory=list)
    _settled_lock: threading.Condition = field(init=False, default_factory=threading.Condition)

    def __post_init__(self) -> None:
        self._signers = [Webhook(secret) for secret in self.endpoint.secrets]
        self._client = httpx.Client(
            timeout=self.timeout,
            follow_redirects=False,
            limits=httpx.Limits(max_connections=POOL_SIZE, max_keepalive_connections=POOL_SIZE),
        )
        self._pool = ThreadPoolExecutor(POOL_SIZE, thread_name_prefix=f"shop-{self.endpoint.name}")
        if self.lease_seconds <= 0:
            # A pass sends BATCH_SIZE deliveries POOL_SIZE at a time, each within timeout.
            rounds = -(-BATCH_SIZE // POOL_SIZE)
            self.lease_seconds = rounds * self.timeout + 30.0
        if self.stop_grace <= 0:
            self.stop_grace = self.timeout + 1.0
        name = self.endpoint.name
        if self.sessions.kw["bind"].dialect.name == "sqlite":
            self._leases = SoleSender.for_endpoint(self.read_sessions, name)
        else:
            self._leases = RowLeases(
                self.sessions, self.read_sessions, name, self.owner, self.lease_seconds
            )

    def close(self, *, wait: bool = True) -> None:
        """Release the HTTP connections and the POSTing threads.

        Args:
            wait: wait for POSTs still running; a stopped sender does not wait for those
                it abandoned (their rows are pending again already).
        """
        self._pool.shutdown(wait=wait, cancel_futures=True)
        self._client.close()
        self._leases.close()

    def held_until(self) -> dt.datetime | None:
        """Until when the endpoint asked, by ``Retry-After``, not to be sent to; or ``None``."""
        with self._hold_lock:
            if self._held_until is not None and self.clock() < self._held_until:
                return self._held_until
            return None

    def _hold(self, wait: dt.timedelta) -> None:
        until = self.clock() + wait
        with self._hold_lock:
            if self._held_until is None or until > self._held_until:
                self._held_until = until
                self._hold_unrecorded = True
        logger.info(
            "shop endpoint %s asked to wait %.0f s (Retry-After): nothing sent to it before %s",
            self.endpoint.name,
            wait.total_seconds(),
            until.isoformat(),
        )

    def run_once(
        self, *, look_first: bool = True, stop: threading.Event | None = None
    ) -> PassReport:
        """One pass: claim what is due, POST it, settle it (module docstring).

        Nothing is claimed while the endpoint asked to wait (:meth:`held_until`).

        Args:
            look_first: look whether anything is due, read-only, before claiming; a
                pass right after a busy one skips the look (a backlog is likely).
            stop: once set, POSTs of the pass not yet started are not started, those in
                flight get :attr:`stop_grace` to answer, and the pass settles what it has.
        """
        report = PassReport()
        attempts = self._claim_and_send(report, look_first=look_first, stop=stop)
        if attempts:
            self._settle(attempts, report)
        return report

    def _claim_and_send(
        self, report: PassReport, *, look_first: bool, stop: threading.Event | None
    ) -> list[Attempt]:
        if self.held_until() is not None or self._stored_hold():
            return []
        with self._settled_lock:
            while True:
                # Settled in a transaction that committed before this claim's reads
                # begin: they see it, so these rows need no more passing over.
                self._unsettled.difference_update(self._settled)
                self._settled.clear()
                if len(self._unsettled) < UNSETTLED_MAX or (stop is not None and stop.is_set()):
                    break
                self._settled_lock.wait(1.0)  # enough waits to be settled
            unsettled = frozenset(self._unsettled)
        claims = self._leases.claim(
            self.clock(), BATCH_SIZE, exclude=unsettled, look_first=look_first
        )
        report.claimed = len(claims)
        return self._send(claims, stop) if claims else []

    def _send(self, claims: Sequence[DeliveryClaim], stop: threading.Event | None) -> list[Attempt]:
        """POST ``claims``, :data:`POOL_SIZE` at a time; those unanswered when a stop's
        grace runs out are :attr:`Outcome.ABANDONED`."""
        futures: dict[Future[Attempt], DeliveryClaim] = {
            self._pool.submit(self._post, claim, stop): claim for claim in claims
        }
        remaining = set(futures)
        deadline: float | None = None
        while remaining:
            _, remaining = wait(remaining, timeout=None if stop is None else STOP_POLL_SECONDS)
            if remaining and stop is not None and stop.is_set():
                if deadline is None:
                    deadline = time.monotonic() + self.stop_grace
                elif time.monotonic() >= deadline:
                    break
        attempts = []
        for future, claim in futures.items():
            if future.done():
                attempts.append(future.result())
            else:
                future.cancel()
                message = f"the sender stopped after {self.stop_grace:g} s without an answer"
                attempts.append(Attempt(claim, Outcome.ABANDONED, None, message))
        return attempts

    def _post(self, claim: DeliveryClaim, stop: threading.Event | None = None) -> Attempt:
        # Checked before each POST, so that a Retry-After or a stop arriving mid-pass
        # keeps the pass's later POSTs from being sent.
        if (stop is not None and stop.is_set()) or self.held_until() is not None:
            return Attempt(claim, Outcome.UNSENT, None, None)
        body = event_body(claim)
        headers = signed_headers(self._signers, claim.event_id, body, dt.datetime.now(dt.UTC))
        try:
            answer = self._client.post(self.endpoint.url, content=body, headers=headers)
        except httpx.TimeoutException:
            return Attempt(claim, Outcome.RETRY, None, f"no answer within {self.timeout:g} s")
        except httpx.HTTPError as exc:
            # The endpoint's URL may hold a credential: the error's kind and text only.
            failure = f"{type(exc).__name__}: {exc}"[:LAST_ERROR_MAX_CHARS]
            return Attempt(claim, Outcome.RETRY, None, failure)
        outcome = classify(answer.status_code)
        error = None if outcome == Outcome.DELIVERED else f"HTTP {answer.status_code}"
        retry_after = None
        if answer.status_code in RETRY_AFTER_STATUSES:
            header = answer.headers.get("retry-after")
            retry_after = parse_retry_after(header, dt.datetime.now(dt.UTC))
            if retry_after is not None:
                # It speaks of the endpoint, not of this event: hold every delivery.
                self._hold(retry_after)
            elif header is not None:
                error = f"HTTP {answer.status_code}, Retry-After not understood"
        return Attempt(claim, outcome, answer.status_code, error, retry_after)

    def _settle(self, attempts: Sequence[Attempt], report: PassReport) -> None:
        now = self.clock()
        # Rows ending alike (most often: every one delivered, 200) are one UPDATE.
        alike: dict[tuple[Any, ...], list[Attempt]] = {}
        for attempt in attempts:
            values = self._outcome(attempt, now)
            alike.setdefault(tuple(sorted(values.items())), []).append(attempt)
        finished: list[tuple[DeliveryState, list[DeliveryClaim]]] = []
        with self.sessions.begin() as session:
            for key, group in alike.items():
                values = dict(key)
                ids = [attempt.claim.id for attempt in group]
                counted = group[0].outcome != Outcome.UNSENT
                settled = set(self._leases.settle(session, ids, counted=counted, values=values))
                report.lease_lost += len(ids) - len(settled)
                state = values["state"]
                if counted:
                    finished.append((state, [a.claim for a in group if a.claim.id in settled]))
                if state is DeliveryState.DELIVERED:
                    report.delivered += len(settled)
                elif group[0].outcome in (Outcome.UNSENT, Outcome.ABANDONED):
                    report.released += len(settled)
                elif state is DeliveryState.PENDING:
                    report.retrying += len(settled)
                else:
                    report.dead += len(settled)
                    for attempt in group:
                        if attempt.claim.id in settled:
                            self._log_given_up(attempt)
            self._record_hold(session)
        count_settled(self.endpoint.name, finished, now)  # once committed

    def _record_hold(self, session: Session) -> None:
        """Move the endpoint's pending deliveries to the end of a new ``Retry-After`` hold,
        so that the other processes' senders, and this one after a restart, keep it too."""
        with self._hold_lock:
            until = self._held_until if self._hold_unrecorded else None
            self._hold_unrecorded = False
        if until is None:
            return
        d = ShopDelivery
        session.execute(
            sa.update(d)
            .where(
                d.endpoint == self.endpoint.name,
                IN_FLIGHT,
                d.state == DeliveryState.PENDING,
                d.next_attempt_at < until,
            )
            .values(next_attempt_at=until)
            .execution_options(**NO_SYNC)
        )
        # Deliveries recorded during the hold are due at once: the hold itself is stored,
        # for every sender to read before it claims (:meth:`_stored_hold`).
        insert = (
            postgresql.insert(ShopEndpointHold)
            if session.get_bind().dialect.name == "postgresql"
            else sqlite.insert(ShopEndpointHold)
        )
        statement = insert.values(endpoint=self.endpoint.name, hold_until=until)
        session.execute(
            statement.on_conflict_do_update(
                index_elements=[ShopEndpointHold.endpoint],
                set_={"hold_until": statement.excluded.hold_until},
                where=ShopEndpointHold.hold_until < statement.excluded.hold_until,
            )
        )

    def _stored_hold(self) -> bool:
        """Whether a sender of the endpoint (this one before a restart, or another
        process's) stored a hold that still runs; if so it is this sender's too."""
        with self.read_sessions() as session:
            until = session.scalar(
                sa.select(ShopEndpointHold.hold_until).where(
                    ShopEndpointHold.endpoint == self.endpoint.name
                )
            )
        if until is None or until <= self.clock():
            return False
        with self._hold_lock:
            if self._held_until is None or until > self._held_until:
                self._held_until = until
        return True

    def _outcome(self, attempt: Attempt, now: dt.datetime) -> dict[str, Any]:
        """The columns a delivery's attempt leaves it with."""
        claim = attempt.claim
        if attempt.outcome == Outcome.UNSENT:
            # Not sent (no attempt counted): due when the hold ends, or now.
            return {"state": DeliveryState.PENDING, "next_attempt_at": self.held_until() or now}
        values: dict[str, Any] = {"last_status": attempt.status, "last_error": attempt.error}
        deadline = claim.retry_from + self.horizon
        if attempt.outcome == Outcome.DELIVERED:
            values.update(state=DeliveryState.DELIVERED, delivered_at=now)
        elif attempt.outcome == Outcome.ABANDONED:
            # The shop may have it: sent again (same webhook-id) by the next sender.
            values.update(state=DeliveryState.PENDING, next_attempt_at=now)
        elif attempt.outcome == Outcome.RETRY and now < deadline:
            wait = backoff(claim.attempts, base=RETRY_BASE_SECONDS, cap=RETRY_CAP_SECONDS)
            if attempt.retry_after is not None:
                if now + attempt.retry_after > deadline:
                    values.update(
                        state=DeliveryState.DEAD,
                        last_error=f"{attempt.error}; its Retry-After ends past the retry horizon",
                    )
                    return values
                # No earlier than the endpoint asked; later if the backoff says so.
                wait = max(wait, attempt.retry_after)
            values.update(state=DeliveryState.PENDING, next_attempt_at=min(now + wait, deadline))
        else:
            values.update(state=DeliveryState.DEAD)
        return values

    def _log_given_up(self, attempt: Attempt) -> None:
        claim = attempt.claim
        logger.warning(
            "shop delivery %d (%s %s) to %s given up: %s",
            claim.id,
            claim.type,
            claim.event_id,
            self.endpoint.name,
            attempt.error if attempt.outcome == Outcome.REFUSED else "retry horizon",
        )

    def run_forever(self, stop: threading.Event, idle: float = IDLE_SECONDS) -> None:
        """Pass after pass until ``stop`` is set; a pass that found nothing waits ``idle``.

        Each pass's answers are settled by a thread of its own (:meth:`_settle_forever`),
        so the next pass does not wait for the database's write lock first; claims pass
        over the rows whose settlement has not committed yet, and while
        :data:`UNSETTLED_MAX` of them wait, the sender waits for the settler.
        A failing pass (the database away, a bug) is logged and tried again a second
        later; what it had claimed stays leased until its lease expires. Told to stop,
        the last pass is settled before the sender ends.
        """
        name = self.endpoint.name
        logger.info("shop event sender for %s started", name)
        settler = threading.Thread(
            target=self._settle_forever,
            args=(stop,),
            name=f"{threading.current_thread().name}-settle",
            daemon=True,
        )
        settler.start()
        busy = False
        try:
            while not stop.is_set():
                report = PassReport()
                try:
                    attempts = self._claim_and_send(report, look_first=not busy, stop=stop)
                except Exception:
                    logger.exception("shop event sender for %s: pass failed", name)
                    busy = False
                    stop.wait(1.0)
                    continue
                if attempts:
                    with self._settled_lock:
                        self._unsettled.update(attempt.claim.id for attempt in attempts)
                    self._settles.put(attempts)
                busy = report.claimed > 0
                if not busy:
                    stop.wait(idle)
        finally:
            self._settles.put(None)
            settler.join()
            # POSTs abandoned at the stop are settled pending already: not waited for.
            self.close(wait=False)
            logger.info("shop event sender for %s stopped", name)

    def _settle_forever(self, stop: threading.Event) -> None:
        """Settle the passes :meth:`run_forever` queues, as many as wait in one transaction,
        until it queues ``None``."""
        while True:
            batch = self._settles.get()
            ending = batch is None
            attempts = list(batch or ())
            while not ending:
                try:
                    more = self._settles.get_nowait()
                except queue.Empty:
                    break
                ending = more is None
                attempts.extend(more or ())
            if attempts:
                self._settle_retrying(attempts, stop)
            if ending:
                return

    def _settle_retrying(self, attempts: list[Attempt], stop: threading.Event) -> None:
        """Settle ``attempts``, trying again a second later while the database fails; once
        stopping, three tries, then they are left (sent again later, the same events)."""
        tries = 0
        while True:
            try:
                self._settle(attempts, PassReport())
            except Exception:
                tries += 1
                logger.exception(
                    "shop event sender for %s: settling %d deliveries failed",
                    self.endpoint.name,
                    len(attempts),
                )
                if stop.is_set() and tries >= 3:
                    return
                time.sleep(1.0)
                continue
            with self._settled_lock:
                self._settled.extend(attempt.claim.id for attempt in attempts)
                self._settled_lock.notify_all()
            return


def start_senders(
    endpoints: Sequence[Endpoint],
    sessions: sessionmaker[Session],
    read_sessions: sessionmaker[Session],
    *,
    owner: str,
    stop: threading.Event,
    horizon: dt.timedelta,
    timeout: float,
) -> list[threading.Thread]:
    """Start one daemon thread per endpoint running its :class:`EndpointSender`.

    Set ``stop``, then :func:`join_senders`, before the database goes: a sender settles
    its last pass on the way out.
    """
    threads = []
    for endpoint in endpoints:
        sender = EndpointSender(
            endpoint, sessions, read_sessions, owner, horizon=horizon, timeout=timeout
        )
        thread = threading.Thread(
            target=sender.run_forever,
            args=(stop,),
            name=f"shop-sender-{endpoint.name}",
            # Daemon only so that a sender stuck past join_senders' wait cannot keep the
            # process alive; a stop joins them first.
            daemon=True,
        )
        thread.start()
        threads.append(thread)
    return threads


def join_senders(threads: Sequence[threading.Thread], *, timeout: float) -> list[str]:
    """Wait for stopped senders to settle their last pass and end; the names of any not
    ended after their stop grace (the request ``timeout`` and a second) and
    :data:`SETTLE_SECONDS` more, which are logged and left."""
    deadline = time.monotonic() + timeout + 1.0 + SETTLE_SECONDS
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    lingering = [thread.name for thread in threads if thread.is_alive()]
    for name in lingering:
        logger.error("%s did not stop in time: its deliveries in flight wait for their lease", name)
    return lingering
