"""The sandbox's own surface: ``/_sandbox/config``, ``stats``, ``faults``, ``clock``,
``restore``, and the gateway faults they control."""

from __future__ import annotations

import datetime as dt
import time

import pytest

from tests.sandbox.conftest import INACTIVE_PARTNER, PARTNER, Venue, order_body


def test_config_tells_a_client_how_to_connect(venue: Venue) -> None:
    """The config names tenant, environment, company, key, partners (with state) and catalog."""
    config = venue.admin.get("/config").json()
    assert config["tenant"] == venue.server.config.tenant
    assert config["environment"] == "sandbox"
    assert config["company"] == "CRONUS International Ltd."
    assert config["apiKey"] == venue.server.api_key
    assert config["baseUrl"] == venue.server.base_url
    partners = {p["id"]: p["active"] for p in config["partners"]}
    assert partners[PARTNER] is True and partners[INACTIVE_PARTNER] is False
    items = config["catalog"]["items"]
    assert config["currencyCode"] == "DKK"
    assert {i["kind"] for i in items} == {"ticket", "group", "package", "coupon"}


def test_admin_endpoints_need_no_key_and_api_calls_are_counted(venue: Venue) -> None:
    """Stats count API calls by endpoint name and status; admin calls are not counted."""
    venue.create(order_body())
    venue.api.post("/channelManager", json=order_body())  # duplicate: 400
    venue.api.get("/channelManager/6c2b1a0e-0000-4000-8000-000000000000")  # 404
    venue.tick()

    stats = venue.stats()

    assert stats["calls"] == {
        "createOrder": {"201": 1, "400": 1},
        "getOrder": {"404": 1},
    }
    assert stats["pipeline"]["processed"] == 1
    venue.admin.delete("/stats")
    assert venue.stats()["calls"] == {}


def test_faults_change_partially_at_run_time(venue: Venue) -> None:
    """POST /_sandbox/faults changes the fields given and keeps the rest."""
    venue.faults(dropRate=0.5, envelope="values")
    after = venue.faults(latency_ms=5)
    assert (after["dropRate"], after["envelope"], after["latencyMs"]) == (0.5, "values", 5)
    assert venue.admin.get("/faults").json() == after


@pytest.mark.parametrize(
    "body",
    [{"dropRate": 2}, {"envelope": "soap"}, {"noSuchFault": 1}, [1]],
    ids=["rate-above-1", "unknown-envelope", "unknown-field", "not-an-object"],
)
def test_invalid_faults_are_refused(venue: Venue, body: object) -> None:
    """Faults out of range or unknown are a 400, and nothing changes."""
    before = venue.admin.get("/faults").json()
    response = venue.admin.post("/faults", json=body)
    assert response.status_code == 400
    assert response.json()["code"] == "generic_error"
    assert venue.admin.get("/faults").json() == before


@pytest.mark.parametrize(
    ("fault", "status", "code"),
    [("rate429", 429, "too_many_requests"), ("rate503", 503, "service_unavailable")],
)
def test_gateway_faults_answer_before_any_work(
    venue: Venue, fault: str, status: int, code: str
) -> None:
    """429/503 faults answer the venue's error body, store nothing, and are counted."""
    venue.faults(**{fault: 1})
    response = venue.api.post("/channelManager", json=order_body())
    assert response.status_code == status
    assert response.json()["code"] == code
    assert venue.stats()["calls"]["createOrder"] == {str(status): 1}

    venue.faults(**{fault: 0})
    assert venue.api.get(f"/channelManager/orders/{PARTNER}").json()["data"] == []


def test_latency_is_added_to_api_calls(venue: Venue) -> None:
    """``latencyMs`` slows every API call down by at least that much."""
    venue.faults(latencyMs=200)
    started = time.monotonic()
    venue.api.get(f"/channelManager/orders/{PARTNER}")
    assert time.monotonic() - started >= 0.2


def test_clock_advances(venue: Venue) -> None:
    """POST /_sandbox/clock moves the sandbox's time, and receivedAt follows it."""
    answer = venue.admin.post("/clock", json={"advanceSeconds": 7200}).json()
    assert answer["offsetSeconds"] == 7200
    received = dt.datetime.fromisoformat(venue.create(order_body())["receivedAt"])
    assert received - dt.datetime.now(dt.UTC) > dt.timedelta(minutes=119)
    refused = venue.admin.post("/clock", json={"advanceSeconds": -1})
    assert refused.status_code == 400


def test_unknown_route_is_the_venues_404(venue: Venue) -> None:
    """A path the venue does not serve answers 404 with the error body."""
    response = venue.api.get("/channelManager/a/b/c")
    assert response.status_code == 404
    assert response.json()["code"] == "resource_not_found"


def test_restore_renumbers_row_versions_so_the_feed_goes_backwards(venue: Venue) -> None:
    """POST /_sandbox/restore renumbers row versions 1..n in order; later changes go on from n
    (APIRequest GetRecords: the database's row version, which a restore sets back)."""
    created = [venue.create(order_body(f"RESTORE-{n}", payment=None))["orderId"] for n in range(3)]
    venue.tick()
    feed = f"/channelManager/orders/{PARTNER}"
    before = venue.api.get(feed, params={"sync": "true"}).json()["data"]
    high_water = int(before[-1]["rowVersion"])
    assert high_water > len(created)

    answer = venue.admin.post("/restore")

    assert answer.status_code == 200, answer.text
    assert answer.json() == {"orders": 3, "rowVersion": 3}
    after = venue.api.get(feed, params={"sync": "true"}).json()["data"]
    assert [(row["orderId"], row["rowVersion"]) for row in after] == [
        (row["orderId"], str(number)) for number, row in enumerate(before, start=1)
    ]
    assert [row["status"] for row in after] == [row["status"] for row in before]
    # A change after the restore takes a version just above n: below the old high-water
    # mark, so a client asking for lastRowVersion=high_water never sees it.
    venue.api.delete(f"/channelManager/{created[0]}")
    changed = venue.create(order_body("RESTORE-NEW"))["orderId"]
    sync = {"sync": "true"}
    assert venue.api.get(feed, params={**sync, "lastRowVersion": high_water}).json()["data"] == []
    newer = venue.api.get(feed, params={**sync, "lastRowVersion": 3}).json()["data"]
    assert [row["orderId"] for row in newer] == [changed]
    assert 3 < int(newer[0]["rowVersion"]) < high_water
