"""Sending the shop's events, after commit: one sender per endpoint, signed, in order.

Each configured shop endpoint has its own :class:`EndpointSender` (a thread of the worker
role, :func:`start_senders`), so a slow or dead endpoint delays only its own deliveries:
never another endpoint's, the worker's getOrder loop, or the webhook. A pass:

1. looks, in a read-only transaction, whether a delivery of its endpoint is due (on
   SQLite an idle pass so never takes the write lock), and if so claims up to
   :data:`BATCH_SIZE` of them in one short transaction (:func:`claim_deliveries`): due,
   and no earlier event of the same order in flight to the same endpoint, so an order's
   events arrive in their sequence; a claim holds each row under a lease;
2. POSTs them at once, a few at a time (:data:`POOL_SIZE`), with no transaction open:
   the body is the event (``type``, ``timestamp``, ``sequence``, ``data``: the order),
   signed per the Standard Webhooks specification with the ``standardwebhooks`` library
   by every secret the endpoint has (several signatures during a change-over), with
   ``webhook-id`` the event's id, the same on every attempt;
3. settles them in one transaction, each only while still leased by this sender: a 2xx
   answer is ``delivered``; 408, 429, a 5xx, a timeout or a connection that failed is
   tried again after an exponential backoff with jitter (:func:`storage.lease.backoff`,
   5 s doubling up to an hour), until the retry horizon (3 days by default) has passed,
   then ``dead``; any other answer is ``dead`` at once (the shop refused the event).

A sender that dies mid-pass loses nothing: its leases expire and the deliveries are
claimed again; the shop may then receive an event twice, with the same ``webhook-id``.
``otacm deliveries list`` and ``replay`` (:func:`list_deliveries`, :func:`replay`) show
them and put dead ones back.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx
import sqlalchemy as sa
from sqlalchemy.orm import Session, aliased, sessionmaker
from standardwebhooks.webhooks import Webhook

from orders.shop_delivery_metrics import count_settled
from storage.lease import LAST_ERROR_MAX_CHARS, NO_SYNC, LeasedQueue, backoff
from storage.models import IN_FLIGHT
from storage.records import DeliveryState, ShopDelivery, ShopEvent
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
"""...up to an hour between attempts."""

DELIVERY_QUEUE = LeasedQueue(
    model=ShopDelivery,
    pending=DeliveryState.PENDING,
    leased=DeliveryState.LEASED,
    dead=DeliveryState.DEAD,
    holder="sender",
    gave_up="given up",
    logger=logger,
)
"""The deliveries as a leased queue. Its :meth:`~storage.lease.LeasedQueue.settle` ends
a lease; claims are :func:`claim_deliveries`'s own: they read the in-flight rows of one
endpoint by due time (one index range, however many wait in backoff behind a dead
endpoint) and pass over a delivery whose order has an earlier one in flight, where
:meth:`~storage.lease.LeasedQueue.claim` walks a connection's rows in id order."""

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


@dataclass(frozen=True)
class DeliveryClaim:
    """A delivery leased to one sender: what sending it needs, not the ORM object."""

    id: int
    event_id: str
    type: str
    order_seq: int
    payload: dict[str, Any]
    created_at: dt.datetime
    retry_from: dt.datetime
    attempts: int


class Outcome:
    """What one POST came to, as :func:`classify` reads it."""

    DELIVERED = "delivered"
    RETRY = "retry"
    REFUSED = "refused"


@dataclass(frozen=True)
class Attempt:
    """One POST of a claimed delivery and what came of it."""

    claim: DeliveryClaim
    outcome: str
    status: int | None
    error: str | None


@dataclass
class PassReport:
    """What one pass of an endpoint's sender did."""

    claimed: int = 0
    delivered: int = 0
    retrying: int = 0
    dead: int = 0
    lease_lost: int = 0


def _due(now: dt.datetime, endpoint: str) -> list[sa.ColumnElement[bool] | sa.TextClause]:
    d = ShopDelivery
    earlier = aliased(ShopDelivery)
    # The literal IN_FLIGHT (unqualified ``state``) names the innermost table in the
    # subquery: the partial index by (endpoint, order, seq) answers it.
    blocked = (
        sa.select(sa.literal(1))
        .select_from(earlier)
        .where(
            earlier.endpoint == d.endpoint,
            earlier.venue_order_id == d.venue_order_id,
            earlier.order_seq < d.order_seq,
            IN_FLIGHT,
        )
        .exists()
    )
    return [
        d.endpoint == endpoint,
        IN_FLIGHT,
        d.next_attempt_at <= now,
        sa.or_(d.state == DeliveryState.PENDING, d.lease_expires_at < now),
        ~blocked,
    ]


def any_due(read_sessions: sessionmaker[Session], endpoint: str, now: dt.datetime) -> bool:
    """Whether a delivery to ``endpoint`` is due, read without taking a write lock."""
    with read_sessions() as session:
        found = session.scalar(sa.select(ShopDelivery.id).where(*_due(now, endpoint)).limit(1))
    return found is not None


