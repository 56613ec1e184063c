"""The documented walkthrough and the order rules, over real HTTP (seeds 002 and 004)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from sandbox.config import DEFAULT_PARTNERS
from tests.sandbox.conftest import (
    INACTIVE_PARTNER,
    OTHER_PARTNER,
    PARTNER,
    Venue,
    future,
    line,
    order_body,
)

ZERO_GUID = "00000000-0000-0000-0000-000000000000"
GUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def bad_schedule_line() -> dict[str, Any]:
    """A line the venue accepts but cannot issue: the catalog's sold-out item, whose
    ticket import fails (CMTicketIssuer RunTicketImport)."""
    return line("31099")


def test_submit_answers_submitted_with_wallet_shells(venue: Venue) -> None:
    """createOrder answers 201 Submitted, references normalised, wallets as shells."""
    body = order_body("  partner-order-42 ", payment=" pay-987654 ")
    body["items"] = [line(quantity=2, wallet={"externalReferenceNumbers": ["JD-1", "JD-2"]})]
    response = venue.api.post("/channelManager", json=body)

    assert response.status_code == 201
    order = response.json()
    assert order["status"] == "Submitted"
    assert order["statusMessage"] == ""
    assert GUID.match(order["orderId"])
    assert order["sellToOrderReference"] == "PARTNER-ORDER-42"
    assert order["paymentReference"] == "PAY-987654"
    assert re.match(r"^CM-\d{12}-[0-9A-F]{4}$", order["buyFromOrderReference"])
    assert len(order["buyFromOrderReference"]) <= 20
    (item,) = order["items"]
    assert item["lineNo"] == 100000
    assert [w["externalReferenceNumber"] for w in item["wallets"]] == ["JD-1", "JD-2"]
    assert {w["walletId"] for w in item["wallets"]} == {ZERO_GUID}
    assert {w["walletReferenceNumber"] for w in item["wallets"]} == {""}


def test_responses_carry_the_venue_headers(venue: Venue) -> None:
    """Every answer, errors included, carries x-npr-version and x-npr-duration."""
    for response in (venue.api.post("/channelManager", json=order_body()), venue.api.get("/x/y")):
        assert response.headers["x-npr-version"]
        assert int(response.headers["x-npr-duration"]) >= 0


def test_tick_issues_an_order_with_a_payment_reference(venue: Venue) -> None:
    """A pickup cycle takes a paid order to Issued with minted wallets, assets and prices."""
    body = order_body(payment="PAY-1")
    body["items"] = [line(quantity=2, wallet={"names": ["Jane", "John"]})]
    order_id = venue.create(body)["orderId"]

    report = venue.tick()

    assert report["processed"] == [{"orderId": order_id, "status": "Issued"}]
    order = venue.get(order_id)
    assert order["status"] == "Issued"
    assert order["jobId"] and order_id in order["manifestUrl"]
    wallets = order["items"][0]["wallets"]
    assert [w["name"] for w in wallets] == ["Jane", "John"]
    for wallet in wallets:
        assert GUID.match(wallet["walletId"]) and wallet["walletId"] != ZERO_GUID
        assert re.match(r"^\d{18}$", wallet["walletReferenceNumber"])
        assert wallet["unitPriceExclVat"] == 80
        assert wallet["unitPriceInclVat"] == 100
        assert wallet["currencyCode"] == "DKK"
        assert wallet["issuedAt"] and wallet["manifestUrl"]
        (asset,) = wallet["assets"]
        assert asset["type"] == "ticket" and asset["itemNumber"] == "31001"
        assert asset["referenceNumber"].startswith("ATF-")


def test_item_kinds_mint_their_wallets(venue: Venue) -> None:
    """Tickets mint per unit, a group one wallet, a package one per package with its
    components (and coupon) as assets."""
    items = [line("31050", quantity=6), line("40100", quantity=2), line("52001", quantity=1)]
    order_id = venue.create(order_body(items=items))["orderId"]
    venue.tick()

    group, package, cruise = venue.get(order_id)["items"]
    assert [i["lineNo"] for i in (group, package, cruise)] == [100000, 200000, 300000]
    assert len(group["wallets"]) == 1 and group["quantity"] == 6
    assert len(package["wallets"]) == 2 and package["isPackage"] is True
    assets = package["wallets"][0]["assets"]
    assert [(a["itemNumber"], a["type"]) for a in assets] == [
        ("31001", "ticket"),
        ("31020", "ticket"),
        ("CPN-CAFE10", "coupon"),
    ]
    assert cruise["wallets"][0]["unitPriceInclVat"] == 25


def test_every_wallet_carries_the_companys_own_currency(make_venue: Callable[..., Venue]) -> None:
    """CMTicketIssuer BuildTicketImportLines and CMCouponIssuer price every wallet in
    GLSetup."LCY Code", the company's local currency (a Code[10]), whatever the item."""
    venue = make_venue(currency_code="LOCALCUR10")
    items = [line("31001"), line("40100"), line("52001"), line("CPN-PARK")]
    order_id = venue.create(order_body(items=items))["orderId"]
    venue.tick()

    wallets = [w for item in venue.get(order_id)["items"] for w in item["wallets"]]
    assert len(wallets) == 4
    assert {w["currencyCode"] for w in wallets} == {"LOCALCUR10"}
    assert venue.admin.get("/config").json()["currencyCode"] == "LOCALCUR10"


