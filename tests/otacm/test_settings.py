"""Settings: environment, file, several venue connections, secrets kept secret."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from pydantic import SecretStr

from otacm.settings import DEFAULT_DATABASE_URL, Settings, mask_database_url
from venue.connection import (
    COMPANY_PATH_FORMS,
    SettingsError,
    VenueConnection,
    add_client_state,
    company_name,
    encode_company,
    read_client_states,
    remove_client_states,
)

KEY = "k-very-secret-key-0001"


def single_venue_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTACM_TENANT", "01234567-89ab-cdef-0123-456789abcdef")
    monkeypatch.setenv("OTACM_COMPANY", "CRONUS International Ltd.")
    monkeypatch.setenv("OTACM_API_KEY", KEY)
    monkeypatch.setenv(
        "OTACM_PARTNER_IDS",
        "21E8C1D2-3F4A-4C5B-9E6D-7F8A9B0C1D2E, {5b7c9d1e-2f3a-4b5c-8d6e-7f8091a2b3c4}",
    )
    monkeypatch.setenv("OTACM_WEBHOOK_CLIENT_STATES", "state-one,state-two")


def test_defaults_need_no_environment() -> None:
    """With nothing configured, otacm uses SQLite under ./var/ and has no venues."""
    settings = Settings.load()
    assert settings.database_url == DEFAULT_DATABASE_URL
    assert settings.database_url.startswith("sqlite:///var/")
    assert settings.connections == []
    assert settings.poll_interval == 15.0


def test_single_venue_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """OTACM_* variables alone make one connection, comma lists split, GUIDs lowercased."""
    single_venue_env(monkeypatch)
    monkeypatch.setenv("OTACM_API_VERSION", "2026-05-01")
    monkeypatch.setenv("OTACM_POLL_INTERVAL", "30")
    settings = Settings.load()
    (venue,) = settings.connections
    assert venue.name == "default"
    assert venue.partner_ids == [
        "21e8c1d2-3f4a-4c5b-9e6d-7f8a9b0c1d2e",
        "5b7c9d1e-2f3a-4b5c-8d6e-7f8091a2b3c4",
    ]
    assert [s.get_secret_value() for s in venue.webhook_client_states] == [
        "state-one",
        "state-two",
    ]
    assert venue.api_version == "2026-05-01"
    assert settings.poll_interval == 30.0


def test_incomplete_single_venue_names_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    """A venue half-configured in the environment is refused, naming the missing variables."""
    monkeypatch.setenv("OTACM_TENANT", "t")
    with pytest.raises(SettingsError, match="OTACM_COMPANY, OTACM_API_KEY"):
        Settings.load()


def test_poll_interval_below_the_venue_advice_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """The venue advises polling no faster than every 10 s; less is a configuration error."""
    monkeypatch.setenv("OTACM_POLL_INTERVAL", "5")
    with pytest.raises(SettingsError, match="poll_interval"):
        Settings.load()


def test_file_lists_several_venues_and_environment_adds_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A TOML file holds several connections; the environment's venue joins them."""
    config = tmp_path / "otacm.toml"
    config.write_text(
        """
database_url = "sqlite:///from-file.sqlite3"
poll_interval = 20

[[connections]]
name = "castle"
tenant = "t1"
company = "Castle Ltd."
api_key = "castle-key-123"
partner_ids = ["11111111-1111-4111-8111-111111111111"]
webhook_client_states = ["c1"]

[[connections]]
name = "zoo"
tenant = "t2"
environment = "sandbox"
company = "Zoo A/S"
api_key = "zoo-key-456"
partner_ids = "22222222-2222-4222-8222-222222222222,{33333333-3333-4333-8333-333333333333}"
"""
    )
    single_venue_env(monkeypatch)
    monkeypatch.setenv("OTACM_CONNECTION_NAME", "museum")
    monkeypatch.setenv("OTACM_POLL_INTERVAL", "25")
    settings = Settings.load(config)
    assert [c.name for c in settings.connections] == ["castle", "zoo", "museum"]
    assert settings.connection("zoo").partner_ids == [
        "22222222-2222-4222-8222-222222222222",
        "33333333-3333-4333-8333-333333333333",
    ]
    assert settings.database_url == "sqlite:///from-file.sqlite3"
    assert settings.poll_interval == 25.0, "the environment wins over the file"


