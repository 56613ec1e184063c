"""The wire models against every JSON example in the venue's own documents, and webhooks.

The seeds show examples as line-numbered code blocks (``1{``, ``2 "orderId": ...``) and
request bodies inside curl ``-d '...'`` arguments; the helpers below strip the numbers
and parse every one, so a model that drifts from the documents fails here.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import re
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from venue.models import (
    ConfirmRequest,
    Order,
    OrderRequest,
    OrderStatus,
    OrderSummary,
    Wallet,
    parse_page,
)
from venue.values import canonical_guid, parse_row_version
from venue.webhooks import (
    ORDER_PROCESSED_EVENT,
    Notification,
    OrderProcessedPayload,
    parse_notifications,
    parse_webhook_body,
)

SEEDS = Path(__file__).resolve().parents[3] / "shared" / "seeds"
# Seeds documenting the older synchronous API, whose responses lack buyFromOrderReference.
SYNC_SEEDS = ("003_",)
CUSTOMER_DATA = ("Jane Doe", "John Doe", "guest@example.com")


@dataclass(frozen=True)
class Example:
    """One code block of a seed: a curl command or a JSON document, numbers stripped."""

    seed: str
    index: int
    text: str

    @property
    def is_curl(self) -> bool:
        return self.text.startswith("curl")

    @property
    def id(self) -> str:
        return f"{self.seed[:3]}-{self.index}"


def _blocks(seed: Path) -> list[Example]:
    """The numbered code blocks of one seed: a block starts at ``1{``, ``1[`` or ``1curl``
    and runs while each line starts with the next line number."""
    examples: list[Example] = []
    lines = seed.read_text(encoding="utf-8").splitlines()
    position = 0
    while position < len(lines):
        line = lines[position]
        if not re.match(r"^1(\{|\[|curl )", line):
            position += 1
            continue
        body: list[str] = []
        number = 1
        while position < len(lines) and lines[position].startswith(str(number)):
            body.append(lines[position][len(str(number)) :])
            number += 1
            position += 1
        examples.append(Example(seed.name, len(examples), "\n".join(body)))
    return examples


@functools.cache
def _examples() -> tuple[Example, ...]:
    return tuple(example for seed in sorted(SEEDS.glob("*.txt")) for example in _blocks(seed))


def _json_documents() -> list[tuple[Example, Any]]:
    return [(e, json.loads(e.text)) for e in _examples() if not e.is_curl]


def _curl_bodies() -> list[tuple[Example, str, Any]]:
    """(example, URL, decoded ``-d '...'`` body) for each curl command that sends JSON."""
    found = []
    for example in _examples():
        body = re.search(r"-d '(.*?)'", example.text, re.DOTALL)
        if example.is_curl and body:
            url = re.search(r"https://\S+", example.text)
            assert url is not None, example.text
            found.append((example, url.group(0), json.loads(body.group(1))))
    return found


def _orders() -> list[tuple[Example, Any]]:
    return [(e, doc) for e, doc in _json_documents() if isinstance(doc, dict)]


def _lists() -> list[tuple[Example, Any]]:
    return [(e, doc) for e, doc in _json_documents() if isinstance(doc, list)]


def _order_requests() -> list[tuple[Example, Any]]:
    return [(e, body) for e, url, body in _curl_bodies() if not url.endswith("/confirm")]


def _confirm_requests() -> list[tuple[Example, Any]]:
    return [(e, body) for e, url, body in _curl_bodies() if url.endswith("/confirm")]


def _params(pairs: list[tuple[Example, Any]]) -> pytest.MarkDecorator:
    return pytest.mark.parametrize(
        ("example", "raw"), pairs, ids=[example.id for example, _ in pairs]
    )


# --- the examples themselves ------------------------------------------------------------


def test_every_seed_example_is_found() -> None:
    """The extractor finds all 17 examples of the seeds, so the tests below cannot pass empty."""
    # 003 (sync): create, confirm, replace, delete; 004 (async): the same and getOrder.
    assert len(_orders()) == 9
    assert len(_lists()) == 2
    assert len(_order_requests()) == 4
    assert len(_confirm_requests()) == 2
    assert len(_examples()) == 22  # plus 5 curl commands without a body (get, delete, list)


@_params(_orders())
def test_documented_order_responses_parse(example: Example, raw: Any) -> None:
    """Each documented order response parses as Order with exact money and UTC times."""
    order = Order.model_validate_json(example.text)

    assert order.order_id == "9c6b2f4e-2b71-4d23-9d6a-a3b4c5d6e7f8"
    assert order.status in (OrderStatus.ISSUED, OrderStatus.SUBMITTED)
    assert order.partner_id == raw["partnerId"]
    assert order.received_at == dt.datetime(2026, 5, 15, 9, 30, tzinfo=dt.UTC)
    assert order.payment_reference == "PAY-987654"
    wallet = order.items[0].wallets[0]
    assert isinstance(wallet.unit_price_excl_vat, Decimal)
    assert wallet.unit_price_excl_vat == Decimal("80")
    assert wallet.unit_price_incl_vat == Decimal("100")
    assert wallet.currency_code == "DKK"
    assert wallet.wallet_reference_number == "141234529930210327"
    assert wallet.external_reference_number == "JD-2026-001"
    assert wallet.issued_at == dt.datetime(2026, 5, 15, 9, 30, 5, tzinfo=dt.UTC)
    assert wallet.issued_at.utcoffset() == dt.timedelta(0)
    asset = wallet.assets[0]
    assert (asset.type, asset.reference_number) == ("ticket", "ATF-BIL010665L-3")
    assert order.items[0].visit_date == dt.date(2026, 6, 1)
    assert order.items[0].visit_time == dt.time(10, 30)


@_params(_orders())
def test_older_synchronous_responses_lack_the_vendor_reference(example: Example, raw: Any) -> None:
    """Synchronous-era responses parse with buy_from_order_reference None; async ones carry it."""
    order = Order.model_validate_json(example.text)

    if example.seed.startswith(SYNC_SEEDS):
        assert "buyFromOrderReference" not in raw
        assert order.buy_from_order_reference is None
        assert order.items[0].line_no == 10000
    else:
        assert order.buy_from_order_reference == "CM-20260515093000-A1B2"
        assert order.items[0].line_no == 100000


@_params(_lists())
def test_documented_list_responses_parse_as_pages(example: Example, raw: Any) -> None:
    """The bare-array list examples parse via parse_page as one final page of summaries."""
    page = parse_page(example.text, OrderSummary)

    assert page.more_pages is False
    assert page.next_page_key is None
    assert len(page.data) == len(raw) == 1
    summary = page.data[0]
    assert summary.status is OrderStatus.ISSUED
    assert summary.sell_to_order_reference == "PARTNER-ORDER-2026-00042"
    assert summary.received_at == dt.datetime(2026, 5, 15, 9, 30, tzinfo=dt.UTC)


@_params(_order_requests())
def test_documented_order_requests_parse_and_round_trip(example: Example, raw: Any) -> None:
    """Each curl createOrder/replaceOrder body parses as OrderRequest and serialises unchanged."""
    request = OrderRequest.model_validate(raw)

    item = request.items[0]
    assert (item.item_number, item.quantity) == ("31001", 2)
    assert (item.visit_date, item.visit_time) == (dt.date(2026, 6, 1), dt.time(10, 30))
    assert item.wallet is not None
    assert item.wallet.external_reference_numbers == ["JD-2026-001", "JOHN-2026-001"]
    assert item.wallet.names is not None and len(item.wallet.names) == item.quantity
    assert request.to_wire() == raw


@_params(_confirm_requests())
def test_documented_confirm_requests_parse(example: Example, raw: Any) -> None:
    """Each curl confirmOrder body parses as ConfirmRequest and serialises back unchanged."""
    request = ConfirmRequest.model_validate(raw)

    assert request.payment_reference == "PAY-987654"
    assert request.to_wire() == raw


# --- details the examples do not show ---------------------------------------------------


def test_money_from_json_text_is_exact() -> None:
    """A fractional price parses to the exact Decimal written, never a float approximation."""
    order = Order.model_validate_json(
        '{"orderId": "9c6b2f4e-2b71-4d23-9d6a-a3b4c5d6e7f8", "status": "Issued",'
        ' "partnerId": "21e8c1d2-3f4a-4c5b-9e6d-7f8a9b0c1d2e", "sellToOrderReference": "R",'
        ' "items": [{"lineNo": 100000, "itemNumber": "1", "wallets":'
        ' [{"unitPriceExclVat": 80.10, "unitPriceInclVat": 0.1}]}]}'
    )

    wallet = order.items[0].wallets[0]
    assert wallet.unit_price_excl_vat == Decimal("80.10")
    assert wallet.unit_price_incl_vat == Decimal("0.1")


def test_change_feed_summaries_carry_row_versions_and_tolerate_unknown_fields() -> None:
    """A replication page keeps rowVersion and row id, and unknown fields do not fail it."""
    page = parse_page(
        json.dumps(
            {
                "morePages": True,
                "nextPageKey": "k2",
                "nextPageURL": "https://example.invalid/next",
                "data": [
                    {
                        "id": "row-1",
                        "rowVersion": 42,
                        "orderId": "9c6b2f4e-2b71-4d23-9d6a-a3b4c5d6e7f8",
                        "status": "Cancelled",
                        "partnerId": "21e8c1d2-3f4a-4c5b-9e6d-7f8a9b0c1d2e",
                        "sellToOrderReference": "R",
                        "receivedAt": "2026-05-15T11:30:00+02:00",
                        "somethingNew": {"nested": True},
                    }
                ],
            }
        ),
        OrderSummary,
    )

    assert (page.more_pages, page.next_page_key) == (True, "k2")
    summary = page.data[0]
    assert (summary.id, summary.row_version, summary.status) == ("row-1", 42, "Cancelled")
    assert summary.received_at == dt.datetime(2026, 5, 15, 9, 30, tzinfo=dt.UTC)
    assert summary.model_extra == {"somethingNew": {"nested": True}}


# The vendor's summary as APIRequest AddFieldToJson writes it (ListOrdersByPartner's
# fields): every field present, blanks as "", the status by its caption, the SystemId
# as ``id`` and the row version as text.
VENDOR_SUMMARY = {
    "orderId": "9c6b2f4e-2b71-4d23-9d6a-a3b4c5d6e7f8",
    "partnerId": "21e8c1d2-3f4a-4c5b-9e6d-7f8a9b0c1d2e",
    "sellToOrderReference": "WEB-1001",
    "buyFromOrderReference": "CM-260515093000-A1B2",
    "sellToEmail": "",
    "sellToName": "",
    "sellToLanguage": "",
    "paymentReference": "",
    "status": "Processing...",
    "statusMessage": "",
    "receivedAt": "2026-05-15T09:30:00.123Z",
    "jobId": "",
    "manifestUrl": "",
    "id": "0b8f1c2d-3e4f-4a5b-8c6d-7e8f9a0b1c2d",
    "rowVersion": "1234567890123",
}


@pytest.mark.parametrize(
    ("text", "status"),
    [
        *[(s.value, s) for s in OrderStatus],
        ("Processing...", OrderStatus.PROCESSING),
        ("processing...", OrderStatus.PROCESSING),
        (" ISSUED ", OrderStatus.ISSUED),
    ],
)
def test_statuses_read_by_plain_name_or_caption(text: str, status: OrderStatus) -> None:
    """CMOrderStatus.Enum.al: single answers write the name (ChannelMgrOrderAgent
    GetStatusAsText), list summaries the caption (APIRequest AddFieldToJson, Format); only
    Processing's caption differs ("Processing..."). Both read as the same status."""
    row = {**VENDOR_SUMMARY, "status": text}
    assert OrderSummary.model_validate(row).status is status
    assert Order.model_validate({**VENDOR_SUMMARY, "status": text}).status is status


def test_captions_are_the_vendors() -> None:
    """CMOrderStatus.Enum.al: every value's caption, as the sandbox writes summaries."""
    assert {s.value: s.caption for s in OrderStatus} == {
        "Submitted": "Submitted",
        "Scheduled": "Scheduled",
        "Processing": "Processing...",
        "Draft": "Draft",
        "Issued": "Issued",
        "Error": "Error",
        "Cancelled": "Cancelled",
    }
    with pytest.raises(ValidationError, match="status"):
        OrderSummary.model_validate({**VENDOR_SUMMARY, "status": "Shipped"})


def test_the_vendors_summary_reads() -> None:
    """APIRequest AddFieldToJson: blanks as "", rowVersion as text (Format(..., 0, 9)),
    ``id`` the SystemId GUID (GetRecords adds it), the status by caption."""
    summary = OrderSummary.model_validate(VENDOR_SUMMARY)

    assert summary.status is OrderStatus.PROCESSING
    assert summary.row_version == 1234567890123
    assert summary.id == VENDOR_SUMMARY["id"] != summary.order_id
    assert summary.received_at == dt.datetime(2026, 5, 15, 9, 30, 0, 123000, tzinfo=dt.UTC)


@pytest.mark.parametrize(
    ("value", "number"),
    [("0", 0), ("42", 42), (" 9223372036854775807 ", 2**63 - 1), (17, 17)],
)
def test_row_versions_read_from_text(value: Any, number: int) -> None:
    """APIRequest AddFieldToJson writes field 0 (the row version) as Format(..., 0, 9):
    decimal digits in a JSON string; a number is taken too."""
    assert parse_row_version(value) == number


@pytest.mark.parametrize("value", ["", "12a", "-1", "1.5", "1,234", True, 1.5, 2**63])
def test_row_versions_that_are_not_whole_numbers_are_refused(value: Any) -> None:
    """Anything but a non-negative 64-bit whole number is not a row version (APIRequest
    AddFieldToJson: a BigInteger formatted with format 9)."""
    with pytest.raises(ValueError, match="rowVersion"):
        parse_row_version(value)


# --- webhooks ---------------------------------------------------------------------------

NOTIFICATION = {
    "appId": "992c2309-cca4-43cb-9e41-911f482ec088",
    "clientState": "s3cret-state",
    "eventName": ORDER_PROCESSED_EVENT,
    "eventVersion": "1.0",
    "timestamp": "2024-01-15T10:30:00Z",
    "companyName": "CRONUS International Ltd.",
    "payload": {
        "orderId": "9c6b2f4e-2b71-4d23-9d6a-a3b4c5d6e7f8",
        "buyFromOrderReference": "CM-20260515093000-A1B2",
        "status": "Issued",
    },
}


@pytest.mark.parametrize(
    "body",
    [
        {"value": [NOTIFICATION, NOTIFICATION]},
        {"values": [NOTIFICATION, NOTIFICATION]},
        NOTIFICATION,
    ],
    ids=["value", "values", "bare"],
)
def test_all_three_webhook_envelopes_parse(body: Any) -> None:
    """The value, values and bare envelopes all yield typed ota_cm_order_processed payloads."""
    notifications = parse_notifications(body)

    assert len(notifications) == (1 if body is NOTIFICATION else 2)
    for notification in notifications:
        assert notification.client_state == "s3cret-state"
        assert notification.timestamp == dt.datetime(2024, 1, 15, 10, 30, tzinfo=dt.UTC)
        payload = notification.order_processed()
        assert payload is not None
        assert payload.order_id == "9c6b2f4e-2b71-4d23-9d6a-a3b4c5d6e7f8"
        assert payload.status is OrderStatus.ISSUED


def test_unknown_notification_fields_and_events_are_tolerated() -> None:
    """Extra fields are kept, and another event parses but has no order-processed payload."""
    other = {**NOTIFICATION, "eventName": "some_other_event", "companyId": "c", "newField": 1}

    [notification] = parse_notifications({"value": [other]})

    assert notification.company_id == "c"
    assert notification.model_extra == {"newField": 1}
    assert notification.order_processed() is None


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"value": [{"eventName": ORDER_PROCESSED_EVENT}]}, "clientState"),
        ({"values": "not a list"}, "values"),
        ({"eventName": ORDER_PROCESSED_EVENT}, "clientState"),
        ({"clientState": "s"}, "eventName"),
    ],
)
def test_invalid_envelopes_raise_naming_the_field(body: Any, field: str) -> None:
    """A body of none of the shapes raises ValidationError whose errors name the bad field."""
    with pytest.raises(ValidationError) as caught:
        parse_notifications(body)

    locations = [part for error in caught.value.errors() for part in error["loc"]]
    assert field in locations


