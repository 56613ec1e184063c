"""PostgreSQL advisory lock keys: one home for how a name becomes a lock key.

Advisory locks lock a number, not a row, so they block only whoever asks for the same
number: the scheduler's job locks (:mod:`heartbeat.coordination`) and the one-run-at-a-
time lock of a connection's reconciliation (:mod:`reconciler.engine`) use them.
"""

from __future__ import annotations

import hashlib

_LOCK_NAMESPACE = "otacm:"


def advisory_lock_key(name: str) -> int:
    """The PostgreSQL advisory lock key of ``name``: a stable signed 64-bit integer.

    Derived from SHA-256 of ``"otacm:" + name``, so it is the same in every process and
    release, and unlikely to collide with another application's keys.
    """
    digest = hashlib.sha256((_LOCK_NAMESPACE + name).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big", signed=True)
