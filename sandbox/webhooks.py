"""Webhook delivery: ``ota_cm_order_processed`` to every subscriber, with the faults.

The pipeline hands :meth:`WebhookDispatcher.publish` the orders one processing run left
terminal; for each subscription the dispatcher builds one notification per order (with
that subscription's ``clientState``), applies the delivery faults (drop, duplicate,
reorder, envelope shape, delay and per-notification jitter — :mod:`sandbox.faults`),
batches them (all of a run in one POST, at most ``webhook_max_batch`` per POST; ``bare``
and a jitter send one per POST) and queues the POSTs for background delivery threads
(``webhookConcurrency`` of them, so several POSTs may be in flight at once), so the
pipeline never waits on a receiver.

A POST answered 2xx is done. As Business Central's webhooks do, transport errors, 408,
429 and 5xx are retried — up to ``webhook_max_attempts`` POSTs, waiting
``webhook_backoff`` seconds and doubling — and any other answer is final. After
``webhook_deactivate_after`` consecutive final 4xx answers other than 408 and 429 (a 2xx
resets the count) the
subscription is marked inactive, as Business Central's can be: it stays listed, with
``subscriptionState`` ``Inactive``, and gets no more deliveries. The dispatcher
owns its delivery threads and, unless one is passed in, its ``httpx.Client`` (which
its threads share: httpx's client is thread-safe); :meth:`~WebhookDispatcher.close`
stops the threads and closes the client it created.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from sandbox.config import SandboxConfig
from sandbox.faults import FaultInjector
from sandbox.state import INACTIVE, Clock, OrderStore, subscription_active
from sandbox.stats import Stats
from venue.models import OrderStatus
from venue.webhooks import ORDER_PROCESSED_EVENT, Subscription

logger = logging.getLogger(__name__)

APP_ID = "992c2309-cca4-43cb-9e41-911f482ec088"
EVENT_VERSION = "1.0"
_RETRYABLE = frozenset({408, 429})


@dataclass(frozen=True)
class ProcessedEvent:
    """An order a processing run left terminal: what ``ota_cm_order_processed`` says."""

    order_id: str
    buy_from_order_reference: str | None
    status: OrderStatus

    def payload(self) -> dict[str, Any]:
        """The notification's small payload."""
        return {
            "orderId": self.order_id,
            "buyFromOrderReference": self.buy_from_order_reference or "",
            "status": str(self.status),
        }


@dataclass(order=True)
class _Post:
    """One webhook POST waiting for its time."""

    due: float
    seq: int
    subscription_id: str = field(compare=False)
    url: str = field(compare=False)
    body: Any = field(compare=False)
    count: int = field(compare=False)
    attempt: int = field(default=1, compare=False)