def test_invalid_payload_of_our_event_raises() -> None:
    """An ota_cm_order_processed notification without an orderId fails when typed."""
    [notification] = parse_notifications({**NOTIFICATION, "payload": {"status": "Issued"}})

    with pytest.raises(ValidationError, match="orderId"):
        notification.order_processed()


def test_reprs_hide_client_state_and_customer_data() -> None:
    """repr() and str() of notifications, orders and requests never show secrets or customers."""
    [notification] = parse_notifications(NOTIFICATION)
    order = Order.model_validate_json(_orders()[0][0].text)
    request = OrderRequest.model_validate(_order_requests()[0][1])
    assert isinstance(notification, Notification)

    for model in (notification, order, request, order.items[0], order.items[0].wallets[0]):
        for text in (repr(model), str(model)):
            assert "s3cret-state" not in text
            for personal in CUSTOMER_DATA:
                assert personal not in text
    assert "9c6b2f4e-2b71-4d23-9d6a-a3b4c5d6e7f8" in repr(order)  # ids stay visible


def _request(**item: Any) -> dict[str, Any]:
    line = {"itemNumber": "31001", "visitDate": "2030-06-01", "visitTime": "10:30:00", **item}
    return {
        "partnerId": "21e8c1d2-3f4a-4c5b-9e6d-7f8a9b0c1d2e",
        "sellToOrderReference": "S-1",
        "items": [{k: v for k, v in line.items() if v is not _ABSENT}],
    }