def test_wallets_carry_the_price_of_what_they_hold(venue: Venue) -> None:
    """CMTicketIssuer BuildTicketImportLines / AccumulatePriceOnWallet and CMCouponIssuer
    IssueAndAttachForAddOnLine: a single ticket's wallet carries its unit price, a group
    ticket's one wallet the per-person price times the quantity, a package's wallet its
    components and coupons added up."""
    items = [line("31050", quantity=6), line("40100", quantity=2), line("31001", quantity=3)]
    order_id = venue.create(order_body(items=items))["orderId"]
    venue.tick()

    group, package, single = venue.get(order_id)["items"]
    prices = {
        name: [(w["unitPriceExclVat"], w["unitPriceInclVat"]) for w in item["wallets"]]
        for name, item in (("group", group), ("package", package), ("single", single))
    }
    assert prices == {
        "group": [(360, 450)],  # 6 x 60.00 / 75.00
        "package": [(128, 160)] * 2,  # 64 + 56 + 8 / 80 + 70 + 10
        "single": [(80, 100)] * 3,
    }


def test_valid_component_schedule_issues(venue: Venue) -> None:
    """A package schedule naming its own ticket components on or after the visit issues."""
    schedule = [{"itemNumber": "31020", "visitDate": future(31), "visitTime": "14:00:00"}]
    body = order_body(items=[line("40100", wallet={"componentSchedule": schedule})])
    order_id = venue.create(body)["orderId"]
    venue.tick()
    assert venue.get(order_id)["status"] == "Issued"


@pytest.mark.parametrize(
    "schedule",
    [
        [{"itemNumber": "31020", "visitDate": future(1), "visitTime": "12:00:00"}],
        [
            {"itemNumber": "31020", "visitDate": future(31), "visitTime": "12:00:00"},
            {"itemNumber": "31020", "visitDate": future(32), "visitTime": "12:00:00"},
        ],
    ],
    ids=["before-the-line", "twice"],
)
def test_component_schedule_has_no_rule_against_the_line(
    venue: Venue, schedule: list[dict[str, str]]
) -> None:
    """ChannelMgrOrderAgent TryParseWalletBlock / TryParseComponentScheduleEntry /
    IsComponentInPackage are the only checks: a component scheduled before the line's
    visit, or twice, is accepted and issued; AppendComponentScheduleArray answers every
    stored entry, in the order sent."""
    body = order_body(items=[line("40100", wallet={"componentSchedule": schedule})])
    order_id = venue.create(body)["orderId"]
    venue.tick()
    order = venue.get(order_id)
    assert order["status"] == "Issued"
    assert order["items"][0]["componentSchedule"] == schedule


def test_a_sold_out_item_fails_the_ticket_import(venue: Venue) -> None:
    """CMTicketIssuer RunTicketImport / TMTicketManagement CAPACITY_EXCEEDED: an item
    whose capacity is exhausted (the catalog's soldOut item 31099) is accepted, and the
    processing run ends in Error with the ticket module's message and no job id."""
    order_id = venue.create(order_body(items=[line("31099")]))["orderId"]
    venue.tick()
    order = venue.get(order_id)
    assert (order["status"], order["statusMessage"], order["jobId"]) == (
        "Error",
        "[-1004] - The capacity for 31099 has been exceeded. Entry is not allowed.",
        "",
    )
    assert order["items"][0]["wallets"][0]["walletId"] == ZERO_GUID


def test_the_sold_out_fault_fails_a_packages_ticket_component(venue: Venue) -> None:
    """CMTicketIssuer BuildTicketImportLines imports a package's ticket components: the
    soldOut fault naming one fails the package's import; coupons import nothing."""
    venue.faults(soldOut=["31020", "CPN-PARK"])
    package = venue.create(order_body("SO-1", items=[line("40100")]))["orderId"]
    coupon = venue.create(order_body("SO-2", items=[line("CPN-PARK")]))["orderId"]
    venue.tick()
    assert venue.get(package)["statusMessage"] == (
        "[-1004] - The capacity for 31020 has been exceeded. Entry is not allowed."
    )
    assert venue.get(coupon)["status"] == "Issued"


