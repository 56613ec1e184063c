"""The shop's ledger export, imported into :class:`~storage.models.LedgerLine`.

``otacm ledger import FILE`` reads the shop's sales (the file, its columns and the checks
of every row: :mod:`reconciler.ledger_file`) and upserts them by (connection, partner,
reference): a re-import updates a sale, never doubles it, and a row that says what the
ledger already says is not written at all (its ``updated_at`` stays).

The whole file is checked before anything is written. A file with bad rows changes
nothing, unless the caller asks to skip them (``skip_bad``); either way every bad row is
reported with its line number, column and reason (:class:`BadRow`). Problems of the file
itself are a :class:`LedgerFileError`.

The checked rows wait in a temporary table of the import's own connection (``COPY`` on
PostgreSQL; on SQLite a temporary table takes no lock on the database), and go into the
ledger in batches of about :data:`~storage.pacing.BATCH_SECONDS` each (at most
:data:`BATCH_SIZE` rows), each committed on its own: one
``INSERT … SELECT … ON CONFLICT DO UPDATE … WHERE <something differs>`` per batch, on
SQLite and PostgreSQL alike. So no write transaction holds SQLite's one write lock for
long (a webhook waits for one batch at most, not for the file), the driver never sees a
multi-row VALUES list (psycopg rewrites the placeholders of a statement of more than 50
on every call, which cost PostgreSQL's import more than its writes), and a million-line
export is never an ORM object per row.

An import that fails between batches (the database gone) keeps the batches it committed
and says so (:class:`ImportInterrupted`: the counts so far, and up to which line); one
whose process is killed keeps them too. Importing the file again is safe either way: the
stored sales are found unchanged, the others are written. Sales submitted through otacm
are in the ledger already: the import updates the shop's fields of those lines and
keeps their ``source`` (``submit``), ``request`` and ``shop_reference``.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from array import array
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker

from reconciler.ledger_file import (
    COLUMNS,
    BadRow,
    LedgerFileError,
    LedgerRow,
    ledger_format,
    read_ledger,
)
from storage.engine import SQLITE_BEGIN_OPTION, database_error_reason, driver_statements
from storage.models import LedgerLine, LedgerSource, VenueConnection, ensure_connection
from storage.pacing import SQLITE_PAUSE, next_batch_size
from storage.sqlite_writes import SQLITE_BULK_OPTION
from venue.values import reference_set_key

logger = logging.getLogger(__name__)

BATCH_SIZE = 5000
"""The most rows a write transaction takes; fewer when the machine is slow (see
:data:`storage.pacing.BATCH_SECONDS`)."""

FIRST_BATCH_ROWS = 500
"""The first batch's size, before any has been timed."""

STAGE_ROWS = 5000
"""Checked rows sent to the temporary table at once."""

KEEP_BAD = 1000
"""Bad rows an :class:`ImportResult` keeps; the rest are only counted."""

_TABLE: sa.Table = LedgerLine.__table__  # type: ignore[assignment]
# The shop's fields: what a re-import may change — every column but the sale's key.
# Not shop_reference (the spelling the sale was first recorded with; for a submitted
# sale, what the venue was sent), source, request or created_at.
_SHOP_FIELDS = tuple(column for column in COLUMNS if column not in ("partner_id", "reference"))
# Optional fields: a blank or absent value keeps what the ledger has, so an export that
# does not carry them never erases what a submission recorded.
_KEPT_WHEN_BLANK = frozenset({"payment_reference", "venue_reference", "external_reference_numbers"})
# The temporary table: the order of the good rows (``seq``, 1, 2...), the file's line of
# each, and the ledger's columns an import writes, as the ledger stores them.
_STAGE = "ledger_import_stage"
_STAGED = (
    "partner_id",
    "shop_reference",
    "reference_key",
    "sold_at",
    "quantity",
    "amount",
    "currency",
    "amount_includes_vat",
    "payment_reference",
    "venue_reference",
    "external_reference_numbers",
    "external_references_key",
    "state",
)
# A missing list is SQL NULL, not the JSON text 'null', so that COALESCE keeps the
# ledger's list.
_NUMBERS_TYPE = sa.JSON(none_as_null=True)


