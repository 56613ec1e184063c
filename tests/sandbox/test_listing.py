"""listOrdersByPartner over real HTTP: filters, cursor paging and the row-version change feed."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from sandbox import Faults
from tests.sandbox.conftest import OTHER_PARTNER, PARTNER, Venue, order_body
from venue.models import OrderStatus

LIST = f"/channelManager/orders/{PARTNER}"


def ids(page: dict[str, Any]) -> list[str]:
    """The orderIds on one page."""
    return [row["orderId"] for row in page["data"]]


def test_summaries_are_compact_and_carry_a_row_id(venue: Venue) -> None:
    """ChannelMgrOrderAgent ListOrdersByPartner's fields, written by APIRequest
    AddFieldToJson: every field present (blank text and codes as ""), no items; GetRecords
    adds ``id``, the record's SystemId (a GUID, not the orderId, the same across changes),
    and ``rowVersion`` only with ``sync``."""
    order = venue.create(order_body(payment=None))
    page = venue.api.get(LIST).json()
    assert page["morePages"] is False
    assert page["nextPageKey"] == "" and page["nextPageURL"] == ""
    (summary,) = page["data"]
    assert set(summary) == {
        "orderId",
        "partnerId",
        "sellToOrderReference",
        "buyFromOrderReference",
        "sellToEmail",
        "sellToName",
        "sellToLanguage",
        "paymentReference",
        "status",
        "statusMessage",
        "receivedAt",
        "jobId",
        "manifestUrl",
        "id",
    }
    assert summary["orderId"] == order["orderId"]
    assert summary["buyFromOrderReference"] == order["buyFromOrderReference"]
    assert (summary["paymentReference"], summary["jobId"], summary["manifestUrl"]) == ("", "", "")
    assert "manifestUrl" not in order  # the single-order builder leaves an empty one out
    assert summary["receivedAt"] == order["receivedAt"]
    assert str(uuid.UUID(summary["id"])) == summary["id"] != order["orderId"]
    venue.tick()
    assert venue.api.get(LIST).json()["data"][0]["id"] == summary["id"]


def test_summaries_write_the_status_by_its_caption(make_venue: Callable[..., Venue]) -> None:
    """APIRequest AddFieldToJson writes an enum with Format: the caption of
    CMOrderStatus.Enum.al ("Processing..."), while getOrder writes the plain name
    (ChannelMgrOrderAgent GetStatusAsText)."""
    venue = make_venue(faults=Faults(seed=7, stall_processing_rate=1.0))
    stuck = venue.create(order_body("STUCK"))["orderId"]
    venue.tick()
    waiting = venue.create(order_body("WAITING"))["orderId"]

    summaries = {row["orderId"]: row for row in venue.api.get(LIST).json()["data"]}
    replicated = venue.api.get(LIST, params={"sync": "true"}).json()["data"]

    assert summaries[stuck]["status"] == "Processing..."
    assert venue.get(stuck)["status"] == "Processing"
    assert summaries[waiting]["status"] == "Submitted"
    assert {row["status"] for row in replicated} == {"Processing...", "Submitted"}
    for row in summaries.values():
        assert row["status"] == OrderStatus(venue.get(row["orderId"])["status"]).caption


def test_lists_only_the_partners_own_orders(venue: Venue) -> None:
    """Another partner's orders never appear in this partner's list."""
    mine = venue.create(order_body("MINE"))["orderId"]
    venue.create(order_body("THEIRS", partner=OTHER_PARTNER))
    assert ids(venue.api.get(LIST).json()) == [mine]


def test_status_filter_is_a_comma_list_ored(venue: Venue) -> None:
    """``status=Draft,Error`` returns orders in either status and no others."""
    draft = venue.create(order_body("A", payment=None))["orderId"]
    issued = venue.create(order_body("B"))["orderId"]
    venue.tick()
    submitted = venue.create(order_body("C"))["orderId"]

    assert ids(venue.api.get(LIST, params={"status": "Draft,Issued"}).json()) == [draft, issued]
    assert ids(venue.api.get(LIST, params={"status": "submitted"}).json()) == [submitted]
    assert len(venue.api.get(LIST).json()["data"]) == 3


def test_unknown_status_is_refused(venue: Venue) -> None:
    """A status the venue does not have is a 400 naming it."""
    response = venue.api.get(LIST, params={"status": "Issued,Shipped"})
    assert response.status_code == 400
    assert response.json() == {"code": "generic_error", "message": "Unknown status 'Shipped'"}


def test_reference_filter_is_exact_and_case_insensitive(venue: Venue) -> None:
    """``sellToOrderReference`` matches one order exactly, in any case."""
    wanted = venue.create(order_body("REF-1"))["orderId"]
    venue.create(order_body("REF-10"))
    page = venue.api.get(LIST, params={"sellToOrderReference": " ref-1"}).json()
    assert ids(page) == [wanted]


def test_received_at_window_is_inclusive(venue: Venue) -> None:
    """receivedAtFrom and receivedAtTo include orders received exactly at the bounds."""
    first = venue.create(order_body("A"))
    venue.advance(3600)
    second = venue.create(order_body("B"))
    venue.advance(3600)
    third = venue.create(order_body("C"))

    window = {"receivedAtFrom": second["receivedAt"], "receivedAtTo": third["receivedAt"]}
    assert ids(venue.api.get(LIST, params=window).json()) == [second["orderId"], third["orderId"]]
    exact = {"receivedAtFrom": first["receivedAt"], "receivedAtTo": first["receivedAt"]}
    assert ids(venue.api.get(LIST, params=exact).json()) == [first["orderId"]]


def test_malformed_received_at_is_refused(venue: Venue) -> None:
    """ChannelMgrOrderAgent ListOrdersByPartner: a receivedAt bound that is not an XML
    date-time is a 400 with the venue's message."""
    response = venue.api.get(LIST, params={"receivedAtFrom": "yesterday"})
    assert response.status_code == 400
    assert response.json()["message"] == "receivedAtFrom must be ISO 8601 datetime"


