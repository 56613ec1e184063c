"""The sandbox against the vendor's source: routing, permissions, re-processing, and the
shape of single-order answers."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest

from sandbox.config import DEFAULT_PARTNERS, Partner
from tests.sandbox.conftest import (
    PARTNER,
    Receiver,
    Venue,
    future,
    line,
    order_body,
)

ZERO_GUID = "00000000-0000-0000-0000-000000000000"
MILLISECONDS = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,3})?Z$")


# --- routing ---------------------------------------------------------------------------


def test_fixed_path_words_match_in_any_case_and_a_trailing_slash_is_ignored(
    venue: Venue,
) -> None:
    """APIRequest Match compares fixed words lower-cased; APIRequestProcessor
    ProcessRequest drops the empty segment a trailing ``/`` leaves."""
    order_id = venue.create()["orderId"]
    got = venue.api.get(f"/CHANNELMANAGER/{order_id}/")
    listed = venue.api.get(f"/channelmanager/Orders/{PARTNER}")
    created = venue.api.post("/ChannelManager/", json=order_body("CASE-2"))
    assert (got.status_code, got.json()["orderId"]) == (200, order_id)
    assert [row["orderId"] for row in listed.json()["data"]] == [order_id]
    assert created.status_code == 201
    assert venue.stats()["calls"]["getOrder"] == {"200": 1}


@pytest.mark.parametrize(
    ("method", "path"),
    [("PATCH", "/channelManager/x"), ("POST", "/channelManager/x"), ("GET", "/channelManager")],
)
def test_a_call_no_route_matches_is_the_venues_404(venue: Venue, method: str, path: str) -> None:
    """ChannelMgrApi Handle: RespondResourceNotFound('API endpoint not found'), written
    '%1 Not Found' by APIResponse."""
    response = venue.api.request(method, path)
    assert response.status_code == 404
    assert response.json() == {
        "code": "resource_not_found",
        "message": "API endpoint not found Not Found",
    }


def test_an_unknown_module_is_404_naming_the_path(venue: Venue) -> None:
    """APIRequestProcessor ProcessRequest: a first segment that is no API module answers
    404 with the path's segments."""
    response = venue.api.get("/salesOrders/123")
    assert response.status_code == 404
    assert response.json() == {
        "code": "resource_not_found",
        "message": "/salesOrders/123 Not Found",
    }


@pytest.mark.parametrize("method", ["OPTIONS", "HEAD", "TRACE"])
def test_other_methods_are_unsupported(venue: Venue, method: str) -> None:
    """APIRequestProcessor ProcessRequest: a method other than GET, POST, PUT, PATCH and
    DELETE is 400 unsupported_http_method (APIResponse
    RespondBadRequestUnsupportedHttpMethod)."""
    response = venue.api.request(method, "/channelManager/x")
    assert response.status_code == 400
    if method != "HEAD":  # a HEAD answer has no body
        assert response.json() == {
            "code": "unsupported_http_method",
            "message": f"Http method {method} is not supported",
        }


def test_a_missing_permission_set_is_403(venue: Venue) -> None:
    """APIRequestProcessor ProcessRequest / ChannelMgrModuleResolver
    GetRequiredPermissionSet: without the permission set every Channel Manager call is
    403 generic_error "Missing permissions: NPR API Channel Mgr"; nothing is stored."""
    venue.faults(missingPermissions=True)
    response = venue.api.post("/channelManager", json=order_body())
    assert response.status_code == 403
    assert response.json() == {
        "code": "generic_error",
        "message": "Missing permissions: NPR API Channel Mgr",
    }
    venue.faults(missingPermissions=False)
    assert venue.api.get(f"/channelManager/orders/{PARTNER}").json()["data"] == []


# --- re-processing ---------------------------------------------------------------------


def test_an_error_order_can_be_reprocessed_and_is_announced(
    venue: Venue, receiver: Receiver
) -> None:
    """CMJobQueueRunner ReProcessSingleOrder / ProcessOneOrder: an Error order whose
    ticket import failed (no job id) runs through CMOrderIssuer IssueForOrder again —
    import and prices included — and the outcome is announced by webhook."""
    venue.subscribe(receiver.url)
    venue.faults(soldOut=["31001"])
    order_id = venue.create()["orderId"]
    venue.tick()
    assert venue.get(order_id)["status"] == "Error"
    venue.settle_webhooks()
    before = len(receiver.notifications())
    venue.faults(soldOut=[])

    response = venue.admin.post(f"/orders/{order_id}/reprocess")

    assert response.status_code == 200
    order = response.json()
    assert (order["status"], order["statusMessage"]) == ("Issued", "")
    assert order["items"][0]["wallets"][0]["unitPriceInclVat"] == 100
    receiver.wait_for_posts(2)
    later = receiver.notifications()[before:]
    assert [(n.payload["orderId"], n.payload["status"]) for n in later] == [(order_id, "Issued")]


def test_reprocessing_after_an_import_does_not_price_the_tickets(venue: Venue) -> None:
    """CMOrderIssuer IssueForOrder imports (and prices) the tickets only when the order
    has no job id: re-processing an order that failed after its import issues wallets
    that carry only their coupons' prices."""
    venue.faults(errorRate=1)
    single = venue.create(order_body("RE-1"))["orderId"]
    package = venue.create(order_body("RE-2", items=[line("40100")]))["orderId"]
    venue.tick()
    assert all(venue.get(o)["jobId"] for o in (single, package))
    venue.faults(errorRate=0)

    answers = [venue.admin.post(f"/orders/{o}/reprocess").json() for o in (single, package)]

    prices = [
        (w["unitPriceExclVat"], w["unitPriceInclVat"])
        for order in answers
        for w in order["items"][0]["wallets"]
    ]
    assert [order["status"] for order in answers] == ["Issued", "Issued"]
    assert prices == [(0, 0), (8, 10)]  # the package's coupon only