def test_very_large_quantities_overflow_the_token_line(venue: Venue) -> None:
    """CMTicketIssuer EncodeTokenLine: a wallet sequence number of 10000 or more ends the
    run in Error with the vendor's message (a group ticket has one wallet and issues)."""
    big = venue.create(order_body("BIG-1", items=[line("31001", 10000)]))["orderId"]
    group = venue.create(order_body("BIG-2", items=[line("31050", 10000)]))["orderId"]
    venue.tick()
    assert venue.get(big)["statusMessage"] == (
        "CMTicketIssuer token line encoding overflow: LineNo=100,000 SeqNo=10,000"
        " ImportIdx=1. SeqNo must stay below 10000 and ImportIdx below 10."
        " This is a programming bug."
    )
    assert venue.get(group)["status"] == "Issued"


def test_a_coupon_component_may_be_scheduled(venue: Venue) -> None:
    """ChannelMgrOrderAgent IsComponentInPackage: any component of the package, a coupon
    too, may be named in componentSchedule; the order issues."""
    schedule = [{"itemNumber": "cpn-cafe10", "visitDate": future(31), "visitTime": "09:00:00"}]
    body = order_body(items=[line("40100", wallet={"componentSchedule": schedule})])
    order_id = venue.create(body)["orderId"]
    venue.tick()
    assert venue.get(order_id)["status"] == "Issued"


def test_unpaid_order_rests_in_draft_until_confirmed(venue: Venue) -> None:
    """Without paymentReference the order settles in Draft; confirmOrder issues it."""
    order_id = venue.create(order_body(payment=None))["orderId"]
    venue.tick()
    draft = venue.get(order_id)
    assert draft["status"] == "Draft"
    assert draft["items"][0]["wallets"][0]["walletReferenceNumber"]

    response = venue.api.post(
        f"/channelManager/{order_id}/confirm", json={"paymentReference": "p-9"}
    )

    assert response.status_code == 200
    assert response.json()["status"] == "Issued"
    assert response.json()["paymentReference"] == "P-9"
    assert [w["walletId"] for w in response.json()["items"][0]["wallets"]] == [
        w["walletId"] for w in draft["items"][0]["wallets"]
    ]


def test_manifests_come_only_with_issued(venue: Venue) -> None:
    """CMOrderIssuer BuildManifestForOrder runs only from ConfirmOrder: a Draft has no
    manifestUrl (order or wallet); confirming it builds them."""
    order_id = venue.create(order_body(payment=None))["orderId"]
    venue.tick()
    draft = venue.get(order_id)
    assert "manifestUrl" not in draft
    assert all("manifestUrl" not in w for w in draft["items"][0]["wallets"])
    issued = venue.api.post(
        f"/channelManager/{order_id}/confirm", json={"paymentReference": "P-1"}
    ).json()
    assert issued["manifestUrl"].endswith(f"?mid={order_id}")
    assert all(w["manifestUrl"] for w in issued["items"][0]["wallets"])


def test_a_blank_payment_reference_leaves_the_order_draft(venue: Venue) -> None:
    """ChannelMgrOrderAgent ConfirmOrder stores the reference in a Code[50] (trimmed to
    ""); CMOrderIssuer ConfirmOrder exits when it is empty: 200, still Draft, no
    reference, no manifest."""
    order_id = venue.create(order_body(payment=None))["orderId"]
    venue.tick()
    response = venue.api.post(
        f"/channelManager/{order_id}/confirm", json={"paymentReference": "   "}
    )
    assert response.status_code == 200
    body = response.json()
    assert (body["status"], body["paymentReference"]) == ("Draft", "")
    assert "manifestUrl" not in body
    assert venue.get(order_id)["status"] == "Draft"


def test_confirm_on_issued_is_a_no_op(venue: Venue) -> None:
    """Confirming an Issued order returns it unchanged and changes no row version."""
    order_id = venue.create(order_body(payment="PAY-1"))["orderId"]
    venue.tick()
    before = venue.get(order_id)
    feed = venue.api.get(f"/channelManager/orders/{PARTNER}", params={"sync": "true"}).json()

    response = venue.api.post(f"/channelManager/{order_id}/confirm", json={"paymentReference": "X"})

    assert response.status_code == 200
    assert response.json() == before
    last = feed["data"][-1]["rowVersion"]
    changes = venue.api.get(
        f"/channelManager/orders/{PARTNER}", params={"sync": "true", "lastRowVersion": last}
    )
    assert changes.json()["data"] == []


