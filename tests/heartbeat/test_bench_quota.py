"""``bench/quota`` runs end to end on a small workload, and what it measures holds together."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.process

ROOT = Path(__file__).resolve().parents[2]
ORDERS = 20
SHARED_ORDERS = 30


def test_a_small_quota_run_knows_every_order_and_agrees_with_the_metrics(tmp_path: Path) -> None:
    """Every order is known once, fetched once, in every scenario; /metrics sees the same."""
    out = tmp_path / "quota.json"
    environment = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("OTACM_") and name != "PROMETHEUS_MULTIPROC_DIR"
    }
    command = ["bench/quota", "--orders", str(ORDERS), "--window", "20", "--out", str(out)]
    command += ["--shared-orders", str(SHARED_ORDERS)]
    done = subprocess.run(
        [sys.executable, *command],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "(a) at most 1.05 calls per order" in done.stdout

    results = json.loads(out.read_text())
    scenarios = results["scenarios"]
    assert set(scenarios) == {"a) webhooks", "b) 30% dropped", "c) all dropped", "baseline"}
    for name, numbers in scenarios.items():
        assert (numbers["orders_settled"], numbers["orders_known"]) == (ORDERS, ORDERS), name
    otacm = {name: numbers for name, numbers in scenarios.items() if name != "baseline"}
    for name, numbers in otacm.items():
        # Whether the webhook or the feed told of it, each order costs one getOrder.
        assert numbers["calls_by_endpoint"]["getOrder"] == ORDERS, name
        learned = {k: v for k, v in numbers["metrics"].items() if k.startswith("settled:")}
        assert sum(learned.values()) == ORDERS, name
    webhooks, blind = otacm["a) webhooks"], otacm["c) all dropped"]
    assert webhooks["metrics"]["settled:webhook"] == ORDERS
    assert "settled:webhook" not in blind["metrics"]
    # otacm's settlement lag (from the venue's timestamps) is the delay the bench measured.
    assert webhooks["metrics"]["lag:p50"] == webhooks["delay_p50"]
    assert webhooks["metrics"]["lag:p95"] == webhooks["delay_p95"]
    assert scenarios["baseline"]["calls"] > ORDERS

    # The shared key: every scenario's processes together within the gateway's limits, as
    # the sandbox counted them, and every order mirrored with about one getOrder each.
    shared = results["shared_key"]
    assert len(shared) == 4
    for name, numbers in shared.items():
        assert numbers["done"] == SHARED_ORDERS, name
        gateway = numbers["gateway"]
        assert gateway["throttled"] == 0, name
        assert gateway["maxInFlight"] <= 5, name
        assert gateway["maxInWindow"] <= 100, name
        assert numbers["calls"]["getOrder"]["200"] >= SHARED_ORDERS, name
    assert shared["1 worker, 1 in flight (before) (sqlite)"]["fetch_concurrency"] == 1
    assert shared["4 workers (sqlite)"]["workers"] == 4
    assert "(shared) the key's limits never exceeded" in done.stdout
