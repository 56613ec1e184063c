"""A throwaway PostgreSQL server, for the tests and the benchmarks; never used in production.

:func:`throwaway_postgresql` runs ``initdb`` and ``pg_ctl`` in a new temporary directory
(as the ``postgres`` system user, through ``setpriv``, when this process is root: the
server refuses to run as root), serves on a unix socket in that directory and on a free
loopback port, with trust authentication for the ``postgres`` role, and stops the server
and removes the directory when the block ends. Its callers choose what differs between
them: the tests want speed (``durable=False``: no fsync, data thrown away at an immediate
stop), the benchmarks production's durability and their own server settings.

It lives in :mod:`storage` (beside :func:`storage.engine.make_engine`, whose URLs it
serves) because both ``tests/`` and ``bench/`` import the installed packages, while the
benchmarks run as scripts (``python bench/ingest``) that cannot import ``tests``.
Importing it starts nothing.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

# Generous: initdb and a first start on a loaded CI machine take seconds, not minutes.
COMMAND_TIMEOUT = 120
START_TIMEOUT = 60
"""Seconds ``pg_ctl start`` waits for the server to accept connections."""


class PostgresqlError(RuntimeError):
    """The throwaway server could not be initialized or started; the message says why."""


class PostgresqlMissing(PostgresqlError):
    """PostgreSQL's server programs are not installed."""


@dataclass(frozen=True)
class PostgresqlServer:
    """A running throwaway PostgreSQL server.

    Attributes:
        directory: its temporary directory: the data, the log and the socket.
        port: the loopback port it listens on.
        options: the server's command-line options (``pg_ctl -o``).
    """

    directory: Path
    port: int
    options: str

    @property
    def pid(self) -> int:
        """The postmaster's process id (its backends are its children)."""
        return int((self.directory / "data" / "postmaster.pid").read_text().split("\n", 1)[0])

    @property
    def url(self) -> str:
        """The URL of its ``postgres`` database, the one to create others from."""
        return self.database_url("postgres")

    def database_url(self, name: str) -> str:
        """The URL of database ``name`` on this server (which may not exist yet)."""
        return f"postgresql+psycopg://postgres@/{name}?host={self.directory}&port={self.port}"

    @contextmanager
    def stopped(self) -> Iterator[None]:
        """The server stopped as an administrator would (``-m fast``: every session is
        ended, clients find their connections closed), started again when the block ends.

        Raises:
            PostgresqlError: ``pg_ctl stop`` or ``start`` failed; with their output and the
                server's log.
        """
        pg_ctl, data = postgresql_program("pg_ctl"), str(self.directory / "data")
        _run_as_server_user(self.directory, pg_ctl, "-D", data, "-m", "fast", "-w", "stop")
        try:
            yield
        finally:
            _start_server(self.directory, self.options)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def postgresql_program(name: str) -> str:
    """The path of a PostgreSQL server program (``initdb``, ``pg_ctl``).

    On PATH, or else the newest version under Debian's ``/usr/lib/postgresql/*/bin``
    (Debian keeps the server programs off PATH).

    Raises:
        PostgresqlMissing: the PostgreSQL server is not installed.
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
    raise PostgresqlMissing(
        f"PostgreSQL's {name} is neither on PATH nor under /usr/lib/postgresql/*/bin: "
        "install the PostgreSQL server (scripts/ensure-postgresql, or apt-get install postgresql)"
    )


@contextmanager
def throwaway_postgresql(
    *,
    durable: bool = True,
    settings: Mapping[str, str] | None = None,
    prefix: str = "otacm-pg-",
    parent: Path | None = None,
) -> Iterator[PostgresqlServer]:
    """A PostgreSQL server in a new temporary directory, stopped and removed afterwards.

    Args:
        durable: ``True`` keeps PostgreSQL's defaults (fsync, full-page writes and
            synchronous commit on, as in production) and stops the server cleanly
            (``-m fast``). ``False`` turns all three off, skips initdb's sync and stops
            it with ``-m immediate``: nothing it holds outlives the block, so nothing
            needs to reach the disk.
        settings: further server settings (``{"max_connections": "200"}``), passed
            as ``-c name=value``.
        prefix: the temporary directory's name prefix, to tell whose server it is.
        parent: where to make that directory; the system's temporary directory when
            ``None``. The tests give a memory-backed one (``/dev/shm``): on a disk,
            ``CREATE DATABASE`` copies its files at a cost of tenths of a second, even
            with fsync off.

    Yields:
        The running server.

    Raises:
        PostgresqlMissing: the server programs are not installed.
        PostgresqlError: ``initdb`` or ``pg_ctl start`` failed; with their output and
            the server's log.
    """
    initdb, pg_ctl = postgresql_program("initdb"), postgresql_program("pg_ctl")
    # Not under a private temporary tree (pytest's tmp_path is the user's alone): the
    # server, as ``postgres``, must reach its own socket directory.
    base = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    if os.geteuid() == 0:
        shutil.chown(base, "postgres", "postgres")
    data = base / "data"
    port = free_port()

    run = partial(_run_as_server_user, base)
    option_list = [f"-c listen_addresses=127.0.0.1 -p {port} -k {base}"]
    if not durable:
        option_list.append("-F -c fsync=off -c full_page_writes=off -c synchronous_commit=off")
    option_list.extend(f"-c {name}={value}" for name, value in (settings or {}).items())
    options = " ".join(option_list)
    try:
        initdb_options = [] if durable else ["--no-sync"]
        run(initdb, "-D", str(data), "-U", "postgres", "-A", "trust", "-E", "UTF8",
            *initdb_options, "--no-instructions")  # fmt: skip
        _start_server(base, options)
        yield PostgresqlServer(directory=base, port=port, options=options)
    finally:
        if (data / "postmaster.pid").exists():
            stop_mode = "fast" if durable else "immediate"
            subprocess.run(
                [*_server_user_prefix(), pg_ctl, "-D", str(data), "-m", stop_mode, "stop"],
                capture_output=True,
                timeout=60,
                check=False,
            )
        shutil.rmtree(base, ignore_errors=True)


def _start_server(directory: Path, options: str) -> None:
    """``pg_ctl start`` the server in ``directory`` with ``options``, waiting until it serves."""
    _run_as_server_user(
        directory, postgresql_program("pg_ctl"), "-D", str(directory / "data"),
        "-l", str(directory / "server.log"), "-w", "-t", str(START_TIMEOUT), "-o", options, "start",
    )  # fmt: skip


def _server_user_prefix() -> list[str]:
    """What runs a command as ``postgres`` when this process is root (the server refuses
    to run as root)."""
    if os.geteuid() == 0:
        return ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups"]
    return []


def _run_as_server_user(directory: Path, *args: str) -> None:
    """Run a server program for the server in ``directory``; its output and log if it fails."""
    done = subprocess.run(
        [*_server_user_prefix(), *args],
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        check=False,
    )
    if done.returncode != 0:
        log = directory / "server.log"
        server_log = log.read_text(errors="replace") if log.exists() else ""
        raise PostgresqlError(
            f"{Path(args[0]).name} failed ({done.returncode}):\n"
            f"{done.stdout}{done.stderr}{server_log}"
        )