def claim_deliveries(
    sessions: sessionmaker[Session],
    endpoint: str,
    *,
    owner: str,
    now: dt.datetime,
    limit: int,
    lease_seconds: float,
) -> list[DeliveryClaim]:
    """Lease up to ``limit`` due deliveries to ``endpoint`` to ``owner``, soonest due first.

    Due: pending with ``next_attempt_at`` come, or leased with the lease expired, and no
    earlier event of the same order in flight to the same endpoint (so at most one of an
    order's events per claim). PostgreSQL selects them ``FOR UPDATE SKIP LOCKED``;
    SQLite's writers take turns. A claimed row's ``next_attempt_at`` becomes its lease's
    end, when it is due again should its sender die.
    """
    d = ShopDelivery
    query = (
        sa.select(
            d.id,
            d.attempts,
            d.retry_from,
            d.order_seq,
            ShopEvent.event_id,
            ShopEvent.type,
            ShopEvent.payload,
            ShopEvent.created_at,
        )
        .join(ShopEvent, ShopEvent.id == d.shop_event_id)
        .where(*_due(now, endpoint))
        .order_by(d.next_attempt_at, d.id)
        .limit(limit)
        .with_for_update(skip_locked=True, of=d)
    )
    expires = now + dt.timedelta(seconds=lease_seconds)
    with sessions.begin() as session:
        rows = session.execute(query).all()
        if rows:
            session.execute(
                sa.update(d)
                .where(d.id.in_([row.id for row in rows]))
                .values(
                    state=DeliveryState.LEASED,
                    lease_owner=owner,
                    lease_expires_at=expires,
                    next_attempt_at=expires,
                    attempts=d.attempts + 1,
                )
                .execution_options(**NO_SYNC)
            )
    return [
        DeliveryClaim(
            id=row.id,
            event_id=row.event_id,
            type=str(row.type),
            order_seq=row.order_seq,
            payload=row.payload,
            created_at=row.created_at,
            retry_from=row.retry_from,
            attempts=row.attempts + 1,
        )
        for row in rows
    ]


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
        sessions: the session factory (claims and settlements).
        read_sessions: a read-only factory (the idle look), the same database.
        owner: the lease owner name (:func:`storage.lease.new_owner`).
        horizon: how long after it was recorded (or replayed) a delivery is retried.
        timeout: seconds one POST may take.
        clock: the current time for claims, backoff and the horizon (tests move it);
            the signatures' timestamps are always the real time.
        lease_seconds: how long a claim holds its rows: longer than a pass can take.
    """

    endpoint: Endpoint
    sessions: sessionmaker[Session]
    read_sessions: sessionmaker[Session]
    owner: str
    horizon: dt.timedelta
    timeout: float
    clock: Clock = utcnow
    lease_seconds: float = 0.0
    _signers: list[Webhook] = field(init=False)
    _client: httpx.Client = field(init=False)
    _pool: ThreadPoolExecutor = field(init=False)

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

    def close(self) -> None:
        """Release the HTTP connections and the POSTing threads."""
        self._pool.shutdown(wait=True)
        self._client.close()

    def run_once(self, *, look_first: bool = True) -> PassReport:
        """One pass: claim what is due, POST it, settle it (module docstring).

        Args:
            look_first: look whether anything is due, read-only, before claiming; a
                pass right after a busy one skips the look (a backlog is likely).
        """
        report = PassReport()
        name = self.endpoint.name
        if look_first and not any_due(self.read_sessions, name, self.clock()):
            return report
        claims = claim_deliveries(
            self.sessions,
            name,
            owner=self.owner,
            now=self.clock(),
            limit=BATCH_SIZE,
            lease_seconds=self.lease_seconds,
        )
        report.claimed = len(claims)
        if claims:
            attempts = list(self._pool.map(self._post, claims))
            self._settle(attempts, report)
        return report

    def _post(self, claim: DeliveryClaim) -> Attempt:
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
        return Attempt(claim, outcome, answer.status_code, error)

    def _settle(self, attempts: Sequence[Attempt], report: PassReport) -> None:
        now = self.clock()
        # Rows ending alike (most often: every one delivered, 200) are one UPDATE.
        alike: dict[tuple[Any, ...], list[Attempt]] = {}
        for attempt in attempts:
            values = self._outcome(attempt, now)
            alike.setdefault(tuple(sorted(values.items())), []).append(attempt)
        counted: list[tuple[DeliveryState, list[DeliveryClaim]]] = []
        with self.sessions.begin() as session:
            for key, group in alike.items():
                values = dict(key)
                ids = [attempt.claim.id for attempt in group]
                settled = set(DELIVERY_QUEUE.settle(session, ids, owner=self.owner, **values))
                report.lease_lost += len(ids) - len(settled)
                state = values["state"]
                counted.append((state, [a.claim for a in group if a.claim.id in settled]))
                if state is DeliveryState.DELIVERED:
                    report.delivered += len(settled)
                elif state is DeliveryState.PENDING:
                    report.retrying += len(settled)
                else:
                    report.dead += len(settled)
                    for attempt in group:
                        if attempt.claim.id in settled:
                            self._log_given_up(attempt)
        count_settled(self.endpoint.name, counted, now)  # once committed

    def _outcome(self, attempt: Attempt, now: dt.datetime) -> dict[str, Any]:
        """The columns a delivery's attempt leaves it with."""
        claim = attempt.claim
        values: dict[str, Any] = {"last_status": attempt.status, "last_error": attempt.error}
        deadline = claim.retry_from + self.horizon
        if attempt.outcome == Outcome.DELIVERED:
            values.update(state=DeliveryState.DELIVERED, delivered_at=now)
        elif attempt.outcome == Outcome.RETRY and now < deadline:
            wait = backoff(claim.attempts, base=RETRY_BASE_SECONDS, cap=RETRY_CAP_SECONDS)
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

        A failing pass (the database away, a bug) is logged and tried again a second
        later; what it had claimed stays leased until its lease expires.
        """
        logger.info("shop event sender for %s started", self.endpoint.name)
        busy = False
        try:
            while not stop.is_set():
                try:
                    report = self.run_once(look_first=not busy)
                except Exception:
                    logger.exception("shop event sender for %s: pass failed", self.endpoint.name)
                    busy = False
                    stop.wait(1.0)
                    continue
                busy = report.claimed > 0
                if not busy:
                    stop.wait(idle)
        finally:
            self.close()


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
    """Start one daemon thread per endpoint running its :class:`EndpointSender`."""
    threads = []
    for endpoint in endpoints:
        sender = EndpointSender(
            endpoint, sessions, read_sessions, owner, horizon=horizon, timeout=timeout
        )
        thread = threading.Thread(
            target=sender.run_forever,
            args=(stop,),
            name=f"shop-sender-{endpoint.name}",
            daemon=True,
        )
        thread.start()
        threads.append(thread)
    return threads


# --- for people: list and replay --------------------------------------------------------


@dataclass(frozen=True)
class DeliveryRow:
    """A delivery as ``otacm deliveries list`` shows it."""

    id: int
    endpoint: str
    state: str
    type: str
    event_id: str
    order_id: str | None
    reference: str | None
    order_seq: int
    attempts: int
    next_attempt_at: dt.datetime
    last_status: int | None
    last_error: str | None
    created_at: dt.datetime
    delivered_at: dt.datetime | None

    def as_dict(self) -> dict[str, Any]:
        """The row as JSON values."""
        return {
            key: value.isoformat() if isinstance(value, dt.datetime) else value
            for key, value in self.__dict__.items()
        }


def list_deliveries(
    session: Session,
    *,
    state: DeliveryState | None = None,
    endpoint: str | None = None,
    limit: int = 100,
) -> list[DeliveryRow]:
    """The newest deliveries first, ``limit`` of them, filtered by state and endpoint."""
    d = ShopDelivery
    query = sa.select(d, ShopEvent).join(ShopEvent, ShopEvent.id == d.shop_event_id)
    if state is not None:
        query = query.where(d.state == state)
    if endpoint is not None:
        query = query.where(d.endpoint == endpoint)
    query = query.order_by(d.id.desc()).limit(limit)
    rows = []
    for delivery, event in session.execute(query).all():
        payload = event.payload if isinstance(event.payload, dict) else {}
        rows.append(
            DeliveryRow(
                id=delivery.id,
                endpoint=delivery.endpoint,
                state=delivery.state.value,
                type=event.type.value,
                event_id=event.event_id,
                order_id=_text(payload.get("orderId")),
                reference=_text(payload.get("sellToOrderReference")),
                order_seq=delivery.order_seq,
                attempts=delivery.attempts,
                next_attempt_at=delivery.next_attempt_at,
                last_status=delivery.last_status,
                last_error=delivery.last_error,
                created_at=event.created_at,
                delivered_at=delivery.delivered_at,
            )
        )
    return rows


class ReplayRefused(ValueError):
    """A replay names a delivery that does not exist or is not dead."""


def replay(
    session: Session,
    *,
    delivery_id: int | None = None,
    endpoint: str | None = None,
    now: dt.datetime,
) -> list[int]:
    """Put dead deliveries back in the queue: one by id, or every dead one (of an endpoint).

    Each is pending at once, with the same event (id, sequence, payload), its retry
    horizon starting again now.

    Raises:
        ReplayRefused: ``delivery_id`` names no delivery, or one not dead.

    Returns:
        The deliveries replayed, by id.
    """
    d = ShopDelivery
    query = sa.update(d).where(d.state == DeliveryState.DEAD)
    if delivery_id is not None:
        found = session.get(ShopDelivery, delivery_id)
        if found is None:
            raise ReplayRefused(f"no shop delivery {delivery_id}")
        if found.state is not DeliveryState.DEAD:
            raise ReplayRefused(f"shop delivery {delivery_id} is {found.state}, not dead")
        query = query.where(d.id == delivery_id)
    if endpoint is not None:
        query = query.where(d.endpoint == endpoint)
    statement = (
        query.values(
            state=DeliveryState.PENDING,
            next_attempt_at=now,
            retry_from=now,
            lease_owner=None,
            lease_expires_at=None,
        )
        .returning(d.id)
        .execution_options(**NO_SYNC)
    )
    return sorted(session.scalars(statement).all())


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None
