"""Shop endpoints in the settings, and ``otacm deliveries list|replay``."""

from __future__ import annotations

import base64
import datetime as dt
import json
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from orders.mirror import upsert_order
from orders.shop_events import deliver_to
from otacm.cli import main
from otacm.settings import Settings
from storage.engine import make_sessions
from storage.models import ChangeSource, ensure_connection
from storage.records import DeliveryState, ShopDelivery
from tests.storage.test_models import T0, parse, wire_order
from tests.support.database import dump
from venue.connection import SettingsError

SECRET = "whsec_" + base64.b64encode(b"k" * 32).decode()
OTHER_SECRET = "whsec_" + base64.b64encode(b"o" * 32).decode()
VENUE = {
    "OTACM_API_BASE_URL": "http://127.0.0.1:9",
    "OTACM_TENANT": "00000000-0000-0000-0000-000000000001",
    "OTACM_COMPANY": "CRONUS",
    "OTACM_API_KEY": "shop-endpoints-key",
}


def load(tmp_path: Path, text: str, **env: str) -> Settings:
    """Settings from a config file of ``text`` and the environment ``env``."""
    path = tmp_path / "otacm.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.MonkeyPatch.context() as patch:
        for name, value in {**VENUE, **env}.items():
            patch.setenv(name, value)
        return Settings.load(path)


def test_endpoints_from_the_file_and_the_environment_serve_their_connections(
    tmp_path: Path,
) -> None:
    """A file's endpoint names its connections; the environment's serves every one."""
    settings = load(
        tmp_path,
        f"""
[[connections]]
name = "zoo"
tenant = "00000000-0000-0000-0000-000000000002"
company = "ZOO"
api_key = "zoo-key"

[[shop_endpoints]]
name = "crm"
url = "https://crm.example/hooks"
secrets = ["{SECRET}", "{OTHER_SECRET}"]
connections = ["zoo"]
""",
        OTACM_SHOP_ENDPOINT_URL="https://shop.example/otacm",
        OTACM_SHOP_ENDPOINT_SECRETS=SECRET,
    )

    assert settings.shop_endpoint_names() == {"zoo": ["crm", "shop"], "default": ["shop"]}
    assert [len(e.secrets) for e in settings.shop_endpoints] == [2, 1]
    assert settings.shop_retry_horizon_days == 3
    shown = repr(settings) + json.dumps(settings.masked(), default=str)
    assert SECRET.removeprefix("whsec_") not in shown
    assert "crm" in shown


def endpoint(name: str = "a", url: str = "https://x.example", secret: str = SECRET) -> str:
    """A ``[[shop_endpoints]]`` table of the config file."""
    return f'[[shop_endpoints]]\nname = "{name}"\nurl = "{url}"\nsecrets = ["{secret}"]\n'


@pytest.mark.parametrize(
    ("text", "env", "problem"),
    [
        (endpoint(secret="nope!"), {}, "base64"),
        (endpoint(secret="whsec_c2hvcnQ="), {}, "24 to 64 bytes, not 5"),
        (endpoint(url="ftp://x"), {}, "http(s)"),
        (endpoint().replace(f'["{SECRET}"]', "[]"), {}, "secrets"),
        (endpoint() + 'connections = ["castle"]', {}, "no venue connection called castle"),
        (endpoint("shop") + endpoint("shop"), {}, "shop endpoint names must be unique: shop"),
        ("", {"OTACM_SHOP_ENDPOINT_URL": "https://x.example"}, "OTACM_SHOP_ENDPOINT_SECRETS"),
        ("", {"OTACM_SHOP_RETRY_HORIZON_DAYS": "0"}, "shop_retry_horizon_days"),
    ],
)
def test_a_bad_endpoint_is_refused_naming_it_never_echoing_a_secret(
    tmp_path: Path, text: str, env: dict[str, str], problem: str
) -> None:
    """Each refusal names the problem; no secret appears in it."""
    with pytest.raises(SettingsError) as refused:
        load(tmp_path, text, **env)

    assert problem in str(refused.value)
    assert "nope!" not in str(refused.value)
    assert SECRET.removeprefix("whsec_") not in str(refused.value)


def _environment(engine: sa.Engine) -> dict[str, str]:
    return {
        **VENUE,
        "OTACM_DATABASE_URL": engine.url.render_as_string(hide_password=False),
        "OTACM_SHOP_ENDPOINT_URL": "http://127.0.0.1:9/events",
        "OTACM_SHOP_ENDPOINT_SECRETS": SECRET,
    }


