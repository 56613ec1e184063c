"""The shipped alerting rules and dashboard: valid, unit-tested, and over real metrics.

``promtool`` (Debian's prometheus package; ``scripts/ensure-promtool``) checks the rules
and the example Prometheus configuration and runs the rules' unit tests in
``deploy/prometheus/tests``. The Grafana dashboard is checked for the shape Grafana
loads, every expression for PromQL syntax (through ``promtool check rules``), and every
metric named by the rules or the dashboard against what a real app's ``/metrics``
exposes on a database with data, on SQLite and PostgreSQL.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from flask import Flask
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr
from sqlalchemy.orm import Session, sessionmaker

from heartbeat.coordination import ScheduledJob, run_job
from heartbeat.metric_figures import refresh_figures
from heartbeat.subscriptions import ConnectionCheck, SubscriptionReport, record_checks
from otacm.settings import Settings
from receiver import create_app
from receiver.context import EXTENSION, Receiver
from receiver.webhook import WEBHOOK_PATH
from sandbox import SandboxConfig, SandboxServer
from storage.models import Inbox, InboxState, ensure_connection
from storage.records import ReconException, ReconRun, ReconTrigger
from tests.receiver.conftest import settings_for
from tests.receiver.notifications import notification
from tests.support.processes import otacm_environment, run_otacm

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "deploy" / "prometheus"
RULES = PROMETHEUS / "otacm-alerts.yml"
RULE_TESTS = sorted((PROMETHEUS / "tests").glob("*.yml"))
DASHBOARD = ROOT / "deploy" / "grafana" / "otacm.json"

SHOP_SECRET = "whsec_" + base64.b64encode(b"s" * 32).decode()

METRIC_NAME = re.compile(r"\botacm_[a-z0-9_]*[a-z0-9]\b")
"""A metric of otacm's, wherever it is named (every one starts so; settings are upper case;
a family of them in prose, ``otacm_job_*``, is not a name)."""


# --- promtool ----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def promtool() -> str:
    """The path of promtool: on the PATH or in the virtualenv, else installed now.

    Skips only when it cannot be had (no package lists, no network, no Debian).
    """
    found = shutil.which("promtool") or _beside_python()
    if found:
        return found
    done = subprocess.run(
        [str(ROOT / "scripts" / "ensure-promtool")],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    found = shutil.which("promtool") or _beside_python()
    if not found:
        reason = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        pytest.skip(f"promtool is not installed and scripts/ensure-promtool failed: {reason[0]}")
    return found


def _beside_python() -> str | None:
    candidate = Path(sys.executable).with_name("promtool")
    return str(candidate) if candidate.is_file() else None


def run_promtool(promtool: str, *args: str, cwd: Path = PROMETHEUS) -> str:
    """Run promtool; its output, asserting that it succeeded."""
    done = subprocess.run(
        [promtool, *args], capture_output=True, text=True, cwd=cwd, timeout=120, check=False
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    return output


@pytest.mark.process
def test_the_rules_pass_promtool_check(promtool: str) -> None:
    """``promtool check rules`` accepts the rules file."""
    output = run_promtool(promtool, "check", "rules", str(RULES))

    assert f"SUCCESS: {len(alert_names())} rules found" in output


@pytest.mark.process
def test_the_example_prometheus_configuration_loads_the_rules(promtool: str) -> None:
    """``promtool check config`` accepts the example configuration and the rules it names."""
    output = run_promtool(promtool, "check", "config", "prometheus.yml")

    assert "SUCCESS: 1 rule files found" in output


@pytest.mark.process
def test_every_rule_passes_its_unit_tests(promtool: str) -> None:
    """``promtool test rules`` over deploy/prometheus/tests: every expected alert (labels
    and rendered annotations) fires, and none other, at each evaluation time."""
    output = run_promtool(promtool, "test", "rules", *map(str, RULE_TESTS))

    assert output.count("SUCCESS") == len(RULE_TESTS)


def test_every_rule_is_tested_firing_and_quiet() -> None:
    """Each alert has a unit test where it fires and one where it must not; the tests name
    no alert the rules lack (an unknown name would pass as never firing)."""
    firing: set[str] = set()
    quiet: set[str] = set()
    for path in RULE_TESTS:
        text = path.read_text()
        firing.update(re.findall(r"alertname: (\w+)\s*\n\s*exp_alerts:\s*\n\s*- exp_labels", text))
        quiet.update(re.findall(r"alertname: (\w+)\s*\n\s*exp_alerts: \[\]", text))

    assert sorted(firing) == sorted(alert_names())
    assert sorted(quiet) == sorted(alert_names())


def alert_names() -> list[str]:
    """The alerts the rules file defines."""
    return re.findall(r"^\s*- alert: (\w+)\s*$", RULES.read_text(), flags=re.MULTILINE)


# --- the dashboard -------------------------------------------------------------------------


def load_dashboard() -> dict[str, Any]:
    """The dashboard as Grafana imports it."""
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return dashboard


def graph_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel that queries (rows are headings)."""
    return [panel for panel in dashboard["panels"] if panel["type"] != "row"]


