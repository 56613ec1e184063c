"""Actions over real HTTP against the sandbox, on SQLite and PostgreSQL: paid drafts
confirmed, orders replaced and cancelled through the outbox, Error orders surfaced.

No webhook reaches otacm (``tests.heartbeat.conftest``): the mirror learns a settled
order through a look-up the test queues for the worker (:func:`fetch`), and what a
confirm, replace or delete did only from the venue's answer to it.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import sqlalchemy as sa

from heartbeat.actions import confirm_paid_drafts, error_orders
from orders.actions import ActionStatus, cancel_order, replace_order
from orders.attempt import NO_LONGER_KNOWN
from orders.inbox import Lookup, queue_lookups
from orders.outbox import record_action
from orders.sender import run_outbox_once
from orders.submission import parse_submission
from orders.submit import SubmitStatus, submit_now
from storage.models import (
    LedgerLine,
    LedgerSource,
    LedgerState,
    Outbox,
    OutboxOperation,
    OutboxState,
)
from tests.heartbeat.conftest import HeartbeatStack, error_line, line
from venue.client import open_client
from venue.models import OrderStatus
from venue.retry import RetryPolicy

OWNER = "actions-test"


# --- helpers -------------------------------------------------------------------------------


def fetch(stack: HeartbeatStack, *order_ids: str) -> None:
    """Have the worker getOrder and mirror the orders, as a webhook or the feed would."""
    with stack.sessions.begin() as session:
        lookups = [Lookup(order_id, "test") for order_id in order_ids]
        queue_lookups(session.connection(), stack.connection_id, lookups, now=stack.now())
    stack.drain()


def import_sale(stack: HeartbeatStack, reference: str, payment_reference: str | None) -> int:
    """A sale as the shop's export records it (no request); its ledger line id."""
    with stack.sessions.begin() as session:
        sale = LedgerLine(
            connection_id=stack.connection_id,
            partner_id=stack.partner_id,
            shop_reference=reference,
            sold_at=stack.now(),
            quantity=1,
            amount=Decimal("100.00"),
            currency="DKK",
            payment_reference=payment_reference,
            state=LedgerState.ACTIVE,
            source=LedgerSource.IMPORT,
        )
        session.add(sale)
        session.flush()
        return sale.id


def draft(stack: HeartbeatStack, reference: str, payment_reference: str | None) -> str:
    """A Draft order at the venue and in the mirror; the ledger's sale carries
    ``payment_reference`` (none when it is ``None``). Its orderId."""
    import_sale(stack, reference, payment_reference)
    order_id = stack.create(reference, paid=False)
    stack.tick()
    fetch(stack, order_id)
    assert stack.history(order_id)[-1] == ("Draft", "poll")
    return order_id


def submit(
    stack: HeartbeatStack, reference: str, *, items: list[dict[str, Any]] | None = None
) -> str:
    """A paid sale submitted through otacm (ledger line, outbox, createOrder); its orderId."""
    outcome = submit_now(
        stack.sessions,
        stack.client,
        stack.connection_id,
        stack.order_request(reference, items=items),
        now=stack.now(),
        amount=Decimal("160.00"),
        currency="DKK",
        owner=OWNER,
    )
    assert outcome.status is SubmitStatus.SENT, outcome
    assert outcome.order_id is not None
    return outcome.order_id


def outbox(stack: HeartbeatStack, operation: OutboxOperation | None = None) -> list[Outbox]:
    """The outbox rows (of ``operation``), oldest first."""
    query = sa.select(Outbox).order_by(Outbox.id)
    if operation is not None:
        query = query.where(Outbox.operation == operation)
    with stack.read_sessions.begin() as session:
        return list(session.scalars(query))


def sale(stack: HeartbeatStack, reference: str) -> LedgerLine:
    """The ledger line of ``reference``."""
    with stack.read_sessions.begin() as session:
        return session.scalars(
            sa.select(LedgerLine).where(LedgerLine.reference_key == reference.upper())
        ).one()


def confirm(stack: HeartbeatStack, **kwargs: Any) -> dict[str, int]:
    """One run of the confirm job with otacm's client (or ``clients``), at ``now``."""
    clients = kwargs.pop("clients", stack.clients)
    return confirm_paid_drafts(
        stack.sessions, clients, owner=OWNER, now=kwargs.pop("now", stack.now())
    ).as_dict()


def counts(**nonzero: int) -> dict[str, int]:
    """An :class:`~heartbeat.actions.ActionReport` as a dict: zero but for ``nonzero``."""
    return {"drafts": 0, "queued": 0, "confirmed": 0, "failed": 0, "retried": 0, **nonzero}


