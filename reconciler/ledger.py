"""The shop's ledger export, imported: CSV or JSON lines into :class:`~storage.models.LedgerLine`.

``otacm ledger import FILE`` reads the shop's sales (columns in :data:`COLUMNS`, described
for the shop's developers in ``docs/ledger-format.md``), checks every row
(:class:`LedgerRow`), and upserts them by (connection, partner, reference): a re-import
updates a sale, never doubles it, and a row that says what the ledger already says is
not written at all (its ``updated_at`` stays).

Every row is checked before the import is committed. A file with bad rows changes
nothing, unless the caller asks to skip them (``skip_bad``); either way every bad row is
reported with its line number, column and reason (:class:`BadRow`). Problems of the file
itself (unknown or missing columns in a CSV header, not UTF-8, an unknown format) are a
:class:`LedgerFileError`.

Writes are set-based: ``INSERT … ON CONFLICT DO UPDATE … WHERE <something differs>`` in
chunks of :data:`CHUNK_SIZE` rows, on SQLite and PostgreSQL alike, so a million-line
export is one pass that checks and writes, never an ORM object per row. Sales
submitted through otacm are in the ledger already: the import updates the shop's fields
of those lines and keeps their ``source`` (``submit``), ``request`` and ``shop_reference``.
"""

from __future__ import annotations

import codecs
import csv
import datetime as dt
import difflib
import json
import logging
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, cast

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker

from storage.flush import INTEGER_MAX
from storage.models import LedgerLine, LedgerSource, LedgerState, ensure_connection
from storage.types import MONEY_MAX, MONEY_PLACES, text_problem
from venue.values import normalize_reference, reference_set_key

logger = logging.getLogger(__name__)

COLUMNS = (
    "partner_id",
    "reference",
    "sold_at",
    "quantity",
    "amount",
    "currency",
    "amount_includes_vat",
    "payment_reference",
    "venue_reference",
    "external_reference_numbers",
    "state",
)
"""The ledger's columns: the CSV header and the JSON keys, in the documented order."""

REQUIRED_COLUMNS = ("partner_id", "reference", "sold_at", "quantity", "amount", "currency")
"""Columns every row must give; the others have defaults (see :class:`LedgerRow`)."""

FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
"""A file's format by its extension; anything else needs the format named."""

CHUNK_SIZE = 5000
"""Rows per upsert statement batch."""

REFERENCE_MAX_CHARS = 50
"""The venue's width of a reference; longer text would not match it."""

_TABLE: sa.Table = LedgerLine.__table__  # type: ignore[assignment]
_AMOUNT = re.compile(r"\d+(\.\d+)?", re.ASCII)
# The width of the reference's upper-cased form: a few characters grow when upper-cased
# ("ß" is "SS"), so a reference within REFERENCE_MAX_CHARS may still not fit it.
_REFERENCE_KEY_MAX = cast(int, cast(sa.String, _TABLE.c.reference_key.type).length)
_CURRENCY = re.compile(r"[A-Za-z]{3}")
_TRUE = frozenset({"true", "1", "yes"})
_FALSE = frozenset({"false", "0", "no"})
# The shop's fields: what a re-import may change — every column but the sale's key.
# Not shop_reference (the spelling the sale was first recorded with; for a submitted
# sale, what the venue was sent), source, request or created_at.
_SHOP_FIELDS = tuple(column for column in COLUMNS if column not in ("partner_id", "reference"))
# Optional fields: a blank or absent value keeps what the ledger has, so an export that
# does not carry them never erases what a submission recorded.
_KEPT_WHEN_BLANK = frozenset({"payment_reference", "venue_reference", "external_reference_numbers"})


class LedgerFileError(ValueError):
    """The file as a whole cannot be imported (its format, encoding or columns)."""


@dataclass(frozen=True, slots=True)
class BadRow:
    """A row that cannot be imported.

    Attributes:
        line: the line of the file the row starts on (1 is a CSV's header).
        column: the column at fault, or ``None`` when it is the row as a whole.
        reason: what is wrong, for a person to fix.
    """

    line: int
    column: str | None
    reason: str

    def describe(self) -> str:
        """One line: ``line 12, sold_at: …``."""
        where = f"line {self.line}" + (f", {self.column}" if self.column else "")
        return f"{where}: {self.reason}"

    def to_json(self) -> dict[str, Any]:
        """The bad row for scripts."""
        return {"line": self.line, "column": self.column, "reason": self.reason}


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


KEEP_BAD = 1000
"""Bad rows an :class:`ImportResult` keeps; the rest are only counted."""


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _text(value: Any, width: int | None = REFERENCE_MAX_CHARS) -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be text, not {type(value).__name__}")
    text = value.strip()
    problem = text_problem(text, width)
    if problem is not None:
        raise ValueError(problem)
    return text


