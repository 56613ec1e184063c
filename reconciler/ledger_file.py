"""The shop's ledger file: its columns, and every row of it read and checked.

The columns (:data:`COLUMNS`) are described for the shop's developers in
``docs/ledger-format.md``. :func:`read_ledger` reads a CSV or JSON lines file and yields
each row checked (:class:`LedgerRow`) or, when it cannot be imported, a :class:`BadRow`
with its line number, column and reason. Problems of the file itself (unknown or
missing columns in a CSV header, not UTF-8, an unknown format) are a
:class:`LedgerFileError`. Storing the rows is :mod:`reconciler.ledger`'s work.
"""

from __future__ import annotations

import codecs
import csv
import datetime as dt
import difflib
import functools
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, cast

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from storage.flush import INTEGER_MAX
from storage.models import LedgerLine, LedgerState
from storage.types import MONEY_MAX, MONEY_PLACES, text_problem
from venue.values import normalize_reference

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

_COLUMN_SET = frozenset(COLUMNS)

REQUIRED_COLUMNS = ("partner_id", "reference", "sold_at", "quantity", "amount", "currency")
"""Columns every row must give; the others have defaults (see :class:`LedgerRow`)."""

FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
"""A file's format by its extension; anything else needs the format named."""

REFERENCE_MAX_CHARS = 50
"""The venue's width of a reference; longer text would not match it."""

_TABLE: sa.Table = LedgerLine.__table__  # type: ignore[assignment]
_AMOUNT = re.compile(r"\d+(\.\d+)?", re.ASCII)
# The width of the reference's upper-cased form: a few characters grow when upper-cased
# ("ß" is "SS"), so a reference within REFERENCE_MAX_CHARS may still not fit it.
_REFERENCE_KEY_MAX = cast(int, cast(sa.String, _TABLE.c.reference_key.type).length)
_CURRENCY = re.compile(r"[A-Za-z]{3}")
_GUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_TRUE = frozenset({"true", "1", "yes"})
_FALSE = frozenset({"false", "0", "no"})


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
        return _partner_guid(value if isinstance(value, str) else _text(value))

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


@functools.lru_cache(maxsize=1024)
def _partner_guid(value: str) -> str:
    """A partner id in the venue's form; cached, as a file names few partners many times."""
    # The venue writes GUIDs lowercase without braces; so do the ledger and the mirror.
    text = _text(value).strip("{}").lower()
    if not _GUID.fullmatch(text):
        raise ValueError(f"{text!r} is not a GUID")
    return text


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
    # Blank values are absent. Unknown keys are judged after the known ones (the
    # documented order puts them last): pydantic cannot even name a key that is not
    # valid text (a lone surrogate). One pass: this runs for every row of the file.
    known: dict[str, Any] = {}
    unknown: str | None = None
    for key, value in record.items():
        if value is None or (isinstance(value, str) and not value.strip()):
            continue
        if key in _COLUMN_SET:
            known[key] = value
        elif unknown is None:
            unknown = key
    try:
        row = LedgerRow.model_validate(known)
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
    if unknown is not None:
        column = str(unknown)
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