def test_duplicate_connection_names_are_refused(tmp_path: Path) -> None:
    """Two connections with one name would mix their orders; the file is refused."""
    config = tmp_path / "otacm.toml"
    venue = 'name = "a"\ntenant = "t"\ncompany = "c"\napi_key = "k"\n'
    config.write_text(f"[[connections]]\n{venue}\n[[connections]]\n{venue}")
    with pytest.raises(SettingsError, match="unique: a"):
        Settings.load(config)


def test_unreadable_or_invalid_file_is_one_clear_error(tmp_path: Path) -> None:
    """A missing file or broken TOML is named in the error."""
    with pytest.raises(SettingsError, match="cannot read config file"):
        Settings.load(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("connections = [")
    with pytest.raises(SettingsError, match="not valid TOML"):
        Settings.load(broken)


def test_unknown_connection_is_named() -> None:
    """Asking for a connection that does not exist lists the known ones."""
    settings = Settings(connections=[VenueConnection(tenant="t", company="c", api_key=KEY)])
    with pytest.raises(SettingsError, match=r"'other' \(known: default\)"):
        settings.connection("other")


@pytest.mark.parametrize(
    "company",
    [
        "CRONUS International Ltd.",
        "CRONUS%20International%20Ltd.",
        "CRONUS%2520International%2520Ltd.",
        "CRONUS+International+Ltd.",
    ],
)
def test_company_is_read_in_any_form_and_written_in_the_chosen_one(company: str) -> None:
    """Raw, once- or twice-percent-encoded or form-encoded (+), the company is the same
    name, written in the path as company_path_form says: %20 by default, %2520 or +."""
    written = {}
    for form in COMPANY_PATH_FORMS:
        venue = VenueConnection(
            tenant="t",
            environment="production",
            company=company,
            company_path_form=form,
            api_key=KEY,
        )
        written[form] = venue.base_url.removeprefix("https://api.npretail.app/t/production/")
    assert written == {
        "percent": "CRONUS%20International%20Ltd.",
        "double": "CRONUS%2520International%2520Ltd.",
        "plus": "CRONUS+International+Ltd.",
    }
    assert company_name(company) == "CRONUS International Ltd."


def test_a_plus_is_a_space_only_where_no_space_is() -> None:
    """A form encoder writes no space, so '+' is a space only in a text without one; a
    literal '+' is kept beside a space, or written %2B."""
    assert company_name("A+B Ltd") == "A+B Ltd"
    assert company_name("A%2BB+Ltd") == "A+B Ltd"
    assert encode_company("A+B Ltd", "plus") == "A%2BB+Ltd"
    assert encode_company("A+B Ltd", "double") == "A%252BB%2520Ltd"


def test_company_path_form_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """OTACM_COMPANY_PATH_FORM sets the single venue's form; another value is refused,
    naming the setting."""
    single_venue_env(monkeypatch)
    monkeypatch.setenv("OTACM_COMPANY_PATH_FORM", "double")
    (venue,) = Settings.load().connections
    assert venue.base_url.endswith("/CRONUS%2520International%2520Ltd.")
    assert venue.masked()["company_path_form"] == "double"
    monkeypatch.setenv("OTACM_COMPANY_PATH_FORM", "spaces")
    with pytest.raises(SettingsError, match="company_path_form"):
        Settings.load()


def test_payment_reference_width_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """OTACM_PAYMENT_REFERENCE_MAX_CHARS: 50 by default (CMOrder.PaymentReference Code[50]),
    20 for a venue on the older synchronous version (Code[20] at 43834b3b8); above 50, or
    below 1, is refused naming the setting."""
    single_venue_env(monkeypatch)
    (venue,) = Settings.load().connections
    assert venue.payment_reference_max_chars == 50
    monkeypatch.setenv("OTACM_PAYMENT_REFERENCE_MAX_CHARS", "20")
    (venue,) = Settings.load().connections
    assert venue.masked()["payment_reference_max_chars"] == 20
    monkeypatch.setenv("OTACM_PAYMENT_REFERENCE_MAX_CHARS", "51")
    with pytest.raises(SettingsError, match="payment_reference_max_chars"):
        Settings.load()


def test_partner_ids_must_be_guids(monkeypatch: pytest.MonkeyPatch) -> None:
    """A partner id that is not a GUID is refused when the settings load, naming it: the
    venue would answer every list with 400 "Invalid partnerId" (ChannelMgrOrderAgent
    ListOrdersByPartner)."""
    single_venue_env(monkeypatch)
    monkeypatch.setenv("OTACM_PARTNER_IDS", "21e8c1d2-3f4a-4c5b-9e6d-7f8a9b0c1d2e,partner-one")
    with pytest.raises(SettingsError, match="partner id 'partner-one' is not a GUID"):
        Settings.load()


def test_company_with_slash_and_percent_stays_one_segment() -> None:
    """A company name with '/' cannot escape its path segment."""
    assert encode_company("Zoo A/S") == "Zoo%20A%2FS"


def test_secrets_never_in_repr_or_masked_view(monkeypatch: pytest.MonkeyPatch) -> None:
    """Neither repr nor the doctor's masked view shows a key, client state or DB password."""
    single_venue_env(monkeypatch)
    monkeypatch.setenv("OTACM_DATABASE_URL", "postgresql://otacm:db-pass-99@db/otacm")
    settings = Settings.load()
    shown = repr(settings) + str(settings) + repr(settings.masked())
    for secret in (KEY, "state-one", "state-two", "db-pass-99"):
        assert secret not in shown
    assert mask_database_url(settings.database_url) == "postgresql://otacm:****@db/otacm"


def test_client_states_longer_than_the_venue_allows_are_refused() -> None:
    """The venue accepts client states of at most 50 characters."""
    with pytest.raises(ValueError, match="at most 50"):
        VenueConnection(
            tenant="t", company="c", api_key=KEY, webhook_client_states=[SecretStr("x" * 51)]
        )


def test_api_version_must_be_a_date() -> None:
    """The version pin is a date, as the venue's x-api-version header expects."""
    with pytest.raises(ValueError, match="YYYY-MM-DD"):
        VenueConnection(tenant="t", company="c", api_key=KEY, api_version="latest")


def test_config_file_named_by_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Processes with no command line (gunicorn) find the file through OTACM_CONFIG_FILE."""
    config = tmp_path / "otacm.toml"
    config.write_text('database_url = "sqlite:///named.sqlite3"\n')
    monkeypatch.setenv("OTACM_CONFIG_FILE", str(config))
    assert Settings.load().database_url == "sqlite:///named.sqlite3"


# --- webhook client states: configured, plus the generated states file --------------------


def plain(states: list[SecretStr]) -> list[str]:
    return [state.get_secret_value() for state in states]


def test_generated_states_join_the_configured_ones(tmp_path: Path) -> None:
    """A connection's states are the configured ones first, then its file's, each once."""
    secrets_dir = tmp_path / "secrets"
    venue = VenueConnection(
        name="castle",
        tenant="t",
        company="c",
        api_key=KEY,
        webhook_client_states=[SecretStr("configured-1"), SecretStr("configured-2")],
    )
    assert plain(venue.client_states(secrets_dir)) == ["configured-1", "configured-2"]
    path = venue.client_state_file(secrets_dir)
    assert path == secrets_dir / "castle.webhook-client-states"
    add_client_state(path, SecretStr("generated-1"))
    add_client_state(path, SecretStr("configured-2"))
    add_client_state(path, SecretStr("generated-2"))
    assert plain(venue.client_states(secrets_dir)) == [
        "configured-1",
        "configured-2",
        "generated-1",
        "generated-2",
    ]
    # Another connection's file is its own.
    other = VenueConnection(name="zoo", tenant="t", company="c", api_key=KEY)
    assert other.client_states(secrets_dir) == []


def test_states_file_is_owner_only(tmp_path: Path) -> None:
    """The generated states live in a 0700 directory, in a 0600 file, even a loose one."""
    secrets_dir = tmp_path / "var" / "secrets"
    path = secrets_dir / "default.webhook-client-states"
    add_client_state(path, SecretStr("first-state"))
    assert secrets_dir.stat().st_mode & 0o777 == 0o700
    assert path.stat().st_mode & 0o777 == 0o600
    path.chmod(0o644)
    secrets_dir.chmod(0o755)
    add_client_state(path, SecretStr("second-state"))
    assert secrets_dir.stat().st_mode & 0o777 == 0o700
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.read_text() == "first-state\nsecond-state\n"


def test_states_file_skips_blanks_and_comments_and_refuses_long_lines(tmp_path: Path) -> None:
    """Blank lines and # comments are not states; an over-long line is named, not shown."""
    path = tmp_path / "default.webhook-client-states"
    assert read_client_states(path) == [], "a missing file holds no state"
    path.write_text("# rotated 2026-01-01\n\n  padded-state  \nsecond\n")
    assert plain(read_client_states(path)) == ["padded-state", "second"]
    path.write_text("ok\n" + "y" * 51 + "\n")
    with pytest.raises(SettingsError, match="line 2: a webhook client state is at most 50") as exc:
        read_client_states(path)
    assert "y" * 51 not in str(exc.value)


def test_states_that_cannot_be_stored_are_refused(tmp_path: Path) -> None:
    """Nothing the venue would refuse, or that would not read back the same, is written."""
    path = tmp_path / "default.webhook-client-states"
    for bad in ("", "x" * 51, " padded", "two\nlines", "#comment"):
        with pytest.raises(ValueError, match="client state"):
            add_client_state(path, SecretStr(bad))
    assert not path.exists()


def test_retired_states_are_removed_from_the_file(tmp_path: Path) -> None:
    """A rotation's old states leave the file; the rest stay, in order, still 0600."""
    path = tmp_path / "secrets" / "default.webhook-client-states"
    for state in ("old-1", "keep-1", "old-2", "keep-2"):
        add_client_state(path, SecretStr(state))
    assert remove_client_states(path, [SecretStr("old-1"), SecretStr("old-2")]) == 2
    assert plain(read_client_states(path)) == ["keep-1", "keep-2"]
    assert path.stat().st_mode & 0o777 == 0o600
    assert remove_client_states(path, [SecretStr("absent")]) == 0
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name], "no temporary left"


