"""A scheduler stand-in for the coordination tests: a process that runs one job via ``run_job``.

``python -m tests.heartbeat.job_competitor URL DIRECTORY OWNER MODE``, run from the
repository's root. Every attempt is appended to ``DIRECTORY/OWNER.jsonl`` as one JSON
line: ``{"owner", "outcome", "start", "end"}`` (nanoseconds on the system-wide monotonic
clock; ``start``/``end`` are taken inside the job, so only while the lock is held).

Modes:
    ``share``: run the job (due every time: interval 0) in a loop until the file
        ``DIRECTORY/stop`` exists; the job lasts a few milliseconds.
    ``hold``: run the job once; inside it, insert a row into ``marker`` without
        committing, create ``DIRECTORY/OWNER.inside``, and block until killed.
"""

from __future__ import annotations

import datetime as dt
import json
import random
import sys
import time
from pathlib import Path

import sqlalchemy as sa

from heartbeat.coordination import ScheduledJob, run_job
from storage.engine import make_engine, make_sessions

JOB_NAME = "contested"

marker_metadata = sa.MetaData()
marker = sa.Table(
    "marker",
    marker_metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("owner", sa.String(100), nullable=False),
)
"""What a ``hold`` job writes and never commits."""


def main(url: str, directory: Path, owner: str, mode: str) -> None:
    """Compete for :data:`JOB_NAME` on the database at ``url`` (see the module docstring)."""
    engine = make_engine(url)
    sessions = make_sessions(engine)
    record = directory / f"{owner}.jsonl"
    times: dict[str, int] = {}

    def share(now: dt.datetime) -> None:
        times["start"] = time.monotonic_ns()
        time.sleep(random.uniform(0.002, 0.01))
        times["end"] = time.monotonic_ns()

    def hold(now: dt.datetime) -> None:
        times["start"] = time.monotonic_ns()
        with sessions.begin() as session:
            session.execute(marker.insert().values(owner=owner))
            session.flush()
            (directory / f"{owner}.inside").touch()
            while True:  # until SIGKILL: the transaction above is never committed
                time.sleep(1)

    job = ScheduledJob(JOB_NAME, 0.0, share if mode == "share" else hold)
    try:
        while True:
            times.clear()
            now = dt.datetime.now(dt.UTC)
            outcome, _ = run_job(engine, sessions, job, owner=owner, now=now)
            with record.open("a", encoding="utf-8") as out:
                out.write(json.dumps({"owner": owner, "outcome": str(outcome), **times}) + "\n")
            if mode != "share" or (directory / "stop").exists():
                break
            # Give the other competitors a chance at the lock between two attempts.
            time.sleep(random.uniform(0, 0.003))
    finally:
        engine.dispose()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), sys.argv[3], sys.argv[4])