class WebhookDispatcher:
    """Builds, batches and delivers notifications on a background thread.

    Threads start with the first publish, up to ``webhookConcurrency`` (a raised value
    adds threads at the next publish; a lowered one keeps those running); :meth:`close`
    stops them. Notifications still queued at close are abandoned (and no longer counted
    as pending).
    """

    def __init__(
        self,
        store: OrderStore,
        config: SandboxConfig,
        faults: FaultInjector,
        stats: Stats,
        clock: Clock,
        *,
        client: httpx.Client | None = None,
    ) -> None:
        self._store = store
        self._config = config
        self._faults = faults
        self._stats = stats
        self._clock = clock
        self._owns_client = client is None
        self._client = client
        self._queue: list[_Post] = []
        self._seq = itertools.count()
        self._busy = 0
        self._changed = threading.Condition()
        self._threads: list[threading.Thread] = []
        self._closed = False
        # Consecutive final 4xx answers per subscription; touched by the delivery threads.
        self._refusals: dict[str, int] = {}
        # Guards the refusal counts and the client's creation, shared by the delivery threads.
        self._lock = threading.Lock()

    def publish(self, events: Sequence[ProcessedEvent]) -> int:
        """Queue notifications of ``events`` for every subscriber; returns how many POSTs.

        Subscriptions are read now: a subscriber that arrives later does not get them.
        """
        if not events:
            return 0
        faults = self._faults.faults
        timestamp = self._clock.now().strftime("%Y-%m-%dT%H:%M:%SZ")
        posts = 0
        for subscription in self._store.subscriptions():
            if subscription.event_name != ORDER_PROCESSED_EVENT:
                continue
            if not subscription_active(subscription):
                continue
            notes = [self._notification(subscription, e, timestamp) for e in events]
            kept = [n for n in notes if not self._faults.roll(faults.drop_rate)]
            self._stats.webhooks("dropped", len(notes) - len(kept))
            if faults.reorder:
                self._faults.shuffle(kept)
            # A jitter delays each notification on its own, so each travels alone.
            alone = faults.envelope == "bare" or faults.webhook_jitter_seconds > 0
            size = 1 if alone else self._config.webhook_max_batch
            batches = [kept[i : i + size] for i in range(0, len(kept), size)]
            if faults.reorder:
                self._faults.shuffle(batches)
            for batch in batches:
                copies = [n for n in batch if self._faults.roll(faults.duplicate_rate)]
                self._stats.webhooks("duplicated", len(copies))
                repeats = [copies[i : i + size] for i in range(0, len(copies), size)]
                for notes_in_post in (batch, *repeats):
                    delay = faults.delay_seconds + self._faults.uniform(
                        faults.webhook_jitter_seconds
                    )
                    self._enqueue(subscription, notes_in_post, faults.envelope, delay)
                    posts += 1
        return posts

    def wait_idle(self, timeout: float) -> bool:
        """Wait until nothing is queued or being posted; whether that happened in time."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while self._queue or self._busy:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._changed.wait(remaining)
        return True

    def close(self) -> None:
        """Stop the delivery thread, abandon what is queued, close an owned client."""
        with self._changed:
            self._closed = True
            abandoned = sum(post.count for post in self._queue)
            self._queue.clear()
            self._changed.notify_all()
            threads = list(self._threads)
        for thread in threads:
            thread.join()
        if abandoned:
            self._stats.pending(-abandoned)
            logger.info("webhook dispatcher closed with %d notifications undelivered", abandoned)
        if self._owns_client and self._client is not None:
            self._client.close()

    # --- internals --------------------------------------------------------------------

    def _notification(
        self, subscription: Subscription, event: ProcessedEvent, timestamp: str
    ) -> dict[str, Any]:
        return {
            "appId": APP_ID,
            "clientState": subscription.client_state or "",
            "eventName": ORDER_PROCESSED_EVENT,
            "eventVersion": EVENT_VERSION,
            "timestamp": timestamp,
            "companyName": self._config.company,
            "companyId": str(uuid.uuid5(uuid.NAMESPACE_URL, self._config.company)),
            "payload": event.payload(),
        }

    def _enqueue(
        self,
        subscription: Subscription,
        notes: list[dict[str, Any]],
        envelope: str,
        delay: float,
    ) -> None:
        body: Any = notes[0] if envelope == "bare" else {envelope: notes}
        post = _Post(
            due=time.monotonic() + delay,
            seq=next(self._seq),
            subscription_id=subscription.id,
            url=subscription.notification_url or "",
            body=body,
            count=len(notes),
        )
        with self._changed:
            if self._closed:
                return
            heapq.heappush(self._queue, post)
            self._stats.pending(post.count)
            while len(self._threads) < self._faults.faults.webhook_concurrency:
                thread = threading.Thread(
                    target=self._run, name=f"sandbox-webhooks-{len(self._threads)}", daemon=True
                )
                self._threads.append(thread)
                thread.start()
            self._changed.notify_all()

    def _run(self) -> None:
        while True:
            with self._changed:
                while not self._closed and (
                    not self._queue or self._queue[0].due > time.monotonic()
                ):
                    wait = self._queue[0].due - time.monotonic() if self._queue else None
                    self._changed.wait(wait)
                if self._closed:
                    return
                post = heapq.heappop(self._queue)
                self._busy += 1
            try:
                self._deliver(post)
            finally:
                with self._changed:
                    self._busy -= 1
                    self._changed.notify_all()

    def _deliver(self, post: _Post) -> None:
        self._stats.webhooks("posts")
        if post.attempt > 1:
            self._stats.webhooks("retries")
        with self._lock:
            if self._client is None:
                # Made on first use: most runtimes (and tests) never deliver a webhook.
                self._client = httpx.Client(timeout=self._config.webhook_timeout)
            client = self._client
        status: int | None
        try:
            status = client.post(post.url, json=post.body).status_code
        except httpx.HTTPError as exc:
            status = None
            logger.info(
                "webhook POST to subscription %s failed: %s",
                post.subscription_id,
                type(exc).__name__,
            )
        if status is not None and 200 <= status < 300:
            with self._lock:
                self._refusals.pop(post.subscription_id, None)
            self._stats.webhooks("sent", post.count)
            self._stats.pending(-post.count)
            return
        retryable = status is None or status in _RETRYABLE or status >= 500
        if retryable and post.attempt < self._config.webhook_max_attempts:
            wait = self._config.webhook_backoff * 2 ** (post.attempt - 1)
            logger.info(
                "webhook POST to subscription %s answered %s; retry %d in %.2fs",
                post.subscription_id,
                status,
                post.attempt,
                wait,
            )
            with self._changed:
                if self._closed:
                    self._stats.pending(-post.count)
                    return
                post.attempt += 1
                post.due = time.monotonic() + wait
                post.seq = next(self._seq)
                heapq.heappush(self._queue, post)
            return
        logger.warning(
            "webhook POST to subscription %s gave up after %d attempts (last answer %s)",
            post.subscription_id,
            post.attempt,
            status,
        )
        self._stats.webhooks("failed", post.count)
        self._stats.pending(-post.count)
        if status is not None and 400 <= status < 500 and status not in _RETRYABLE:
            # 408 and 429 ask for a retry; only the other 4xx say "do not send this".
            self._count_refusal(post.subscription_id)

    def _count_refusal(self, subscription_id: str) -> None:
        """One more final 4xx for the subscription; at the limit it becomes inactive."""
        limit = self._config.webhook_deactivate_after
        with self._lock:
            refusals = self._refusals.get(subscription_id, 0) + 1
            self._refusals[subscription_id] = refusals
            deactivate = bool(limit) and refusals >= limit
            if deactivate:
                del self._refusals[subscription_id]
        if not deactivate:
            return
        if self._store.set_subscription_state(subscription_id, INACTIVE) is not None:
            logger.warning(
                "webhook subscription %s made inactive after %d refused deliveries",
                subscription_id,
                refusals,
            )