_ABSENT = object()

REQUEST_REFUSALS = {
    "visitTime missing": ({"visitTime": _ABSENT}, ("items", 0, "visitTime"), "Field required"),
    "visitTime null": ({"visitTime": None}, ("items", 0, "visitTime"), "HH:mm:ss"),
    "visitTime HH:MM": ({"visitTime": "10:30"}, ("items", 0, "visitTime"), "HH:mm:ss"),
    "visitTime fraction": ({"visitTime": "10:30:00.5"}, ("items", 0, "visitTime"), "HH:mm:ss"),
    "visitTime offset": ({"visitTime": "10:30:00Z"}, ("items", 0, "visitTime"), "HH:mm:ss"),
    "visitTime 24h": ({"visitTime": "24:00:00"}, ("items", 0, "visitTime"), "HH:mm:ss"),
    "visitDate missing": ({"visitDate": _ABSENT}, ("items", 0, "visitDate"), "Field required"),
    "visitDate datetime": (
        {"visitDate": "2030-06-01T00:00:00"},
        ("items", 0, "visitDate"),
        "YYYY-MM-DD",
    ),
    "visitDate short": ({"visitDate": "2030-6-1"}, ("items", 0, "visitDate"), "YYYY-MM-DD"),
    "visitDate not a day": (
        {"visitDate": "2030-02-30"},
        ("items", 0, "visitDate"),
        "not a date of the calendar",
    ),
    "quantity zero": ({"quantity": 0}, ("items", 0, "quantity"), "greater than or equal to 1"),
    "names empty": ({"wallet": {"names": []}}, ("items", 0, "wallet", "names"), "at least 1"),
    "references empty": (
        {"wallet": {"externalReferenceNumbers": []}},
        ("items", 0, "wallet", "externalReferenceNumbers"),
        "at least 1",
    ),
    "names neither quantity nor one": (
        {"quantity": 3, "wallet": {"names": ["A", "B"]}},
        ("items", 0, "wallet"),
        "names holds 2 entries; a line of quantity 3 issues 3 wallets",
    ),
    "references neither quantity nor one": (
        {"quantity": 3, "wallet": {"externalReferenceNumbers": ["A", "B"]}},
        ("items", 0, "wallet"),
        "externalReferenceNumbers holds 2 entries",
    ),
}