def mirror_tables(stack: HeartbeatStack) -> dict[str, list[tuple[Any, ...]]]:
    """The mirror's and the ledger's rows: what an action refused must leave alone."""
    tables = ("venue_order", "order_item", "wallet", "asset", "status_change", "ledger_line")
    snapshot = stack.snapshot()
    return {name: snapshot[name] for name in tables}


# --- confirming paid drafts ----------------------------------------------------------------


def test_a_paid_draft_is_confirmed_once_and_unpaid_ones_are_left_alone(
    stack: HeartbeatStack,
) -> None:
    """A Draft whose sale carries a payment reference is confirmed and mirrored Issued
    with its wallets (source confirm); an unpaid sale's Draft and an order the ledger
    lacks stay Draft; a second run records nothing."""
    paid = draft(stack, "PAID-1", "pay-1")
    unpaid = draft(stack, "UNPAID-1", None)
    orphan = stack.create("ORPHAN-1", paid=False)
    stack.tick()
    fetch(stack, orphan)
    stack.reset_stats()

    first = confirm(stack)

    assert first == counts(drafts=1, queued=1, confirmed=1)
    stack.assert_mirrored([paid, unpaid, orphan])
    row = stack.mirror(paid)
    assert row is not None
    assert (row.status, row.payment_reference) == (OrderStatus.ISSUED, "PAY-1")
    assert stack.history(paid)[-1] == ("Issued", "confirm")
    assert all(w.wallet_reference_number for item in row.items for w in item.wallets)
    for other in (unpaid, orphan):
        assert stack.history(other) == [("Draft", "poll")]
    [confirmation] = outbox(stack, OutboxOperation.CONFIRM)
    assert (confirmation.state, confirmation.order_id) == (OutboxState.SENT, paid)
    assert confirmation.request == {"paymentReference": "pay-1"}
    assert confirmation.ledger_line_id == sale(stack, "PAID-1").id

    assert confirm(stack) == counts()
    assert stack.calls("confirmOrder") == 1
    assert len(outbox(stack)) == 1


def test_a_confirm_the_venue_cannot_take_now_is_retried_later_and_lands_once(
    stack: HeartbeatStack,
) -> None:
    """Every call answered 503: the confirm is recorded and waits its backoff; the next
    run records no second one; the outbox sender lands it once the venue is back."""
    paid = draft(stack, "PAID-503", "PAY-503")
    (connection,) = stack.settings.connections
    now = stack.now()
    with open_client(connection, retry=RetryPolicy(attempts=1)) as once:
        clients = {stack.connection_id: once}
        stack.faults(rate503=1.0)
        first = confirm(stack, clients=clients, now=now)
        stack.faults(rate503=0.0)
        second = confirm(stack, clients=clients, now=now)
        [waiting] = outbox(stack, OutboxOperation.CONFIRM)
        passed = run_outbox_once(stack.sessions, clients, owner=OWNER, now=now)
        retried = run_outbox_once(stack.sessions, clients, owner=OWNER, now=waiting.next_attempt_at)

    assert first == counts(drafts=1, queued=1, retried=1)
    assert second == counts(drafts=1)
    assert waiting.state is OutboxState.PENDING
    assert waiting.next_attempt_at > now
    assert "503" in (waiting.last_error or "")
    assert passed.claimed == 0
    assert (retried.claimed, retried.sent) == (1, 1)
    assert stack.history(paid)[-1] == ("Issued", "confirm")
    assert stack.stats()["calls"]["confirmOrder"] == {"200": 1, "503": 1}
    assert confirm(stack) == counts()


def test_a_refused_confirm_is_left_to_a_person(stack: HeartbeatStack) -> None:
    """The order was replaced elsewhere (Submitted): the venue refuses the confirm, the
    row fails with its message, the mirror is re-read; once a Draft again, the order
    gets no second confirm on its own."""
    paid = draft(stack, "PAID-REFUSED", "PAY-R")
    stack.venue.replace_order(paid, stack.order_request("PAID-REFUSED", paid=False))

    report = confirm(stack)
    stack.drain()

    assert report == counts(drafts=1, queued=1, failed=1)
    [refused] = outbox(stack, OutboxOperation.CONFIRM)
    assert refused.state is OutboxState.FAILED
    assert refused.last_error == "Order cannot be confirmed in status Submitted"
    assert stack.history(paid)[-1] == ("Submitted", "poll")

    stack.tick()
    fetch(stack, paid)
    assert confirm(stack) == counts(drafts=1)
    assert stack.calls("confirmOrder") == 1


