"""What ``bench/history`` runs otacm against: cached databases, the sandbox, otacm's roles.

- :class:`Cache`: built histories kept under ``--cache-dir`` and copied for each
  measurement (the measurements write: claims lease rows, the feed queues lookups, a
  reconciliation opens exceptions), so that every run starts from the same history and
  a re-run does not build it again. SQLite: one file per size. PostgreSQL: a server
  whose data directory lives in the cache (:func:`cached_postgresql`), a template
  database per size, copied with ``CREATE DATABASE ... TEMPLATE``.
- :func:`venue`: the sandbox (``sandbox.SandboxServer``) on a free loopback port,
  without its pickup cadence.
- :func:`otacm_settings` and :func:`otacm_environment`: otacm configured for that venue
  and the history's database, in this process and for its commands.
- :func:`role`: an ``otacm`` role (``web``, ``worker``) as a process of its own.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import sqlalchemy as sa
from bodies import CLIENT_STATE
from pydantic import SecretStr
from servers import BenchSetupError, free_port, wait_until_ready

from otacm.settings import Settings
from receiver.finance.auth import hash_password
from sandbox import Faults, SandboxConfig, SandboxServer
from storage.engine import make_engine
from storage.migrate import upgrade
from storage.testing import (
    PostgresqlError,
    PostgresqlMissing,
    PostgresqlServer,
    _run_as_server_user,
    _server_user_prefix,
    _start_server,
    postgresql_program,
)

REPOSITORY = Path(__file__).resolve().parents[2]
FINANCE_USER, FINANCE_PASSWORD = "bench", "bench-history-password"
CSRF_FIELD = 'name="csrf_token" value="'


# --- the cache -----------------------------------------------------------------------------


@contextmanager
def cached_postgresql(base: Path) -> Iterator[PostgresqlServer]:
    """A PostgreSQL server whose data directory is ``base/data``, made on first use.

    Production's durability (``fsync`` and synchronous commit on), room for gunicorn's
    pools; listening on a unix socket in ``base`` and a free loopback port; stopped
    (``-m fast``) when the block ends, its data kept.

    Raises:
        BenchSetupError: the server is not installed, or cannot be initialized or started.
    """
    try:
        initdb, pg_ctl = postgresql_program("initdb"), postgresql_program("pg_ctl")
        base.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(base, "postgres", "postgres")
        data = base / "data"
        if not (data / "PG_VERSION").exists():
            shutil.rmtree(data, ignore_errors=True)
            _run_as_server_user(base, initdb, "-D", str(data), "-U", "postgres", "-A", "trust",
                                "-E", "UTF8", "--no-instructions")  # fmt: skip
        port = free_port()
        options = f"-c listen_addresses=127.0.0.1 -p {port} -k {base} -c max_connections=200"
        if (data / "postmaster.pid").exists():
            # A run killed before its stop: its server may still run (pg_ctl starts it in
            # a session of its own). Stopped first; a file left by a dead one goes.
            subprocess.run(
                [*_server_user_prefix(), pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop"],
                capture_output=True,
                timeout=120,
                check=False,
            )
            (data / "postmaster.pid").unlink(missing_ok=True)
        _start_server(base, options)
    except PostgresqlMissing as exc:
        raise BenchSetupError(f"{exc}; or run --db sqlite") from exc
    except PostgresqlError as exc:
        raise BenchSetupError(str(exc)) from exc
    try:
        yield PostgresqlServer(directory=base, port=port, options=options)
    finally:
        subprocess.run(
            [*_server_user_prefix(), pg_ctl, "-D", str(data), "-m", "fast", "stop"],
            capture_output=True,
            timeout=120,
            check=False,
        )


@dataclass
class Cache:
    """Built histories of one database kind under ``directory``, and working copies of them."""

    kind: str
    directory: Path
    server: PostgresqlServer | None = None

    def _meta(self, size: int) -> Path:
        return self.directory / f"history_{size}.json"

    def _file(self, name: str) -> Path:
        return self.directory / f"{name}.sqlite3"

    def url(self, name: str) -> str:
        """The URL of database ``name`` (a file here, or a database on the server)."""
        if self.server is None:
            return f"sqlite:///{self._file(name)}"
        return self.server.database_url(name)

    def built(self, size: int, version: int) -> dict[str, object] | None:
        """The metadata of the history of ``size`` built by ``version``, if it is cached."""
        meta = self._meta(size)
        if not meta.exists():
            return None
        data = json.loads(meta.read_text())
        return data if data.get("version") == version and self._exists(f"history_{size}") else None

    def build(
        self, size: int, version: int, fill: Callable[[sa.Engine], dict[str, object]]
    ) -> dict[str, object]:
        """Build the history of ``size`` with ``fill`` into a new migrated database; cache it."""
        name = f"history_{size}"
        self._meta(size).unlink(missing_ok=True)
        self._drop(name)
        self._create(name)
        upgrade(self.url(name))
        engine = make_engine(self.url(name))
        try:
            data = {"version": version, **fill(engine)}
        finally:
            engine.dispose()
        self._meta(size).write_text(json.dumps(data, indent=1))
        return data

    @contextmanager
    def copy(self, size: int) -> Iterator[str]:
        """A working copy of the history of ``size``, migrated to the latest schema; its URL."""
        name = "history_work"
        self._drop(name)
        if self.server is None:
            shutil.copyfile(self._file(f"history_{size}"), self._file(name))
        else:
            self._admin(f"CREATE DATABASE {name} TEMPLATE history_{size}{self._strategy()}")
        try:
            upgrade(self.url(name))
            yield self.url(name)
        finally:
            self._drop(name)

    def _strategy(self) -> str:
        """How ``CREATE DATABASE`` copies: PostgreSQL 15's default writes every block of
        the template into the WAL (tens of gigabytes at 10M orders, through the default
        ``max_wal_size``'s checkpoints); ``FILE_COPY`` copies the files after one
        checkpoint, as every earlier version did."""
        assert self.server is not None
        engine = sa.create_engine(self.server.url, poolclass=sa.NullPool)
        try:
            with engine.connect() as connection:
                version = int(connection.exec_driver_sql("SHOW server_version_num").scalar_one())
        finally:
            engine.dispose()
        return " STRATEGY FILE_COPY" if version >= 150000 else ""

    def _exists(self, name: str) -> bool:
        if self.server is None:
            return self._file(name).exists()
        engine = sa.create_engine(self.server.url, poolclass=sa.NullPool)
        try:
            with engine.connect() as connection:
                query = sa.text("SELECT 1 FROM pg_database WHERE datname = :name")
                return connection.execute(query, {"name": name}).first() is not None
        finally:
            engine.dispose()

    def _create(self, name: str) -> None:
        if self.server is not None:
            self._admin(f"CREATE DATABASE {name}")

    def _drop(self, name: str) -> None:
        if self.server is None:
            for suffix in ("", "-wal", "-shm"):
                Path(f"{self._file(name)}{suffix}").unlink(missing_ok=True)
            shutil.rmtree(self.directory / f"{name}.sqlite3.locks", ignore_errors=True)
            return
        self._admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def _admin(self, statement: str) -> None:
        assert self.server is not None
        engine = sa.create_engine(
            self.server.url, isolation_level="AUTOCOMMIT", poolclass=sa.NullPool
        )
        try:
            with engine.connect() as connection:
                connection.exec_driver_sql(statement)
        finally:
            engine.dispose()


# --- the venue and otacm ---------------------------------------------------------------------


@contextmanager
def venue() -> Iterator[SandboxServer]:
    """The sandbox on a free loopback port; no pickup cadence (the benchmark ticks it)."""
    # werkzeug logs every request the sandbox serves; the benchmark prints its figures.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    config = SandboxConfig(pickup_interval=0, webhook_backoff=0.05, faults=Faults(seed=1))
    with SandboxServer(config) as server:
        yield server


def otacm_settings(url: str, server: SandboxServer, directory: Path) -> Settings:
    """otacm in this process: the history's database, the sandbox's venue, both partners."""
    from build import PARTNERS

    config = server.config
    return Settings(
        database_url=url,
        api_base_url=server.url,
        tenant=config.tenant,
        environment=config.environment,
        company=config.company,
        api_key=config.api_key,
        partner_ids=list(PARTNERS),
        webhook_client_states=[SecretStr(CLIENT_STATE)],
        secrets_dir=directory / "secrets",
    )


def otacm_environment(settings: Settings, directory: Path) -> dict[str, str]:
    """The same configuration for otacm's commands and roles, as ``OTACM_*`` variables."""
    environment = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("OTACM_") and name != "PROMETHEUS_MULTIPROC_DIR"
    }
    connection = settings.connections[0]
    environment.update(
        OTACM_DATABASE_URL=settings.database_url,
        OTACM_API_BASE_URL=settings.api_base_url,
        OTACM_TENANT=connection.tenant,
        OTACM_ENVIRONMENT=connection.environment,
        OTACM_COMPANY=connection.company,
        OTACM_API_KEY=connection.api_key.get_secret_value(),
        OTACM_PARTNER_IDS=",".join(connection.partner_ids),
        OTACM_WEBHOOK_CLIENT_STATES=CLIENT_STATE,
        OTACM_SECRETS_DIR=str(directory / "secrets"),
        OTACM_FINANCE_USERS=f"{FINANCE_USER}:{finance_hash()}",
        OTACM_LOG_LEVEL="WARNING",
        PYTHONPATH=str(REPOSITORY),
    )
    return environment