@pytest.mark.parametrize(
    ("item", "loc", "problem"), REQUEST_REFUSALS.values(), ids=list(REQUEST_REFUSALS)
)
def test_order_requests_the_venue_would_refuse_are_refused_naming_the_field(
    item: dict[str, Any], loc: tuple[Any, ...], problem: str
) -> None:
    """ChannelMgrOrderAgent TryParseItem / GetRequiredTimeField / GetRequiredDateField /
    TryParseWalletBlock: what the venue refuses without its catalog, the request model
    refuses first, naming the field."""
    with pytest.raises(ValidationError) as caught:
        OrderRequest.model_validate(_request(**item))
    (error,) = caught.value.errors()
    assert error["loc"] == loc
    assert problem in error["msg"]


def test_order_requests_the_venue_takes_are_taken_and_sent_as_it_reads_them() -> None:
    """ChannelMgrOrderAgent TryParseItem: quantity is optional (absent or null is 1);
    a wallet list of the quantity or of one entry (a group ticket's one wallet,
    ExpectedWalletCount) is taken; visitTime is sent exactly as HH:mm:ss."""
    absent = OrderRequest.model_validate(_request(quantity=_ABSENT))
    null = OrderRequest.model_validate(_request(quantity=None))
    assert absent.items[0].quantity == null.items[0].quantity == 1
    group = OrderRequest.model_validate(_request(quantity=4, wallet={"names": ["Group"]}))
    assert group.items[0].wallet is not None and group.items[0].wallet.names == ["Group"]
    built = OrderRequest.model_validate(
        {**_request(), "items": [{**_request()["items"][0], "visitTime": dt.time(9, 5)}]}
    )
    wire = built.to_wire()["items"][0]
    assert (wire["visitDate"], wire["visitTime"], wire["quantity"]) == (
        "2030-06-01",
        "09:05:00",
        1,
    )
    with pytest.raises(ValidationError, match="HH:mm:ss"):
        OrderRequest.model_validate(
            {**_request(), "items": [{**_request()["items"][0], "visitTime": dt.time(9, 5, 0, 1)}]}
        )