def test_a_draft_gone_at_the_venue_fails_its_confirm_and_is_marked_removed(
    stack: HeartbeatStack,
) -> None:
    """Deleted at the venue, still Draft in the mirror: 404 fails the confirm ("no longer
    knows"), the order is marked removed, and it is not tried again."""
    paid = draft(stack, "PAID-GONE", "PAY-G")
    stack.venue.delete_order(paid)

    assert confirm(stack) == counts(drafts=1, queued=1, failed=1)

    [gone] = outbox(stack, OutboxOperation.CONFIRM)
    assert (gone.state, gone.last_error) == (OutboxState.FAILED, NO_LONGER_KNOWN)
    stack.assert_removed(paid)
    assert stack.history(paid)[-1] == (None, "confirm")
    assert confirm(stack) == counts()


def test_one_orders_actions_reach_the_venue_in_the_order_they_were_decided(
    stack: HeartbeatStack,
) -> None:
    """A delete recorded before a confirm of the same order is sent first; the confirm
    waits for it (rows are claimed one at a time, so in the same pass) and finds the
    order gone."""
    order_id = draft(stack, "PAID-ORDERED", "PAY-O")
    with stack.sessions.begin() as session:
        record_action(
            session, stack.connection_id, OutboxOperation.DELETE, order_id, now=stack.now()
        )
        record_action(
            session,
            stack.connection_id,
            OutboxOperation.CONFIRM,
            order_id,
            now=stack.now(),
            request={"paymentReference": "PAY-O"},
        )

    first = run_outbox_once(stack.sessions, stack.clients, owner=OWNER, now=stack.now())
    second = run_outbox_once(stack.sessions, stack.clients, owner=OWNER, now=stack.now())

    assert (first.claimed, first.sent, first.removed, first.failed) == (2, 1, 1, 1)
    assert second.claimed == 0
    assert [(row.operation, row.state) for row in outbox(stack)] == [
        (OutboxOperation.DELETE, OutboxState.SENT),
        (OutboxOperation.CONFIRM, OutboxState.FAILED),
    ]
    assert stack.calls("confirmOrder") == 1
    stack.assert_removed(order_id)


# --- replacing -----------------------------------------------------------------------------


def test_replacing_an_error_order_sends_it_through_the_pipeline_again(
    stack: HeartbeatStack,
) -> None:
    """An order in Error, fixed: Submitted again (source replace), the sale's ledger
    line takes the new request and amount, and after the venue's pickup it is Issued."""
    order_id = submit(stack, "FIX-1", items=[error_line()])
    stack.tick()
    fetch(stack, order_id)
    assert stack.history(order_id)[-1] == ("Error", "poll")
    fixed = parse_submission(
        {
            **stack.order_body("fix-1", items=[line("31001", 2)]),
            "amount": "200.00",
            "currency": "DKK",
        }
    )

    outcome = replace_order(
        stack.sessions, {"default": stack.client}, "FIX-1", fixed, now=stack.now()
    )

    assert (outcome.status, outcome.order_status) == (ActionStatus.REPLACED, OrderStatus.SUBMITTED)
    assert (outcome.order_id, outcome.connection) == (order_id, "default")
    assert stack.history(order_id)[-1] == ("Submitted", "replace")
    line_after = sale(stack, "FIX-1")
    assert line_after.request is not None
    assert [i["itemNumber"] for i in line_after.request["items"]] == ["31001"]
    assert (line_after.quantity, line_after.amount) == (2, Decimal("200.00"))
    [replaced] = outbox(stack, OutboxOperation.REPLACE)
    assert (replaced.state, replaced.ledger_line_id) == (OutboxState.SENT, line_after.id)

    stack.tick()
    fetch(stack, order_id)
    stack.assert_mirrored([order_id])
    assert stack.history(order_id)[-1] == ("Issued", "poll")


def test_replacing_an_issued_order_is_refused_and_changes_nothing(stack: HeartbeatStack) -> None:
    """The venue refuses to replace an Issued order: its message comes back, the row is
    failed, the mirror and the ledger are as they were."""
    order_id = submit(stack, "ISSUED-1")
    stack.tick()
    fetch(stack, order_id)
    before = mirror_tables(stack)
    other = parse_submission(stack.order_body("ISSUED-1", items=[line("31002")]))

    outcome = replace_order(
        stack.sessions, {"default": stack.client}, order_id, other, now=stack.now()
    )

    assert outcome.status is ActionStatus.REFUSED
    assert outcome.message == "Order cannot be replaced in status Issued"
    assert not outcome.done
    assert mirror_tables(stack) == before
    [refused] = outbox(stack, OutboxOperation.REPLACE)
    assert (refused.state, refused.last_error) == (OutboxState.FAILED, outcome.message)
    truth = stack.truth(order_id)
    assert truth is not None and truth.status is OrderStatus.ISSUED