def test_paging_follows_page_keys_that_keep_the_filters(venue: Venue) -> None:
    """pageSize=2 over 5 matching orders gives pages of 2, 2, 1; the key keeps the filter
    (APIRequest ApplyPageKey) and pageSize is read from each request (GetRecords)."""
    venue.create(order_body("ISSUED-1"))
    venue.create(order_body("ISSUED-2"))
    venue.tick()  # two Issued orders the filter must keep out of every page
    submitted = [venue.create(order_body(f"S-{n}"))["orderId"] for n in range(5)]

    pages = [venue.api.get(LIST, params={"status": "Submitted", "pageSize": 2}).json()]
    while pages[-1]["morePages"]:
        key = pages[-1]["nextPageKey"]
        assert f"pageKey={key}" in pages[-1]["nextPageURL"]
        pages.append(venue.api.get(LIST, params={"pageKey": key, "pageSize": 2}).json())

    assert [len(p["data"]) for p in pages] == [2, 2, 1]
    assert [i for p in pages for i in ids(p)] == submitted
    assert pages[-1]["nextPageKey"] == ""


def test_next_page_url_can_be_followed(venue: Venue) -> None:
    """nextPageURL (re-appending the query unencoded) leads to the next page."""
    for n in range(3):
        venue.create(order_body(f"R-{n}"))
    first = venue.api.get(LIST, params={"status": "Submitted", "pageSize": 2}).json()
    second = venue.api.get(first["nextPageURL"]).json()
    assert len(second["data"]) == 1


def test_page_size_bounds(venue: Venue) -> None:
    """APIRequest GetRecords: a pageSize below 1 or above 20000 is 20000; one that is not
    a number is refused."""
    for n in range(3):
        venue.create(order_body(f"SIZE-{n}"))
    for size in ("0", "-5", "20001"):
        response = venue.api.get(LIST, params={"pageSize": size})
        assert response.status_code == 200
        assert (len(response.json()["data"]), response.json()["morePages"]) == (3, False)
    refused = venue.api.get(LIST, params={"pageSize": "many"})
    assert refused.status_code == 400
    assert refused.json()["message"] == "pageSize must be an integer"
    assert venue.api.get(LIST, params={"pageSize": "20000"}).status_code == 200


def test_last_row_version_is_read_only_with_sync(venue: Venue) -> None:
    """APIRequest GetRecords applies ``lastRowVersion`` only inside ``if sync given``:
    without ``sync`` it is ignored (every order, no rowVersion); ``sync=false`` keeps the
    filter but not the row-version order."""
    first = venue.create(order_body("A"))["orderId"]
    second = venue.create(order_body("B"))["orderId"]
    mark = venue.api.get(LIST, params={"sync": "true"}).json()["data"][0]["rowVersion"]

    ignored = venue.api.get(LIST, params={"lastRowVersion": mark}).json()["data"]
    filtered = venue.api.get(LIST, params={"sync": "false", "lastRowVersion": mark}).json()

    assert [row["orderId"] for row in ignored] == [first, second]
    assert all("rowVersion" not in row for row in ignored)
    assert [row["orderId"] for row in filtered["data"]] == [second]
    assert venue.api.get(LIST, params={"sync": "maybe"}).status_code == 400