def dashboard_expressions(dashboard: dict[str, Any]) -> list[str]:
    """The PromQL of every target, in panel order."""
    return [target["expr"] for panel in graph_panels(dashboard) for target in panel["targets"]]


def test_the_dashboard_has_grafanas_shape() -> None:
    """Valid JSON with a title, a uid, a datasource variable every query uses, and panels
    with unique ids, each on the 24-column grid without overlap, and targets with expr."""
    dashboard = load_dashboard()

    assert dashboard["title"] and dashboard["uid"] and dashboard["schemaVersion"] >= 30
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    taken: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        cells = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not cells & taken, f"{panel['title']} overlaps another panel"
        taken |= cells
    panels = graph_panels(dashboard)
    assert len(panels) >= 10
    for panel in panels:
        assert panel["type"] in {"timeseries", "stat"} and panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip() and target["datasource"] == panel["datasource"]


@pytest.mark.process
def test_every_dashboard_expression_is_valid_promql(promtool: str, tmp_path: Path) -> None:
    """Each panel's query parses, once Grafana's variables are given values: checked as a
    recording rule by ``promtool check rules``."""
    expressions = dashboard_expressions(load_dashboard())
    grafana_values = {"$__rate_interval": "5m", "$connection": ".*"}
    rules = []
    for n, expr in enumerate(expressions):
        for variable, value in grafana_values.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, f"a Grafana variable the check does not know: {expr}"
        rules.append({"record": f"dashboard:check_{n}", "expr": expr})
    checked = tmp_path / "dashboard-rules.yml"
    # JSON is YAML: promtool reads it as a rules file.
    checked.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))

    output = run_promtool(promtool, "check", "rules", str(checked), cwd=tmp_path)

    assert f"SUCCESS: {len(expressions)} rules found" in output


# --- the metrics they name -----------------------------------------------------------------

NOW = dt.datetime.now(dt.UTC)


@pytest.fixture
def app(migrated_engine: sa.Engine) -> Iterator[Flask]:
    """A receiver app on the migrated test database with the receiver tests' connections
    and a shop endpoint."""
    shop = {"name": "shop", "url": "https://shop.example/events", "secrets": [SHOP_SECRET]}
    app = create_app(settings_for(migrated_engine, shop_endpoints=[shop]))
    try:
        yield app
    finally:
        receiver: Receiver = app.extensions[EXTENSION]
        receiver.close()


def plant(sessions: sessionmaker[Session], engine: sa.Engine, tmp_path: Path) -> None:
    """Some of everything the database-derived gauges read, through the product's paths
    where there is one: a job run, a subscription check, a dead letter, an exception."""
    job = ScheduledJob("watchdog", 15, lambda now: None)
    run_job(engine, sessions, job, owner="test", now=NOW, lock_dir=tmp_path / "locks")
    with sessions.begin() as session:
        connection_id = ensure_connection(session, "venue-a")
        run = ReconRun(
            connection_id=connection_id,
            started_at=NOW,
            period_from=NOW - dt.timedelta(days=1),
            period_to=NOW,
            trigger=ReconTrigger.SCHEDULED,
        )
        session.add(run)
        session.flush()
        session.add(
            ReconException(
                connection_id=connection_id,
                category="missing_at_venue",
                subject_key="ledger:p:SHOP-1",
                first_seen_run_id=run.id,
                last_seen_run_id=run.id,
                first_seen_at=NOW,
            )
        )
        session.execute(sa.update(Inbox).values(state=InboxState.DEAD))
    record_checks(
        sessions,
        SubscriptionReport(found={connection_id: ConnectionCheck(usable=True, recreated=True)}),
        now=NOW,
    )
    refresh_figures(sessions, sessions, now=NOW, stuck_after=dt.timedelta(hours=1))


