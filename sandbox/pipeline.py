"""The venue's background job: pickup, processing (minting), and the stuck-order sweeper.

A *pickup cycle* (:meth:`Pipeline.run_cycle`, every ``pickup_interval`` seconds and on
``POST /_sandbox/tick``) first sweeps — Scheduled for over 5 minutes goes back to
Submitted, Processing for over an hour becomes Error, silently — then takes every
Submitted order through Scheduled and Processing to a terminal status: Issued when it
has a paymentReference, Draft when not, Error (with ``statusMessage``) when issuance
fails. Each step is a change, so each takes a new row version. The orders one cycle
left terminal are announced in one ``ota_cm_order_processed`` run (batched per
subscriber); the sweeper, ``?sync=1`` and the legacy synchronous mode announce nothing.

With the ``holdCommitSeconds`` fault, a background run's last change is held: it takes
its row version when the run ends but is committed (and announced) only by the first
cycle that much later (:meth:`~sandbox.state.OrderStore.hold`), which releases it before
sweeping: a late commit below versions taken meanwhile.

Issuance fails when a line's visit date has passed since submission, its item has left
the catalog, its ``componentSchedule`` schedules a component twice or before the line's
visit (the request parser lets both through), or the ``errorRate`` fault fires. The
``stall*Rate`` faults leave an order hanging for the sweeper. Minting gives each wallet
a GUID, an 18-digit reference number, the partner's external reference and name, the
price of what it holds (:meth:`~sandbox.catalog.CatalogItem.wallet_price`), a manifest
URL and its assets (tickets and coupons with reference numbers).
"""

from __future__ import annotations

import datetime as dt
import logging
import secrets
import string
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any

from sandbox.catalog import CatalogItem
from sandbox.config import SandboxConfig
from sandbox.faults import FaultInjector
from sandbox.orders import shell_items
from sandbox.requests import RequestLine
from sandbox.state import Clock, OrderRecord, OrderStore
from sandbox.stats import Stats
from sandbox.webhooks import ProcessedEvent, WebhookDispatcher
from venue.models import Asset, OrderItem, OrderStatus, Wallet

logger = logging.getLogger(__name__)

SCHEDULED_TIMEOUT = dt.timedelta(minutes=5)
PROCESSING_TIMEOUT = dt.timedelta(hours=1)
STUCK_MESSAGE = "Order was stuck in Processing for more than 1 hour; replace it to retry"
UNEXPECTED_MESSAGE = "Unexpected error while issuing the order; replace it to retry"
_ALPHANUMERIC = string.ascii_uppercase + string.digits


class IssueFailure(Exception):
    """Issuance failed; the message becomes the order's ``statusMessage``."""


@dataclass
class CycleReport:
    """What one pickup cycle did, as ``POST /_sandbox/tick`` answers it."""

    rescheduled: list[str] = field(default_factory=list)
    timed_out: list[str] = field(default_factory=list)
    processed: list[tuple[str, OrderStatus]] = field(default_factory=list)
    stalled: list[tuple[str, OrderStatus]] = field(default_factory=list)
    held: list[str] = field(default_factory=list)
    webhook_posts: int = 0

    def to_json(self) -> dict[str, Any]:
        """The report as JSON."""
        return {
            "rescheduled": self.rescheduled,
            "timedOut": self.timed_out,
            "processed": [{"orderId": i, "status": str(s)} for i, s in self.processed],
            "stalled": [{"orderId": i, "status": str(s)} for i, s in self.stalled],
            "held": self.held,
            "webhookPosts": self.webhook_posts,
        }


