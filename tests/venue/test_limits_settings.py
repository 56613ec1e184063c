"""The venue key's limits as configured: per connection, the same for connections of one key."""

from __future__ import annotations

import pytest
from pydantic import SecretStr

from otacm.settings import Settings
from venue.connection import VenueConnection
from venue.throttle import Limits


def _venue(name: str, key: str, **limits: float) -> VenueConnection:
    return VenueConnection(name=name, tenant="t", company="c", api_key=SecretStr(key), **limits)


def test_the_defaults_stay_below_the_venues_limits() -> None:
    """4 in flight of the venue's 5, 5,400 of its 6,000 per 5 minutes."""
    assert _venue("a", "k").limits == Limits(max_in_flight=4, rate=5400, period=300.0)


def test_the_single_venue_form_reads_the_limits_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """OTACM_VENUE_* set the limits of the connection configured from the environment."""
    for name, value in {
        "TENANT": "t",
        "COMPANY": "c",
        "API_KEY": "k",
        "VENUE_MAX_IN_FLIGHT": "2",
        "VENUE_RATE_LIMIT": "90",
        "VENUE_RATE_PERIOD": "5",
    }.items():
        monkeypatch.setenv(f"OTACM_{name}", value)

    (venue,) = Settings.load().connections

    assert venue.limits == Limits(max_in_flight=2, rate=90, period=5.0)


def test_connections_of_one_key_must_agree_on_its_limits() -> None:
    """Two connections with one key and other limits are refused, naming one, not the key."""
    with pytest.raises(ValueError, match="connection b uses the API key of another") as caught:
        other = _venue("b", "secret-key", venue_rate_limit=10)
        Settings(connections=[_venue("a", "secret-key"), other])
    assert "secret-key" not in str(caught.value)
    Settings(connections=[_venue("a", "k1"), _venue("b", "k2", venue_rate_limit=10)])
