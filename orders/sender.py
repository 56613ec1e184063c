"""The outbox sender: one claimed call sent to the venue, its answer applied.

:func:`send_outbox_row` and :func:`run_outbox_once` claim due rows
(:func:`orders.outbox.claim_outbox`) one at a time, make each call with no transaction
open, and apply the answer in a transaction of its own, only while the row is still
leased by its sender (:class:`orders.attempt.Send`); what each operation calls and how
its answer is applied is :mod:`orders.calls`'s. A database failure leaves the row
leased: the first claim after its lease expires sends it again (looking a create up
first). The scheduler's ``retry_outbox`` job runs :func:`run_outbox_once`; ``otacm
submit``, ``POST /api/orders`` and ``otacm orders replace/cancel`` send their own row at
once through :func:`send_outbox_row`.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Mapping
from dataclasses import dataclass, fields

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from orders.attempt import Clock, LeaseLost, Send, SendOutcome, SendResult, kept_leased, moving_from
from orders.calls import SENDERS
from orders.outbox import DEFAULT_LEASE_SECONDS, DEFAULT_MAX_ATTEMPTS, OutboxClaim, claim_outbox
from storage.models import Outbox, OutboxState
from venue.client import VenueClient

logger = logging.getLogger(__name__)


@dataclass
class OutboxReport:
    """What one :func:`run_outbox_once` pass did, counted in rows.

    Attributes:
        claimed: rows leased by the pass.
        sent: rows the venue carried out (including those resolved after a lost answer).
        resolved: of ``sent``, rows whose earlier answer was lost, found afterwards.
        in_error: of ``resolved``, creates whose order was found in Error (not sent again).
        removed: of ``sent``, orders now gone at the venue (deleted while Draft or Error).
        retried: rows sent back to pending after a failure that may pass.
        failed: rows the venue refused.
        dead: rows given up after ``max_attempts``.
        lease_lost: rows another sender had re-claimed by the time this one applied.
        abandoned: rows left leased after our own database failed.
        venue_calls: rows sent to the venue (look-ups and the client's retries not counted).
    """

    claimed: int = 0
    sent: int = 0
    resolved: int = 0
    in_error: int = 0
    removed: int = 0
    retried: int = 0
    failed: int = 0
    dead: int = 0
    lease_lost: int = 0
    abandoned: int = 0
    venue_calls: int = 0

    def add(self, result: SendResult) -> None:
        """Count one row's result."""
        self.venue_calls += 1
        counter = {
            SendOutcome.SENT: "sent",
            SendOutcome.RETRYING: "retried",
            SendOutcome.FAILED: "failed",
            SendOutcome.DEAD: "dead",
            SendOutcome.LEASE_LOST: "lease_lost",
            SendOutcome.ABANDONED: "abandoned",
        }.get(result.outcome)
        if counter is not None:
            setattr(self, counter, getattr(self, counter) + 1)
        if result.outcome is SendOutcome.SENT:
            self.resolved += result.resolved
            self.in_error += result.found_in_error
            self.removed += result.removed

    def as_dict(self) -> dict[str, int]:
        """The counts by name, for logs and ``--json``."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def send_outbox_row(
    sessions: sessionmaker[Session],
    client: VenueClient,
    outbox_id: int,
    *,
    owner: str,
    now: dt.datetime,
    lease_seconds: float = DEFAULT_LEASE_SECONDS,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    clock: Clock | None = None,
) -> SendResult:
    """Claim one outbox row if it is due, send it, and apply the venue's answer.

    Args:
        sessions: the session factory; claim and apply commit on their own.
        client: the venue client of the row's connection.
        outbox_id: the row.
        owner: the lease owner name (:func:`~storage.lease.new_owner`).
        now: the current time (aware).
        lease_seconds: how long the row is held from its claim, and from each renewal
            before a further venue call (``OTACM_OUTBOX_LEASE_SECONDS``).
        max_attempts: attempts after which a failing row is ``dead``.
        clock: the time renewals are counted from; by default ``now`` moving on with
            the monotonic clock.

    Returns:
        What came of it; ``NOT_CLAIMED`` with the row's current state when it was not due.
    """
    clock = clock or moving_from(now)
    claims = claim_outbox(
        sessions,
        owner=owner,
        now=now,
        limit=1,
        lease_seconds=lease_seconds,
        ids=[outbox_id],
        max_attempts=max_attempts,
    )
    if not claims:
        with sessions.begin() as session:
            row = session.get(Outbox, outbox_id)
            state = None if row is None else row.state
            order_id = None if row is None else row.order_id
            message = None if row is None else row.last_error
        return SendResult(
            outbox_id, SendOutcome.NOT_CLAIMED, state=state, order_id=order_id, message=message
        )
    return _send_claim(
        sessions,
        client,
        claims[0],
        owner=owner,
        now=now,
        max_attempts=max_attempts,
        lease_seconds=lease_seconds,
        clock=clock,
    )


def run_outbox_once(
    sessions: sessionmaker[Session],
    clients: Mapping[int, VenueClient],
    *,
    owner: str,
    now: dt.datetime,
    batch_size: int = 50,
    lease_seconds: float = DEFAULT_LEASE_SECONDS,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    clock: Clock | None = None,
) -> OutboxReport:
    """One pass of the outbox sender: claim due rows one at a time and send each.

    Only rows of connections in ``clients`` are claimed, whatever their operation. Each
    row is claimed just before it is sent, so its lease counts from then, not from the
    start of the pass; each call is made with no transaction open.

    Args:
        sessions: the session factory.
        clients: the venue client of each connection id; the caller creates and closes
            them (:func:`venue.client.open_client`).
        owner: this sender's lease owner name (:func:`~storage.lease.new_owner`).
        now: the current time (aware).
        batch_size: the most rows to claim.
        lease_seconds: how long a claimed row stays this sender's, from its claim and
            from each renewal before a further venue call (``OTACM_OUTBOX_LEASE_SECONDS``;
            see :data:`DEFAULT_LEASE_SECONDS`).
        max_attempts: attempts after which a row is ``dead``.
        clock: the current time at each claim; by default ``now`` moving on with the
            monotonic clock.

    Returns:
        What the pass did.
    """
    clock = clock or moving_from(now)
    report = OutboxReport()
    while report.claimed < batch_size:
        # Each lease counts from its own claim; what the pass records is stamped ``now``.
        claims = claim_outbox(
            sessions,
            owner=owner,
            now=clock(),
            limit=1,
            lease_seconds=lease_seconds,
            connection_ids=clients.keys(),
            max_attempts=max_attempts,
        )
        if not claims:
            break
        [claim] = claims
        report.claimed += 1
        report.add(
            _send_claim(
                sessions,
                clients[claim.connection_id],
                claim,
                owner=owner,
                now=now,
                max_attempts=max_attempts,
                lease_seconds=lease_seconds,
                clock=clock,
            )
        )
    if report.claimed:
        logger.info("outbox pass: %s", report.as_dict())
    return report


def _send_claim(
    sessions: sessionmaker[Session],
    client: VenueClient,
    claim: OutboxClaim,
    *,
    owner: str,
    now: dt.datetime,
    max_attempts: int,
    lease_seconds: float,
    clock: Clock,
) -> SendResult:
    """Send one claimed row and apply the answer; a database failure leaves it leased."""
    send = Send(
        sessions,
        client,
        claim,
        owner=owner,
        now=now,
        max_attempts=max_attempts,
        lease_seconds=lease_seconds,
        clock=clock,
    )
    try:
        with kept_leased(send):
            return SENDERS[claim.operation](send)
    except LeaseLost:
        logger.warning(
            "outbox %d: lease lost before a further venue call; left to its new sender", claim.id
        )
        return SendResult(claim.id, SendOutcome.LEASE_LOST)
    except SQLAlchemyError as exc:
        # Nothing of the failed transaction was written; the row stays leased, and the
        # first claim after the lease expires sends it again.
        logger.warning(
            "outbox %d: database error %s; left to its lease", claim.id, type(exc).__name__
        )
        return SendResult(claim.id, SendOutcome.ABANDONED, state=OutboxState.LEASED)