@dataclass(frozen=True)
class ImportResult:
    """What an import did.

    Attributes:
        inserted: new sales.
        updated: sales already in the ledger that the file changed.
        unchanged: sales already in the ledger as the file has them.
        bad: how many rows are bad.
        bad_rows: the first :data:`KEEP_BAD` of them, in file order.
        written: whether anything was written (``False`` when bad rows stopped it).
    """

    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    bad: int = 0
    bad_rows: tuple[BadRow, ...] = ()
    written: bool = False

    def to_json(self, limit: int | None = None) -> dict[str, Any]:
        """The counts and (the first ``limit``) bad rows for scripts."""
        shown = self.bad_rows if limit is None else self.bad_rows[:limit]
        return {
            "inserted": self.inserted,
            "updated": self.updated,
            "unchanged": self.unchanged,
            "bad": self.bad,
            "bad_rows": [row.to_json() for row in shown],
            "written": self.written,
        }


class ImportInterrupted(LedgerFileError):
    """The database failed part-way: some batches are stored, the rest of the file is not.

    A :class:`LedgerFileError` (the file could not be imported whole), whose message says
    what is stored and to import the file again, which is safe: the stored sales are then
    found unchanged.

    Attributes:
        result: what the committed batches stored (``written`` when any was), and every
            bad row of the file.
        stored_through: the file's last line whose sale is stored (0: none).
        reason: why the database failed, in a few secret-free words.
    """

    def __init__(self, result: ImportResult, stored_through: int, reason: str) -> None:
        self.result = result
        self.stored_through = stored_through
        self.reason = reason
        stored = (
            f"the sales up to line {stored_through} are stored ({result.inserted} inserted, "
            f"{result.updated} updated, {result.unchanged} unchanged), the rest are not"
            if result.written
            else "nothing was stored"
        )
        super().__init__(
            f"the import stopped: the database failed ({reason}); {stored}. Import the "
            "file again to finish: sales already stored are found unchanged"
        )


@dataclass
class _Counts:
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    bad: int = 0
    bad_rows: list[BadRow] = field(default_factory=list)
    written: bool = False

    def add_bad(self, row: BadRow) -> None:
        self.bad += 1
        if len(self.bad_rows) < KEEP_BAD:
            self.bad_rows.append(row)

    def result(self) -> ImportResult:
        return ImportResult(
            inserted=self.inserted,
            updated=self.updated,
            unchanged=self.unchanged,
            bad=self.bad,
            bad_rows=tuple(self.bad_rows),
            written=self.written,
        )


