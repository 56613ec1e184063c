"""Text no database column takes, found where it comes in.

PostgreSQL refuses NUL characters in text; an unpaired surrogate (what a JSON
``"\\ud800"`` escape alone decodes to) cannot be encoded as UTF-8 for either database.
What comes from outside — a venue answer, a webhook, the shop's JSON, a ledger file — is
checked here, at the boundary, so that a refusal names the field and never depends on
which database otacm runs on (:func:`storage.types.text_problem` adds a column's width).
"""

from __future__ import annotations

from typing import Any

UNSTORABLE_TEXT = "text without NUL characters or unpaired surrogates"
"""What to tell the sender of a field :func:`storable_text` refuses."""


def storable_text(text: str) -> bool:
    """Whether a text column takes ``text`` on both databases.

    PostgreSQL refuses NUL characters; an unpaired surrogate (what a JSON ``"\\ud800"``
    escape alone decodes to) cannot be encoded as UTF-8 for either. Code that stores a
    field from outside checks it, so an answer never depends on the database.
    """
    if "\x00" in text:
        return False
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def unstorable_text_path(value: Any, path: str = "") -> str | None:
    """The dotted path of the first key or string in decoded JSON no text column takes.

    ``None`` when :func:`storable_text` takes every one; a list index is a path segment.
    """
    if isinstance(value, str):
        return None if storable_text(value) else path
    if isinstance(value, dict):
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            if not storable_text(str(key)):
                return where
            found = unstorable_text_path(item, where)
            if found is not None:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found = unstorable_text_path(item, f"{path}.{index}" if path else str(index))
            if found is not None:
                return found
    return None
