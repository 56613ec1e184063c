"""Writing in short transactions beside SQLite's one write lock: how big each batch, and
how long to leave the lock free after it.

A long write (a ledger import, a reconciliation's results, pruning) goes in batches, each
its own transaction on a connection marked as bulk work
(:data:`storage.sqlite_writes.SQLITE_BULK_OPTION`), so a webhook's insert gets the lock
between them, before the next batch (:class:`storage.sqlite_writes.WriteLock`).
:func:`next_batch_size` sizes each batch from how long the previous one held the lock,
toward :data:`BATCH_SECONDS`; :data:`SQLITE_PAUSE` is how long to wait after it.
"""

from __future__ import annotations

from storage.sqlite_writes import SLOW_POLL_SECONDS

BATCH_SECONDS = 0.02
"""How long a write transaction should take: each batch's size is set from how long the
previous one took, so that on a loaded machine too a batch holds SQLite's write lock
for about this long. A webhook arriving during a batch waits for the rest of it, and
its answer should take less than 50 ms; a transaction's own cost (a commit to the WAL,
with ``synchronous=NORMAL`` no fsync) is far below it."""

MIN_BATCH_ROWS = 100
"""The fewest rows a batch takes however slow the machine (unless ``batch_size`` is
smaller): below that, each transaction's own cost would dominate."""

SQLITE_PAUSE = 2 * SLOW_POLL_SECONDS
"""How long bulk work leaves SQLite's write lock free after a batch. otacm's own writers
need no gap (they say they wait, and the next batch lets them first): this is for
another bulk writer, which tries the lock every 1 to 5 ms, and for clients outside
otacm, whose SQLite busy handler tries at its own pace."""


def next_batch_size(size: int, held: float, most: int) -> int:
    """The next batch's rows: ``size`` rows held the transaction ``held`` seconds.

    Scaled toward :data:`BATCH_SECONDS`, at most doubling at a time (one quick batch is
    no promise), within :data:`MIN_BATCH_ROWS` (or ``most`` if smaller) and ``most``.
    """
    wanted = size * BATCH_SECONDS / max(held, 1e-6)
    return max(min(most, MIN_BATCH_ROWS), min(most, 2 * size, int(wanted)))
