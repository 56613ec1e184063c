"""Ids in the path: what is a GUID, what an unknown one answers (over real HTTP).

ChannelMgrOrderAgent ListOrdersByPartner reads the partner id with ``Evaluate`` into a
Guid and only filters by it; TryGetOrderIdFromPath does the same for the order id of
getOrder, confirmOrder, replaceOrder and deleteOrder, and ``Order.Get`` then answers 404
with the id as Business Central formats a GUID (braces, upper case).
"""

from __future__ import annotations

import pytest

from tests.sandbox.conftest import INACTIVE_PARTNER, PARTNER, Venue, order_body

UNKNOWN = "11111111-2222-3333-4444-555555555555"
NOT_GUIDS = ("not-a-guid", "1234", "11111111-2222-3333-4444-55555555555g", "{" + UNKNOWN)


def spellings(guid: str) -> list[str]:
    """The ways of writing ``guid`` that a .NET GUID parse reads."""
    return [guid, guid.upper(), "{" + guid + "}", "{" + guid.upper() + "}", guid.replace("-", "")]


def test_unknown_partner_lists_nothing(venue: Venue) -> None:
    """A valid GUID the venue does not know is only a filter: 200 and an empty page
    (ChannelMgrOrderAgent ListOrdersByPartner)."""
    venue.create(order_body())
    response = venue.api.get(f"/channelManager/orders/{UNKNOWN}")
    assert response.status_code == 200, response.text
    assert response.json()["data"] == [] and response.json()["morePages"] is False
    feed = venue.api.get(f"/channelManager/orders/{UNKNOWN}", params={"sync": "true"})
    assert (feed.status_code, feed.json()["data"]) == (200, [])


def test_inactive_partner_still_lists(venue: Venue) -> None:
    """The list checks no partner setup, so an inactive partner's list answers 200
    (ChannelMgrOrderAgent ListOrdersByPartner)."""
    response = venue.api.get(f"/channelManager/orders/{INACTIVE_PARTNER}")
    assert (response.status_code, response.json()["data"]) == (200, [])


def test_partner_id_in_any_guid_spelling(venue: Venue) -> None:
    """Braces, upper case or bare hex name the same partner (ChannelMgrOrderAgent
    ListOrdersByPartner ``Evaluate(PartnerId, ...)``)."""
    order_id = venue.create(order_body())["orderId"]
    for spelling in spellings(PARTNER):
        response = venue.api.get(f"/channelManager/orders/{spelling}")
        assert response.status_code == 200, (spelling, response.text)
        assert [row["orderId"] for row in response.json()["data"]] == [order_id], spelling


@pytest.mark.parametrize("text", NOT_GUIDS)
def test_partner_id_that_is_not_a_guid_is_a_400(venue: Venue, text: str) -> None:
    """Not a GUID: 400 generic_error "Invalid partnerId" (ChannelMgrOrderAgent
    ListOrdersByPartner)."""
    response = venue.api.get(f"/channelManager/orders/{text}")
    assert response.status_code == 400
    assert response.json() == {"code": "generic_error", "message": "Invalid partnerId"}


def test_order_id_that_is_not_a_guid_is_a_400_on_every_call(venue: Venue) -> None:
    """getOrder, confirmOrder, replaceOrder and deleteOrder answer 400 "Invalid order id"
    before anything else (ChannelMgrOrderAgent TryGetOrderIdFromPath)."""
    for text in NOT_GUIDS:
        path = f"/channelManager/{text}"
        answers = [
            venue.api.get(path),
            venue.api.post(f"{path}/confirm", json={"paymentReference": "P"}),
            venue.api.put(path, json=order_body()),
            venue.api.delete(path),
        ]
        for response in answers:
            assert response.status_code == 400, (text, response.request.method)
            assert response.json() == {"code": "generic_error", "message": "Invalid order id"}


def test_unknown_order_is_a_404_naming_it_as_business_central_does(venue: Venue) -> None:
    """A valid but unknown GUID: 404 "Order '{GUID}' not found", the id in braces and upper
    case as Format writes a Guid (ChannelMgrOrderAgent GetOrder, ConfirmOrder,
    ReplaceOrder, DeleteOrder)."""
    path = f"/channelManager/{UNKNOWN}"
    answers = [
        venue.api.get(path),
        venue.api.post(f"{path}/confirm", json={"paymentReference": "P"}),
        venue.api.put(path, json=order_body()),
        venue.api.delete(path),
    ]
    for response in answers:
        assert response.status_code == 404, response.request.method
        assert response.json() == {
            "code": "resource_not_found",
            "message": "Order '{11111111-2222-3333-4444-555555555555}' not found Not Found",
        }


def test_order_id_in_any_guid_spelling(venue: Venue) -> None:
    """An order is found by its id in any spelling the GUID parse reads, and answered with
    the venue's own lowercase form (ChannelMgrOrderAgent TryGetOrderIdFromPath)."""
    order_id = venue.create(order_body())["orderId"]
    for spelling in spellings(order_id):
        response = venue.api.get(f"/channelManager/{spelling}")
        assert response.status_code == 200, (spelling, response.text)
        assert response.json()["orderId"] == order_id


def test_confirming_an_issued_order_reads_no_body(venue: Venue) -> None:
    """confirmOrder on an Issued order is a no-op answered before the body is read, so
    even a missing body gets 200 (ChannelMgrOrderAgent ConfirmOrder)."""
    order_id = venue.create(order_body())["orderId"]
    venue.tick()
    assert venue.get(order_id)["status"] == "Issued"
    response = venue.api.post(f"/channelManager/{order_id}/confirm")
    assert (response.status_code, response.json()["status"]) == (200, "Issued")
