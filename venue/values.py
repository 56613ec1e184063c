"""The venue's values and the rules for reading them: one place decides each.

The types the wire models declare their fields with, each normalizing as it reads:
:data:`Guid` (an id in the venue's canonical GUID form), :data:`BlankAsNone` (blank text
is no value), :data:`UtcDateTime` (aware UTC; Business Central's zero date is none),
:data:`RowVersion`, and the personal and secret text kept out of reprs. Beside them the
rules for ids and references wherever they come from: :func:`parse_guid` (a GUID as the
venue reads one), :func:`canonical_guid` (an id as the order mirror keys it),
:func:`normalize_reference` and :func:`reference_set_key` (reference codes compared
case-blind).
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, Field
from pydantic_core import PydanticCustomError


def _blank_to_none(value: Any) -> Any:
    """The venue sends ``""`` (and Business Central's zero date) for "no value"."""
    if isinstance(value, str) and (value.strip() == "" or value.startswith("0001-01-01")):
        return None
    return value


def _utc(value: dt.datetime | None) -> dt.datetime | None:
    if value is None:
        return None
    if value.tzinfo is None:
        # The venue documents its times as UTC; a missing offset means UTC, not local time.
        return value.replace(tzinfo=dt.UTC)
    try:
        return value.astimezone(dt.UTC)
    except OverflowError:
        # Within hours of year 1 or 9999 the offset takes it out of range: not a time the
        # venue writes, so a validation error (a ValueError), not a crash.
        raise ValueError("out of range in UTC") from None


UtcDateTime = Annotated[
    dt.datetime | None,
    BeforeValidator(_blank_to_none),
    AfterValidator(_utc),
    Field(default=None),
]
OptionalDate = Annotated[dt.date | None, BeforeValidator(_blank_to_none), Field(default=None)]
OptionalTime = Annotated[dt.time | None, BeforeValidator(_blank_to_none), Field(default=None)]
OptionalText = Annotated[str | None, Field(default=None)]
"""Optional text kept exactly as written, ``""`` included (envelopes, subscriptions)."""


def _none_when_blank(value: Any) -> Any:
    """The venue writes ``""`` for a text field with no value: absent, like a missing one."""
    if isinstance(value, str) and not value.strip():
        return None
    return value


BlankAsNone = Annotated[str | None, BeforeValidator(_none_when_blank), Field(default=None)]
"""Optional text of an order, where blank (or only blanks) means absent: ``None``.

Other text is kept as written. Every reader (the order mirror, the feed, the outbox)
gets ``None`` for "no value", so a blank and a missing field are the same to them.
"""


def parse_row_version(value: Any) -> int:
    """A ``rowVersion`` as a number: the venue writes it as text (a formatted 64-bit integer).

    Business Central formats the row version with ``Format(..., 0, 9)``: plain decimal
    digits. A JSON number is taken too, as a gateway might convert it.

    Raises:
        ValueError: the value is not a non-negative whole number that fits 64 bits.
    """
    if isinstance(value, bool):
        raise ValueError("rowVersion must be a whole number written as text")
    if isinstance(value, int):
        number = value
    elif isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
        number = int(value.strip())
    else:
        raise ValueError("rowVersion must be a whole number written as text")
    if not 0 <= number < 2**63:
        raise ValueError("rowVersion must be a non-negative 64-bit integer")
    return number


def _row_version_or_none(value: Any) -> int | None:
    return None if value is None else parse_row_version(value)


RowVersion = Annotated[int | None, BeforeValidator(_row_version_or_none), Field(default=None)]
# Customer data and shared secrets: kept out of reprs, so out of logs and tracebacks.
# Customer data of an order is blank-as-None too, like :data:`BlankAsNone`.
PersonalText = Annotated[
    str | None, BeforeValidator(_none_when_blank), Field(default=None, repr=False)
]
SecretText = Annotated[str, Field(repr=False)]


_GUID_FORMS = (
    re.compile(r"[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}"),
    re.compile(r"[0-9A-Fa-f]{32}"),
)


def parse_guid(text: str) -> str | None:
    """``text`` as the venue writes a GUID (lowercase, hyphens, no braces), or ``None``.

    The venue reads ids from the path with Business Central's ``Evaluate`` into a Guid
    (ChannelMgrOrderAgent TryGetOrderIdFromPath, ListOrdersByPartner), a .NET GUID parse:
    the hyphenated form, bare or in braces or parentheses, or 32 hex digits, in any
    case, surrounding blanks ignored. Anything else it refuses with a 400 ("Invalid
    order id", "Invalid partnerId").
    """
    value = text.strip()
    if len(value) == 38 and (value[0], value[-1]) in (("{", "}"), ("(", ")")):
        value = value[1:-1]
    if not any(form.fullmatch(value) for form in _GUID_FORMS):
        return None
    digits = value.replace("-", "").lower()
    return f"{digits[:8]}-{digits[8:12]}-{digits[12:16]}-{digits[16:20]}-{digits[20:]}"


def canonical_guid(text: str) -> str:
    """An id as the order mirror keys it: the venue's GUID form (:func:`parse_guid`).

    For ids of otacm's own keeping (the inbox, the command line, a stored row), which
    are not refused here: text that does not read as a GUID is trimmed, unbraced and
    lower-cased, so that it still compares equal to itself in any case.
    """
    return parse_guid(text) or text.strip().strip("{}").lower()


def guid_or_none(value: Any) -> str | None:
    """``value`` as a lowercase GUID without braces, or ``None`` when it is not one."""
    return parse_guid(value) if isinstance(value, str) else None


def _guid(value: Any) -> Any:
    """A GUID the venue wrote, in any spelling it reads, as it writes one."""
    if not isinstance(value, str):
        return value  # str validation refuses it, naming the field
    guid = parse_guid(value)
    if guid is None:
        raise PydanticCustomError("guid", "is not a valid GUID")
    return guid


Guid = Annotated[str, BeforeValidator(_guid)]
"""A GUID from the venue in its canonical form: lowercase, hyphenated, no braces.

Any spelling the venue itself reads (:func:`parse_guid`: braces or parentheses, upper
case, the 32 digits) is taken; anything else is a validation error naming the field.
"""


def guid_caption(guid: str) -> str:
    """A GUID as Business Central's ``Format`` writes it into messages: braces, upper case."""
    return "{" + guid.upper() + "}"


def normalize_reference(reference: str) -> str:
    """The venue's form of a reference code: trimmed and upper-cased.

    References compare case-insensitively; this is the one place that decides how.
    """
    return reference.strip().upper()


def reference_set_key(references: Iterable[str | None]) -> str | None:
    """A set of reference codes as one text that compares equal exactly when the sets do.

    Each code in the venue's form (:func:`normalize_reference`), blanks left out, every
    code once, sorted, one per line; ``None`` when no code is left. The external
    reference numbers a sale lists and those its wallets carry are compared this way.
    """
    codes = sorted({normalize_reference(code) for code in references if code and code.strip()})
    return "\n".join(codes) or None