def test_confirm_is_refused_outside_draft_and_issued(venue: Venue) -> None:
    """Confirming an in-flight order is a 400 naming its status."""
    order_id = venue.create(order_body(payment=None))["orderId"]
    response = venue.api.post(f"/channelManager/{order_id}/confirm", json={"paymentReference": "X"})
    assert response.status_code == 400
    assert response.json() == {
        "code": "generic_error",
        "message": "Order cannot be confirmed in status Submitted",
    }


def test_confirm_needs_a_payment_reference(venue: Venue) -> None:
    """confirmOrder without paymentReference is a 400 naming the field."""
    order_id = venue.create(order_body(payment=None))["orderId"]
    venue.tick()
    response = venue.api.post(f"/channelManager/{order_id}/confirm", json={})
    assert response.status_code == 400
    assert response.json()["message"] == "Required field 'paymentReference' is missing"


def test_replace_resubmits_a_draft(venue: Venue) -> None:
    """replaceOrder on a Draft swaps items, returns Submitted, keeps the identity."""
    created = venue.create(order_body(payment=None))
    order_id = created["orderId"]
    venue.tick()

    body = order_body(payment="PAY-2", items=[line("31002", quantity=3)])
    response = venue.api.put(f"/channelManager/{order_id}", json=body)

    assert response.status_code == 200
    replaced = response.json()
    assert replaced["status"] == "Submitted"
    assert replaced["orderId"] == order_id
    assert replaced["buyFromOrderReference"] == created["buyFromOrderReference"]
    assert [w["walletId"] for w in replaced["items"][0]["wallets"]] == [ZERO_GUID] * 3
    venue.tick()
    issued = venue.get(order_id)
    assert issued["status"] == "Issued"
    assert issued["items"][0]["itemNumber"] == "31002"


def test_replace_fixes_an_error_order(venue: Venue) -> None:
    """An Error order is replaced with a valid schedule and then issues."""
    order_id = venue.create(order_body(items=[bad_schedule_line()]))["orderId"]
    venue.tick()
    response = venue.api.put(f"/channelManager/{order_id}", json=order_body())
    assert response.status_code == 200
    venue.tick()
    assert venue.get(order_id)["status"] == "Issued"


@pytest.mark.parametrize("settle", [False, True], ids=["Submitted", "Issued"])
def test_replace_is_refused_outside_draft_and_error(venue: Venue, settle: bool) -> None:
    """replaceOrder on an in-flight or Issued order is a 400 naming its status."""
    order_id = venue.create(order_body())["orderId"]
    if settle:
        venue.tick()
    response = venue.api.put(f"/channelManager/{order_id}", json=order_body())
    status = "Issued" if settle else "Submitted"
    assert response.status_code == 400
    assert response.json() == {
        "code": "generic_error",
        "message": f"Order cannot be replaced in status {status}",
    }


def test_replace_cannot_change_partner_or_reference(venue: Venue) -> None:
    """partnerId and sellToOrderReference are immutable under PUT."""
    order_id = venue.create(order_body(payment=None))["orderId"]
    venue.tick()
    other_reference = venue.api.put(f"/channelManager/{order_id}", json=order_body("ORDER-2"))
    other_partner = venue.api.put(
        f"/channelManager/{order_id}", json=order_body(partner=OTHER_PARTNER)
    )
    assert other_reference.status_code == 400
    assert other_reference.json()["message"] == "sellToOrderReference cannot be changed via PUT"
    assert other_partner.status_code == 400
    assert other_partner.json()["message"] == "partnerId cannot be changed via PUT"
    assert venue.get(order_id)["status"] == "Draft"


def test_delete_keeps_an_issued_order_as_cancelled(venue: Venue) -> None:
    """Deleting an Issued order keeps it as Cancelled, its assets and lines destroyed.

    ChannelMgrOrderAgent ``DeleteOrder``; CMOrderIssuer ``DeleteOrder`` /
    ``DestroyOrderAssets`` (wallets, components and lines deleted; status message, job
    and manifest cleared; Cancelled).
    """
    order_id = venue.create(order_body())["orderId"]
    venue.tick()
    assert venue.get(order_id)["manifestUrl"]

    response = venue.api.delete(f"/channelManager/{order_id}")

    assert response.status_code == 200
    answer = response.json()
    assert answer["status"] == "Cancelled"
    assert (answer["items"], answer["statusMessage"], answer["jobId"]) == ([], "", "")
    assert "manifestUrl" not in answer
    assert venue.get(order_id) == answer
    again = venue.api.delete(f"/channelManager/{order_id}")
    assert again.status_code == 200 and again.json() == answer