def test_deliveries_list_and_replay(migrated_engine: sa.Engine) -> None:
    """list shows each delivery (as JSON too); replay puts a dead one back, once."""
    sessions = make_sessions(migrated_engine)
    deliver_to(sessions, {"default": ["shop"]})
    with sessions.begin() as session:
        connection_id = ensure_connection(session, "default")
        order = parse(wire_order("Issued", minted=True))
        upsert_order(session, connection_id, order, source=ChangeSource.FETCH, observed_at=T0)
    with sessions.begin() as session:
        session.execute(
            sa.update(ShopDelivery).values(
                state=DeliveryState.DEAD, attempts=1, last_status=410, last_error="HTTP 410"
            )
        )
    env = _environment(migrated_engine)
    runner = CliRunner()

    listed = runner.invoke(main, ["deliveries", "list", "--json"], env=env)
    text = runner.invoke(main, ["deliveries", "list", "--state", "dead"], env=env)
    none = runner.invoke(main, ["deliveries", "list", "--state", "pending"], env=env)

    assert listed.exit_code == 0, listed.output
    [row] = json.loads(listed.stdout)
    assert (row["endpoint"], row["state"], row["type"], row["reference"]) == (
        "shop",
        "dead",
        "order.issued",
        "SHOP-1001",
    )
    assert row["event_id"].startswith("msg_") and row["last_status"] == 410
    assert f"{row['id']}  shop  dead  order.issued  {row['event_id']}" in text.stdout
    assert none.stdout == "no deliveries\n"

    replayed = runner.invoke(main, ["deliveries", "replay", str(row["id"]), "--json"], env=env)
    again = runner.invoke(main, ["deliveries", "replay", str(row["id"])], env=env)

    assert (replayed.exit_code, json.loads(replayed.stdout)) == (0, {"replayed": [row["id"]]})
    assert again.exit_code == 1
    assert f"shop delivery {row['id']} is pending, not dead" in again.output
    with sessions() as session:
        delivery = session.scalars(sa.select(ShopDelivery)).one()
    assert delivery.state is DeliveryState.PENDING
    assert delivery.next_attempt_at > dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        (["deliveries", "replay"], "name one delivery ID, or --dead"),
        (["deliveries", "replay", "1", "--dead"], "name one delivery ID, or --dead"),
        (["deliveries", "replay", "7"], "no shop delivery 7"),
        (["deliveries", "replay", str(2**64)], f"no shop delivery {2**64}"),
        (["deliveries", "replay", "--dead", "--endpoint", "nope"], "no shop endpoint named 'nope'"),
        (["deliveries", "list", "--state", "lost"], "Invalid value for '--state'"),
    ],
)
def test_a_bad_replay_is_one_line_exit_1_and_changes_nothing(
    migrated_engine: sa.Engine, args: list[str], problem: str
) -> None:
    """Refusals name the problem and change nothing stored."""
    before = dump(migrated_engine)

    result = CliRunner().invoke(main, args, env=_environment(migrated_engine))

    assert result.exit_code != 0
    assert problem in result.output
    assert "Traceback" not in result.output
    assert dump(migrated_engine) == before


def test_replay_dead_puts_back_every_dead_delivery(migrated_engine: sa.Engine) -> None:
    """--dead with no dead delivery replays none, and says so."""
    result = CliRunner().invoke(
        main, ["deliveries", "replay", "--dead"], env=_environment(migrated_engine)
    )

    assert (result.exit_code, result.stdout) == (0, "0 dead deliveries queued again\n")


def test_doctor_fails_on_deliveries_given_up(migrated_engine: sa.Engine) -> None:
    """Dead deliveries fail the doctor, counted per endpoint, with what to do."""
    from tests.otacm.test_doctor import _doctor_on

    assert _doctor_on(migrated_engine)["shop events"]["ok"]
    sessions = make_sessions(migrated_engine)
    deliver_to(sessions, {"default": ["shop", "crm"]})
    with sessions.begin() as session:
        connection_id = ensure_connection(session, "default")
        order = parse(wire_order("Issued", minted=True))
        upsert_order(session, connection_id, order, source=ChangeSource.FETCH, observed_at=T0)
    with sessions.begin() as session:
        session.execute(
            sa.update(ShopDelivery)
            .where(ShopDelivery.endpoint == "crm")
            .values(state=DeliveryState.DEAD)
        )

    check = _doctor_on(migrated_engine)["shop events"]
    assert not check["ok"] and check["facts"] == {"crm": 1}
    assert "deliveries given up: 1 to crm" in check["detail"]
    assert "otacm deliveries replay --dead" in check["detail"]


def test_the_roles_sessions_record_deliveries_to_the_configured_endpoints(
    migrated_engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A change made through a role's sessions (worker, scheduler) records one delivery per
    endpoint serving its connection, and none for an endpoint of another connection."""
    from prometheus_client import CollectorRegistry
    from pydantic import SecretStr

    from otacm.processes import open_runtime
    from receiver import metrics
    from receiver.metrics import VenueCallMetrics
    from venue.connection import VenueConnection

    def venue(name: str) -> VenueConnection:
        return VenueConnection(
            name=name,
            api_base_url="http://venue.invalid",
            tenant="00000000-0000-0000-0000-000000000001",
            company="CRONUS",
            api_key=SecretStr("key-for-tests"),
        )

    settings = Settings(
        database_url=migrated_engine.url.render_as_string(hide_password=False),
        connections=[venue("default"), venue("zoo")],
        shop_endpoints=[
            {"name": "shop", "url": "http://127.0.0.1:9/a", "secrets": [SECRET]},
            {
                "name": "zoo-crm",
                "url": "http://127.0.0.1:9/b",
                "secrets": [SECRET],
                "connections": ["zoo"],
            },
        ],
    )
    monkeypatch.setattr(
        metrics, "VenueCallMetrics", lambda registry: VenueCallMetrics(CollectorRegistry())
    )
    with open_runtime(settings) as runtime, runtime.sessions.begin() as session:
        connection_id = ensure_connection(session, "default")
        order = parse(wire_order("Issued", minted=True))
        upsert_order(session, connection_id, order, source=ChangeSource.FETCH, observed_at=T0)

    with make_sessions(migrated_engine)() as session:
        endpoints = session.scalars(sa.select(ShopDelivery.endpoint)).all()
    assert endpoints == ["shop"]