def import_ledger(
    sessions: sessionmaker[Session],
    path: Path,
    *,
    connection_id: int | None = None,
    connection_name: str | None = None,
    now: dt.datetime,
    fmt: str | None = None,
    skip_bad: bool = False,
    batch_size: int = BATCH_SIZE,
) -> ImportResult:
    """Import the shop's ledger file into the ledger of one venue connection.

    First every row is checked, and the good ones are set aside in a temporary table; at
    the first bad row (unless ``skip_bad``) nothing more is set aside, but the rest of
    the file is still checked so that every bad row is reported, and nothing is written.
    Then the good rows are upserted in file order, at most ``batch_size`` per transaction, by
    (connection, partner, reference key): new sales are inserted (source ``import``),
    changed ones updated (``updated_at`` = ``now``), unchanged ones left alone.

    Args:
        sessions: the session factory; the import owns its transactions.
        path: the ledger file.
        connection_id: the venue connection the sales belong to; or else
        connection_name: its name, for a connection that may not be stored yet: its
            row is then created in the first batch's transaction, so a refused file
            leaves nothing behind.
        now: the time of the import (aware): ``created_at``/``updated_at`` of what it
            writes.
        fmt: ``csv`` or ``jsonl``; by default from the extension.
        skip_bad: import the good rows even when some are bad.
        batch_size: the most rows per write transaction (each batch's size follows how
            long the previous one took: :data:`storage.pacing.BATCH_SECONDS`).

    Returns:
        The counts (all 0 when nothing was written), and the bad rows.

    Raises:
        LedgerFileError: the file cannot be read as a whole; nothing is written.
        ImportInterrupted: the database failed while writing; the batches before are
            stored, and the exception says what they stored.
        TypeError: neither or both of ``connection_id`` and ``connection_name`` given.
    """
    if (connection_id is None) == (connection_name is None):
        raise TypeError("import_ledger needs connection_id or connection_name, not both")
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    fmt = ledger_format(path, fmt)
    counts = _Counts()
    with sessions() as session:
        engine = cast(sa.Engine, session.get_bind())
    with engine.connect() as connection, _stage(connection) as stage:
        lines = stage.fill(read_ledger(path, fmt), counts, stop_at_bad=not skip_bad)
        if counts.bad and not skip_bad:
            logger.info("ledger file refused: %d bad row(s), nothing written", counts.bad)
            return counts.result()
        if connection_id is None and lines:
            # Most files are for a connection already stored: found without the write
            # lock, which the first batch then holds for its own rows only.
            with _begin(connection):
                connection_id = connection.scalar(
                    sa.select(VenueConnection.id).where(VenueConnection.name == connection_name)
                )
        upsert = _upsert_statement(connection.dialect.name)
        sqlite = connection.dialect.name == "sqlite"
        stored_through, first, size = 0, 0, min(batch_size, FIRST_BATCH_ROWS)
        while first < len(lines):
            batch = lines[first : first + size]
            started = time.monotonic()
            try:
                with _begin(connection, "IMMEDIATE"):
                    if connection_id is None:
                        with sessions(bind=connection) as joined:
                            connection_id = ensure_connection(joined, cast(str, connection_name))
                    _write_batch(connection, upsert, connection_id, first, len(batch), now, counts)
            except sa_exc.DBAPIError as exc:
                reason = database_error_reason(exc)
                logger.warning(
                    "ledger import stopped at line %d: %s; stored through line %d",
                    batch[0],
                    reason,
                    stored_through,
                )
                raise ImportInterrupted(counts.result(), stored_through, reason) from exc
            held = time.monotonic() - started
            counts.written = True
            stored_through = batch[-1]
            first += len(batch)
            size = next_batch_size(len(batch), held, batch_size)
            if sqlite and first < len(lines):
                # Let other writers in: they would miss a gap of microseconds.
                time.sleep(SQLITE_PAUSE)
    counts.written = True
    logger.info(
        "ledger imported: %d inserted, %d updated, %d unchanged, %d bad",
        counts.inserted,
        counts.updated,
        counts.unchanged,
        counts.bad,
    )
    return counts.result()