def _short(value: Any) -> str:
    """A value of the file quoted in a reason: its ``repr`` (escaped), cut to 60 characters."""
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


def _printable(name: str) -> str:
    """A key of the file as it can be shown: escaped if it holds unprintable characters."""
    return name if name.isprintable() else ascii(name)


class LedgerRow(BaseModel):
    """One sale of the shop's export, checked. Blank values count as absent.

    Amounts are exact decimals (no exponent, at most six places, not negative); times
    carry their offset (``Z`` or ``+01:00``; a naive time is refused) and are kept in UTC;
    references are trimmed (``reference_key`` is the venue's upper-cased form).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    partner_id: str
    reference: str
    sold_at: dt.datetime
    quantity: int
    amount: Decimal
    currency: str
    amount_includes_vat: bool = True
    payment_reference: str | None = None
    venue_reference: str | None = None
    external_reference_numbers: list[str] | None = None
    state: LedgerState = LedgerState.ACTIVE

    @property
    def reference_key(self) -> str:
        """The reference in the venue's form: what "the same sale" means."""
        return normalize_reference(self.reference)

    @field_validator("partner_id", mode="before")
    @classmethod
    def _guid(cls, value: Any) -> str:
        # The venue writes GUIDs lowercase without braces; so do the ledger and the mirror.
        text = _text(value).strip("{}").lower()
        if not re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", text):
            raise ValueError(f"{text!r} is not a GUID")
        return text

    @field_validator("reference", mode="before")
    @classmethod
    def _reference(cls, value: Any) -> str:
        text = _text(value)
        if len(normalize_reference(text)) > _REFERENCE_KEY_MAX:
            raise ValueError(f"is longer than {_REFERENCE_KEY_MAX} characters in upper case")
        return text

    @field_validator("payment_reference", "venue_reference", mode="before")
    @classmethod
    def _optional_reference(cls, value: Any) -> str | None:
        return None if _blank(value) else _text(value)

    @field_validator("sold_at", mode="before")
    @classmethod
    def _aware_time(cls, value: Any) -> dt.datetime:
        if not isinstance(value, str):
            raise ValueError("must be an ISO 8601 time as text")
        try:
            moment = dt.datetime.fromisoformat(value.strip())
        except ValueError:
            raise ValueError(f"{_short(value)} is not an ISO 8601 time") from None
        if moment.utcoffset() is None:
            raise ValueError(f"{_short(value)} has no offset: add Z or +HH:MM")
        try:
            return moment.astimezone(dt.UTC)
        except OverflowError:
            # Within a day of year 1 or 9999, the offset takes it past what a time holds.
            raise ValueError(f"{_short(value)} is out of range in UTC") from None

    @field_validator("quantity", mode="before")
    @classmethod
    def _count(cls, value: Any) -> int:
        digits = value.strip() if isinstance(value, str) else None
        if digits is not None and digits.isascii() and digits.isdigit():
            # Long texts of digits are too many tickets whatever they say; not parsed.
            value = int(digits) if len(digits) <= len(str(INTEGER_MAX)) else INTEGER_MAX + 1
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            if value > INTEGER_MAX:
                raise ValueError(f"more than {INTEGER_MAX} tickets")
            return value
        raise ValueError(f"{_short(value)} is not a whole number of tickets (0 or more)")

    @field_validator("amount", mode="before")
    @classmethod
    def _money(cls, value: Any) -> Decimal:
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        elif isinstance(value, Decimal):
            # A JSON number, parsed exactly; written back as the file wrote it.
            value = str(value)
        if not isinstance(value, str) or not _AMOUNT.fullmatch(value.strip()):
            raise ValueError(
                f"{_short(value)} is not an amount: digits with an optional decimal point "
                "(no sign, exponent or thousands separator)"
            )
        amount = Decimal(value.strip())
        exponent = amount.as_tuple().exponent
        if isinstance(exponent, int) and -exponent > MONEY_PLACES:
            raise ValueError(f"{_short(value)} has more than {MONEY_PLACES} decimal places")
        if amount > MONEY_MAX:
            raise ValueError(f"{_short(value)} is more than the largest amount, {MONEY_MAX}")
        return amount

    @field_validator("currency", mode="before")
    @classmethod
    def _currency(cls, value: Any) -> str:
        if not isinstance(value, str) or not _CURRENCY.fullmatch(value.strip()):
            raise ValueError(f"{_short(value)} is not an ISO 4217 code (three letters)")
        return value.strip().upper()

    @field_validator("amount_includes_vat", mode="before")
    @classmethod
    def _flag(cls, value: Any) -> bool:
        if _blank(value):
            return True
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise ValueError(f"{_short(value)} is not one of true/false, 1/0, yes/no")

    @field_validator("external_reference_numbers", mode="before")
    @classmethod
    def _numbers(cls, value: Any) -> list[str] | None:
        if _blank(value):
            return None
        if isinstance(value, str):
            value = value.split(";")
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise ValueError("must be a list of texts (in CSV: separated by ';')")
        numbers = [_text(item, width=None) for item in value if item.strip()]
        return numbers or None

    @field_validator("state", mode="before")
    @classmethod
    def _state(cls, value: Any) -> LedgerState:
        if _blank(value):
            return LedgerState.ACTIVE
        text = value.strip().lower() if isinstance(value, str) else value
        try:
            return LedgerState(text)
        except ValueError:
            allowed = ", ".join(state.value for state in LedgerState)
            raise ValueError(f"{_short(value)} is not one of {allowed}") from None