def test_a_status_caption_is_its_name_except_processing() -> None:
    """Messages naming a status carry its caption: CMOrderStatus ``Processing...``.

    ChannelMgrOrderAgent ``DeleteOrder`` writes "mid-flight (status %1)" with the enum
    formatted, which is its caption.
    """
    assert OrderStatus.PROCESSING.caption == "Processing..."
    assert [s.caption for s in OrderStatus if s is not OrderStatus.PROCESSING] == [
        s.value for s in OrderStatus if s is not OrderStatus.PROCESSING
    ]


def _header(**fields: Any) -> dict[str, Any]:
    return {**_request(), **fields}


def test_a_lines_customer_fields_are_typed_hidden_and_an_explicit_null_is_sent() -> None:
    """ChannelMgrOrderAgent TryParseItem (CMOrderLine NotificationAddress, Name, Language):
    a line's ``sellToEmail`` / ``sellToName`` / ``sellToLanguage`` override the header's;
    present but null is "" (the line gets no e-mail), absent is the header's. The wire
    body keeps the null, leaves an absent field out, and reprs never show the values."""
    body = _header(sellToEmail="guest@example.com", sellToName="John Doe")
    overriding = {**body["items"][0], "sellToEmail": "Jane Doe <x@example.org>"}
    overriding |= {"sellToName": "Jane Doe", "sellToLanguage": "dan"}
    cleared = {**body["items"][0], "sellToEmail": None, "sellToName": None}
    inherited = body["items"][0]
    request = OrderRequest.model_validate({**body, "items": [overriding, cleared, inherited]})

    line = request.items[0]
    assert (line.sell_to_email, line.sell_to_name, line.sell_to_language) == (
        "Jane Doe <x@example.org>",
        "Jane Doe",
        "dan",
    )
    assert line.model_extra == {}  # typed, not passed through
    wire = request.to_wire()["items"]
    assert wire[0]["sellToEmail"] == "Jane Doe <x@example.org>"
    assert (wire[1]["sellToEmail"], wire[1]["sellToName"]) == (None, None)
    assert "sellToLanguage" not in wire[1]
    assert not {"sellToEmail", "sellToName", "sellToLanguage"} & set(wire[2])
    assert json.loads(json.dumps(request.to_wire())) == request.to_wire()
    # Stored and read back (the ledger keeps the wire body), the null survives.
    assert OrderRequest.model_validate(request.to_wire()).to_wire() == request.to_wire()
    for text in (repr(request), repr(line), str(line)):
        assert "Jane Doe" not in text and "x@example.org" not in text and "dan" not in text