class _Stage:
    """The import's temporary table on its connection: the checked rows, in file order."""

    def __init__(self, connection: sa.Connection) -> None:
        self.connection = connection
        dialect = connection.dialect
        self.name = f"{'pg_temp' if dialect.name == 'postgresql' else 'temp'}.{_STAGE}"
        # (position in a row, the bind processor of its column) for the columns that
        # have one: applied by hand, as SQLAlchemy would, since the rows go to the driver.
        self._processors: list[tuple[int, Callable[[Any], Any]]] = [
            (position, process)
            for position, name in enumerate(_STAGED, start=2)
            if (process := _stage_type(name)._cached_bind_processor(dialect)) is not None
        ]

    def fill(
        self, items: Iterator[tuple[int, LedgerRow] | BadRow], counts: _Counts, *, stop_at_bad: bool
    ) -> array[int]:
        """Set every good row of ``items`` aside; count the bad ones in ``counts``.

        Returns:
            The file's line of each row set aside, in order (row ``n`` is ``seq`` n + 1).
        """
        lines = array("q")
        rows: list[list[Any]] = []
        for item in items:
            if isinstance(item, BadRow):
                counts.add_bad(item)
                continue
            if counts.bad and stop_at_bad:
                continue  # nothing will be written: only the bad rows still matter
            line, row = item
            lines.append(line)
            rows.append(self._row(len(lines), line, row))
            if len(rows) >= STAGE_ROWS:
                self._load(rows)
                rows = []
        if rows and not (counts.bad and stop_at_bad):
            self._load(rows)
        return lines

    def _row(self, seq: int, line: int, row: LedgerRow) -> list[Any]:
        numbers = row.external_reference_numbers
        values = [
            seq,
            line,
            row.partner_id,
            row.reference,
            row.reference_key,
            row.sold_at,
            row.quantity,
            row.amount,
            row.currency,
            row.amount_includes_vat,
            row.payment_reference,
            row.venue_reference,
            numbers,
            reference_set_key(numbers or ()),
            row.state,
        ]
        for position, process in self._processors:
            if values[position] is not None:
                values[position] = process(values[position])
        return values

    def _load(self, rows: list[list[Any]]) -> None:
        with _begin(self.connection), driver_statements(self.connection) as driver:
            driver.load(self.name, ("seq", "line", *_STAGED), rows)


def _begin(connection: sa.Connection, sqlite_mode: str = "DEFERRED") -> sa.RootTransaction:
    """A transaction of ``connection``; on SQLite begun in ``sqlite_mode``.

    The stage's own work is ``DEFERRED``: it writes only the connection's temporary
    table, so on SQLite it never takes (nor waits for) the database's write lock.
    """
    # Every batch is bulk work: a webhook waiting for SQLite's write lock goes first.
    connection.execution_options(**{SQLITE_BEGIN_OPTION: sqlite_mode, SQLITE_BULK_OPTION: True})
    return connection.begin()


def _stage_type(name: str) -> sa.types.TypeEngine[Any]:
    """The type of a column of the stage: the ledger's (so values are stored as there)."""
    return _NUMBERS_TYPE if name == "external_reference_numbers" else _TABLE.c[name].type


@contextmanager
def _stage(connection: sa.Connection) -> Iterator[_Stage]:
    """A new, empty temporary table on ``connection``; dropped when the block ends."""
    stage = _Stage(connection)
    dialect = connection.dialect
    columns = ", ".join(f"{name} {_stage_type(name).compile(dialect=dialect)}" for name in _STAGED)
    with _begin(connection):
        connection.exec_driver_sql(f"DROP TABLE IF EXISTS {stage.name}")
        connection.exec_driver_sql(
            f"CREATE TEMPORARY TABLE {_STAGE} "
            f"(seq INTEGER PRIMARY KEY, line INTEGER NOT NULL, {columns})"
        )
    try:
        yield stage
    finally:
        if not connection.closed and not connection.invalidated:
            try:
                if connection.in_transaction():
                    connection.rollback()
                with _begin(connection):
                    connection.exec_driver_sql(f"DROP TABLE IF EXISTS {stage.name}")
            except sa_exc.DBAPIError:
                # The connection is unusable: the pool discards it, and its temporary
                # table with it.
                logger.debug("the ledger import's temporary table was not dropped")


def _write_batch(
    connection: sa.Connection,
    upsert: Any,
    connection_id: int,
    first: int,
    size: int,
    now: dt.datetime,
    counts: _Counts,
) -> None:
    """Upsert the rows ``first + 1`` to ``first + size`` of the stage; count what it did."""
    params = {"connection_id": connection_id, "after": first, "upto": first + size, "now": now}
    if connection.dialect.name == "sqlite":
        # SQLite's upsert cannot say whether it inserted: count the batch's sales the
        # ledger has first (answered from the unique index). Each row written (inserted,
        # or updated because something differed) returns a row.
        existing = connection.execute(_EXISTING_SQLITE, params).scalar_one()
        changed = len(connection.execute(upsert, params).all())
        inserted = size - existing
    else:
        # Counted by the server: 2,000 rows need not travel to be counted.
        changed, inserted = connection.execute(upsert, params).one()
        existing = size - inserted
    counts.inserted += inserted
    counts.updated += changed - inserted
    counts.unchanged += existing - (changed - inserted)