def test_garbled_page_key_is_refused(venue: Venue) -> None:
    """A pageKey that is no page key is a 400 (APIRequest ApplyPageKey fails)."""
    venue.create(order_body("K-0"))
    garbled = venue.api.get(LIST, params={"pageKey": "not-a-key"})
    assert garbled.status_code == 400


def test_page_key_on_another_partners_path_continues_the_first_listing(venue: Venue) -> None:
    """APIRequest GetRecords / ApplyPageKey: the key's view (its filters, the partner
    among them) replaces the request's, so on another partner's path it goes on listing
    the first partner's orders."""
    created = [venue.create(order_body(f"K-{n}"))["orderId"] for n in range(3)]
    first = venue.api.get(LIST, params={"pageSize": 1}).json()
    other = venue.api.get(
        f"/channelManager/orders/{OTHER_PARTNER}", params={"pageKey": first["nextPageKey"]}
    )
    assert other.status_code == 200
    listed = [row["orderId"] for row in [*first["data"], *other.json()["data"]]]
    assert listed == created


def test_replication_orders_by_row_version(venue: Venue) -> None:
    """``sync=true`` lists by rowVersion ascending, each record carrying it."""
    first = venue.create(order_body("A"))["orderId"]
    second = venue.create(order_body("B"))["orderId"]
    venue.tick()  # both change: A then B, three times each
    venue.api.post(f"/channelManager/{first}/confirm", json={"paymentReference": "X"})
    venue.api.delete(f"/channelManager/{first}")  # A cancelled: changed last

    page = venue.api.get(LIST, params={"sync": "true"}).json()
    versions = [int(row["rowVersion"]) for row in page["data"]]
    assert ids(page) == [second, first]
    assert versions == sorted(versions) and len(set(versions)) == 2


def test_change_feed_returns_exactly_the_rows_changed_since(venue: Venue) -> None:
    """``lastRowVersion=N`` returns the rows changed after N — confirm and cancel included,
    webhook or not — and rows deleted outright simply vanish."""
    draft = venue.create(order_body("DRAFT", payment=None))["orderId"]
    issued = venue.create(order_body("ISSUED"))["orderId"]
    doomed = venue.create(order_body("DOOMED", payment=None))["orderId"]
    untouched = venue.create(order_body("UNTOUCHED"))["orderId"]
    venue.tick()
    feed = venue.api.get(LIST, params={"sync": "true"}).json()
    assert set(ids(feed)) == {draft, issued, doomed, untouched}
    high_water = max(int(row["rowVersion"]) for row in feed["data"])

    venue.api.post(f"/channelManager/{draft}/confirm", json={"paymentReference": "P"})
    venue.api.delete(f"/channelManager/{issued}")
    venue.api.delete(f"/channelManager/{doomed}")

    changes = venue.api.get(LIST, params={"sync": "true", "lastRowVersion": high_water}).json()
    assert ids(changes) == [draft, issued]
    assert [row["status"] for row in changes["data"]] == ["Issued", "Cancelled"]
    assert all(int(row["rowVersion"]) > high_water for row in changes["data"])
    newest = max(int(row["rowVersion"]) for row in changes["data"])
    nothing = venue.api.get(LIST, params={"sync": "true", "lastRowVersion": newest}).json()
    assert nothing["data"] == []


def test_change_feed_pages_without_gaps_or_repeats(venue: Venue) -> None:
    """Paging the change feed with pageSize=2 visits every row once, in row-version order."""
    created = [venue.create(order_body(f"F-{n}"))["orderId"] for n in range(5)]
    pages = [venue.api.get(LIST, params={"sync": "true", "pageSize": 2}).json()]
    while pages[-1]["morePages"]:
        pages.append(venue.api.get(LIST, params={"pageKey": pages[-1]["nextPageKey"]}).json())
    rows = [row for page in pages for row in page["data"]]
    assert [row["orderId"] for row in rows] == created
    assert all("rowVersion" in row for row in rows)