@pytest.mark.parametrize("items", [None, [bad_schedule_line()]], ids=["Draft", "Error"])
def test_delete_removes_a_draft_or_error_order_answering_cancelled(
    venue: Venue, items: Any
) -> None:
    """Deleting a Draft or Error order answers it Cancelled with no items, then it is gone.

    CMOrderIssuer ``DeleteOrder`` runs ``DestroyOrderAssets`` (status Cancelled, lines
    deleted) before deleting the header; ChannelMgrOrderAgent ``DeleteOrder`` answers the
    record as it was marked. getOrder then answers 404.
    """
    order_id = venue.create(order_body(payment=None, items=items))["orderId"]
    venue.tick()
    before = venue.get(order_id)
    assert before["status"] in ("Draft", "Error") and before["items"]

    response = venue.api.delete(f"/channelManager/{order_id}")

    assert response.status_code == 200
    answer = response.json()
    assert answer["orderId"] == order_id
    assert answer["status"] == "Cancelled"
    assert (answer["items"], answer["statusMessage"], answer["jobId"]) == ([], "", "")
    assert answer["sellToOrderReference"] == before["sellToOrderReference"]
    gone = venue.api.get(f"/channelManager/{order_id}")
    assert gone.status_code == 404
    assert gone.json()["code"] == "resource_not_found"
    assert venue.api.delete(f"/channelManager/{order_id}").status_code == 404


def test_delete_is_refused_in_flight(venue: Venue) -> None:
    """Deleting a Submitted order is the 400 "mid-flight", the order left as it was.

    ChannelMgrOrderAgent ``DeleteOrder``: "Order is mid-flight (status %1); retry once it
    has settled." for Submitted, Scheduled and Processing.
    """
    order_id = venue.create(order_body())["orderId"]
    response = venue.api.delete(f"/channelManager/{order_id}")
    assert response.status_code == 400
    assert response.json() == {
        "code": "generic_error",
        "message": "Order is mid-flight (status Submitted); retry once it has settled.",
    }
    assert venue.get(order_id)["status"] == "Submitted"


def test_duplicate_reference_is_refused(venue: Venue) -> None:
    """A second order with the same reference (any case, any spaces) is a 400."""
    venue.create(order_body("order-7"))
    response = venue.api.post("/channelManager", json=order_body("  Order-7 "))
    assert response.status_code == 400
    message = (
        "An order with sellToOrderReference 'ORDER-7' already exists"
        f" for partner '{DEFAULT_PARTNERS[0].name}'"
    )
    assert response.json() == {"code": "generic_error", "message": message}


def test_duplicate_of_an_error_order_replaces_it(venue: Venue) -> None:
    """Resubmitting an Error order's reference deletes it and accepts a new orderId."""
    old_id = venue.create(order_body("ORDER-8", items=[bad_schedule_line()]))["orderId"]
    venue.tick()
    assert venue.get(old_id)["status"] == "Error"

    new = venue.create(order_body("ORDER-8"))

    assert new["orderId"] != old_id
    assert new["sellToOrderReference"] == "ORDER-8"
    assert venue.api.get(f"/channelManager/{old_id}").status_code == 404


def test_references_are_cut_at_fifty_characters(venue: Venue) -> None:
    """Over-long references are silently truncated to 50 characters."""
    order = venue.create(order_body("r" * 60, payment="p" * 70))
    assert order["sellToOrderReference"] == "R" * 50
    assert order["paymentReference"] == "P" * 50


def _without(field: str) -> dict[str, Any]:
    body = order_body()
    del body[field]
    return body


def _item(**changes: Any) -> dict[str, Any]:
    """A body whose one line has ``changes`` (a value of ``None`` below: removed)."""
    item = {**line(), **changes}
    return order_body(items=[{k: v for k, v in item.items() if v is not _GONE}])


_GONE = object()
_SCHEDULE_OK = {"itemNumber": "31020", "visitDate": future(31), "visitTime": "14:00:00"}


def _schedule(**changes: Any) -> dict[str, Any]:
    entry = {**_SCHEDULE_OK, **changes}
    entry = {k: v for k, v in entry.items() if v is not _GONE}
    return order_body(items=[line("40100", wallet={"componentSchedule": [entry]})])