def test_a_replacement_whose_answer_was_lost_is_recognised_on_its_retry(
    stack: HeartbeatStack,
) -> None:
    """An earlier attempt landed but its answer was lost: the retry is refused (the order
    is in flight), the order is found holding the replacement, and the row is sent."""
    order_id = submit(stack, "LOST-1", items=[error_line()])
    stack.tick()
    fetch(stack, order_id)
    fixed = parse_submission(stack.order_body("LOST-1", items=[line("31020", 3)]))
    with stack.sessions.begin() as session:
        row = record_action(
            session,
            stack.connection_id,
            OutboxOperation.REPLACE,
            order_id,
            now=stack.now(),
            request=fixed.request.to_wire(),
        )
        row.attempts = 1  # the attempt whose answer was lost
    stack.venue.replace_order(order_id, fixed.request)

    report = run_outbox_once(stack.sessions, stack.clients, owner=OWNER, now=stack.now())

    assert (report.sent, report.resolved) == (1, 1)
    assert stack.history(order_id)[-1] == ("Submitted", "replace")
    assert sale(stack, "LOST-1").quantity == 3


# --- cancelling ----------------------------------------------------------------------------


def test_cancelling_an_issued_order_keeps_it_as_cancelled(stack: HeartbeatStack) -> None:
    """deleteOrder of an Issued order: Cancelled, wallets destroyed, mirrored (source delete)."""
    order_id = submit(stack, "CANCEL-1")
    stack.tick()
    fetch(stack, order_id)

    outcome = cancel_order(stack.sessions, {"default": stack.client}, "cancel-1", now=stack.now())

    assert (outcome.status, outcome.order_status) == (ActionStatus.CANCELLED, OrderStatus.CANCELLED)
    stack.assert_mirrored([order_id])
    row = stack.mirror(order_id)
    assert row is not None
    assert [w for item in row.items for w in item.wallets] == []
    assert stack.history(order_id)[-1] == ("Cancelled", "delete")


def test_cancelling_a_draft_removes_it(stack: HeartbeatStack) -> None:
    """deleteOrder of a Draft the ledger lacks: removed at the venue and in the mirror;
    its outbox row names no sale."""
    order_id = stack.create("CANCEL-DRAFT", paid=False)
    stack.tick()
    fetch(stack, order_id)

    outcome = cancel_order(stack.sessions, {"default": stack.client}, order_id, now=stack.now())

    assert (outcome.status, outcome.order_status) == (ActionStatus.REMOVED, None)
    stack.assert_removed(order_id)
    assert stack.history(order_id)[-1] == (None, "delete")
    [deleted] = outbox(stack, OutboxOperation.DELETE)
    assert (deleted.state, deleted.ledger_line_id) == (OutboxState.SENT, None)


def test_cancelling_an_order_in_flight_is_refused_until_it_settled(stack: HeartbeatStack) -> None:
    """The venue refuses to delete a Submitted order: refused with its message, not
    queued, the mirror unchanged; run again once settled, it is cancelled."""
    order_id = submit(stack, "CANCEL-FLIGHT")
    before = mirror_tables(stack)

    refused = cancel_order(stack.sessions, {"default": stack.client}, order_id, now=stack.now())

    assert refused.status is ActionStatus.REFUSED
    assert "mid-flight (status Submitted)" in (refused.message or "")
    assert mirror_tables(stack) == before
    assert [row.state for row in outbox(stack, OutboxOperation.DELETE)] == [OutboxState.FAILED]

    stack.tick()
    again = cancel_order(stack.sessions, {"default": stack.client}, order_id, now=stack.now())
    assert again.status is ActionStatus.CANCELLED
    assert stack.history(order_id)[-1] == ("Cancelled", "delete")


# --- orders in Error -----------------------------------------------------------------------


def test_error_orders_are_listed_with_the_venues_reason(stack: HeartbeatStack) -> None:
    """Orders in Error come with the venue's reason and whether the ledger has the sale."""
    known = submit(stack, "ERR-1", items=[error_line()])
    orphan = stack.create_error("ERR-2")
    issued = submit(stack, "OK-1")
    stack.tick()
    fetch(stack, known, orphan, issued)

    with stack.read_sessions.begin() as session:
        found = error_orders(session)
        none_elsewhere = error_orders(session, connection_id=stack.connection_id + 1)

    assert [(o.order_id, o.in_ledger) for o in found] == [(known, True), (orphan, False)]
    truth = stack.truth(known)
    assert truth is not None and truth.status_message
    assert found[0].status_message == truth.status_message
    assert found[0].ledger_state is LedgerState.ACTIVE
    assert found[0].buy_from_order_reference == truth.buy_from_order_reference
    assert found[0].describe().startswith("ERR-1  order ")
    assert found[1].to_json()["sellToOrderReference"] == "ERR-2"
    assert none_elsewhere == []
    text = str([o.to_json() for o in found] + [o.describe() for o in found])
    assert "Jane Doe" not in text and "guest@example.com" not in text