_STAGE_TABLE = sa.table(_STAGE, sa.column("seq"), *(sa.column(name) for name in _STAGED))
_BATCH = sa.and_(
    _STAGE_TABLE.c.seq > sa.bindparam("after"), _STAGE_TABLE.c.seq <= sa.bindparam("upto")
)
_EXISTING_SQLITE = (
    sa.select(sa.func.count())
    .select_from(
        _STAGE_TABLE.join(
            _TABLE,
            sa.and_(
                _TABLE.c.connection_id == sa.bindparam("connection_id"),
                _TABLE.c.partner_id == _STAGE_TABLE.c.partner_id,
                _TABLE.c.reference_key == _STAGE_TABLE.c.reference_key,
            ),
        )
    )
    .where(_BATCH)
)


def _upsert_statement(dialect: str) -> Any:
    """``INSERT … SELECT <a batch of the stage> ON CONFLICT (connection_id, partner_id,
    reference_key) DO UPDATE``, and what it wrote.

    Only the shop's fields are set, and only when one of them differs, so an unchanged
    row is not written. Optional fields left blank keep the ledger's value. On SQLite
    the statement returns a row per row written; on PostgreSQL one row, the count of
    rows written and of those inserted.
    """
    if dialect == "postgresql":
        insert: postgresql.Insert | sqlite.Insert = postgresql.insert(_TABLE)
    elif dialect == "sqlite":
        insert = sqlite.insert(_TABLE)
    else:
        raise NotImplementedError(f"the ledger runs on SQLite or PostgreSQL, not {dialect}")
    now = sa.bindparam("now", type_=_TABLE.c.updated_at.type)
    source = sa.bindparam("source", LedgerSource.IMPORT, type_=_TABLE.c.source.type)
    rows = (
        sa.select(
            sa.bindparam("connection_id", type_=sa.Integer),
            *(_STAGE_TABLE.c[name] for name in _STAGED),
            source,
            now,
            now,
        )
        .where(_BATCH)
        .order_by(_STAGE_TABLE.c.seq)
    )
    insert = insert.from_select(
        ["connection_id", *_STAGED, "source", "created_at", "updated_at"], rows
    )
    excluded = insert.excluded
    new: dict[str, Any] = {}
    differs = []
    for name in _SHOP_FIELDS:
        value: Any = excluded[name]
        if name in _KEPT_WHEN_BLANK:
            value = sa.func.coalesce(value, _TABLE.c[name])
        new[name] = value
        old: Any = _TABLE.c[name]
        if name == "external_reference_numbers":
            # PostgreSQL's json has no equality; the same list serializes the same way.
            value, old = sa.cast(value, sa.Text), sa.cast(old, sa.Text)
        differs.append(value.is_distinct_from(old))
    # Derived from the list: kept with it, and never the reason a row is written.
    new["external_references_key"] = sa.func.coalesce(
        excluded.external_references_key, _TABLE.c.external_references_key
    )
    upsert = insert.on_conflict_do_update(
        index_elements=["connection_id", "partner_id", "reference_key"],
        set_={**new, "updated_at": excluded.updated_at},
        where=sa.or_(*differs),
    )
    if dialect == "sqlite":
        return upsert.returning(sa.literal_column("1"))
    # xmax is 0 on a row version this statement inserted (not one it updated).
    written = upsert.returning(sa.literal_column("xmax = 0", sa.Boolean).label("inserted")).cte(
        "written"
    )
    return sa.select(sa.func.count(), sa.func.count().filter(written.c.inserted))
