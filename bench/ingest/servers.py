"""What the ingest benchmark runs its load against, each started fresh in a temporary directory.

- :func:`postgresql_server`: a throwaway PostgreSQL server
  (:func:`storage.testing.throwaway_postgresql`, shared with the tests) with its default
  durability (``fsync`` and ``synchronous_commit`` on, as in production), listening on
  a unix socket in its directory and on a free loopback port.
- :class:`DatabaseFactory`: a new, empty database per server under test: a SQLite file,
  or a database on that PostgreSQL server.
- :func:`http_server`: a gunicorn process (``otacm web`` or the bare endpoint), started
  on a free loopback port, waited for until its readiness check answers 200, and
  stopped with SIGTERM (gunicorn's graceful stop) when done.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa

from storage.engine import make_engine
from storage.testing import (
    PostgresqlError,
    PostgresqlMissing,
    PostgresqlServer,
    throwaway_postgresql,
)
from storage.testing import free_port as free_port  # re-exported: __main__ takes it from here

READY_TIMEOUT = 60.0
"""Seconds a server may take to start and answer its readiness check."""


class BenchSetupError(RuntimeError):
    """Something the benchmark needs could not be started; the message says what."""


@contextmanager
def postgresql_server() -> Iterator[PostgresqlServer]:
    """A PostgreSQL server in a temporary directory, stopped and removed afterwards.

    :func:`storage.testing.throwaway_postgresql` with production's durability and room
    for every gunicorn worker's pool (``max_connections=200``).

    Raises:
        BenchSetupError: the server is not installed, or cannot be initialized or started.
    """
    with ExitStack() as stack:
        try:
            server = stack.enter_context(
                throwaway_postgresql(
                    durable=True, settings={"max_connections": "200"}, prefix="otacm-bench-pg-"
                )
            )
        except PostgresqlMissing as exc:
            raise BenchSetupError(f"{exc}; or run --db sqlite") from exc
        except PostgresqlError as exc:
            raise BenchSetupError(str(exc)) from exc
        yield server


@contextmanager
def server_for(kind: str) -> Iterator[PostgresqlServer | None]:
    """The PostgreSQL server for ``postgresql``; nothing for SQLite."""
    if kind == "postgresql":
        with postgresql_server() as server:
            yield server
    else:
        yield None


@dataclass
class DatabaseFactory:
    """New empty databases of one kind: SQLite files in ``directory``, or PostgreSQL ones."""

    kind: str
    directory: Path
    server: PostgresqlServer | None = None
    """The PostgreSQL server (kind ``postgresql``)."""

    @property
    def server_pid(self) -> int | None:
        """The process whose tree is the database server; ``None`` for SQLite (in-process)."""
        return None if self.server is None else self.server.pid

    def new(self, name: str) -> str:
        """The URL of a new, empty database called ``name``."""
        if self.kind == "sqlite":
            return f"sqlite:///{self.directory / f'{name}.sqlite3'}"
        if self.server is None:
            raise ValueError("a PostgreSQL database needs the server")
        admin = sa.create_engine(
            self.server.url, isolation_level="AUTOCOMMIT", poolclass=sa.NullPool
        )
        try:
            with admin.connect() as connection:
                connection.exec_driver_sql(f"CREATE DATABASE {name}")
        finally:
            admin.dispose()
        return sa.make_url(self.server.url).set(database=name).render_as_string(hide_password=False)


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds (user and system) used so far by process ``root`` and its descendants alive.

    Read from ``/proc``; a descendant that has exited is no longer counted, so compare
    two readings only across a span where the tree's processes live on (gunicorn's
    workers, PostgreSQL's pooled backends).
    """
    ticks = os.sysconf("SC_CLK_TCK")
    parents: dict[int, int] = {}
    used: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        # The command name may hold spaces and parentheses: the fields follow the last ")".
        fields = stat[stat.rindex(")") + 2 :].split()
        parents[int(entry.name)] = int(fields[1])
        used[int(entry.name)] = int(fields[11]) + int(fields[12])
    total = 0
    for pid, cpu in used.items():
        ancestor = pid
        while ancestor and ancestor != root:
            ancestor = parents.get(ancestor, 0)
        if ancestor == root:
            total += cpu
    return total / ticks


def count_rows(database_url: str, table: str) -> int:
    """How many rows ``table`` holds, through otacm's own engine settings."""
    engine = make_engine(database_url)
    try:
        with engine.connect() as connection:
            query = sa.select(sa.func.count()).select_from(sa.table(table))
            return int(connection.execute(query).scalar_one())
    finally:
        engine.dispose()


def wait_until_ready(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    """Poll ``url`` until it answers 200.

    Raises:
        BenchSetupError: the process exited, or it was not ready in time.
    """
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BenchSetupError(f"the server exited with {process.returncode}:\n{_tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:  # noqa: S310 (loopback)
                if answer.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.2)
    raise BenchSetupError(f"{url} did not answer 200 within {READY_TIMEOUT:.0f} s:\n{_tail(log)}")


@contextmanager
def http_server(
    command: Sequence[str], *, env: dict[str, str], port: int, ready_path: str, log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """Run a gunicorn ``command`` listening on ``port`` until the block ends.

    Its output goes to ``log``. It is ready when ``ready_path`` answers 200, and is
    stopped with SIGTERM, then SIGKILL if it has not exited within 30 seconds.
    """
    with log.open("ab") as output:
        process = subprocess.Popen(list(command), env=env, stdout=output, stderr=subprocess.STDOUT)
    try:
        wait_until_ready(f"http://127.0.0.1:{port}{ready_path}", process, log)
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def run_checked(command: Sequence[str], *, env: dict[str, str], log: Path) -> None:
    """Run a command to completion, its output appended to ``log``.

    Raises:
        BenchSetupError: it failed.
    """
    with log.open("ab") as output:
        done = subprocess.run(
            list(command),
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            check=False,
            timeout=300,
        )
    if done.returncode != 0:
        raise BenchSetupError(f"{' '.join(command)} failed ({done.returncode}):\n{_tail(log)}")


def _tail(log: Path, lines: int = 30) -> str:
    if not log.exists():
        return ""
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
