"""Fixtures shared by every test package, one layer each: environment → settings → engine.

Databases: ``engine`` is parametrized over SQLite and PostgreSQL (a real server started
once per session in a temporary directory, ``postgresql_url``) and gives an empty
database per test; ``migrated_engine`` has the schema; ``sessions`` is their session
factory. Layers further up (apps, the sandbox) live beside the tests that use them.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from storage.engine import make_engine, make_sessions
from storage.migrate import upgrade

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No test sees the developer's own OTACM_* configuration."""
    import os

    for name in list(os.environ):
        if name.startswith("OTACM_"):
            monkeypatch.delenv(name)
    yield


# --- databases ---------------------------------------------------------------------------


def _postgresql_program(name: str) -> str:
    """The path of a PostgreSQL server program; a loud failure naming what to install."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(
        Path("/usr/lib/postgresql").glob(f"*/bin/{name}"),
        key=lambda path: int(path.parts[-3]) if path.parts[-3].isdigit() else 0,
    )
    if candidates:
        return str(candidates[-1])
    pytest.fail(
        f"PostgreSQL's {name} is neither on PATH nor under /usr/lib/postgresql/*/bin: "
        "install the PostgreSQL server (e.g. apt-get install postgresql-15); "
        "the tests run on PostgreSQL as well as SQLite",
        pytrace=False,
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="session")
def postgresql_url() -> Iterator[str]:
    """A real PostgreSQL server in a temporary directory; yields the URL of a database on it.

    Trust authentication, a unix socket in the directory plus 127.0.0.1 on a free port,
    fsync off. As root, the server runs as the ``postgres`` system user.
    """
    initdb, pg_ctl = _postgresql_program("initdb"), _postgresql_program("pg_ctl")
    # Not under pytest's tmp_path: that tree is private to the user running pytest, and
    # the server (as ``postgres``) must reach its own socket directory.
    base = Path(tempfile.mkdtemp(prefix="otacm-pg-"))
    run_as: list[str] = []
    if os.geteuid() == 0:
        run_as = ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups"]
        shutil.chown(base, "postgres", "postgres")
    data, log = base / "data", base / "server.log"
    port = _free_port()

    def run(*args: str) -> None:
        done = subprocess.run(
            [*run_as, *args], capture_output=True, text=True, timeout=120, check=False
        )
        if done.returncode != 0:
            server_log = log.read_text(errors="replace") if log.exists() else ""
            pytest.fail(
                f"{Path(args[0]).name} failed ({done.returncode}):\n"
                f"{done.stdout}{done.stderr}{server_log}",
                pytrace=False,
            )

    try:
        run(initdb, "-D", str(data), "-U", "postgres", "-A", "trust", "-E", "UTF8",
            "--no-sync", "--no-instructions")  # fmt: skip
        options = (
            "-F -c fsync=off -c full_page_writes=off -c synchronous_commit=off "
            f"-c listen_addresses=127.0.0.1 -p {port} -k {base}"
        )
        run(pg_ctl, "-D", str(data), "-l", str(log), "-w", "-t", "60", "-o", options, "start")
        url = f"postgresql+psycopg://postgres@/otacm?host={base}&port={port}"
        _admin_statement(url, "CREATE DATABASE otacm", database="postgres")
        yield url
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run(
                [*run_as, pg_ctl, "-D", str(data), "-m", "immediate", "stop"],
                capture_output=True,
                timeout=60,
                check=False,
            )
        shutil.rmtree(base, ignore_errors=True)


def _admin_statement(url: str, statement: str, *, database: str) -> None:
    """Run a statement that cannot run in a transaction (CREATE/DROP DATABASE)."""
    admin = sa.create_engine(
        sa.make_url(url).set(database=database), isolation_level="AUTOCOMMIT", poolclass=sa.NullPool
    )
    try:
        with admin.connect() as connection:
            connection.exec_driver_sql(statement)
    finally:
        admin.dispose()


@contextmanager
def _empty_database(request: pytest.FixtureRequest, backend: str, tmp_path: Path) -> Iterator[str]:
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'otacm.sqlite3'}"
        return
    server_url: str = request.getfixturevalue("postgresql_url")
    name = f"test_{uuid.uuid4().hex[:12]}"
    _admin_statement(server_url, f"CREATE DATABASE {name}", database="otacm")
    try:
        yield sa.make_url(server_url).set(database=name).render_as_string(hide_password=False)
    finally:
        _admin_statement(server_url, f"DROP DATABASE {name} WITH (FORCE)", database="otacm")


@pytest.fixture(
    params=[
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgresql", id="postgresql", marks=pytest.mark.postgresql),
    ]
)
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[sa.Engine]:
    """An engine from ``make_engine`` on a new, empty database: SQLite, then PostgreSQL."""
    with _empty_database(request, request.param, tmp_path) as url:
        engine = make_engine(url)
        try:
            yield engine
        finally:
            engine.dispose()


@pytest.fixture
def migrated_engine(engine: sa.Engine) -> sa.Engine:
    """The ``engine`` database upgraded to the latest schema."""
    upgrade(engine)
    return engine


@pytest.fixture
def sessions(migrated_engine: sa.Engine) -> sessionmaker[Session]:
    """The session factory on the migrated database."""
    return make_sessions(migrated_engine)
