"""The webhook subscription: the scheduled check recreates a missing one, ``subscribe``
generates a client state the receiver accepts at once, ``--new-state`` rotates, and no
client state ever shows in a result, the command's output or the logs.

Over real HTTP against the sandbox. Tests that need the receiver run on SQLite and on
PostgreSQL (the ``settings`` fixture, here with no configured client state).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from pydantic import SecretStr

from heartbeat.subscriptions import (
    ConnectionCheck,
    SubscribeResult,
    check_subscriptions,
    subscribe,
)
from otacm.cli import main
from otacm.settings import Settings
from receiver import create_app
from receiver.context import EXTENSION
from receiver.webhook import WEBHOOK_PATH
from sandbox import SandboxServer
from sandbox.webhooks import APP_ID
from storage.models import Inbox
from storage.testing import free_port
from tests.support.stack import LiveReceiver, line, receiver, wait_until
from venue.client import open_client
from venue.connection import VenueConnection, read_client_states
from venue.models import OrderRequest
from venue.webhooks import ORDER_PROCESSED_EVENT

__all__ = ["receiver"]  # the live receiver fixture, on this module's settings

URL = "https://shop.example/webhooks/ota-cm"
FIRST, SECOND = "configured-state-first-01", "configured-state-second-02"


def venue_connection(
    sandbox: SandboxServer, *states: str, name: str = "default", api_key: str | None = None
) -> VenueConnection:
    """The sandbox as a venue connection configured with ``states``."""
    config = sandbox.config
    return VenueConnection(
        name=name,
        api_base_url=sandbox.url,
        tenant=config.tenant,
        environment=config.environment,
        company=config.company,
        api_key=SecretStr(api_key) if api_key else config.api_key,
        webhook_client_states=[SecretStr(state) for state in states],
    )


@pytest.fixture
def venue(sandbox: SandboxServer) -> Iterator[httpx.Client]:
    """The tests' own HTTP client of the sandbox's API, to look at subscriptions as they are."""
    config = sandbox.config
    with httpx.Client(
        base_url=sandbox.base_url,
        headers={"x-np-api-key": config.api_key.get_secret_value()},
        timeout=10,
    ) as client:
        yield client


def listed(venue: httpx.Client, url: str = URL) -> list[dict[str, Any]]:
    """The sandbox's subscriptions for ``url``."""
    response = venue.get("/webhooks")
    assert response.status_code == 200, response.text
    return [s for s in response.json()["value"] if s["notificationUrl"] == url]


def shown(result: SubscribeResult) -> str:
    """Everything a result can show: its repr, its line and its JSON."""
    return repr(result) + result.describe() + json.dumps(result.to_json())


# --- the scheduled check -----------------------------------------------------------------