@pytest.mark.parametrize(
    "url", ["ftp://example.com/hook", "/webhooks/ota-cm", "example.com/hook", "https://"]
)
def test_webhook_url_must_be_absolute_http(url: str) -> None:
    """The venue can only POST to an absolute http(s) URL; anything else is refused."""
    with pytest.raises(ValueError, match="webhook_url"):
        Settings(webhook_url=url)


def test_webhook_url_accepted_as_given() -> None:
    """A good URL is kept (trimmed); an empty one means "not set"."""
    assert Settings(webhook_url=" https://shop.example/webhooks/ota-cm ").webhook_url == (
        "https://shop.example/webhooks/ota-cm"
    )
    assert Settings(webhook_url="").webhook_url is None


def test_the_feed_overlap_is_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """APIRequest GetRecords: rowVersion is the database's row version, one counter for
    every table, so the change feed's overlap is minutes (default 10), not a count."""
    assert Settings().feed_overlap == dt.timedelta(minutes=10)
    monkeypatch.setenv("OTACM_FEED_OVERLAP_MINUTES", "2.5")
    assert Settings.load().feed_overlap == dt.timedelta(minutes=2, seconds=30)


def test_the_retired_row_version_overlap_is_refused_naming_its_successor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A settings file or environment that still names feed_overlap (a count of row
    versions, meaningless for a database-wide counter: APIRequest GetRecords) is refused
    with one clear message rather than silently ignored."""
    config = tmp_path / "otacm.toml"
    config.write_text("feed_overlap = 50\n", encoding="utf-8")
    with pytest.raises(SettingsError, match="set feed_overlap_minutes"):
        Settings.load(config)
    monkeypatch.setenv("OTACM_FEED_OVERLAP", "50")
    with pytest.raises(SettingsError, match=r"OTACM_FEED_OVERLAP: .*OTACM_FEED_OVERLAP_MINUTES"):
        Settings.load()