# What the venue would cut without a word (CopyStr to the field's MaxStrLen).
TOO_LONG = {
    "header e-mail": (
        {"sellToEmail": "a" * 89 + "@example.org"},
        ("sellToEmail",),
    ),
    "header name": ({"sellToName": "N" * 101}, ("sellToName",)),
    "header language": ({"sellToLanguage": "ENGLISH-GB1"}, ("sellToLanguage",)),
    "reference": ({"sellToOrderReference": "R" * 51}, ("sellToOrderReference",)),
    "payment reference": ({"paymentReference": "P" * 51}, ("paymentReference",)),
    "line e-mail": (
        {"items": [{**_request()["items"][0], "sellToEmail": "b" * 101}]},
        ("items", 0, "sellToEmail"),
    ),
    "line name": (
        {"items": [{**_request()["items"][0], "sellToName": "M" * 101}]},
        ("items", 0, "sellToName"),
    ),
    "line language": (
        {"items": [{**_request()["items"][0], "sellToLanguage": "x" * 11}]},
        ("items", 0, "sellToLanguage"),
    ),
    "wallet name": (
        {"items": [{**_request()["items"][0], "wallet": {"names": ["W" * 101]}}]},
        ("items", 0, "wallet", "names", 0),
    ),
    "external reference": (
        {
            "items": [
                {
                    **_request()["items"][0],
                    "quantity": 2,
                    "wallet": {"externalReferenceNumbers": ["E-1", "E" * 101]},
                }
            ]
        },
        ("items", 0, "wallet", "externalReferenceNumbers", 1),
    ),
    # Looked up as Item."No." (Code[20]) after the cut: another item's number.
    "item number": (
        {"items": [{**_request()["items"][0], "itemNumber": "3" * 21}]},
        ("items", 0, "itemNumber"),
    ),
    "component item number": (
        {
            "items": [
                {
                    **_request()["items"][0],
                    "wallet": {
                        "componentSchedule": [
                            {
                                "itemNumber": "C" * 21,
                                "visitDate": "2030-06-01",
                                "visitTime": "10:00:00",
                            }
                        ]
                    },
                }
            ]
        },
        ("items", 0, "wallet", "componentSchedule", 0, "itemNumber"),
    ),
}


@pytest.mark.parametrize(("fields", "loc"), TOO_LONG.values(), ids=list(TOO_LONG))
def test_text_the_venue_would_cut_is_refused_naming_the_field(
    fields: dict[str, Any], loc: tuple[Any, ...]
) -> None:
    """ChannelMgrOrderAgent TryParseHeader / TryParseItem / TryParseWalletBlock cut text to
    the width of CMOrder (sellToEmail, sellToName Text[100]; sellToLanguage Code[10];
    sellToOrderReference, paymentReference Code[50]), CMOrderLine (Text[100], Text[100],
    Code[10]) and CMOrderWallet (WalletName, ExternalReferenceNumber Text[100]), and
    TryParseItem / IsComponentInPackage look itemNumber up cut to Code[20]: one character
    more is refused, naming the field."""
    with pytest.raises(ValidationError) as caught:
        OrderRequest.model_validate(_header(**fields))
    (error,) = caught.value.errors()
    assert error["loc"] == loc
    assert "the venue would cut the rest" in error["msg"]


def test_text_at_the_venues_widths_is_taken() -> None:
    """The widths themselves (CMOrder, CMOrderLine, CMOrderWallet) fit: nothing is cut.
    A Code field is trimmed after the cut, so trailing blanks do not count."""
    line = {
        **_request()["items"][0],
        "itemNumber": "3" * 20,
        "sellToEmail": "b" * 88 + "@example.org",
        "sellToLanguage": "ENGLISH-GB  ",
        "wallet": {"names": ["W" * 100], "externalReferenceNumbers": ["E" * 100]},
    }
    request = OrderRequest.model_validate(
        _header(
            sellToEmail="a" * 88 + "@example.org",
            sellToName="N" * 100,
            sellToLanguage="ENGLISH-GB",
            sellToOrderReference="R" * 50,
            paymentReference="P" * 50,
            items=[line],
        )
    )
    assert request.to_wire()["items"][0]["wallet"]["names"] == ["W" * 100]
    assert ConfirmRequest(payment_reference="P" * 50).to_wire() == {"paymentReference": "P" * 50}
    with pytest.raises(ValidationError, match="would cut"):
        ConfirmRequest(payment_reference="P" * 51)


SCHEDULE_REFUSALS = {
    "not an object": (["31002"], ()),
    "itemNumber missing": ([{"visitDate": "2030-06-02", "visitTime": "09:00:00"}], ("itemNumber",)),
    "itemNumber empty": (
        [{"itemNumber": "", "visitDate": "2030-06-02", "visitTime": "09:00:00"}],
        ("itemNumber",),
    ),
    "visitDate missing": ([{"itemNumber": "31002", "visitTime": "09:00:00"}], ("visitDate",)),
    "visitDate form": (
        [{"itemNumber": "31002", "visitDate": "02.06.2030", "visitTime": "09:00:00"}],
        ("visitDate",),
    ),
    "visitTime missing": ([{"itemNumber": "31002", "visitDate": "2030-06-02"}], ("visitTime",)),
    "visitTime form": (
        [{"itemNumber": "31002", "visitDate": "2030-06-02", "visitTime": "9:00"}],
        ("visitTime",),
    ),
    "not a list": ({"itemNumber": "31002"}, ()),
}


