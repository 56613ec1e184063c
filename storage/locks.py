"""Locks that stand beside the data: PostgreSQL advisory lock keys, SQLite lock files.

Both lock a name, not a row, so they block only whoever asks for the same name: the
scheduler's job locks (:mod:`heartbeat.coordination`) and the one-run-at-a-time lock of
a connection's reconciliation (:mod:`reconciler.engine`) use them. On PostgreSQL the
name becomes a number (:func:`advisory_lock_key`); on SQLite a file in a directory
beside the database (:func:`default_lock_dir`).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import sqlalchemy as sa

_LOCK_NAMESPACE = "otacm:"


def advisory_lock_key(name: str) -> int:
    """The PostgreSQL advisory lock key of ``name``: a stable signed 64-bit integer.

    Derived from SHA-256 of ``"otacm:" + name``, so it is the same in every process and
    release, and unlikely to collide with another application's keys.
    """
    digest = hashlib.sha256((_LOCK_NAMESPACE + name).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def default_lock_dir(engine: sa.Engine) -> Path:
    """Where a SQLite database's file locks (its jobs', its runs') live: beside its file.

    ``<database file>.locks`` next to the database, so two databases in one directory
    do not share locks. An in-memory database belongs to one process, so its locks
    need only be private to that process: a temporary directory named after it.
    """
    database = engine.url.database or ""
    if database.startswith("file:"):
        # A URI filename (``?uri=true``): the path is before any query.
        database = database.removeprefix("file:").split("?", 1)[0]
    if database in ("", ":memory:") or "mode=memory" in str(engine.url):
        return Path(tempfile.gettempdir()) / f"otacm-locks-{os.getpid()}"
    path = Path(database).expanduser().resolve()
    return path.parent / f"{path.name}.locks"
