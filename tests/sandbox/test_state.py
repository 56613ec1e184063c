"""A sandbox with a state file keeps its orders, row versions and subscriptions across a
restart."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.sandbox.conftest import PARTNER, config_for_tests, order_body, running

LIST = f"/channelManager/orders/{PARTNER}"


def test_state_file_survives_a_restart(tmp_path: Path) -> None:
    """Orders, row versions and subscriptions come back; new changes continue the count."""
    config = config_for_tests(state_path=str(tmp_path / "venue.sqlite3"))
    with running(config) as venue:
        issued = venue.create(order_body("KEEP-1"))
        pending = venue.create(order_body("KEEP-2"))
        venue.tick()
        venue.create(order_body("KEEP-3"))
        subscription = venue.subscribe("https://partner.example/hooks")
        before = venue.api.get(LIST, params={"sync": "true"}).json()["data"]
        full = venue.get(issued["orderId"])

    with running(config) as venue:
        after = venue.api.get(LIST, params={"sync": "true"}).json()["data"]
        assert after == before
        assert venue.get(issued["orderId"]) == full
        assert venue.get(pending["orderId"])["status"] == "Issued"
        assert [s["id"] for s in venue.api.get("/webhooks").json()["value"]] == [subscription["id"]]
        duplicate = venue.api.post("/channelManager", json=order_body("KEEP-1"))
        assert duplicate.status_code == 400

        venue.tick()
        newest = max(row["rowVersion"] for row in before)
        changed = venue.api.get(LIST, params={"sync": "true", "lastRowVersion": newest}).json()
        assert [row["sellToOrderReference"] for row in changed["data"]] == ["KEEP-3"]
        assert changed["data"][0]["status"] == "Issued"


def test_concurrent_calls_are_serialised(tmp_path: Path) -> None:
    """Submissions from many threads at once all land, each change with its own row version."""
    # Eight callers at once: past the gateway's bound of five, which is not what this tests.
    config = config_for_tests(state_path=str(tmp_path / "venue.sqlite3"), gateway_max_in_flight=0)
    with running(config) as venue:

        def submit(worker: int) -> list[int]:
            return [
                venue.api.post("/channelManager", json=order_body(f"W{worker}-{n}")).status_code
                for n in range(10)
            ]

        with ThreadPoolExecutor(max_workers=8) as pool:
            statuses = [s for batch in pool.map(submit, range(8)) for s in batch]
        venue.tick()

        assert statuses == [201] * 80
        rows = venue.api.get(LIST, params={"sync": "true"}).json()["data"]
        assert len(rows) == 80
        assert len({row["rowVersion"] for row in rows}) == 80
        assert {row["status"] for row in rows} == {"Issued"}