def test_check_creates_then_finds_then_recreates(
    sandbox: SandboxServer,
    venue: httpx.Client,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """No subscription: one is made with the first configured state; then it is found and
    nothing is made; deleted at the venue, it is recreated with a warning."""
    caplog.set_level(logging.DEBUG)
    connection = venue_connection(sandbox, FIRST, SECOND)
    secrets_dir = tmp_path / "secrets"
    with open_client(connection) as client:
        other = client.create_subscription("https://other.example/hook", "other-state-1")

        def check() -> dict[str, int]:
            report = check_subscriptions(
                {7: connection}, {7: client}, url=URL, secrets_dir=secrets_dir
            )
            return report.as_dict()

        assert check() == {"checked": 1, "present": 0, "created": 1, "errors": 0}
        (made,) = listed(venue)
        assert (made["eventName"], made["clientState"]) == (ORDER_PROCESSED_EVENT, FIRST)

        assert check() == {"checked": 1, "present": 1, "created": 0, "errors": 0}
        assert listed(venue) == [made]

        client.delete_subscription(made["id"])
        caplog.clear()
        assert check() == {"checked": 1, "present": 0, "created": 1, "errors": 0}
    (again,) = listed(venue)
    assert again["id"] != made["id"] and again["clientState"] == FIRST
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert f"subscription for {URL} missing at connection default: recreated as " in warnings[0]
    assert [s["id"] for s in listed(venue, "https://other.example/hook")] == [other.id]
    assert not secrets_dir.exists(), "configured states need no generated one"
    assert FIRST not in caplog.text and SECOND not in caplog.text


def test_a_subscription_with_a_state_we_refuse_is_replaced(
    sandbox: SandboxServer, venue: httpx.Client, tmp_path: Path
) -> None:
    """A subscription for our URL whose state the receiver would refuse cannot deliver: the
    check makes a good one and deletes it."""
    connection = venue_connection(sandbox, FIRST)
    with open_client(connection) as client:
        foreign = client.create_subscription(URL, "left-by-an-old-install")
        report = check_subscriptions(
            {1: connection}, {1: client}, url=URL, secrets_dir=tmp_path / "secrets"
        )
    assert report.as_dict() == {"checked": 1, "present": 0, "created": 1, "errors": 0}
    (made,) = listed(venue)
    assert made["id"] != foreign.id and made["clientState"] == FIRST


INACTIVE_STATES = [
    {"subscriptionState": "Inactive"},
    {"subscriptionState": "disabled"},
    {"SubscriptionState": "Deleted"},
    {"state": "Suspended"},
    {"status": "Inactive"},
    {"isActive": False},
]


@pytest.mark.parametrize("state", INACTIVE_STATES, ids=lambda state: str(state))
def test_an_inactive_subscription_is_replaced(tmp_path: Path, state: dict[str, Any]) -> None:
    """A venue that lists a subscription as not active (Business Central's
    ``subscriptionState``, or a like field) gets a new one, and the old is deleted."""
    store: dict[str, dict[str, Any]] = {
        "old": {"id": "old", "notificationUrl": URL, "eventName": ORDER_PROCESSED_EVENT, **state}
    }

    def venue_api(request: httpx.Request) -> httpx.Response:
        path = request.url.path.rsplit("/", 2)
        if request.method == "GET" and path[-1] == "webhooks":
            return httpx.Response(200, json={"value": list(store.values())})
        if request.method == "POST" and path[-1] == "webhook":
            body = json.loads(request.content)
            store["new"] = {"id": "new", **body, "subscriptionState": "Active"}
            return httpx.Response(201, json=store["new"])
        if request.method == "DELETE" and path[-2] == "webhook":
            return httpx.Response(200, json=store.pop(path[-1]))
        return httpx.Response(404, json={"code": "resource_not_found", "message": "no"})

    connection = VenueConnection(
        tenant="t", company="c", api_key=SecretStr("k"), webhook_client_states=[SecretStr(FIRST)]
    )
    with open_client(connection, transport=httpx.MockTransport(venue_api)) as client:
        result = subscribe(connection, client, url=URL, secrets_dir=tmp_path)
        assert (result.created, result.subscription_id, result.deleted) == (True, "new", ("old",))
        assert list(store) == ["new"] and store["new"]["clientState"] == FIRST
        again = subscribe(connection, client, url=URL, secrets_dir=tmp_path)
    assert (again.created, again.subscription_id) == (False, "new")


@pytest.mark.parametrize(
    "state",
    [{"subscriptionState": "Active"}, {"subscriptionState": "ACTIVE"}, {"isActive": True}, {}],
    ids=lambda state: str(state),
)
def test_an_active_or_stateless_subscription_is_kept(tmp_path: Path, state: dict[str, Any]) -> None:
    """Active in any case, or with no state field at all, a subscription is ours to keep."""
    listed_ = {"id": "ours", "notificationUrl": URL, "eventName": ORDER_PROCESSED_EVENT, **state}
    seen: list[str] = []

    def venue_api(request: httpx.Request) -> httpx.Response:
        seen.append(request.method)
        return httpx.Response(200, json={"value": [listed_]})

    connection = VenueConnection(
        tenant="t", company="c", api_key=SecretStr("k"), webhook_client_states=[SecretStr(FIRST)]
    )
    with open_client(connection, transport=httpx.MockTransport(venue_api)) as client:
        result = subscribe(connection, client, url=URL, secrets_dir=tmp_path)
    assert (result.created, result.subscription_id, seen) == (False, "ours", ["GET"])


@pytest.mark.parametrize("sandbox_changes", [{"webhook_create_empty_body": True}])
def test_a_create_answered_with_an_empty_body_is_found_by_listing(
    sandbox: SandboxServer, tmp_path: Path
) -> None:
    """201 with no body: the new subscription is found by listing and reported as made;
    the next check finds it (Business Central's external event subscriptions)."""
    connection = venue_connection(sandbox, FIRST)
    with open_client(connection) as client:
        client.create_subscription("https://other.example/hook", "other-state-1")
        result = subscribe(connection, client, url=URL, secrets_dir=tmp_path)
        again = subscribe(connection, client, url=URL, secrets_dir=tmp_path)
    (made,) = [s for s in sandbox.runtime.store.subscriptions() if s.notification_url == URL]
    assert (result.created, result.subscription_id) == (True, made.id)
    assert (again.created, again.subscription_id) == (False, made.id)


@pytest.mark.parametrize("sandbox_changes", [{"webhook_create_empty_body": True}])
def test_subscribe_command_with_an_empty_create_answer(
    sandbox: SandboxServer, tmp_path: Path
) -> None:
    """`otacm subscribe` reports success, naming the subscription it found by listing."""
    code, output = otacm(["subscribe", "--url", URL], command_env(sandbox, tmp_path))
    assert code == 0, output
    (made,) = sandbox.runtime.store.subscriptions()
    assert f"subscription {made.id} for {URL} created at connection default" in output


@pytest.mark.parametrize(
    "sandbox_changes", [{"webhook_list_paths": "webhook"}, {"webhook_list_paths": "webhooks"}]
)
def test_the_check_works_with_either_list_path(sandbox: SandboxServer, tmp_path: Path) -> None:
    """Whether the venue lists at /webhooks or only at /webhook, the check creates once
    and then finds the subscription (``spec/WEBHOOKS.md``: try the other on 404)."""
    connection = venue_connection(sandbox, FIRST)
    with open_client(connection) as client:
        reports = [
            check_subscriptions({1: connection}, {1: client}, url=URL, secrets_dir=tmp_path)
            for _ in range(2)
        ]
    assert [r.as_dict() for r in reports] == [
        {"checked": 1, "present": 0, "created": 1, "errors": 0},
        {"checked": 1, "present": 1, "created": 0, "errors": 0},
    ]
    assert len(sandbox.runtime.store.subscriptions()) == 1


def test_a_subscription_the_venue_made_inactive_is_recreated(
    sandbox: SandboxServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Listed with ``subscriptionState`` Inactive, the subscription counts as missing: the
    check makes a new one, deletes the inactive one and says so."""
    connection = venue_connection(sandbox, FIRST)
    with open_client(connection) as client:
        first = subscribe(connection, client, url=URL, secrets_dir=tmp_path)
        admin = httpx.post(
            f"{sandbox.url}/_sandbox/webhooks/{first.subscription_id}/state",
            json={"subscriptionState": "Inactive"},
        )
        assert admin.status_code == 200, admin.text
        caplog.set_level(logging.WARNING)
        report = check_subscriptions({1: connection}, {1: client}, url=URL, secrets_dir=tmp_path)
    assert report.as_dict() == {"checked": 1, "present": 0, "created": 1, "errors": 0}
    assert report.found == {1: ConnectionCheck(usable=True, recreated=True)}
    (made,) = sandbox.runtime.store.subscriptions()
    assert made.id != first.subscription_id and made.client_state == FIRST
    assert (made.model_extra or {})["subscriptionState"] == "Active"
    assert f"subscription for {URL} unusable at connection default" in caplog.text


def test_failures_are_counted_per_connection(
    sandbox: SandboxServer, venue: httpx.Client, tmp_path: Path
) -> None:
    """A key the venue refuses, or a states file that cannot be written, fails that
    connection only; the others are still checked."""
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    refused = venue_connection(sandbox, FIRST, name="refused", api_key="not-the-key")
    stateless = venue_connection(sandbox, name="stateless")
    good = venue_connection(sandbox, SECOND, name="good")
    with (
        open_client(refused) as refused_client,
        open_client(stateless) as stateless_client,
        open_client(good) as good_client,
    ):
        report = check_subscriptions(
            {1: refused, 2: stateless, 3: good},
            {1: refused_client, 2: stateless_client, 3: good_client},
            url=URL,
            secrets_dir=blocker / "secrets",
        )
    assert report.as_dict() == {"checked": 3, "present": 0, "created": 1, "errors": 2}
    found = {cid: (check.usable, check.recreated) for cid, check in report.found.items()}
    assert found == {1: (False, False), 2: (False, False), 3: (True, True)}
    assert report.found[1].error and report.found[2].error and report.found[3].error is None
    (made,) = listed(venue)
    assert made["clientState"] == SECOND, "nothing was made without its state stored"


# --- subscribe, the receiver, rotation ------------------------------------------------------


@pytest.fixture
def settings_changes(tmp_path: Path) -> dict[str, Any]:
    """No configured client state: the receiver knows only what the secrets file holds."""
    return {"webhook_client_states": [], "secrets_dir": tmp_path / "var" / "secrets"}


def notification(state: str, order_id: str = "7d2973c9-fe2d-479e-a7bb-ad5f68140ee2") -> Any:
    """A webhook body as the venue sends it, carrying ``state``."""
    return {
        "value": [
            {
                "appId": APP_ID,
                "clientState": state,
                "eventName": ORDER_PROCESSED_EVENT,
                "eventVersion": "1.0",
                "timestamp": "2026-01-15T10:30:00Z",
                "companyName": "CRONUS International Ltd.",
                "payload": {
                    "orderId": order_id,
                    "buyFromOrderReference": "CM-1",
                    "status": "Issued",
                },
            }
        ]
    }


def post(receiver: LiveReceiver, state: str) -> int:
    """POST a notification carrying ``state`` to the live receiver; the HTTP status."""
    response = httpx.post(f"{receiver.url}{WEBHOOK_PATH}", json=notification(state), timeout=10)
    return response.status_code


def delivered_orders(settings: Settings) -> set[str | None]:
    """The order ids of the webhook rows in the inbox."""
    engine = sa.create_engine(settings.database_url, poolclass=sa.NullPool)
    try:
        with engine.connect() as connection:
            return set(connection.scalars(sa.select(Inbox.order_id)))
    finally:
        engine.dispose()


def venue_delivers(sandbox: SandboxServer, connection: VenueConnection, reference: str) -> str:
    """An order made and issued at the venue, its webhook sent; the order's id."""
    partner = sandbox.config.partners[0].id
    request = OrderRequest.model_validate(
        {
            "partnerId": partner,
            "sellToOrderReference": reference,
            "paymentReference": "P1",
            "items": [line()],
        }
    )
    with open_client(connection) as client:
        order_id = client.create_order(request).order_id
    sandbox.tick()
    assert sandbox.runtime.dispatcher.wait_idle(15)
    return order_id


def test_subscribe_generates_a_state_the_running_receiver_accepts(
    settings: Settings,
    sandbox: SandboxServer,
    venue: httpx.Client,
    receiver: LiveReceiver,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With no state at all, subscribe generates one into an owner-only file; the receiver,
    started before the file existed, accepts the venue's webhooks carrying it; a receiver
    refuses the state while the file is absent. The state shows nowhere."""
    caplog.set_level(logging.DEBUG)
    (connection,) = settings.connections
    url = f"{receiver.url}{WEBHOOK_PATH}"
    path = connection.client_state_file(settings.secrets_dir)
    assert not path.exists()

    with open_client(connection) as client:
        result = subscribe(connection, client, url=url, secrets_dir=settings.secrets_dir)
    assert (result.created, result.state_generated, result.secrets_file) == (True, True, path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.parent.stat().st_mode & 0o777 == 0o700
    (state,) = (s.get_secret_value() for s in read_client_states(path))
    assert 20 <= len(state) <= 50
    (made,) = listed(venue, url)
    assert (made["id"], made["clientState"]) == (result.subscription_id, state)

    order_id = venue_delivers(sandbox, connection, "SUB-1")
    assert order_id in delivered_orders(settings), "the venue's webhook was accepted"
    assert sandbox.runtime.stats.snapshot()["webhooks"]["failed"] == 0

    # A receiver started while the file is absent refuses the state, and accepts it as
    # soon as the file is there, without a restart.
    hidden = path.with_name("elsewhere")
    path.rename(hidden)
    app = create_app(settings)
    try:
        http = app.test_client()
        assert http.post(WEBHOOK_PATH, json=notification(state)).status_code == 401
        hidden.rename(path)
        assert http.post(WEBHOOK_PATH, json=notification(state)).status_code == 200
    finally:
        app.extensions[EXTENSION].close()

    assert state not in shown(result)
    assert state not in caplog.text


def test_new_state_rotates(
    settings: Settings,
    sandbox: SandboxServer,
    venue: httpx.Client,
    receiver: LiveReceiver,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """--new-state: a new state in the file, a subscription with it, the old subscription
    deleted and its state retired; the receiver then refuses the old state."""
    caplog.set_level(logging.DEBUG)
    (connection,) = settings.connections
    url = f"{receiver.url}{WEBHOOK_PATH}"
    path = connection.client_state_file(settings.secrets_dir)
    with open_client(connection) as client:
        first = subscribe(connection, client, url=url, secrets_dir=settings.secrets_dir)
        (old,) = (s.get_secret_value() for s in read_client_states(path))
        assert post(receiver, old) == 200
        again = subscribe(connection, client, url=url, secrets_dir=settings.secrets_dir)
        assert (again.created, again.subscription_id) == (False, first.subscription_id)

        rotated = subscribe(
            connection, client, url=url, secrets_dir=settings.secrets_dir, new_state=True
        )
    assert rotated.created and rotated.state_generated
    assert (rotated.deleted, rotated.retired_states, rotated.warnings) == (
        (first.subscription_id,),
        1,
        (),
    )
    (new,) = (s.get_secret_value() for s in read_client_states(path))
    assert new != old
    (made,) = listed(venue, url)
    assert (made["id"], made["clientState"]) == (rotated.subscription_id, new)

    assert post(receiver, new) == 200
    wait_until(lambda: post(receiver, old) == 401, what="the old state to be refused")
    order_id = venue_delivers(sandbox, connection, "ROT-1")
    assert order_id in delivered_orders(settings)
    for secret in (old, new):
        assert secret not in shown(first) + shown(again) + shown(rotated)
        assert secret not in caplog.text


def test_rotation_keeps_configured_states_and_says_so(
    sandbox: SandboxServer, venue: httpx.Client, tmp_path: Path
) -> None:
    """With states in the configuration, a rotation works but warns that they are still
    accepted and would be used for a recreated subscription."""
    connection = venue_connection(sandbox, FIRST)
    with open_client(connection) as client:
        subscribe(connection, client, url=URL, secrets_dir=tmp_path)
        rotated = subscribe(connection, client, url=URL, secrets_dir=tmp_path, new_state=True)
    (made,) = listed(venue)
    assert made["clientState"] not in (FIRST, None)
    assert len(rotated.warnings) == 1 and "configured client states" in rotated.warnings[0]


# --- the command ---------------------------------------------------------------------------


def command_env(sandbox: SandboxServer, tmp_path: Path, **changes: str) -> dict[str, str]:
    """``OTACM_*`` for the sandbox's venue, secrets under ``tmp_path``."""
    config = sandbox.config
    return {
        "OTACM_API_BASE_URL": sandbox.url,
        "OTACM_TENANT": config.tenant,
        "OTACM_ENVIRONMENT": config.environment,
        "OTACM_COMPANY": config.company,
        "OTACM_API_KEY": config.api_key.get_secret_value(),
        "OTACM_SECRETS_DIR": str(tmp_path / "secrets"),
        "OTACM_LOG_LEVEL": "DEBUG",
        **changes,
    }


def otacm(args: list[str], env: dict[str, str]) -> tuple[int, str]:
    """``otacm ARGS`` in this process; its exit code and everything it wrote (logs too)."""
    result = CliRunner().invoke(main, args, env=env, catch_exceptions=False)
    return result.exit_code, result.output


def test_subscribe_command(sandbox: SandboxServer, venue: httpx.Client, tmp_path: Path) -> None:
    """`otacm subscribe` creates, then finds, then rotates; the states never show."""
    env = command_env(sandbox, tmp_path)
    path = tmp_path / "secrets" / "default.webhook-client-states"

    code, output = otacm(["subscribe", "--url", URL], env)
    assert code == 0, output
    (made,) = listed(venue)
    assert f"subscription {made['id']} for {URL} created at connection default" in output
    assert str(path) in output
    assert "webhook subscription" in output, "the logs are part of what is checked"
    (first,) = (s.get_secret_value() for s in read_client_states(path))
    assert made["clientState"] == first
    assert first not in output

    code, output = otacm(["subscribe", "--url", URL, "--json"], env)
    assert code == 0, output
    assert first not in output
    body = json.loads(output[output.index("{") : output.rindex("}") + 1])
    assert (body["created"], body["subscriptionId"]) == (False, made["id"])

    code, output = otacm(["subscribe", "--url", URL, "--new-state", "--json"], env)
    assert code == 0, output
    (second,) = (s.get_secret_value() for s in read_client_states(path))
    assert first not in output and second not in output
    body = json.loads(output[output.index("{") : output.rindex("}") + 1])
    assert (body["created"], body["deleted"], body["retiredStates"]) == (True, [made["id"]], 1)
    (rotated,) = listed(venue)
    assert (rotated["id"], rotated["clientState"]) == (body["subscriptionId"], second)


def errors_of(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("Error:")]


def test_subscribe_command_errors(sandbox: SandboxServer, tmp_path: Path) -> None:
    """Each failure is one `Error:` line and exit 1, and nothing is subscribed."""
    env = command_env(sandbox, tmp_path)
    unreachable = f"http://127.0.0.1:{free_port()}"
    config = tmp_path / "two.toml"
    venue_table = f'api_base_url = "{sandbox.url}"\ntenant = "t"\ncompany = "c"\napi_key = "k"\n'
    config.write_text(
        f'[[connections]]\nname = "castle"\n{venue_table}\n'
        f'[[connections]]\nname = "zoo"\n{venue_table}'
    )
    cases = [
        (["--url", "ftp://shop.example/hook"], env, "must be an absolute http(s) URL"),
        (["--url", "/webhooks/ota-cm"], env, "must be an absolute http(s) URL"),
        (["--url", URL], {}, "no venue connection is configured"),
        (["--url", URL, "--connection", "zoo"], env, "no venue connection named 'zoo'"),
        (
            ["--url", URL],
            {"OTACM_CONFIG_FILE": str(config)},
            "several venue connections (castle, zoo): name one with --connection",
        ),
        (["--url", URL], {**env, "OTACM_API_KEY": "wrong-key"}, "refused the API key"),
        (["--url", URL], {**env, "OTACM_API_BASE_URL": unreachable}, "unreachable"),
    ]
    for args, case_env, expected in cases:
        code, output = otacm(["subscribe", *args], case_env)
        assert code == 1, (args, output)
        (error,) = errors_of(output)
        assert expected in error, (args, error)
        assert "wrong-key" not in output
    assert sandbox.runtime.store.subscriptions() == []
    assert not (tmp_path / "secrets").exists() or not any((tmp_path / "secrets").iterdir())
