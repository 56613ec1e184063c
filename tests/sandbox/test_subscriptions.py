"""Subscriptions as Business Central's external event subscriptions behave: an empty 201,
one list path or the other, and a subscription that turns inactive.

The vendor's source only raises the event (CMOrderWebhooks ``ExternalBusinessEvent
ota_cm_order_processed``); subscribing is Business Central's own external event
subscription API behind the vendor's gateway (``spec/WEBHOOKS.md``, "Subscription"), so
each variant is an option of the sandbox.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from sandbox.cli import build_config, sandbox_command
from tests.sandbox.conftest import Receiver, Venue, order_body


def states(venue: Venue) -> dict[str, str]:
    """Each subscription's ``subscriptionState``, by id, as listed."""
    listed = venue.api.get("/webhooks").json()["value"]
    return {s["id"]: s["subscriptionState"] for s in listed}


def test_subscriptions_are_listed_active(venue: Venue) -> None:
    """A new subscription answers and lists with ``subscriptionState`` Active
    (CMOrderWebhooks; Business Central's external event subscriptions)."""
    made = venue.subscribe("https://partner.example/hooks")
    assert made["subscriptionState"] == "Active"
    assert states(venue) == {made["id"]: "Active"}


def test_create_can_answer_201_with_an_empty_body(make_venue: Callable[..., Venue]) -> None:
    """With webhook_create_empty_body, POST /webhook answers 201 and no body; the
    subscription is listed (Business Central's external event subscriptions)."""
    venue = make_venue(webhook_create_empty_body=True)
    response = venue.api.post(
        "/webhook",
        json={
            "notificationUrl": "https://partner.example/hooks",
            "eventName": "ota_cm_order_processed",
            "clientState": "state-1",
        },
    )
    assert (response.status_code, response.content) == (201, b"")
    (listed,) = venue.api.get("/webhooks").json()["value"]
    assert (listed["notificationUrl"], listed["clientState"]) == (
        "https://partner.example/hooks",
        "state-1",
    )


@pytest.mark.parametrize(
    ("paths", "served"),
    [("both", {"/webhooks", "/webhook"}), ("webhooks", {"/webhooks"}), ("webhook", {"/webhook"})],
)
def test_only_the_configured_list_paths_are_served(
    make_venue: Callable[..., Venue], paths: str, served: set[str]
) -> None:
    """webhook_list_paths serves GET /webhooks, GET /webhook or both; the other is 404
    (the vendor's pages name both; ``spec/WEBHOOKS.md``)."""
    venue = make_venue(webhook_list_paths=paths)
    made = venue.subscribe("https://partner.example/hooks")
    for path in ("/webhooks", "/webhook"):
        response = venue.api.get(path)
        if path in served:
            assert response.status_code == 200, path
            assert [s["id"] for s in response.json()["value"]] == [made["id"]]
        else:
            assert response.status_code == 404, path
            assert response.json()["code"] == "resource_not_found"
    assert venue.api.get(f"/webhook/{made['id']}").status_code == 200


def test_repeated_refusals_make_a_subscription_inactive(
    make_venue: Callable[..., Venue], receiver: Receiver
) -> None:
    """After webhook_deactivate_after consecutive final 4xx answers the subscription is
    listed Inactive and gets nothing more; a 2xx between refusals restarts the count
    (Business Central's external events; WEBHOOKS.md "Retries")."""
    venue = make_venue(webhook_deactivate_after=2)
    refused = venue.subscribe(receiver.url, client_state="refused")
    receiver.answers = [400, 200, 400, 404]
    for number in range(3):
        venue.create(order_body(f"R-{number}"))
        venue.tick()
        venue.settle_webhooks()
    assert states(venue) == {refused["id"]: "Active"}, "400, 200, 400: not two in a row"
    venue.create(order_body("R-3"))
    venue.tick()
    venue.settle_webhooks()
    assert states(venue) == {refused["id"]: "Inactive"}
    posts = venue.stats()["webhooks"]["posts"]
    venue.create(order_body("R-4"))
    venue.tick()
    assert venue.settle_webhooks()["webhooks"]["posts"] == posts, "no delivery when inactive"


def test_answers_asking_for_a_retry_never_deactivate(
    make_venue: Callable[..., Venue], receiver: Receiver
) -> None:
    """408 and 429 ask for a retry: even when the retries run out they do not count
    toward making a subscription inactive (WEBHOOKS.md "Retries")."""
    venue = make_venue(webhook_deactivate_after=1, webhook_max_attempts=2)
    made = venue.subscribe(receiver.url)
    receiver.answers = [429, 408]
    venue.create(order_body("T-1"))
    venue.tick()
    assert venue.settle_webhooks()["webhooks"]["failed"] == 1
    assert states(venue) == {made["id"]: "Active"}


def test_without_the_option_refusals_never_deactivate(venue: Venue, receiver: Receiver) -> None:
    """By default (0) no number of refusals makes a subscription inactive."""
    made = venue.subscribe(receiver.url)
    receiver.answers = [400, 400, 400]
    for number in range(3):
        venue.create(order_body(f"N-{number}"))
        venue.tick()
        venue.settle_webhooks()
    assert states(venue) == {made["id"]: "Active"}


def test_admin_endpoint_sets_the_state(venue: Venue, receiver: Receiver) -> None:
    """POST /_sandbox/webhooks/{id}/state makes a subscription Inactive (no deliveries)
    or Active again; other values and unknown ids are refused."""
    made = venue.subscribe(receiver.url)
    path = f"/webhooks/{made['id']}/state"
    response = venue.admin.post(path, json={"subscriptionState": "Inactive"})
    assert (response.status_code, response.json()["subscriptionState"]) == (200, "Inactive")
    venue.create(order_body("A-1"))
    venue.tick()
    assert venue.settle_webhooks()["webhooks"]["posts"] == 0
    assert states(venue) == {made["id"]: "Inactive"}

    assert venue.admin.post(path, json={"subscriptionState": "Active"}).status_code == 200
    venue.create(order_body("A-2"))
    venue.tick()
    assert venue.settle_webhooks()["webhooks"]["sent"] == 1

    bad = venue.admin.post(path, json={"subscriptionState": "Sleeping"})
    assert bad.status_code == 400 and "subscriptionState" in bad.json()["message"]
    unknown = venue.admin.post("/webhooks/nope/state", json={"subscriptionState": "Inactive"})
    assert unknown.status_code == 404


def test_options_from_the_command_line_and_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """--webhook-create-empty-body, --webhook-list-paths and --webhook-deactivate-after,
    and their OTACM_SANDBOX_* variables, reach the config."""

    def config(*args: str) -> tuple[bool, str, int]:
        built = build_config(sandbox_command.make_context("sandbox", list(args)).params)
        return (
            built.webhook_create_empty_body,
            built.webhook_list_paths,
            built.webhook_deactivate_after,
        )

    assert config() == (False, "both", 0)
    assert config(
        "--webhook-create-empty-body",
        "--webhook-list-paths",
        "webhook",
        "--webhook-deactivate-after",
        "3",
    ) == (True, "webhook", 3)
    monkeypatch.setenv("OTACM_SANDBOX_WEBHOOK_CREATE_EMPTY_BODY", "true")
    monkeypatch.setenv("OTACM_SANDBOX_WEBHOOK_LIST_PATHS", "webhooks")
    monkeypatch.setenv("OTACM_SANDBOX_WEBHOOK_DEACTIVATE_AFTER", "5")
    assert config() == (True, "webhooks", 5)