@pytest.mark.parametrize("payment", ["PAY-1", None], ids=["Issued", "Draft"])
def test_only_submitted_or_error_orders_are_reprocessed(venue: Venue, payment: str | None) -> None:
    """CMJobQueueRunner ReProcessSingleOrder refuses any other status, naming it."""
    order_id = venue.create(order_body(payment=payment))["orderId"]
    venue.tick()
    response = venue.admin.post(f"/orders/{order_id}/reprocess")
    status = "Issued" if payment else "Draft"
    assert response.status_code == 400
    assert response.json()["message"] == (
        f"Order status {status} is not eligible for manual processing \u2014 only Submitted"
        " (initial) or Error (retry) are."
    )


def test_a_submitted_order_is_reprocessed_at_once(venue: Venue) -> None:
    """CMJobQueueRunner ReProcessSingleOrder takes a Submitted order straight through."""
    order_id = venue.create(order_body(payment=None))["orderId"]
    response = venue.admin.post(f"/orders/{order_id}/reprocess")
    assert response.json()["status"] == "Draft"
    assert venue.tick()["processed"] == []


# --- the shape of single-order answers -------------------------------------------------


def test_a_submitted_order_writes_every_field(venue: Venue) -> None:
    """ChannelMgrOrderAgent BuildOrderResponseJson / AppendOrderLine / AppendWallet: every
    field is written — empty text "", a shell's prices 0, an unset issuedAt as JsonBuilder
    CreateJsonValue writes it ("") — and only manifestUrl is left out when empty;
    componentSchedule only on package lines with entries."""
    body = order_body(payment=None)
    del body["sellToEmail"], body["sellToName"]
    order = venue.create(body)
    assert {k: order[k] for k in ("paymentReference", "jobId", "sellToEmail", "sellToName")} == {
        "paymentReference": "",
        "jobId": "",
        "sellToEmail": "",
        "sellToName": "",
    }
    assert "manifestUrl" not in order
    assert MILLISECONDS.match(order["receivedAt"])
    (item,) = order["items"]
    assert list(item) == [
        "lineNo",
        "itemNumber",
        "description",
        "isPackage",
        "quantity",
        "visitDate",
        "visitTime",
        "sellToName",
        "sellToEmail",
        "sellToLanguage",
        "wallets",
    ]
    (wallet,) = item["wallets"]
    assert wallet == {
        "seqNo": 1,
        "walletId": ZERO_GUID,
        "walletReferenceNumber": "",
        "externalReferenceNumber": "",
        "name": "",
        "issuedAt": "",
        "unitPriceExclVat": 0,
        "unitPriceInclVat": 0,
        "currencyCode": "",
        "assets": [],
    }


def test_a_wallet_without_a_name_gets_the_items_description(venue: Venue) -> None:
    """CMOrderIssuer WrapAssetsIntoWallets / DeriveDefaultWalletName: no name given → the
    item's description; issuedAt carries milliseconds when there are any."""
    order_id = venue.create(order_body(items=[line("31001", 2, wallet={"names": ["Ann", ""]})]))[
        "orderId"
    ]
    venue.tick()
    wallets = venue.get(order_id)["items"][0]["wallets"]
    assert [w["name"] for w in wallets] == ["Ann", "Castle Admission"]
    assert all(MILLISECONDS.match(w["issuedAt"]) for w in wallets)


def test_a_package_line_answers_its_component_schedule(venue: Venue) -> None:
    """ChannelMgrOrderAgent AppendComponentScheduleArray: the stored entries, item
    numbers as Code (upper case), in the order sent."""
    schedule = [{"itemNumber": "cpn-cafe10", "visitDate": future(31), "visitTime": "09:00:00"}]
    order = venue.create(order_body(items=[line("40100", wallet={"componentSchedule": schedule})]))
    assert order["items"][0]["componentSchedule"] == [{**schedule[0], "itemNumber": "CPN-CAFE10"}]


def test_a_partner_without_a_design_template_gets_no_manifest(
    make_venue: Callable[..., Venue],
) -> None:
    """CMOrderIssuer BuildManifestForOrder exits when the partner has no design template:
    an Issued order then has no manifestUrl, nor have its wallets."""
    partners = (
        Partner(id=DEFAULT_PARTNERS[0].id, name="No Design", design_template=False),
        *DEFAULT_PARTNERS[1:],
    )
    venue = make_venue(partners=partners)
    order_id = venue.create()["orderId"]
    venue.tick()
    order = venue.get(order_id)
    assert order["status"] == "Issued"
    assert "manifestUrl" not in order
    assert all("manifestUrl" not in w for w in order["items"][0]["wallets"])


def test_partners_are_read_with_their_name_and_flags() -> None:
    """The CLI's and environment's partner form names the partner (CMPartnerSetup Name,
    quoted by ChannelMgrOrderAgent's messages) and its design template."""
    partner = Partner.parse(f"{PARTNER.upper()}:inactive:no-template=Nordic Tours A/S")
    assert (partner.id, partner.active, partner.design_template, partner.name) == (
        PARTNER,
        False,
        False,
        "Nordic Tours A/S",
    )
    assert Partner.parse(partner.to_text()) == partner
    assert Partner.parse(PARTNER).name == f"Partner {PARTNER[:8].upper()}"
