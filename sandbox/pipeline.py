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

Issuance fails as the venue's does (CMOrderIssuer IssueForOrder, CMTicketIssuer), with
its messages: when the ticket import cannot be built — an item has left the catalog, a
line's token lines overflow (a non-group line of 10000 or more, a package of ten or more
tickets) — or the import fails — a visit date has passed since submission, an item is
sold out (the catalog's ``soldOut``, the ``soldOut`` fault) — or, with the ``errorRate``
fault, after the import (the job id then stays, and a re-processing run does not import
again). The ``stall*Rate`` faults leave an order hanging for the sweeper. Minting gives
each wallet a GUID, an 18-digit reference number, the partner's external reference and
name (the item's description when none was given), the price of what it holds
(:meth:`~sandbox.catalog.CatalogItem.wallet_price`) and its assets (tickets and coupons
with reference numbers). Manifests are built only when an order becomes Issued, and only
for a partner with a design template (:func:`issued_changes`). An operator may
re-process a Submitted or Error order (:meth:`Pipeline.reprocess`).
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

from sandbox.catalog import CatalogItem, ItemKind
from sandbox.config import SandboxConfig
from sandbox.errors import InvalidRequest, not_found
from sandbox.faults import FaultInjector
from sandbox.orders import issued_changes, shell_items
from sandbox.state import Clock, OrderRecord, OrderStore
from sandbox.stats import Stats
from sandbox.webhooks import ProcessedEvent, WebhookDispatcher
from venue.models import Asset, OrderItem, OrderStatus, Wallet
from venue.values import guid_caption

logger = logging.getLogger(__name__)

SCHEDULED_TIMEOUT = dt.timedelta(minutes=5)
PROCESSING_TIMEOUT = dt.timedelta(hours=1)
# CMJobQueueRunner RecoverStaleProcessing.
STUCK_MESSAGE = (
    "Order was stuck in Processing for over 1 hour and was automatically marked as Error."
    " Inspect and either re-Process or Delete."
)
# CMTicketIssuer ConfirmTickets: a failure after the import (the ``errorRate`` fault).
AFTER_IMPORT_MESSAGE = "Import header for JobId {job_id} not found. This is a programming bug."
# CMTicketIssuer EncodeTokenLine.
OVERFLOW_MESSAGE = (
    "CMTicketIssuer token line encoding overflow: LineNo={line_no} SeqNo={seq_no}"
    " ImportIdx={index}. SeqNo must stay below 10000 and ImportIdx below 10."
    " This is a programming bug."
)
TOKEN_SEQ_LIMIT = 10000
TOKEN_IMPORT_LIMIT = 10
# TMTicketManagement CAPACITY_EXCEEDED, as RaiseError prefixes it with its number.
CAPACITY_MESSAGE = "[-1004] - The capacity for {admission} has been exceeded. Entry is not allowed."
STATUS_MESSAGE_LENGTH = 500  # CMOrder StatusMessage is a Text[500]
WALLET_NAME_LENGTH = 100
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
        # CMOrderIssuer IssueForOrder: Processing (status message cleared) is committed
        # before the ticket import; the job id only once the import has succeeded.
        record = self._move(record, OrderStatus.PROCESSING, status_message="")
        if background and self._faults.roll(faults.stall_processing_rate):
            return record
        return self._issue(record, background=background)

    def reprocess(self, order_id: str) -> OrderRecord:
        """A venue operator re-processes a Submitted or Error order, and it is announced.

        CMJobQueueRunner ReProcessSingleOrder: only Submitted or Error orders (else the
        vendor's error, the status by its caption); the order goes straight to
        Processing and through CMOrderIssuer IssueForOrder, and the outcome — Issued,
        Draft or Error — is announced by ``ota_cm_order_processed`` (ProcessOneOrder).
        When an earlier run had already imported the tickets (its job id is set) the
        import is not run again, so the ticket prices are not computed: the wallets carry
        only their coupons' prices (see :meth:`_mint`).

        Raises:
            InvalidRequest: the order is in another status.
            ResourceNotFound: no such order.
        """
        with self._running:
            record = self._store.get(order_id)
            if record is None:
                raise not_found(f"Order '{guid_caption(order_id)}' not found")
            if record.status not in (OrderStatus.SUBMITTED, OrderStatus.ERROR):
                raise InvalidRequest(
                    f"Order status {record.status.caption} is not eligible for manual"
                    " processing — only Submitted (initial) or Error (retry) are."
                )
            record = self._move(record, OrderStatus.PROCESSING, status_message="")
            final = self._issue(record, background=False)
            assert final is not None  # only background runs are held
            self._dispatcher.publish(
                [ProcessedEvent(final.order_id, final.order.buy_from_order_reference, final.status)]
            )
        self._stats.pipeline("processed")
        logger.info("order %s re-processed: %s", final.order_id, final.status)
        return final

    def _issue(self, record: OrderRecord, *, background: bool) -> OrderRecord | None:
        """CMOrderIssuer IssueForOrder from Processing: import, wallets, Draft or Issued."""
        job_id = record.order.job_id or ""
        imported_now = not job_id
        try:
            if imported_now:
                self._import_tickets(record)
                job_id = f"TM-IMPORT-{self._store.next_value('job'):06d}"
                record = self._move(record, OrderStatus.PROCESSING, job_id=job_id)
            items = self._mint(record, tickets_priced=imported_now)
            if self._faults.roll(self._faults.faults.error_rate):
                # A failure after the import (the tickets' confirmation): the job id stays.
                raise IssueFailure(AFTER_IMPORT_MESSAGE.format(job_id=job_id))
        except IssueFailure as failure:
            logger.info("order %s failed to issue", record.order_id)
            return self._finish(
                record,
                OrderStatus.ERROR,
                background=background,
                status_message=str(failure)[:STATUS_MESSAGE_LENGTH],
                items=shell_items(record.request, self._config),
            )
        if not record.order.payment_reference:
            return self._finish(record, OrderStatus.DRAFT, background=background, items=items)
        # CMOrderIssuer ConfirmOrder: Issued, then the manifests (BuildManifestForOrder).
        order = record.order.model_copy(update={"items": items})
        return self._finish(
            record, OrderStatus.ISSUED, background=background, **issued_changes(order, self._config)
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

    def _import_tickets(self, record: OrderRecord) -> None:
        """The ticket import, as CMTicketIssuer ReshapeToTicketImport and RunTicketImport
        fail it: first every line is reshaped into import lines (an item no longer sold,
        a token line overflow), then the import checks each line's admission (a visit
        date now past, an exhausted capacity).

        Raises:
            IssueFailure: with the venue's message for the first failure.
        """
        catalog = self._config.catalog
        shells = shell_items(record.request, self._config)
        for line, shell in zip(record.request.items, shells, strict=True):
            item = catalog.get(line.item_number)
            if item is None:
                # BuildTicketImportLines ``MasterItem.Get``: Business Central's own error.
                raise IssueFailure(
                    "The Item does not exist. Identification fields and values:"
                    f" No.='{line.item_number.upper()}'"
                )
            overflow = token_line_overflow(item, line.quantity)
            if overflow is not None:
                seq_no, index = overflow
                raise IssueFailure(
                    OVERFLOW_MESSAGE.format(
                        line_no=bc_integer(shell.line_no),
                        seq_no=bc_integer(seq_no),
                        index=bc_integer(index),
                    )
                )
        today = self._config.local_today(self._clock.now())
        sold_out = self._faults.faults.sold_out
        for line in record.request.items:
            item = catalog.get(line.item_number)
            assert item is not None  # checked above
            if item.kind is ItemKind.COUPON:
                continue  # no ticket to import
            # TMImportTicketWorker GetAdmissionTimeSlot: the visit date is checked again.
            if line.visit_date < today:
                raise IssueFailure(
                    f"Expected visit date {line.visit_date.isoformat()} for admission code"
                    f" {item.item_number} is in the past."
                )
            number = catalog.sold_out_number(item, sold_out)
            if number is not None:
                raise IssueFailure(CAPACITY_MESSAGE.format(admission=number))

    def _mint(self, record: OrderRecord, *, tickets_priced: bool) -> list[OrderItem]:
        """The order's lines with minted wallets (CMOrderIssuer WrapAssetsIntoWallets).

        Args:
            record: the order being issued.
            tickets_priced: whether this run imported the tickets and so priced them
                (CMTicketIssuer AccumulatePriceOnWallet); when the import was an earlier
                run's, a wallet carries only its coupons' prices.
        """
        catalog = self._config.catalog
        issued_at = self._clock.venue_now()
        shells = shell_items(record.request, self._config)
        lines = []
        for line, shell in zip(record.request.items, shells, strict=True):
            item = catalog.get(line.item_number)
            assert item is not None  # the import found it
            wallets = [
                self._wallet(item, line.quantity, w, issued_at, tickets_priced=tickets_priced)
                for w in shell.wallets
            ]
            lines.append(shell.model_copy(update={"wallets": wallets}))
        return lines

    def _wallet(
        self,
        item: CatalogItem,
        quantity: int,
        shell: Wallet,
        issued_at: dt.datetime,
        *,
        tickets_priced: bool,
    ) -> Wallet:
        excl, incl = item.wallet_price(quantity, tickets=tickets_priced)
        return shell.model_copy(
            update={
                "wallet_id": str(uuid.uuid4()),
                "wallet_reference_number": str(10**17 + secrets.randbelow(9 * 10**17)),
                # CMOrderIssuer DeriveDefaultWalletName: no name given → the item's.
                "name": shell.name or item.description[:WALLET_NAME_LENGTH],
                "issued_at": issued_at,
                "unit_price_excl_vat": excl,
                "unit_price_incl_vat": incl,
                # CMTicketIssuer / CMCouponIssuer: GLSetup."LCY Code", the company's own.
                "currency_code": self._config.currency_code,
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


def token_line_overflow(item: CatalogItem, quantity: int) -> tuple[int, int] | None:
    """Where CMTicketIssuer EncodeTokenLine overflows for a line, or ``None``.

    Each imported ticket gets a token line ``LineNo + SeqNo * 10 + ImportIdx``: a wallet's
    sequence number must stay below 10000 and a wallet's tickets (a package's ticket
    components) below 10. Wallets are reshaped in order, so the first to overflow is the
    first wallet of a package with ten or more tickets, else wallet 10000.

    Returns:
        ``(SeqNo, ImportIdx)`` of the first ticket that overflows.
    """
    if item.kind is ItemKind.COUPON:
        return None  # nothing imported
    tickets = sum(1 for c in item.components if c.type == "ticket") or 1
    if tickets >= TOKEN_IMPORT_LIMIT:
        return 1, TOKEN_IMPORT_LIMIT
    if item.wallet_count(quantity) >= TOKEN_SEQ_LIMIT:
        return TOKEN_SEQ_LIMIT, 1
    return None


def bc_integer(number: int) -> str:
    """An integer as Business Central formats it into a message: thousands separated."""
    return f"{number:,}"


def _asset_reference(asset_type: str) -> str:
    """A ticket number like the venue's (``ATF-BIL010665L-3``) or a coupon code."""
    token = "".join(secrets.choice(_ALPHANUMERIC) for _ in range(10))
    if asset_type == "coupon":
        return f"CPN-{token}"
    return f"ATF-{token}-{secrets.randbelow(10)}"
