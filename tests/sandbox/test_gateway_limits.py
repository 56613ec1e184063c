"""The gateway's limits per API identity: 429 with Retry-After beyond them, and counters."""

from __future__ import annotations

import threading
from collections.abc import Callable

import httpx
from click.testing import CliRunner

from sandbox.cli import build_config, sandbox_command
from sandbox.config import SandboxConfig
from sandbox.limits import ANONYMOUS, GatewayLimits, identity_label
from tests.sandbox.conftest import PARTNER, TLS, Venue, order_body

LIST = "/channelManager/orders/21e8c1d2-3f4a-4c5b-9e6d-7f8a9b0c1d2e"


def _counters(venue: Venue, key: str | None = None) -> dict[str, int]:
    identities = venue.stats()["limits"]["identities"]
    return dict(identities[identity_label(key or venue.server.api_key)])


def test_beyond_the_rate_the_gateway_answers_429_with_retry_after_and_does_no_work(
    make_venue: Callable[..., Venue],
) -> None:
    """Three calls a minute: the fourth is refused before any work, and counted."""
    venue = make_venue(gateway_rate_limit=3, gateway_rate_period=60)
    for n in range(3):
        venue.create(reference=f"RATE-{n}")

    refused = venue.api.post("/channelManager", json=order_body("RATE-3"))

    assert refused.status_code == 429
    assert refused.json()["code"] == "too_many_requests"
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    assert "Rate limit is exceeded" in refused.json()["message"]
    assert venue.stats()["calls"]["createOrder"] == {"201": 3, "429": 1}
    counters = _counters(venue)
    assert (counters["requests"], counters["maxInWindow"], counters["throttled"]) == (4, 4, 1)
    # The refused order was never taken.
    store = venue.server.runtime.store
    assert store.find(PARTNER, "RATE-2") is not None
    assert store.find(PARTNER, "RATE-3") is None


def test_beyond_the_in_flight_bound_the_gateway_answers_429(
    make_venue: Callable[..., Venue],
) -> None:
    """Two in process at once: of six slow calls together, some are refused with Retry-After 1."""
    venue = make_venue(gateway_max_in_flight=2)
    venue.faults(latencyMs=400)
    start = threading.Barrier(6)
    answers: list[httpx.Response] = []
    lock = threading.Lock()

    def call() -> None:
        start.wait()
        response = venue.api.get(LIST)
        with lock:
            answers.append(response)

    threads = [threading.Thread(target=call) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    refused = [r for r in answers if r.status_code == 429]
    assert refused and len(refused) <= 4
    assert {r.headers["Retry-After"] for r in refused} == {"1"}
    counters = _counters(venue)
    assert counters["maxInFlight"] > 2
    assert counters["throttled"] == len(refused)
    assert counters["inFlight"] == 0


def test_within_the_limits_nothing_is_refused_and_the_counters_say_so(venue: Venue) -> None:
    """At the documented limits, calls one after the other are all answered."""
    limits = venue.stats()["limits"]
    assert (limits["maxInFlight"], limits["rateLimit"], limits["ratePeriod"]) == (5, 6000, 300)
    for _ in range(5):
        assert venue.api.get(LIST).status_code == 200
    counters = _counters(venue)
    assert counters == {
        "requests": 5,
        "maxInFlight": 1,
        "maxInWindow": 5,
        "throttled": 0,
        "inFlight": 0,
    }


def test_each_identity_is_counted_apart_and_named_without_its_key(
    make_venue: Callable[..., Venue],
) -> None:
    """Another key's calls (even refused ones) count for that key alone; no key shows."""
    venue = make_venue(gateway_rate_limit=2, gateway_rate_period=60)
    base = venue.server.base_url
    with httpx.Client(base_url=base, headers={"x-np-api-key": "other"}, verify=TLS) as other:
        assert other.get(LIST).status_code == 401
    with httpx.Client(base_url=base, verify=TLS) as anonymous:
        assert anonymous.get(LIST).status_code == 401
    assert venue.api.get(LIST).status_code == 200
    assert venue.api.get(LIST).status_code == 200

    stats = venue.stats()
    identities = stats["limits"]["identities"]
    assert set(identities) == {
        identity_label(venue.server.api_key),
        identity_label("other"),
        ANONYMOUS,
    }
    assert identities[identity_label("other")]["requests"] == 1
    assert identities[identity_label(venue.server.api_key)]["throttled"] == 0
    assert venue.server.api_key not in str(stats)

    reset = venue.admin.delete("/stats").json()["limits"]["identities"]
    assert reset[identity_label(venue.server.api_key)]["requests"] == 0
    # Zeroing the counters does not reopen the window: the key's two calls still count.
    assert venue.api.get(LIST).status_code == 429


def test_the_window_slides() -> None:
    """A call is refused while the window holds the rate, admitted once the oldest left it."""
    now = [100.0]
    limits = GatewayLimits(0, 2, 10.0, clock=lambda: now[0])
    assert limits.enter("k") is None
    now[0] = 104.0
    assert limits.enter("k") is None
    now[0] = 109.5
    assert limits.enter("k") == 1  # the call at 100 leaves the window at 110
    now[0] = 110.0
    assert limits.enter("k") is None
    for _ in range(4):
        limits.leave("k")
    counters = limits.snapshot()["identities"]["k"]
    assert (counters["maxInWindow"], counters["throttled"], counters["inFlight"]) == (3, 1, 0)


def test_the_limits_are_set_on_the_command_line() -> None:
    """--gateway-* options set the limits; --help lists them with their variables."""
    help_text = CliRunner().invoke(sandbox_command, ["--help"]).output
    for option in ("--gateway-max-in-flight", "--gateway-rate-limit", "--gateway-rate-period"):
        assert option in help_text
    assert "OTACM_SANDBOX_GATEWAY_RATE_LIMIT" in help_text

    context = sandbox_command.make_context(
        "sandbox",
        [
            "--gateway-max-in-flight",
            "2",
            "--gateway-rate-limit",
            "10",
            "--gateway-rate-period",
            "1",
        ],
    )
    config = build_config(dict(context.params))
    assert isinstance(config, SandboxConfig)
    assert (
        config.gateway_max_in_flight,
        config.gateway_rate_limit,
        config.gateway_rate_period,
    ) == (
        2,
        10,
        1.0,
    )