class Pipeline:
    """Processing runs over the store; one cycle (or synchronous run) at a time."""

    def __init__(
        self,
        store: OrderStore,
        config: SandboxConfig,
        clock: Clock,
        faults: FaultInjector,
        dispatcher: WebhookDispatcher,
        stats: Stats,
    ) -> None:
        self._store = store
        self._config = config
        self._clock = clock
        self._faults = faults
        self._dispatcher = dispatcher
        self._stats = stats
        # One run at a time: a tick, the cadence and a ?sync=1 call never share an order.
        self._running = threading.Lock()

    def run_cycle(self) -> CycleReport:
        """Sweep, then process every Submitted order; announce the terminal ones."""
        report = CycleReport()
        with self._running:
            # Held changes first: a commit that is due lands before the sweeper looks.
            events = []
            for released in self._store.release_due(self._clock.now()):
                report.processed.append((released.order_id, released.status))
                events.append(
                    ProcessedEvent(
                        released.order_id, released.order.buy_from_order_reference, released.status
                    )
                )
            self._sweep(report)
            for record in self._store.with_status(OrderStatus.SUBMITTED):
                final = self._run(record, background=True)
                if final is None:
                    report.held.append(record.order_id)
                elif final.status.settled:
                    report.processed.append((final.order_id, final.status))
                    events.append(
                        ProcessedEvent(
                            final.order_id, final.order.buy_from_order_reference, final.status
                        )
                    )
                else:
                    report.stalled.append((final.order_id, final.status))
            report.webhook_posts = self._dispatcher.publish(events)
        self._stats.pipeline("cycles")
        self._stats.pipeline("processed", len(report.processed))
        self._stats.pipeline("stalled", len(report.stalled))
        self._stats.pipeline("held", len(report.held))
        if report.processed or report.stalled or report.rescheduled or report.timed_out:
            logger.info(
                "pickup cycle: %d processed, %d stalled, %d rescheduled, %d timed out",
                len(report.processed),
                len(report.stalled),
                len(report.rescheduled),
                len(report.timed_out),
            )
        return report

    def process_now(self, record: OrderRecord) -> OrderRecord:
        """Issue one Submitted order inside the API call (``?sync=1``, legacy mode).

        No faults stall it and no webhook announces it.
        """
        with self._running:
            current = self._store.get(record.order_id) or record
            if current.status is not OrderStatus.SUBMITTED:
                return current
            final = self._run(current, background=False)
        assert final is not None  # only background runs are held
        self._stats.pipeline("processed")
        return final

    # --- the sweeper ------------------------------------------------------------------

    def _sweep(self, report: CycleReport) -> None:
        now = self._clock.now()
        for record in self._store.with_status(OrderStatus.SCHEDULED):
            if now - record.status_since > SCHEDULED_TIMEOUT:
                self._move(record, OrderStatus.SUBMITTED)
                report.rescheduled.append(record.order_id)
        # A held change's order is locked by its open transaction: the sweeper waits.
        held = self._store.held_ids()
        for record in self._store.with_status(OrderStatus.PROCESSING):
            if record.order_id not in held and now - record.status_since > PROCESSING_TIMEOUT:
                self._move(
                    record,
                    OrderStatus.ERROR,
                    status_message=STUCK_MESSAGE,
                    items=shell_items(record.request, self._config),
                )
                report.timed_out.append(record.order_id)
        self._stats.pipeline("rescheduled", len(report.rescheduled))
        self._stats.pipeline("timedOut", len(report.timed_out))

    # --- one processing run -----------------------------------------------------------

    def _run(self, record: OrderRecord, *, background: bool) -> OrderRecord | None:
        """Submitted → Scheduled → Processing → Issued/Draft/Error (or a stall).

        Returns:
            The order as the run left it, or ``None`` when its last change is held
            (``holdCommitSeconds``) for a later cycle to commit.
        """
        faults = self._faults.faults
        record = self._move(record, OrderStatus.SCHEDULED)
        if background and self._faults.roll(faults.stall_scheduled_rate):
            return record
        job_id = f"TM-IMPORT-{self._store.next_value('job'):06d}"
        record = self._move(record, OrderStatus.PROCESSING, job_id=job_id)
        if background and self._faults.roll(faults.stall_processing_rate):
            return record
        try:
            if self._faults.roll(faults.error_rate):
                raise IssueFailure(UNEXPECTED_MESSAGE)
            items = self._mint(record)
        except IssueFailure as failure:
            logger.info("order %s failed to issue", record.order_id)
            return self._finish(
                record,
                OrderStatus.ERROR,
                background=background,
                status_message=str(failure),
                items=shell_items(record.request, self._config),
            )
        status = OrderStatus.ISSUED if record.order.payment_reference else OrderStatus.DRAFT
        return self._finish(
            record,
            status,
            background=background,
            status_message="",
            items=items,
            manifest_url=self._manifest_url(record.order_id),
        )

    def _finish(
        self, record: OrderRecord, status: OrderStatus, *, background: bool, **changes: Any
    ) -> OrderRecord | None:
        """The run's last change: written now, or held for a late commit (``None``)."""
        hold = self._faults.faults.hold_commit_seconds
        if not (background and hold > 0):
            return self._move(record, status, **changes)
        now = self._clock.now()
        order = record.order.model_copy(update={"status": status, **changes})
        version = self._store.hold(order, record.request, now, now + dt.timedelta(seconds=hold))
        logger.info("order %s: its last change (rowVersion %d) is held", record.order_id, version)
        return None

    def _move(self, record: OrderRecord, status: OrderStatus, **changes: Any) -> OrderRecord:
        order = record.order.model_copy(update={"status": status, **changes})
        return self._store.save(order, record.request, self._clock.now())

    def _manifest_url(self, manifest_id: str) -> str:
        return f"{self._config.manifest_base_url}?mid={manifest_id}"

    def _mint(self, record: OrderRecord) -> list[OrderItem]:
        """The order's lines with minted wallets.

        Raises:
            IssueFailure: a line cannot be issued; the message says which and why.
        """
        catalog = self._config.catalog
        today = self._config.local_today(self._clock.now())
        issued_at = self._clock.now().replace(microsecond=0)
        shells = shell_items(record.request, self._config)
        lines = []
        for index, (line, shell) in enumerate(zip(record.request.items, shells, strict=True)):
            item = catalog.get(line.item_number)
            if item is None:
                raise IssueFailure(f"Unknown item '{line.item_number}'")
            if line.visit_date < today:
                raise IssueFailure(f"items[{index}] visitDate must not be in the past")
            problem = _schedule_problem(line)
            if problem:
                raise IssueFailure(f"Invalid componentSchedule on line {shell.line_no}: {problem}")
            wallets = [self._wallet(item, line.quantity, w, issued_at) for w in shell.wallets]
            lines.append(shell.model_copy(update={"wallets": wallets}))
        return lines

    def _wallet(
        self, item: CatalogItem, quantity: int, shell: Wallet, issued_at: dt.datetime
    ) -> Wallet:
        wallet_id = str(uuid.uuid4())
        excl, incl = item.wallet_price(quantity)
        return shell.model_copy(
            update={
                "wallet_id": wallet_id,
                "wallet_reference_number": str(10**17 + secrets.randbelow(9 * 10**17)),
                "issued_at": issued_at,
                "unit_price_excl_vat": excl,
                "unit_price_incl_vat": incl,
                "currency_code": item.currency_code,
                "manifest_url": self._manifest_url(wallet_id),
                "assets": [
                    Asset(
                        id=str(uuid.uuid4()),
                        type=component.type,
                        asset_id=str(uuid.uuid4()),
                        reference_number=_asset_reference(component.type),
                        item_number=component.item_number,
                        description=component.description,
                    )
                    for component in item.asset_templates()
                ],
            }
        )


def _schedule_problem(line: RequestLine) -> str | None:
    """Why the ticket import cannot take the line's componentSchedule, or ``None``.

    The venue's request parser (ChannelMgrOrderAgent TryParseComponentScheduleEntry)
    has already checked each entry's component, date and time; what it lets through and
    the sandbox's issuance refuses — the order then ends in Error, as a failed ticket
    import does (CMTicketIssuer RunTicketImport) — is a component scheduled twice or
    before the line's own visit date.
    """
    seen: set[str] = set()
    for entry in line.component_schedule or ():
        if entry.item_number in seen:
            return f"component '{entry.item_number}' is scheduled twice"
        seen.add(entry.item_number)
        if entry.visit_date < line.visit_date:
            return f"component '{entry.item_number}' is scheduled before the line's visitDate"
    return None


def _asset_reference(asset_type: str) -> str:
    """A ticket number like the venue's (``ATF-BIL010665L-3``) or a coupon code."""
    token = "".join(secrets.choice(_ALPHANUMERIC) for _ in range(10))
    if asset_type == "coupon":
        return f"CPN-{token}"
    return f"ATF-{token}-{secrets.randbelow(10)}"
