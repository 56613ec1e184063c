"""The worker's getOrder calls for one batch, several in flight at once.

At 200 ms of venue latency one call after the other gives a worker about five orders a
second; the venue allows an API identity several requests in process at once. So
:func:`fetch_orders` runs a batch's getOrder calls on up to ``concurrency`` threads
and hands each answer back, as it comes, to the worker's thread, which applies it to the
database as before (:mod:`orders.worker`): no database work happens on these threads,
and the key's shared limit (:mod:`venue.throttle`, :mod:`storage.venue_limits`) still
bounds the calls of every thread, process and node together.

A venue failure is an answer too (:class:`Fetched`); anything else a call raises (a bug)
is raised in the worker's thread when its turn comes, as a sequential call would, and
the calls not yet started are dropped: their rows stay leased and are fetched again
once their lease expires. A call starts only as an earlier answer is applied, so no
more than ``concurrency`` answers ever wait to be applied: a worker killed mid-batch
has spent at most that many calls for nothing.
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import TypeVar

from venue.client import VenueClient
from venue.errors import VenueError, order_gone
from venue.models import Order

K = TypeVar("K", bound=Hashable)

DEFAULT_FETCH_CONCURRENCY = 4
"""getOrder calls a worker keeps in flight: the default limit's places in flight
(:data:`venue.throttle.DEFAULT_MAX_IN_FLIGHT`), so one worker alone can use the key's rate."""


@dataclass(frozen=True)
class Fetched:
    """What getOrder said of one order.

    Attributes:
        order: the order; ``None`` when the venue said it does not exist (a 404 naming
            it, :func:`venue.errors.order_gone`), or when the call failed.
        failure: the venue's failure, when it was not a verdict on the order.
    """

    order: Order | None
    failure: VenueError | None = None


def fetch_one(client: VenueClient, order_id: str) -> Fetched:
    """getOrder for one order, its failure kept as an answer.

    Raises:
        Exception: anything but a :class:`~venue.errors.VenueError` (a fault of ours).
    """
    try:
        return Fetched(client.get_order(order_id))
    except VenueError as exc:
        if order_gone(exc, order_id):
            return Fetched(None)
        # Any other failure (another 404 included: an unmatched route, the gateway's) is
        # not a verdict on the order.
        return Fetched(None, exc)


def fetch_orders(
    requests: Sequence[tuple[K, VenueClient, str]], *, concurrency: int
) -> Iterator[tuple[K, Fetched]]:
    """getOrder for each ``(key, client, order_id)``, up to ``concurrency`` at once.

    Answers are yielded as they arrive (in the requests' order when ``concurrency`` is
    1, on the caller's thread); the caller applies each before it asks for the next.

    Raises:
        Exception: what a call raised other than a venue failure (see the module docstring).
    """
    if concurrency <= 1 or len(requests) <= 1:
        for key, client, order_id in requests:
            yield key, fetch_one(client, order_id)
        return
    with ThreadPoolExecutor(
        max_workers=min(concurrency, len(requests)), thread_name_prefix="getOrder"
    ) as pool:
        waiting = iter(requests)
        running: dict[Future[Fetched], K] = {}
        try:
            while True:
                # A new call starts only as an answer is taken: never more than
                # ``concurrency`` answers fetched and not yet applied, so a worker killed
                # mid-batch leaves at most that many to be fetched again.
                for key, client, order_id in itertools.islice(waiting, concurrency - len(running)):
                    running[pool.submit(fetch_one, client, order_id)] = key
                if not running:
                    return
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    yield running.pop(future), future.result()
        finally:
            # Left early (a fault, or the caller stopped): calls not started are dropped.
            for future in running:
                future.cancel()