def ledger_format(path: Path, fmt: str | None = None) -> str:
    """The format of ``path``: ``fmt`` when given, else from the extension.

    Raises:
        LedgerFileError: ``fmt`` is unknown, or none was given and the extension says
            nothing.
    """
    if fmt is not None:
        if fmt not in FORMATS.values():
            raise LedgerFileError(f"unknown format {fmt!r}: csv or jsonl")
        return fmt
    found = FORMATS.get(path.suffix.lower())
    if found is None:
        raise LedgerFileError(
            f"cannot tell the format of {path.name} from its extension "
            "(.csv, .jsonl, .ndjson): name it with --format csv|jsonl"
        )
    return found


def read_ledger(path: Path, fmt: str | None = None) -> Iterator[tuple[int, LedgerRow] | BadRow]:
    """Every row of the file, checked, in file order: ``(line, row)`` or a :class:`BadRow`.

    Blank lines are skipped. The second row with a (partner, reference) the file already
    had (references compare case-insensitively) is bad, naming the first one's line.

    Args:
        path: the ledger file.
        fmt: ``csv`` or ``jsonl``; by default from the extension.

    Raises:
        LedgerFileError: the file cannot be read as a whole (see the module docstring).
    """
    fmt = ledger_format(path, fmt)
    records = _csv_records(path) if fmt == "csv" else _jsonl_records(path)
    seen: dict[str, int] = {}
    for line, record in records:
        if isinstance(record, BadRow):
            yield record
            continue
        checked = _check(line, record)
        if isinstance(checked, BadRow):
            yield checked
            continue
        key = f"{checked.partner_id} {checked.reference_key}"
        first = seen.setdefault(key, line)
        if first != line:
            yield BadRow(line, "reference", f"{checked.reference!r} is also on line {first}")
            continue
        yield line, checked


def _check(line: int, record: Mapping[str, Any]) -> LedgerRow | BadRow:
    present = {
        key: value
        for key, value in record.items()
        if value is not None and (not isinstance(value, str) or value.strip())
    }
    # Unknown keys are judged here, after the known ones (the documented order puts them
    # last): pydantic cannot even name a key that is not valid text (a lone surrogate).
    unknown = [key for key in present if key not in COLUMNS]
    try:
        row = LedgerRow.model_validate({key: present[key] for key in COLUMNS if key in present})
    except ValidationError as exc:
        # One reason per row: the first column at fault, in the documented order.
        errors = sorted(exc.errors(), key=lambda e: _column_order(str(e["loc"][0])))
        error = errors[0]
        column = str(error["loc"][0]) if error["loc"] else None
        if error["type"] == "missing":
            reason = "required, but blank or absent"
        else:
            reason = str(error["msg"]).removeprefix("Value error, ")
        return BadRow(line, column, reason)
    if unknown:
        column = str(unknown[0])
        return BadRow(line, _printable(column), f"unknown column{_suggestion(column)}")
    return row


def _column_order(column: str) -> int:
    return COLUMNS.index(column) if column in COLUMNS else len(COLUMNS)