def exposed_names(text: str) -> tuple[set[str], set[str]]:
    """The metric families of an exposition, and every series name they can have.

    A family with no samples yet (a labelled counter before its first count) is exposed
    all the same: its ``# TYPE`` line is there, and its series appear with the first
    count. Counters add ``_total``, histograms ``_bucket``, ``_sum`` and ``_count``,
    summaries ``_sum`` and ``_count``.
    """
    families: set[str] = set()
    series: set[str] = set()
    suffixes = {
        "counter": ("_total",),
        "histogram": ("_bucket", "_sum", "_count"),
        "summary": ("", "_sum", "_count"),
        "gauge": ("",),
    }
    for family in text_string_to_metric_families(text):
        families.add(family.name)
        series.update(family.name + suffix for suffix in suffixes.get(family.type, ("",)))
        series.update(sample.name for sample in family.samples)
    return families, series


def test_the_rules_and_the_dashboard_name_only_exposed_metrics(
    app: Flask,
    sessions: sessionmaker[Session],
    migrated_engine: sa.Engine,
    tmp_path: Path,
) -> None:
    """Every otacm metric named in the rules or the dashboard is one a real app's
    /metrics exposes (with data behind it); and the dashboard shows every family."""
    client = app.test_client()
    assert client.post(WEBHOOK_PATH, json={"value": [notification()]}).status_code == 200
    plant(sessions, migrated_engine, tmp_path)
    assert client.get("/healthz").status_code == 200

    response = client.get("/metrics")

    assert response.status_code == 200
    families, series = exposed_names(response.get_data(as_text=True))
    # prometheus-client adds each counter's creation time as a family of its own.
    ours = {n for n in families if n.startswith("otacm_") and not n.endswith("_created")}
    for source in (RULES, DASHBOARD):
        named = set(METRIC_NAME.findall(source.read_text()))
        assert named, source
        assert not named - series, f"{source.name} names metrics /metrics lacks"
    on_dashboard = "\n".join(dashboard_expressions(load_dashboard()))
    assert not {name for name in ours if name not in on_dashboard}, "families not on the dashboard"
    # The data is there: the database-derived gauges the rules watch carry samples.
    text = response.get_data(as_text=True)
    for name in (
        "otacm_job_last_success_timestamp_seconds",
        "otacm_job_interval_seconds",
        "otacm_subscription_usable",
        "otacm_subscription_recreated_timestamp_seconds",
        "otacm_recon_exceptions_open",
        "otacm_orders_stuck",
        "otacm_dead_letters",
        "otacm_http_responses_total",
        "otacm_shop_deliveries",
        "otacm_shop_delivery_oldest_undelivered_age_seconds",
    ):
        assert re.search(rf"^{name}{{", text, flags=re.MULTILINE), name


def scrape_samples(app: Flask) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """The samples of the app's ``/metrics``, by name and labels."""
    text = app.test_client().get("/metrics").get_data(as_text=True)
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


@pytest.mark.process
def test_the_scheduled_subscription_check_reaches_metrics(
    migrated_engine: sa.Engine, tmp_path: Path
) -> None:
    """``otacm poll --job check_subscriptions`` (the scheduler's job) records what it found;
    /metrics of a web app on the same database shows it usable, and a subscription the
    venue made inactive moves the recreated time the alert watches."""
    url = "https://shop.example/webhooks/ota-cm"
    with SandboxServer(SandboxConfig(pickup_interval=0)) as venue:
        config = venue.config
        settings = Settings(
            database_url=migrated_engine.url.render_as_string(hide_password=False),
            api_base_url=venue.url,
            tenant=config.tenant,
            environment=config.environment,
            company=config.company,
            api_key=config.api_key,
            partner_ids=[partner.id for partner in config.partners if partner.active],
            webhook_client_states=[SecretStr("alerts-test-state-5b1e")],
        )
        environment = otacm_environment(
            settings, OTACM_WEBHOOK_URL=url, OTACM_SECRETS_DIR=str(tmp_path / "secrets")
        )
        app = create_app(settings)
        try:
            run_otacm("poll", "--job", "check_subscriptions", environment=environment)
            first = scrape_samples(app)
            (made,) = venue.runtime.store.subscriptions()
            answer = httpx.post(
                f"{venue.url}/_sandbox/webhooks/{made.id}/state",
                json={"subscriptionState": "Inactive"},
            )
            assert answer.status_code == 200, answer.text
            run_otacm("poll", "--job", "check_subscriptions", environment=environment)
            second = scrape_samples(app)
        finally:
            receiver: Receiver = app.extensions[EXTENSION]
            receiver.close()

    default = frozenset({("connection", "default")})
    recreated = "otacm_subscription_recreated_timestamp_seconds"
    assert first[("otacm_subscription_usable", default)] == 1
    assert second[("otacm_subscription_usable", default)] == 1
    assert second[(recreated, default)] > first[(recreated, default)] > 0