@pytest.mark.parametrize(
    ("schedule", "where"), SCHEDULE_REFUSALS.values(), ids=list(SCHEDULE_REFUSALS)
)
def test_a_component_schedule_the_venue_would_refuse_is_refused_naming_the_entry(
    schedule: Any, where: tuple[Any, ...]
) -> None:
    """ChannelMgrOrderAgent TryParseWalletBlock / TryParseComponentScheduleEntry: entries
    must be objects with itemNumber (required text), visitDate (YYYY-MM-DD) and visitTime
    (HH:mm:ss). The venue ignores a schedule that is not an array; otacm refuses it, as
    the package's components would silently keep the line's visit. The bad entry is named
    (``items[0].wallet.componentSchedule[1].visitTime``)."""
    good = {"itemNumber": "31002", "visitDate": "2030-06-02", "visitTime": "09:00:00"}
    entries = [good, *schedule] if isinstance(schedule, list) else schedule
    line = {**_request()["items"][0], "wallet": {"componentSchedule": entries}}
    with pytest.raises(ValidationError) as caught:
        OrderRequest.model_validate(_header(items=[line]))
    (error,) = caught.value.errors()
    prefix = ("items", 0, "wallet", "componentSchedule")
    assert error["loc"] == ((*prefix, 1, *where) if isinstance(schedule, list) else prefix)


def test_a_component_schedule_is_typed_and_sent_as_the_venue_reads_it() -> None:
    """ChannelMgrOrderAgent TryParseComponentScheduleEntry: each entry's itemNumber,
    visitDate and visitTime, sent in the venue's forms; null is no schedule (the venue
    ignores anything but an array); an empty array is taken (nothing rescheduled)."""
    entry = {"itemNumber": "31002", "visitDate": "2030-06-02", "visitTime": "09:00:00"}
    line = {**_request()["items"][0], "wallet": {"componentSchedule": [entry, entry]}}
    request = OrderRequest.model_validate(_header(items=[line]))
    wallet = request.items[0].wallet
    assert wallet is not None and wallet.component_schedule is not None
    assert wallet.component_schedule[0].visit_date == dt.date(2030, 6, 2)
    assert request.to_wire()["items"][0]["wallet"]["componentSchedule"] == [entry, entry]
    for value in (None, []):
        line = {**_request()["items"][0], "wallet": {"componentSchedule": value}}
        OrderRequest.model_validate(_header(items=[line]))


@pytest.mark.parametrize(
    "partner", ["abc", "", "21e8c1d2-3f4a-4c5b-9e6d", "21e8c1d2-3f4a-4c5b-9e6d-7f8a9b0c1d2e-1"]
)
def test_a_partner_id_that_is_not_a_guid_is_refused(partner: str) -> None:
    """ChannelMgrOrderAgent TryParseHeader: "partnerId is not a valid GUID"."""
    with pytest.raises(ValidationError) as caught:
        OrderRequest.model_validate(_header(partnerId=partner))
    (error,) = caught.value.errors()
    assert error["loc"] == ("partnerId",)
    assert "is not a valid GUID" in error["msg"]


@pytest.mark.parametrize(
    "partner",
    ["{21E8C1D2-3F4A-4C5B-9E6D-7F8A9B0C1D2E}", "21e8c1d23f4a4c5b9e6d7f8a9b0c1d2e"],
)
def test_a_partner_id_in_any_guid_spelling_is_taken(partner: str) -> None:
    """ChannelMgrOrderAgent TryParseHeader reads partnerId with Evaluate into a Guid:
    braces, upper case and the 32-digit form are GUIDs too."""
    assert OrderRequest.model_validate(_header(partnerId=partner)).partner_id == partner


# --- venue values, normalized where they come in ----------------------------------------

GUID = "21e8c1d2-3f4a-4c5b-9e6d-7f8a9b0c1d2e"
# Every spelling the venue itself reads as a GUID (a .NET GUID parse, via Evaluate).
GUID_SPELLINGS = [
    GUID,
    GUID.upper(),
    "{" + GUID + "}",
    "{" + GUID.upper() + "}",
    "(" + GUID + ")",
    GUID.replace("-", ""),
    GUID.replace("-", "").upper(),
    f"  {GUID}  ",
]


@pytest.mark.parametrize("spelling", GUID_SPELLINGS)
def test_an_order_answers_ids_in_any_guid_spelling_as_the_venue_writes_them(
    spelling: str,
) -> None:
    """orderId and partnerId of an order, a summary and a webhook payload come out
    lowercase, hyphenated, without braces, whichever spelling the venue read."""
    order = Order.model_validate({**VENDOR_SUMMARY, "orderId": spelling, "partnerId": spelling})
    summary = OrderSummary.model_validate({**VENDOR_SUMMARY, "orderId": spelling})
    payload = OrderProcessedPayload.model_validate({"orderId": spelling})

    assert (order.order_id, order.partner_id) == (GUID, GUID)
    assert summary.order_id == GUID
    assert payload.order_id == GUID


@pytest.mark.parametrize(
    ("model", "field", "value"),
    [
        (Order, "orderId", "order-1"),
        (Order, "partnerId", ""),
        (OrderSummary, "orderId", GUID[:-1]),
        (OrderSummary, "partnerId", "{" + GUID),
        (Order, "orderId", GUID + "0"),
    ],
)
def test_an_id_that_is_no_guid_is_a_validation_error_naming_the_field(
    model: type[Order], field: str, value: str
) -> None:
    """An id the venue could not have written is refused, naming the field, not kept."""
    with pytest.raises(ValidationError) as caught:
        model.model_validate({**VENDOR_SUMMARY, field: value})

    (error,) = caught.value.errors()
    assert error["loc"] == (field,)
    assert error["msg"] == "is not a valid GUID"