# ChannelMgrOrderAgent TryParseHeader / TryParseItems / TryParseItem / TryParseWalletBlock /
# TryParseComponentScheduleEntry / GetRequired*Field / TryGetPartnerSetup: each rule's message.
VALIDATION_CASES = {
    "not an object": ([1, 2], "Body must be a JSON object"),
    "missing partner": (_without("partnerId"), "Required field 'partnerId' is missing"),
    "null partner": (
        {**order_body(), "partnerId": None},
        "Required field 'partnerId' cannot be null",
    ),
    "partner not primitive": (
        {**order_body(), "partnerId": {"id": PARTNER}},
        "Required field 'partnerId' must be a primitive value",
    ),
    "partner not a guid": ({**order_body(), "partnerId": "abc"}, "partnerId is not a valid GUID"),
    "missing reference": (
        _without("sellToOrderReference"),
        "Required field 'sellToOrderReference' is missing",
    ),
    "empty reference": (order_body(""), "Required field 'sellToOrderReference' cannot be empty"),
    "email not primitive": (
        {**order_body(), "sellToEmail": ["a@b.c"]},
        "Optional field 'sellToEmail' must be a primitive value",
    ),
    "unknown partner": (
        order_body(partner="11111111-2222-3333-4444-555555555555"),
        "Unknown partnerId '{11111111-2222-3333-4444-555555555555}'",
    ),
    "inactive partner": (
        order_body(partner=INACTIVE_PARTNER),
        f"Partner '{DEFAULT_PARTNERS[2].name}' is not active",
    ),
    "missing items": (_without("items"), "items array is required"),
    "items not an array": ({**order_body(), "items": {}}, "items must be an array"),
    "no items": (order_body(items=[]), "items array must contain at least one entry"),
    "item not an object": (order_body(items=[line(), "31001"]), "items[1] must be an object"),
    "missing item number": (_item(itemNumber=_GONE), "Required field 'itemNumber' is missing"),
    "unknown item": (order_body(items=[line("99999")]), "Unknown item '99999'"),
    "zero quantity": (_item(quantity=0), "quantity must be >= 1 (line 100000)"),
    "negative quantity": (
        order_body(items=[line(), line(quantity=-1)]),
        "quantity must be >= 1 (line 200000)",
    ),
    "missing visit date": (_item(visitDate=_GONE), "Required field 'visitDate' is missing"),
    "visit date format": (
        _item(visitDate="01/06/2030"),
        "Required field 'visitDate' must be YYYY-MM-DD",
    ),
    "visit date with a time": (
        _item(visitDate="2030-06-01T00:00:00"),
        "Required field 'visitDate' must be YYYY-MM-DD",
    ),
    "missing visit time": (_item(visitTime=_GONE), "Required field 'visitTime' is missing"),
    "null visit time": (_item(visitTime=None), "Required field 'visitTime' cannot be null"),
    "visit time without seconds": (
        _item(visitTime="10:30"),
        "Required field 'visitTime' must be HH:mm:ss",
    ),
    "visit time with a fraction": (
        _item(visitTime="10:30:00.000"),
        "Required field 'visitTime' must be HH:mm:ss",
    ),
    "visit time out of range": (
        _item(visitTime="24:00:00"),
        "Required field 'visitTime' must be HH:mm:ss",
    ),
    "past visit": (
        order_body(items=[line(), {**line(), "visitDate": "2020-01-01"}]),
        "items[1] visitDate must not be in the past",
    ),
    "names length": (
        order_body(items=[line(quantity=2, wallet={"names": ["Only One"]})]),
        "wallet.names array length (1) must equal 2 on line 100000",
    ),
    "empty names": (
        order_body(items=[line(wallet={"names": []})]),
        "wallet.names array length (0) must equal 1 on line 100000",
    ),
    "group names length": (
        order_body(items=[line("31050", quantity=4, wallet={"names": ["A", "B"]})]),
        "wallet.names array length (2) must equal 1 on line 100000",
    ),
    "group names one per guest": (
        order_body(items=[line("31050", quantity=2, wallet={"names": ["A", "B"]})]),
        "wallet.names array length (2) must equal 1 on line 100000",
    ),
    "external references length": (
        order_body(
            items=[line(), line(quantity=3, wallet={"externalReferenceNumbers": ["A", "B"]})]
        ),
        "wallet.externalReferenceNumbers array length (2) must equal 3 on line 200000",
    ),
    "empty external references": (
        order_body(items=[line(wallet={"externalReferenceNumbers": []})]),
        "wallet.externalReferenceNumbers array length (0) must equal 1 on line 100000",
    ),
    "schedule on a ticket": (
        order_body(items=[line(wallet={"componentSchedule": []})]),
        "wallet.componentSchedule is only valid for package items (line 100000)",
    ),
    "schedule entry not an object": (
        order_body(items=[line("40100", wallet={"componentSchedule": ["31020"]})]),
        "wallet.componentSchedule entries must be objects (line 100000)",
    ),
    "schedule names no component": (
        _schedule(itemNumber="52001"),
        "'52001' is not a component of package '40100' (line 100000)",
    ),
    "schedule without a visit time": (
        _schedule(visitTime=_GONE),
        "Required field 'visitTime' is missing",
    ),
    "schedule visit time format": (
        _schedule(visitTime="14:00"),
        "Required field 'visitTime' must be HH:mm:ss",
    ),
    "schedule in the past": (
        _schedule(visitDate="2020-01-01"),
        "items[0].componentSchedule entry '31020' visitDate must not be in the past",
    ),
}