_HASH: list[str] = []


def finance_hash() -> str:
    """The finance user's password hash (scrypt is slow: made once)."""
    if not _HASH:
        _HASH.append(hash_password(FINANCE_PASSWORD))
    return _HASH[0]


OTACM = [sys.executable, "-m", "otacm"]


@contextmanager
def role(
    args: list[str], environment: dict[str, str], log: Path, *, capped: bool = False
) -> Iterator[subprocess.Popen[bytes]]:
    """``otacm ARGS`` running until the block ends; stopped with SIGTERM (then SIGKILL).

    ``capped``: each of its processes may use at most :data:`MEMORY_LIMIT`.
    """
    with log.open("ab") as output:
        process = subprocess.Popen(
            _capped([*OTACM, *args]) if capped else [*OTACM, *args],
            env=environment,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@contextmanager
def web(environment: dict[str, str], log: Path) -> Iterator[str]:
    """``otacm web`` (gunicorn, two workers, each capped to :data:`MEMORY_LIMIT`) on a free
    port, ready; its base URL."""
    port = free_port()
    args = ["web", "--bind", f"127.0.0.1:{port}", "--workers", "2"]
    with role(args, environment, log, capped=True) as process:
        wait_until_ready(f"http://127.0.0.1:{port}/readyz", process, log)
        yield f"http://127.0.0.1:{port}"


def signed_in(base: str) -> httpx.Client:
    """An HTTP client signed in to the finance pages at ``base``; the caller closes it.

    Raises:
        BenchSetupError: the sign-in was refused.
    """
    client = httpx.Client(base_url=base, timeout=600)
    page = client.get("/finance/sign-in").text
    start = page.find(CSRF_FIELD)
    if start < 0:
        raise BenchSetupError("the sign-in page has no CSRF token")
    token = page[start + len(CSRF_FIELD) :].split('"', 1)[0]
    answer = client.post(
        "/finance/sign-in",
        data={"name": FINANCE_USER, "password": FINANCE_PASSWORD, "csrf_token": token},
    )
    if answer.status_code != 302:
        raise BenchSetupError(f"finance sign-in answered {answer.status_code}")
    return client


MEMORY_LIMIT = 4 << 30
"""The address space each process of a capped command or role may take: the machine is
shared, and an export or a page that loads a million exceptions would take far more
(about 8.5 GiB before, for an XLSX of a million); beyond it the process fails."""


# Sets the limit, then becomes the command (same process id): no preexec_fn, which is
# unsafe in a process with threads (the sandbox's, the webhook prober's).
_CAP = (
    "import os, resource, sys; limit = int(sys.argv[1]); "
    "resource.setrlimit(resource.RLIMIT_AS, (limit, limit)); os.execv(sys.argv[2], sys.argv[2:])"
)


def _capped(command: list[str]) -> list[str]:
    """``command`` run with its address space limited to :data:`MEMORY_LIMIT`."""
    return [sys.executable, "-c", _CAP, str(MEMORY_LIMIT), *command]


def run_command(
    args: list[str],
    environment: dict[str, str],
    log: Path,
    *,
    timeout: float = 3600,
    capped: bool = False,
) -> tuple[int | None, float, int]:
    """Run ``otacm ARGS`` to its end, killed after ``timeout`` seconds; ``capped`` as in
    :func:`role`.

    Returns:
        Its exit status (``None`` when it was killed at the timeout), its wall seconds
        and its peak RSS in bytes.
    """
    started = time.perf_counter()
    with log.open("ab") as output:
        process = subprocess.Popen(
            _capped([*OTACM, *args]) if capped else [*OTACM, *args],
            env=environment,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    killed = False
    peak = 0
    while True:
        # The peak is the kernel's high-water mark of the command's own memory (VmHWM),
        # read as it runs. Not wait4's ru_maxrss: on Linux that starts from the memory of
        # the process it was forked from (this one, which may have worked on a big
        # history), carried across exec.
        peak = max(peak, _high_water_mark(process.pid))
        pid, status, _ = os.wait4(process.pid, os.WNOHANG)
        if pid:
            process.returncode = os.waitstatus_to_exitcode(status)
            code = None if killed else process.returncode
            return code, time.perf_counter() - started, peak
        if not killed and time.perf_counter() > started + timeout:
            process.kill()
            killed = True
        time.sleep(0.02)


def _high_water_mark(pid: int) -> int:
    """A running process's peak resident memory in bytes (0 once it is gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def utc_text(moment: dt.datetime) -> str:
    """A moment as the CLI's ``--from``/``--to`` take it."""
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S")
