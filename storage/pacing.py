"""Writing in short transactions beside SQLite's one write lock: how big each batch, and
how long to leave the lock free after it.

A long write (a ledger import, a reconciliation's results, pruning) goes in batches, each
its own transaction, so a webhook's insert gets the lock between them.
:func:`next_batch_size` sizes each batch from how long the previous one held the lock,
toward :data:`BATCH_SECONDS`; :func:`sqlite_pause` is how long to wait after it.
"""

from __future__ import annotations

BATCH_SECONDS = 0.05
"""How long a write transaction should take: each batch's size is set from how long the
previous one took, so that on a loaded machine too a batch holds SQLite's write lock
for about this long (``bench/ledger_import`` measured 2,000-row batches at 40-100 ms on
this 2-core machine, and up to 306 ms when seven people shared it), far from the
200 ms a webhook beside the import may wait."""

MIN_BATCH_ROWS = 100
"""The fewest rows a batch takes however slow the machine (unless ``batch_size`` is
smaller): below that, each transaction's own cost would dominate."""

SQLITE_BUSY_SLEEPS = (0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.025, 0.025, 0.025, 0.05, 0.05)
"""How a writer waits for SQLite's write lock (its default busy handler, which every
connection of otacm uses through its busy timeout): it tries, then sleeps these many
seconds between tries, then 0.1 s at a time."""


def next_batch_size(size: int, held: float, most: int) -> int:
    """The next batch's rows: ``size`` rows held the transaction ``held`` seconds.

    Scaled toward :data:`BATCH_SECONDS`, at most doubling at a time (one quick batch is
    no promise), within :data:`MIN_BATCH_ROWS` (or ``most`` if smaller) and ``most``.
    """
    wanted = size * BATCH_SECONDS / max(held, 1e-6)
    return max(min(most, MIN_BATCH_ROWS), min(most, 2 * size, int(wanted)))


def sqlite_pause(held: float) -> float:
    """How long to leave SQLite's write lock free after a batch held it ``held`` seconds.

    As long as the sleep of a writer that began waiting when the batch began (the
    longest any waiter is in: the sleeps grow with the wait), so that every waiter tries
    again while the lock is free: about 20 ms after a batch of 50 ms.
    """
    waited = 0.0
    for sleep in SQLITE_BUSY_SLEEPS:
        waited += sleep
        if waited > held:
            return sleep
    return 0.1