@pytest.mark.parametrize(("body", "message"), VALIDATION_CASES.values(), ids=VALIDATION_CASES)
def test_invalid_orders_are_refused_with_the_venues_message(
    venue: Venue, body: Any, message: str
) -> None:
    """ChannelMgrOrderAgent TryParseHeader, TryParseItems, TryParseItem,
    TryParseWalletBlock, TryParseComponentScheduleEntry, GetRequired*Field,
    TryGetPartnerSetup: each rule answers 400 generic_error with the venue's message, in
    the venue's order, storing nothing."""
    response = venue.api.post("/channelManager", json=body)
    assert response.status_code == 400
    answer = response.json()
    assert answer["code"] == "generic_error"
    # Past dates end with "(received …, local today …)".
    assert answer["message"] == message or answer["message"].startswith(f"{message} (received ")
    listed = venue.api.get(f"/channelManager/orders/{PARTNER}").json()
    assert listed["data"] == []


def test_body_that_is_not_json_is_refused(venue: Venue) -> None:
    """APIRequestProcessor ProcessRequest keeps a body that does not parse as a JSON text
    value; ChannelMgrOrderAgent CreateOrder then answers it as any non-object body."""
    response = venue.api.post(
        "/channelManager", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert response.json()["message"] == "Body must be a JSON object"


def test_unknown_order_is_404(venue: Venue) -> None:
    """getOrder for an id the venue never issued answers 404 resource_not_found."""
    response = venue.api.get("/channelManager/6c2b1a0e-0000-4000-8000-000000000000")
    assert response.status_code == 404
    assert response.json()["code"] == "resource_not_found"


@pytest.mark.parametrize(
    "headers",
    [{}, {"x-np-api-key": "wrong"}, {"Authorization": "Bearer wrong"}],
    ids=["missing", "wrong", "wrong-bearer"],
)
def test_calls_without_the_key_are_401(venue: Venue, headers: dict[str, str]) -> None:
    """A missing or wrong key is a 401 with the venue's error body."""
    response = httpx.get(
        f"{venue.server.base_url}/channelManager/orders/{PARTNER}", headers=headers
    )
    assert response.status_code == 401
    assert response.json()["code"] == "unauthorized"
    assert response.json()["message"]


def test_bearer_key_is_accepted(venue: Venue) -> None:
    """The older pages' ``Authorization: Bearer <key>`` works too."""
    response = httpx.get(
        f"{venue.server.base_url}/channelManager/orders/{PARTNER}",
        headers={"Authorization": f"Bearer {venue.server.api_key}"},
    )
    assert response.status_code == 200


@pytest.mark.parametrize(
    "address",
    [
        "/00000000-0000-0000-0000-000000000000/sandbox/CRONUS%20International%20Ltd.",
        "/01234567-89ab-cdef-0123-456789abcdef/production/CRONUS%20International%20Ltd.",
        "/01234567-89ab-cdef-0123-456789abcdef/sandbox/Other%20Company",
    ],
    ids=["tenant", "environment", "company"],
)
def test_unknown_address_is_404(venue: Venue, address: str) -> None:
    """An unknown tenant, environment or company answers 404 resource_not_found."""
    response = httpx.get(
        f"{venue.server.url}{address}/channelManager/orders/{PARTNER}",
        headers={"x-np-api-key": venue.server.api_key},
    )
    assert response.status_code == 404
    assert response.json()["code"] == "resource_not_found"


@pytest.mark.parametrize("quantity", [_GONE, None], ids=["absent", "null"])
def test_quantity_absent_or_null_is_one(venue: Venue, quantity: Any) -> None:
    """ChannelMgrOrderAgent TryParseItem: quantity is optional; absent or null is 1."""
    order = venue.create(_item(quantity=quantity))
    (item,) = order["items"]
    assert item["quantity"] == 1
    assert len(item["wallets"]) == 1


def test_wallet_lists_give_each_wallet_its_entry(venue: Venue) -> None:
    """ChannelMgrOrderAgent TryParseWalletBlock / ExpectedWalletCount: one name and one
    external reference per wallet (a group ticket has one whatever the quantity);
    TryParseItem: per-line sellToName overrides the header's, null clears it."""
    items = [
        line(quantity=2, wallet={"names": ["Ann", "Bo"], "externalReferenceNumbers": ["E1", "E2"]}),
        line("31050", quantity=4, wallet={"names": ["Group"]}, sellToName="Leader"),
        line(sellToName=None, wallet={"names": "not a list"}),  # not an array: ignored
    ]
    order = venue.create(order_body(items=items))
    single, group, plain = order["items"]
    assert [(w["name"], w["externalReferenceNumber"]) for w in single["wallets"]] == [
        ("Ann", "E1"),
        ("Bo", "E2"),
    ]
    assert [w["name"] for w in group["wallets"]] == ["Group"]
    assert (single["sellToName"], group["sellToName"], plain["sellToName"]) == (
        "Jane Doe",
        "Leader",
        "",
    )
    assert plain["wallets"][0]["name"] == ""


def test_replace_is_validated_as_create_is(venue: Venue) -> None:
    """ChannelMgrOrderAgent ReplaceOrder parses the body with the same TryParseHeader and
    TryParseItems: a visitTime without seconds is refused and the order stays as it was."""
    order_id = venue.create(order_body(payment=None))["orderId"]
    venue.tick()
    response = venue.api.put(f"/channelManager/{order_id}", json=_item(visitTime="10:30"))
    assert response.status_code == 400
    assert response.json() == {
        "code": "generic_error",
        "message": "Required field 'visitTime' must be HH:mm:ss",
    }
    assert venue.get(order_id)["status"] == "Draft"


def test_a_refused_resubmission_still_deletes_the_error_order(venue: Venue) -> None:
    """ChannelMgrOrderAgent CreateOrder / IsDuplicateOrder: the Error order under the
    reference is deleted before the items are read, so it is gone even when the new
    order is then refused."""
    old_id = venue.create(order_body("ORDER-9", items=[bad_schedule_line()]))["orderId"]
    venue.tick()
    assert venue.get(old_id)["status"] == "Error"
    again = order_body("ORDER-9", items=[{**line(), "visitTime": "9:00:00"}])
    assert venue.api.post("/channelManager", json=again).status_code == 400
    assert venue.api.get(f"/channelManager/{old_id}").status_code == 404


def test_over_long_text_is_cut_as_the_venue_cuts_it(venue: Venue) -> None:
    """ChannelMgrOrderAgent TryParseHeader / TryParseItem / TryParseWalletBlock: text is
    copied into CMOrder, CMOrderLine and CMOrderWallet with CopyStr to the field's width,
    without a word: e-mail and name Text[100]; the language upper-cased (ToUpper), cut
    at 10 and, as a Code, trimmed; wallet names and external references Text[100]. A
    line's null sellToEmail is "" (no e-mail for that line)."""
    body = order_body("CUT-1")
    body["sellToEmail"] = "e" * 99 + "@x"
    body["sellToName"] = "N" * 120
    body["sellToLanguage"] = " english-gb"  # 11 characters: the cut keeps " english-g"
    body["items"] = [
        line(
            quantity=1,
            sellToEmail="l" * 101,
            sellToName=None,
            sellToLanguage="dan",
            wallet={"names": ["W" * 130], "externalReferenceNumbers": ["R" * 101]},
        ),
        line(sellToEmail=None),
        line(),
    ]

    order = venue.create(body)

    assert (order["sellToEmail"], order["sellToName"]) == ("e" * 99 + "@", "N" * 100)
    assert order["sellToLanguage"] == "ENGLISH-G"
    first, cleared, inherited = order["items"]
    # An empty value is "" at the venue (AppendOrderLine writes every key); read both ways.
    assert (first["sellToEmail"], first.get("sellToName", ""), first["sellToLanguage"]) == (
        "l" * 100,
        "",
        "DAN",
    )
    wallet = first["wallets"][0]
    assert (wallet["name"], wallet["externalReferenceNumber"]) == ("W" * 100, "R" * 100)
    assert cleared.get("sellToEmail", "") == ""
    assert cleared["sellToName"] == "N" * 100
    assert (inherited["sellToEmail"], inherited["sellToLanguage"]) == (
        order["sellToEmail"],
        "ENGLISH-G",
    )
