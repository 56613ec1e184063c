"""Two real ``otacm scheduler`` processes share the change feed's partners.

A sandbox with a dozen partners, behind a proxy that answers 503 to one partner's
listings (:class:`~tests.support.partner_faults.PartnerFaultProxy`); two schedulers on
one database (SQLite, then PostgreSQL), two feed workers each. Each partner's feed is its
own unit: both schedulers follow partners, no partner is listed more often than its run
record says nor twice in one interval, and the failing partner — retried for about half
a minute, then failed on its own run record — delays none of the others.
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path

import pytest
import sqlalchemy as sa
from pydantic import SecretStr
from sqlalchemy.orm import Session, sessionmaker

from otacm.settings import Settings
from sandbox import Faults, SandboxConfig, SandboxServer
from sandbox.config import Partner
from storage.engine import make_sessions
from storage.records import JobRun
from tests.support.partner_faults import PartnerFaultProxy
from tests.support.processes import OtacmProcess, otacm_environment
from tests.support.stack import wait_until

pytestmark = pytest.mark.process

PARTNERS = [f"{n:08x}-3f4a-4c5b-9e6d-7f8a9b0c1d2e" for n in range(1, 13)]
FAILING = PARTNERS[0]
HEALTHY = PARTNERS[1:]
INTERVAL = 10  # the least poll interval the settings allow
UNIT_RAN = re.compile(r"job change_feed:[\w.-]+:([0-9a-f-]{36}): (?:ran$|\{)", re.MULTILINE)


@pytest.fixture
def sandbox() -> Iterator[SandboxServer]:
    """The simulated venue, knowing every partner of :data:`PARTNERS`."""
    config = SandboxConfig(
        partners=tuple(Partner(id=partner) for partner in PARTNERS),
        pickup_interval=0,
        faults=Faults(seed=11),
    )
    with SandboxServer(config) as server:
        yield server


@pytest.fixture
def proxy(sandbox: SandboxServer) -> Iterator[PartnerFaultProxy]:
    """The venue as otacm sees it: :data:`FAILING`'s listings answered 503."""
    with PartnerFaultProxy(sandbox.url, [FAILING]) as proxy:
        yield proxy


def unit_runs(sessions: sessionmaker[Session]) -> dict[str, JobRun]:
    """The feed units' run records, by partner."""
    with sessions.begin() as session:
        query = sa.select(JobRun).where(JobRun.name.startswith("change_feed:"))
        return {row.name.rsplit(":", 1)[1]: row for row in session.scalars(query)}


def test_two_schedulers_share_the_partners_and_a_failing_one_delays_nobody(
    migrated_engine: sa.Engine, sandbox: SandboxServer, proxy: PartnerFaultProxy, tmp_path: Path
) -> None:
    """Every healthy partner runs twice while the failing one's first run is still being
    retried; both schedulers follow partners; each listing at the venue is one run on its
    unit's record, never two in one interval; the failing partner ends failed on its own
    record, naming the 503, and no other record shows a failure."""
    config = sandbox.config
    settings = Settings(
        database_url=migrated_engine.url.render_as_string(hide_password=False),
        api_base_url=proxy.url,
        tenant=config.tenant,
        environment=config.environment,
        company=config.company,
        api_key=config.api_key,
        partner_ids=PARTNERS,
        webhook_client_states=[SecretStr("feed-schedulers-state-7a21")],
    )
    environment = otacm_environment(
        settings, OTACM_POLL_INTERVAL=str(INTERVAL), OTACM_FEED_WORKERS="2", OTACM_LOG_LEVEL="DEBUG"
    )
    sessions = make_sessions(migrated_engine, read_only=True)
    schedulers = [
        OtacmProcess(["scheduler"], environment, tmp_path / f"scheduler-{n}.log") for n in (1, 2)
    ]
    try:

        def healthy_twice() -> bool:
            runs = unit_runs(sessions)
            done = all(p in runs and runs[p].runs >= 2 for p in HEALTHY)
            return done or not all(s.alive() for s in schedulers)

        def failing_failed() -> bool:
            runs = unit_runs(sessions)
            failed = FAILING in runs and runs[FAILING].failures >= 1
            return failed or not all(s.alive() for s in schedulers)

        wait_until(healthy_twice, timeout=120, what="every healthy partner to run twice")
        during = unit_runs(sessions)[FAILING]
        wait_until(failing_failed, timeout=120, what="the failing partner's run to fail")
        assert all(scheduler.alive() for scheduler in schedulers)
    finally:
        codes = [scheduler.stop() for scheduler in schedulers]
        for scheduler in schedulers:
            sys.stderr.write(f"--- {scheduler.log.name} ---\n{scheduler.output()}\n")
    runs = unit_runs(sessions)

    assert codes == [0, 0]
    # A slow partner delays only itself: the others ran twice during its first run.
    assert (during.runs, during.finished_at) == (1, None)
    followed = [Counter(UNIT_RAN.findall(scheduler.output())) for scheduler in schedulers]
    assert all(followed), followed  # both schedulers followed partners
    for partner in HEALTHY:
        record = runs[partner]
        assert record.failures == 0 and record.last_error is None
        # Each listing is one run on the record, by one scheduler or the other...
        assert proxy.listings[partner] == record.runs == followed[0][partner] + followed[1][partner]
        # ...and none came within the same interval as the one before.
        gaps = [later - earlier for earlier, later in pairwise(proxy.listed_at[partner])]
        assert all(gap > INTERVAL / 2 for gap in gaps), gaps
    failing = runs[FAILING]
    assert failing.failures >= 1 and failing.last_error is not None
    assert "503" in failing.last_error and FAILING in failing.last_error