def _suggestion(column: str) -> str:
    close = difflib.get_close_matches(column, COLUMNS, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _csv_records(path: Path) -> Iterator[tuple[int, Mapping[str, Any] | BadRow]]:
    try:
        with path.open(encoding="utf-8-sig", newline="") as stream:
            reader = csv.reader(stream)
            header = next(reader, None)
            if header is None:
                raise LedgerFileError(f"{path.name} is empty: it needs a header line")
            columns = _check_header([name.strip() for name in header])
            previous_end = reader.line_num
            for fields in reader:
                line, previous_end = previous_end + 1, reader.line_num
                if not any(value.strip() for value in fields):
                    continue
                if len(fields) != len(columns):
                    reason = f"{len(fields)} fields, the header has {len(columns)}"
                    yield line, BadRow(line, None, reason)
                    continue
                yield line, dict(zip(columns, fields, strict=True))
    except UnicodeDecodeError as exc:
        raise LedgerFileError(
            f"{path.name} is not UTF-8 (byte {exc.start} of a read block): export it as UTF-8"
        ) from None
    except csv.Error as exc:
        raise LedgerFileError(f"{path.name} is not valid CSV: {exc}") from None


def _check_header(columns: Sequence[str]) -> Sequence[str]:
    unknown = [name for name in columns if name not in COLUMNS]
    if unknown:
        named = ", ".join(f"{name!r}{_suggestion(name)}" for name in unknown)
        raise LedgerFileError(f"unknown column(s) {named}; the columns are {', '.join(COLUMNS)}")
    doubled = sorted({name for name in columns if columns.count(name) > 1})
    if doubled:
        raise LedgerFileError(f"column(s) given twice: {', '.join(doubled)}")
    missing = [name for name in REQUIRED_COLUMNS if name not in columns]
    if missing:
        raise LedgerFileError(f"required column(s) missing from the header: {', '.join(missing)}")
    return columns


def _jsonl_records(path: Path) -> Iterator[tuple[int, Mapping[str, Any] | BadRow]]:
    decode = codecs.getincrementaldecoder("utf-8")
    with path.open("rb") as stream:
        for line, raw in enumerate(stream, start=1):
            try:
                text = decode().decode(raw, final=True)
            except UnicodeDecodeError:
                yield line, BadRow(line, None, "not UTF-8")
                continue
            if line == 1:
                text = text.removeprefix("\ufeff")
            if not text.strip():
                continue
            try:
                # Numbers as Decimal: a JSON 12.30 is the amount 12.30, not a float.
                record = json.loads(text, parse_float=Decimal)
            except ValueError as exc:
                yield line, BadRow(line, None, f"not JSON: {exc}")
                continue
            except RecursionError:
                yield line, BadRow(line, None, "not a ledger row: JSON nested too deeply")
                continue
            if not isinstance(record, dict):
                yield line, BadRow(line, None, "not a JSON object")
                continue
            yield line, record


@dataclass
class _Counts:
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    bad: int = 0
    bad_rows: list[BadRow] = field(default_factory=list)

    def add_bad(self, row: BadRow) -> None:
        self.bad += 1
        if len(self.bad_rows) < KEEP_BAD:
            self.bad_rows.append(row)


def import_ledger(
    sessions: sessionmaker[Session],
    path: Path,
    *,
    connection_id: int | None = None,
    connection_name: str | None = None,
    now: dt.datetime,
    fmt: str | None = None,
    skip_bad: bool = False,
    chunk_size: int = CHUNK_SIZE,
) -> ImportResult:
    """Import the shop's ledger file into the ledger of one venue connection.

    One transaction: every row is checked, and the good ones are upserted as they come,
    by (connection, partner, reference key): new sales are inserted (source
    ``import``), changed ones updated (``updated_at`` = ``now``), unchanged ones left
    alone. At the first bad row (unless ``skip_bad``) writing stops, the rest of the file
    is still checked so that every bad row is reported, and the transaction is rolled
    back: nothing of the file is kept. One pass over the file, not two, because a good
    file (the usual case) then costs one read and one check per row.

    Args:
        sessions: the session factory; the import owns its transaction.
        path: the ledger file.
        connection_id: the venue connection the sales belong to; or else
        connection_name: its name, for a connection that may not be stored yet: its
            row is then created in the import's transaction, so a refused file leaves
            nothing behind.
        now: the time of the import (aware): ``created_at``/``updated_at`` of what it
            writes.
        fmt: ``csv`` or ``jsonl``; by default from the extension.
        skip_bad: import the good rows even when some are bad.
        chunk_size: rows per upsert batch.

    Returns:
        The counts (all 0 when nothing was written), and the bad rows.

    Raises:
        LedgerFileError: the file cannot be read as a whole; nothing is written.
        TypeError: neither or both of ``connection_id`` and ``connection_name`` given.
    """
    if (connection_id is None) == (connection_name is None):
        raise TypeError("import_ledger needs connection_id or connection_name, not both")
    fmt = ledger_format(path, fmt)
    counts = _Counts()
    with sessions() as session:
        if connection_id is None:
            connection_id = ensure_connection(session, cast(str, connection_name))
        chunk: list[LedgerRow] = []
        for item in read_ledger(path, fmt):
            if isinstance(item, BadRow):
                counts.add_bad(item)
                if not skip_bad:
                    chunk = []  # no more writes: this transaction will be rolled back
                continue
            if counts.bad and not skip_bad:
                continue
            chunk.append(item[1])
            if len(chunk) >= chunk_size:
                _upsert(session, connection_id, chunk, now, counts)
                chunk = []
        if counts.bad and not skip_bad:
            session.rollback()
            logger.info("ledger file refused: %d bad row(s), nothing written", counts.bad)
            return ImportResult(bad=counts.bad, bad_rows=tuple(counts.bad_rows))
        if chunk:
            _upsert(session, connection_id, chunk, now, counts)
        session.commit()
    logger.info(
        "ledger imported: %d inserted, %d updated, %d unchanged, %d bad",
        counts.inserted,
        counts.updated,
        counts.unchanged,
        counts.bad,
    )
    return ImportResult(
        inserted=counts.inserted,
        updated=counts.updated,
        unchanged=counts.unchanged,
        bad=counts.bad,
        bad_rows=tuple(counts.bad_rows),
        written=True,
    )


def _upsert(
    session: Session,
    connection_id: int,
    rows: Sequence[LedgerRow],
    now: dt.datetime,
    counts: _Counts,
) -> None:
    """Upsert one chunk; count what it inserted, updated and left alone."""
    dialect = session.get_bind().dialect.name
    existing = 0
    if dialect == "sqlite":
        # SQLite's upsert cannot say whether it inserted: count the chunk's sales the
        # ledger has first (plain IN lists, answered from the unique index).
        pairs = {(row.partner_id, row.reference_key) for row in rows}
        found = session.execute(
            sa.select(_TABLE.c.partner_id, _TABLE.c.reference_key).where(
                _TABLE.c.connection_id == connection_id,
                _TABLE.c.partner_id.in_({partner for partner, _ in pairs}),
                _TABLE.c.reference_key.in_({key for _, key in pairs}),
            )
        )
        existing = sum(1 for pair in found if tuple(pair) in pairs)
    params = [
        {
            "connection_id": connection_id,
            "partner_id": row.partner_id,
            "shop_reference": row.reference,
            "reference_key": row.reference_key,
            "sold_at": row.sold_at,
            "quantity": row.quantity,
            "amount": row.amount,
            "currency": row.currency,
            "amount_includes_vat": row.amount_includes_vat,
            "payment_reference": row.payment_reference,
            "venue_reference": row.venue_reference,
            "ext_numbers": row.external_reference_numbers,
            "external_references_key": reference_set_key(row.external_reference_numbers or ()),
            "state": row.state,
            "source": LedgerSource.IMPORT,
            "created_at": now,
            "updated_at": now,
        }
        for row in rows
    ]
    # Each row written (inserted, or updated because something differed) returns its id.
    returned = session.execute(_upsert_statement(dialect), params).all()
    changed = len(returned)
    if dialect == "postgresql":
        # xmax is 0 on a row version this statement inserted (not one it updated).
        inserted = sum(1 for row in returned if row.inserted)
        existing = len(rows) - inserted
    else:
        inserted = len(rows) - existing
    counts.inserted += inserted
    counts.updated += changed - inserted
    counts.unchanged += existing - (changed - inserted)


def _upsert_statement(dialect: str) -> Any:
    """``INSERT … ON CONFLICT (connection_id, partner_id, reference_key) DO UPDATE``.

    Only the shop's fields are set, and only when one of them differs, so an unchanged
    row is not written (and returns nothing). Optional fields left blank keep the
    ledger's value.
    """
    if dialect == "postgresql":
        insert: postgresql.Insert | sqlite.Insert = postgresql.insert(_TABLE)
    elif dialect == "sqlite":
        insert = sqlite.insert(_TABLE)
    else:
        raise NotImplementedError(f"the ledger runs on SQLite or PostgreSQL, not {dialect}")
    # A missing list is SQL NULL, not the JSON text 'null', so that COALESCE keeps the
    # ledger's list.
    insert = insert.values(
        external_reference_numbers=sa.bindparam("ext_numbers", type_=sa.JSON(none_as_null=True))
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
    return insert.on_conflict_do_update(
        index_elements=["connection_id", "partner_id", "reference_key"],
        set_={**new, "updated_at": excluded.updated_at},
        where=sa.or_(*differs),
    ).returning(
        _TABLE.c.id,
        sa.literal_column("xmax = 0" if dialect == "postgresql" else "1", sa.Boolean).label(
            "inserted"
        ),
    )
