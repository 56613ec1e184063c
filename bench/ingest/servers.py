"""What the ingest benchmark runs its load against, each started fresh in a temporary directory.

- :func:`postgresql_server`: a throwaway PostgreSQL server (``initdb`` and ``pg_ctl``,
  run as the ``postgres`` system user when this runs as root) with its default
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
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa

from storage.engine import make_engine

READY_TIMEOUT = 60.0
"""Seconds a server may take to start and answer its readiness check."""


class BenchSetupError(RuntimeError):
    """Something the benchmark needs could not be started; the message says what."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def postgresql_program(name: str) -> str:
    """The path of a PostgreSQL server program (``initdb``, ``pg_ctl``).

    Raises:
        BenchSetupError: PostgreSQL's server is not installed.
    """
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(
        Path("/usr/lib/postgresql").glob(f"*/bin/{name}"),
        key=lambda path: int(path.parts[-3]) if path.parts[-3].isdigit() else 0,
    )
    if candidates:
        return str(candidates[-1])
    raise BenchSetupError(
        f"PostgreSQL's {name} is neither on PATH nor under /usr/lib/postgresql/*/bin: "
        "install the PostgreSQL server (apt-get install postgresql), or run --db sqlite"
    )


@dataclass(frozen=True)
class PostgresqlServer:
    """A running PostgreSQL server: the URL of its ``postgres`` database, its postmaster."""

    url: str
    pid: int


@contextmanager
def postgresql_server() -> Iterator[PostgresqlServer]:
    """A PostgreSQL server in a temporary directory, stopped and removed afterwards.

    Raises:
        BenchSetupError: the server cannot be initialized or started.
    """
    initdb, pg_ctl = postgresql_program("initdb"), postgresql_program("pg_ctl")
    # Outside any private temporary tree: the server (as ``postgres``) must reach it.
    base = Path(tempfile.mkdtemp(prefix="otacm-bench-pg-"))
    run_as: list[str] = []
    if os.geteuid() == 0:
        run_as = ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups"]
        shutil.chown(base, "postgres", "postgres")
    data, log = base / "data", base / "server.log"
    port = free_port()

    def run(*args: str) -> None:
        done = subprocess.run(
            [*run_as, *args], capture_output=True, text=True, timeout=120, check=False
        )
        if done.returncode != 0:
            server_log = log.read_text(errors="replace") if log.exists() else ""
            raise BenchSetupError(
                f"{Path(args[0]).name} failed ({done.returncode}):\n"
                f"{done.stdout}{done.stderr}{server_log}"
            )

    try:
        run(
            initdb,
            "-D",
            str(data),
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--no-instructions",
        )
        options = f"-c listen_addresses=127.0.0.1 -p {port} -k {base} -c max_connections=200"
        run(pg_ctl, "-D", str(data), "-l", str(log), "-w", "-t", "60", "-o", options, "start")
        pid = int((data / "postmaster.pid").read_text().split("\n", 1)[0])
        yield PostgresqlServer(
            f"postgresql+psycopg://postgres@/postgres?host={base}&port={port}", pid
        )
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run(
                [*run_as, pg_ctl, "-D", str(data), "-m", "fast", "stop"],
                capture_output=True,
                timeout=60,
                check=False,
            )
        shutil.rmtree(base, ignore_errors=True)


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
