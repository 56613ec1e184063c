"""The partner's client of the venue's OTA Channel Manager API.

:class:`VenueClient` is a thin class around an injected ``httpx.Client``: one method per
endpoint, wire JSON turned into :mod:`venue.models` at this edge, failures turned into
:mod:`venue.errors`. Transport errors, 429, 503 and 504 are retried with stamina
(exponential backoff with jitter, bounded by attempts and a deadline; a ``Retry-After``
is waited out in full) — createOrder only when the venue cannot have acted on it; every
other answer is final (the policy: :mod:`venue.retry`). Calls pass through the identity's
shared :class:`~venue.throttle.Throttle`, which also holds every caller of the identity
back until a 429's or 503's ``Retry-After`` has passed (a call that would wait longer
than the policy's longest wait is not sent: :class:`~venue.errors.VenueRateLimited`
with that ``retry_after``), to the paths of :mod:`venue.endpoints`; answers
are read by :mod:`venue.answers`. Each call is logged as one line of method, path,
status, duration and the venue's ``x-npr-version``; never the API key, never a query
value or a body (they hold customer names and e-mails). :func:`open_client` is the
factory that owns its ``httpx.Client``.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import stamina
from pydantic import SecretStr

from venue.answers import ModelT, read_answer, read_error_body, read_page
from venue.connection import VenueConnection
from venue.endpoints import (
    SUBSCRIPTION_LIST_PATHS,
    CallObserver,
    endpoint_name,
    order_path,
    partner_path,
    query_time,
    segment,
)
from venue.errors import (
    VenueNotFound,
    VenueProtocolError,
    VenueRateLimited,
    VenueUnavailable,
    error_for_status,
)
from venue.models import ConfirmRequest, Order, OrderRequest, OrderStatus, OrderSummary, Page
from venue.retry import RetryPolicy, retry_after_seconds, retryable, retryable_unsent
from venue.throttle import HeldOff, Throttle, ThrottleClosed, throttle_for
from venue.values import normalize_reference, parse_guid
from venue.webhooks import ORDER_PROCESSED_EVENT, Subscription, SubscriptionRequest

logger = logging.getLogger(__name__)

# The venue queues a request up to 8 minutes before answering 503; waiting that long on
# one call helps nobody, so a read timeout here is a transport error and is retried.
DEFAULT_TIMEOUT = httpx.Timeout(30.0, connect=10.0)


class VenueClient:
    """One venue connection's API, over an ``httpx.Client`` the caller owns.

    The client does not manage the life cycle of the ``httpx.Client`` passed to it: whoever
    created it closes it (or use :func:`open_client`). Request timeouts are the
    ``httpx.Client``'s; URLs are absolute, so its ``base_url`` is not used.

    Retried calls are not all idempotent at the venue. createOrder is retried only when
    the venue cannot have acted on it (429, 503, no connection): a first attempt that
    landed but whose answer was lost (a timeout, a reset, a 504) may have gone into Error
    by the time of a retry, and the venue deletes an order in Error when it accepts a
    new one for the reference — the failed sale issued again with no person deciding.
    Such a failure is raised at once, for the caller to look the sale up
    (:meth:`find_by_reference`) before it sends it again. A replaceOrder's retry may
    find the order Submitted.

    Args:
        http: the HTTP client to send requests with.
        connection: the venue, its key, its version pin.
        throttle: the concurrency and rate limit to respect, and where a ``Retry-After``
            is recorded for every caller of the identity: by default the one shared by
            every client of ``connection.api_identity`` in this process; a
            :class:`~venue.throttle.SharedThrottle` (:func:`storage.venue_limits.shared_throttle`)
            shares it with every process of the identity.
        retry: attempts, deadline and backoff for transient failures.
        observer: told of every attempt (metrics); see :data:`CallObserver`.
    """

    def __init__(
        self,
        http: httpx.Client,
        connection: VenueConnection,
        *,
        throttle: Throttle | None = None,
        retry: RetryPolicy | None = None,
        observer: CallObserver | None = None,
    ) -> None:
        self._http = http
        self._connection = connection
        self._base_url = connection.base_url
        self._headers = {
            "x-np-api-key": connection.api_key.get_secret_value(),
            "Accept": "application/json",
        }
        if connection.api_version:
            self._headers["x-api-version"] = connection.api_version
        self._throttle = throttle or throttle_for(connection.api_identity, connection.limits)
        self._retry = retry or RetryPolicy()
        self._observer = observer
        self._subscription_list_paths = SUBSCRIPTION_LIST_PATHS
        self._partner_ids = frozenset(connection.partner_ids)

    def serves(self, partner_id: str) -> bool:
        """Whether ``partner_id`` is one of the partners configured for this connection.

        The venue's webhooks and getOrder are company-wide (CMOrderWebhooks, and
        ChannelMgrOrderAgent ``GetOrder`` has no partner check), so orders of other
        partners of the same company reach otacm; only the configured partners' are ours
        to mirror.
        """
        guid = parse_guid(partner_id)
        return guid is not None and guid in self._partner_ids

    @property
    def connection(self) -> VenueConnection:
        """The venue connection this client talks to."""
        return self._connection

    @property
    def partner_ids(self) -> frozenset[str]:
        """The partners configured for this connection (lowercase GUIDs)."""
        return self._partner_ids

    def __repr__(self) -> str:
        return f"VenueClient({self._base_url!r})"

    # --- orders -----------------------------------------------------------------------

    def create_order(self, request: OrderRequest, *, sync: bool = False) -> Order:
        """Submit a new order (createOrder).

        Args:
            request: the order.
            sync: issue inside the call (``?sync=1``, undocumented; fires no webhook).

        Returns:
            The order as accepted: usually Submitted; already settled on the older
            synchronous API or with ``sync``.

        Raises:
            VenueRejected: refused; ``is_duplicate_reference`` when the reference is taken.
            VenueError: any other failure.
        """
        params = {"sync": "1"} if sync else None
        response = self._call(
            "POST",
            "/channelManager",
            params=params,
            json=request.to_wire(),
            retry_on=retryable_unsent,
        )
        return read_answer("POST", "/channelManager", response, Order)

    def get_order(self, order_id: str) -> Order:
        """The full order, with items, wallets and assets (getOrder).

        Raises:
            VenueNotFound: no such order (or it was deleted outright).
            VenueError: any other failure.
        """
        path = order_path("GET", order_id)
        return read_answer("GET", path, self._call("GET", path), Order)

    def confirm_order(self, order_id: str, payment_reference: str) -> Order:
        """Confirm a Draft order's payment, making it Issued (confirmOrder).

        A no-op returning the order unchanged when it is already Issued.

        Raises:
            VenueRejected: the order cannot be confirmed in its status.
            VenueError: any other failure.
        """
        path = order_path("POST", order_id, "/confirm")
        body = ConfirmRequest(payment_reference=payment_reference).to_wire()
        return read_answer("POST", path, self._call("POST", path, json=body), Order)

    def replace_order(self, order_id: str, request: OrderRequest) -> Order:
        """Replace a Draft or Error order's header and items (replaceOrder).

        Returns:
            The order, Submitted again.

        Raises:
            VenueRejected: the order is in another status, or the request is invalid.
            VenueError: any other failure.
        """
        path = order_path("PUT", order_id)
        response = self._call("PUT", path, json=request.to_wire())
        return read_answer("PUT", path, response, Order)

    def delete_order(self, order_id: str) -> Order | None:
        """Cancel an Issued order, or remove a Draft or Error one (deleteOrder).

        Returns:
            The order as the venue answered it, or ``None`` when the body was empty.

        Raises:
            VenueRejected: the order is still in flight.
            VenueNotFound: no such order.
            VenueError: any other failure.
        """
        path = order_path("DELETE", order_id)
        response = self._call("DELETE", path)
        if not response.content.strip():
            return None
        return read_answer("DELETE", path, response, Order)

    def list_orders(
        self,
        partner_id: str,
        *,
        statuses: Iterable[OrderStatus | str] | None = None,
        sell_to_order_reference: str | None = None,
        received_from: dt.datetime | None = None,
        received_to: dt.datetime | None = None,
        page_size: int | None = None,
    ) -> Iterator[OrderSummary]:
        """The partner's orders as summaries, every page (listOrdersByPartner).

        Filters combine with AND; ``statuses`` are OR-ed; the ``received_*`` bounds are
        inclusive and must be timezone-aware. Pages are requested lazily while iterating.
        A summary that does not read is logged (ids only) and left out, never failing
        its page.

        Raises:
            VenueError: a page could not be fetched.
        """
        params: dict[str, str] = {}
        if statuses is not None:
            params["status"] = ",".join(str(status) for status in statuses)
        if sell_to_order_reference is not None:
            params["sellToOrderReference"] = normalize_reference(sell_to_order_reference)
        if received_from is not None:
            params["receivedAtFrom"] = query_time(received_from)
        if received_to is not None:
            params["receivedAtTo"] = query_time(received_to)
        if page_size is not None:
            params["pageSize"] = str(page_size)
        pages = self._pages(partner_path(partner_id), params, OrderSummary, skip_unreadable=True)
        return (summary for page in pages for summary in page.data)

    def orders_page(self, partner_id: str, *, page_size: int) -> Page[OrderSummary]:
        """The first page of the partner's orders, oldest received first: one call.

        ``more_pages`` says whether more follow; for a count that need not be exact. Rows
        that do not read are in the page's ``unreadable``.

        Raises:
            VenueError: the page could not be fetched.
        """
        params = {"pageSize": str(page_size)}
        path = partner_path(partner_id)
        return next(self._pages(path, params, OrderSummary, skip_unreadable=True))

    def change_feed(
        self,
        partner_id: str,
        last_row_version: int | None,
        page_size: int | None = None,
    ) -> Iterator[OrderSummary]:
        """The partner's orders created or changed after ``last_row_version``, oldest first.

        ``None`` starts from the beginning. Rows deleted outright do not appear. The row
        version is the venue's database-wide counter and a long transaction can commit
        a lower one late, so callers re-read from their mark as it stood some minutes
        ago and upsert (see :mod:`heartbeat.feed`).

        Raises:
            VenueError: a page could not be fetched.
        """
        for page in self.change_feed_pages(partner_id, last_row_version, page_size):
            yield from page.data

    def change_feed_pages(
        self,
        partner_id: str,
        last_row_version: int | None,
        page_size: int | None = None,
    ) -> Iterator[Page[OrderSummary]]:
        """:meth:`change_feed` a page at a time: one venue call per page yielded.

        For callers that commit their progress page by page (the heartbeat's feed). A
        row that does not parse never fails its page: it is logged (ids only) and left
        in the page's ``unreadable``, with its orderId and rowVersion when they read.

        Raises:
            VenueError: a page could not be fetched.
        """
        params = {"sync": "true"}
        if last_row_version is not None:
            params["lastRowVersion"] = str(last_row_version)
        if page_size is not None:
            params["pageSize"] = str(page_size)
        return self._pages(partner_path(partner_id), params, OrderSummary, skip_unreadable=True)

    def find_by_reference(self, partner_id: str, reference: str) -> list[OrderSummary]:
        """The partner's orders with this ``sellToOrderReference`` (compared case-blind).

        Usually none or one; more only in the venue's history of deleted-and-resubmitted
        Error orders.
        """
        wanted = normalize_reference(reference)
        return [
            summary
            for summary in self.list_orders(partner_id, sell_to_order_reference=reference)
            if normalize_reference(summary.sell_to_order_reference) == wanted
        ]

    # --- webhook subscriptions --------------------------------------------------------

    def create_subscription(
        self,
        notification_url: str,
        client_state: str | SecretStr,
        event_name: str = ORDER_PROCESSED_EVENT,
    ) -> Subscription | None:
        """Subscribe ``notification_url`` to ``event_name`` (``POST /webhook``).

        Args:
            notification_url: where the venue will POST notifications.
            client_state: the shared secret (at most 50 characters) each one will carry.
            event_name: the business event.

        Returns:
            The subscription made, or ``None`` when the venue answered 2xx with an empty
            body (as Business Central's external event subscriptions may): find it with
            :meth:`list_subscriptions`.
        """
        if isinstance(client_state, SecretStr):
            client_state = client_state.get_secret_value()
        body = SubscriptionRequest(
            notification_url=notification_url, event_name=event_name, client_state=client_state
        ).to_wire()
        response = self._call("POST", "/webhook", json=body)
        if not response.content.strip():
            return None
        return read_answer("POST", "/webhook", response, Subscription)

    def list_subscriptions(self) -> list[Subscription]:
        """This company's webhook subscriptions: ``GET /webhooks``, or ``GET /webhook``.

        The vendor's pages name both list paths; the other is tried when the first
        answers 404, and the one that answered is used first from then on.

        Raises:
            VenueNotFound: neither path is served (or the company is not found).
            VenueError: any other failure.
        """
        first, second = self._subscription_list_paths
        try:
            subscriptions = list(self._paged(first, {}, Subscription))
        except VenueNotFound:
            subscriptions = list(self._paged(second, {}, Subscription))
            self._subscription_list_paths = (second, first)
        return subscriptions

    def delete_subscription(self, subscription_id: str) -> None:
        """Remove a webhook subscription (``DELETE /webhook/{id}``).

        Raises:
            VenueNotFound: no such subscription.
            VenueError: any other failure.
        """
        self._call("DELETE", f"/webhook/{segment(subscription_id)}")

    # --- the edge ---------------------------------------------------------------------

    def _paged(
        self, path: str, params: dict[str, str], item_type: type[ModelT]
    ) -> Iterator[ModelT]:
        """Every item of a cursor-paged list (see :meth:`_pages`)."""
        for page in self._pages(path, params, item_type):
            yield from page.data

    def _pages(
        self,
        path: str,
        params: dict[str, str],
        item_type: type[ModelT],
        *,
        skip_unreadable: bool = False,
    ) -> Iterator[Page[ModelT]]:
        """Every page of a cursor-paged list, each next request built from ``nextPageKey``.

        ``nextPageURL`` is never followed: the venue re-appends query values to it
        without encoding them. With ``skip_unreadable``, a row that does not parse is
        logged (its ids and the fields at fault, never its values) and kept in the
        page's ``unreadable``; otherwise it fails the page.
        """
        seen_keys: set[str] = set()
        page_params = dict(params)
        while True:
            response = self._call("GET", path, params=page_params)
            page: Page[ModelT] = read_page(
                path, response, item_type, skip_unreadable=skip_unreadable
            )
            for row in page.unreadable:
                logger.warning(
                    "venue GET %s: row %d does not read (orderId %s, id %s, rowVersion %s): %s",
                    path,
                    row.index,
                    row.order_id or "-",
                    row.record_id or "-",
                    "-" if row.row_version is None else row.row_version,
                    row.problem,
                )
            yield page
            key = page.next_page_key
            if not page.more_pages or not key:
                return
            if key in seen_keys:
                raise VenueProtocolError("GET", path, reason="nextPageKey repeats a page")
            seen_keys.add(key)
            page_params = {**params, "pageKey": key}

    def _call(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, str] | None = None,
        json: Any = None,
        retry_on: Callable[[Exception], bool] = retryable,
    ) -> httpx.Response:
        """Send one call with retries; the 2xx response, or the error for the last answer.

        ``retry_on`` says which failures are tried again (within the policy).
        """
        policy = self._retry
        attempt_no = 0

        def backoff(exc: Exception) -> bool | float:
            # A Retry-After is waited out in full: within the policy's longest wait the
            # retry comes then, beyond it the call gives up at once, and the caller's
            # own backoff (the outbox's, the inbox's) takes over.
            if not retry_on(exc) or isinstance(exc.__cause__, ThrottleClosed):
                # A closed limit is a process stopping: trying again cannot help.
                return False
            asked = exc.retry_after if isinstance(exc, VenueUnavailable) else None
            if asked is None:
                return True
            return asked if asked <= policy.wait_max else False

        try:
            for attempt in stamina.retry_context(
                on=backoff,
                attempts=policy.attempts,
                timeout=policy.deadline,
                wait_initial=policy.wait_initial,
                wait_max=policy.wait_max,
                wait_jitter=policy.wait_jitter,
            ):
                with attempt:
                    attempt_no = attempt.num
                    return self._send(method, path, params, json, attempt_no)
        except VenueUnavailable as exc:
            logger.warning(
                "venue %s %s gave up after %d attempts (%s)",
                method,
                path,
                attempt_no,
                exc.status or type(exc.__cause__).__name__,
            )
            raise
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

    def _send(
        self,
        method: str,
        path: str,
        params: dict[str, str] | None,
        json: Any,
        attempt: int,
    ) -> httpx.Response:
        """One attempt: the 2xx response, or the matching :class:`~venue.errors.VenueError`."""
        started = time.perf_counter()
        try:
            with self._throttle.slot(max_hold=self._retry.wait_max):
                response = self._http.request(
                    method,
                    self._base_url + path,
                    params=params,
                    json=json,
                    headers=self._headers,
                )
        except HeldOff as exc:
            # Not sent: the venue asked every caller of this key to wait that long.
            held = VenueRateLimited(method, path, reason=str(exc))
            held.retry_after = exc.seconds
            raise held from exc
        except httpx.TransportError as exc:
            self._observe(method, path, None, started)
            logger.warning(
                "venue %s %s failed: %s after %.0f ms (attempt %d)",
                method,
                path,
                type(exc).__name__,
                (time.perf_counter() - started) * 1000,
                attempt,
            )
            raise VenueUnavailable(method, path, reason=type(exc).__name__) from exc
        self._observe(method, path, response.status_code, started)
        logger.info(
            "venue %s %s -> %d in %.0f ms (x-npr-version %s, attempt %d)",
            method,
            path,
            response.status_code,
            (time.perf_counter() - started) * 1000,
            response.headers.get("x-npr-version", "-"),
            attempt,
        )
        if response.is_success:
            return response
        code, message = read_error_body(response)
        error = error_for_status(method, path, response.status_code, code=code, message=message)
        if isinstance(error, VenueUnavailable):
            error.retry_after = retry_after_seconds(
                response.headers.get("Retry-After"), dt.datetime.now(dt.UTC)
            )
            if error.retry_after is not None and response.status_code in (429, 503):
                # The gateway's word holds for the key, not this call: every caller of
                # the identity (every process, with a shared throttle) waits it out.
                self._throttle.hold_off(error.retry_after)
        raise error

    def _observe(self, method: str, path: str, status: int | None, started: float) -> None:
        if self._observer is not None:
            self._observer(endpoint_name(method, path), status, time.perf_counter() - started)


@contextmanager
def open_client(
    connection: VenueConnection,
    *,
    transport: httpx.BaseTransport | None = None,
    timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
    throttle: Throttle | None = None,
    retry: RetryPolicy | None = None,
    observer: CallObserver | None = None,
) -> Iterator[VenueClient]:
    """A :class:`VenueClient` over an ``httpx.Client`` of its own, closed on exit.

    Args:
        connection: the venue to talk to.
        transport: the HTTP transport (tests pass ``httpx.MockTransport``).
        timeout: per-request timeouts.
        throttle: as for :class:`VenueClient`.
        retry: as for :class:`VenueClient`.
        observer: as for :class:`VenueClient`.
    """
    with httpx.Client(transport=transport, timeout=timeout) as http:
        yield VenueClient(http, connection, throttle=throttle, retry=retry, observer=observer)