def test_a_webhook_payload_order_id_that_is_no_guid_names_the_field() -> None:
    with pytest.raises(ValidationError) as caught:
        OrderProcessedPayload.model_validate({"orderId": "o-1"})

    assert [error["loc"] for error in caught.value.errors()] == [("orderId",)]


@pytest.mark.parametrize("blank", ["", " ", "\t\n "])
def test_blank_text_of_an_order_is_none(blank: str) -> None:
    """The venue writes "" for no value: every optional text of an order, its lines,
    wallets and assets reads as None, the same as a missing field."""
    line = {
        "lineNo": 1,
        "itemNumber": "31001",
        "description": blank,
        "sellToName": blank,
        "sellToEmail": blank,
        "sellToLanguage": blank,
        "wallets": [
            {
                "walletId": blank,
                "walletReferenceNumber": blank,
                "externalReferenceNumber": blank,
                "name": blank,
                "currencyCode": blank,
                "manifestUrl": blank,
                "assets": [
                    {
                        "id": blank,
                        "type": blank,
                        "assetId": blank,
                        "referenceNumber": blank,
                        "itemNumber": blank,
                        "description": blank,
                    }
                ],
            }
        ],
    }
    header = {
        name: blank
        for name in (
            "statusMessage",
            "buyFromOrderReference",
            "sellToEmail",
            "sellToName",
            "sellToLanguage",
            "paymentReference",
            "jobId",
            "manifestUrl",
            "id",
        )
    }
    order = Order.model_validate({**VENDOR_SUMMARY, **header, "items": [line]})
    summary = OrderSummary.model_validate({**VENDOR_SUMMARY, **header})
    payload = OrderProcessedPayload.model_validate(
        {"orderId": GUID, "buyFromOrderReference": blank}
    )

    item = order.items[0]
    wallet = item.wallets[0]
    asset = wallet.assets[0]
    texts = [
        *(getattr(order, name) for name in _snake(header) if name != "id"),
        *(getattr(summary, name) for name in _snake(header)),
        item.description,
        item.sell_to_name,
        item.sell_to_email,
        item.sell_to_language,
        *(getattr(wallet, name) for name in _WALLET_TEXTS),
        *(getattr(asset, name) for name in _ASSET_TEXTS),
        payload.buy_from_order_reference,
    ]
    assert len(texts) == 8 + 9 + 4 + len(_WALLET_TEXTS) + len(_ASSET_TEXTS) + 1
    assert texts == [None] * len(texts)


_WALLET_TEXTS = (
    "wallet_id",
    "wallet_reference_number",
    "external_reference_number",
    "name",
    "currency_code",
    "manifest_url",
)
_ASSET_TEXTS = ("id", "type", "asset_id", "reference_number", "item_number", "description")


def _snake(fields: dict[str, Any]) -> list[str]:
    return [re.sub(r"([A-Z])", r"_\1", name).lower() for name in fields]


def test_text_that_is_not_blank_is_kept_as_written() -> None:
    """Only a blank is no value: other text, surrounding blanks and all, is the venue's."""
    wallet = Wallet.model_validate({"walletReferenceNumber": " 0042 ", "name": "x"})
    order = Order.model_validate({**VENDOR_SUMMARY, "statusMessage": " Sold out "})

    assert (wallet.wallet_reference_number, wallet.name) == (" 0042 ", "x")
    assert order.status_message == " Sold out "


def test_what_is_sent_keeps_the_partner_id_as_written() -> None:
    """A request is the partner's words to the venue: its partnerId is not rewritten."""
    written = "{" + GUID.upper() + "}"

    request = OrderRequest.model_validate(_header(partnerId=written))

    assert request.to_wire()["partnerId"] == written


@pytest.mark.parametrize("spelling", GUID_SPELLINGS)
def test_an_id_of_otacms_own_keeping_is_keyed_as_the_venue_writes_it(spelling: str) -> None:
    assert canonical_guid(spelling) == GUID


@pytest.mark.parametrize(("text", "key"), [("{ORDER-1}", "order-1"), (" Abc ", "abc"), ("", "")])
def test_an_id_of_otacms_own_keeping_that_is_no_guid_still_compares(text: str, key: str) -> None:
    """Ids from the inbox or the command line are not refused; they are keyed case-blind."""
    assert canonical_guid(text) == key


@pytest.mark.parametrize(
    ("body", "key", "where"),
    [
        ({"value": [NOTIFICATION, NOTIFICATION]}, "value", "value.1."),
        ({"values": [NOTIFICATION, NOTIFICATION]}, "values", "values.1."),
        (NOTIFICATION, None, ""),
    ],
    ids=["value", "values", "bare"],
)
def test_a_webhook_body_says_its_shape_and_keeps_what_was_received(
    body: Any, key: str | None, where: str
) -> None:
    """One reading of the envelope: its list field, the path of each notification in
    errors, the typed notifications and the same ones as they came."""
    parsed = parse_webhook_body(body)

    assert parsed.key == key
    assert parsed.where(len(parsed.notifications) - 1) == where
    assert parsed.received == (body[key] if key else [body])
    assert parsed.notifications == parse_notifications(body)
    assert len(parsed.notifications) == len(parsed.received)
