"""Keyset paging of the finance lists: where a page starts, read from and written to URLs.

A list's URL names the row its page follows (``after=<id>``) or precedes
(``before=<id>``), never an offset: the database goes straight to it along an index, so
a page deep in a million rows costs what the first does, and rows added or changed
meanwhile neither repeat nor skip a row on the next page. ``start`` (the position of the
page's first row, for "51-100 of N") rides along; it only labels the page. ``size`` is
the rows per page, bounded. A value none of these take is a 400 page naming it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from flask import abort

from storage.types import ID_MAX

MAX_PAGE_SIZE = 200
"""The most rows a page shows."""


@dataclass(frozen=True)
class Cursor:
    """Where the page asked for starts, and how many rows it shows."""

    after: int | None
    before: int | None
    start: int
    size: int
    default_size: int

    @classmethod
    def from_args(cls, args: Mapping[str, str], *, default_size: int, ids: str) -> Cursor:
        """The cursor of a query string; a 400 page for a value it cannot take.

        Args:
            args: the query string.
            default_size: the page size when none is asked for.
            ids: what the ids are, for the message ("an exception number").
        """
        after = _number(args, "after", ids, 0, ID_MAX)
        before = _number(args, "before", ids, 0, ID_MAX)
        start = _number(args, "start", "a row's position", 1, ID_MAX) or 1
        size = _number(args, "size", f"a page size from 1 to {MAX_PAGE_SIZE}", 1, MAX_PAGE_SIZE)
        return cls(after, before, start, size or default_size, default_size)

    def shown(self, rows: Sequence[Any], *, more_before: bool) -> Shown:
        """The positions of ``rows``, the page read at this cursor."""
        first = self.start if more_before and (self.after or self.before) else 1
        return Shown(
            first=first if rows else 0,
            last=first + len(rows) - 1 if rows else 0,
            size=self.size,
            default_size=self.default_size,
            moved=self.after is not None or self.before is not None,
        )


@dataclass(frozen=True)
class Shown:
    """The rows a page shows, by position (1-based; 0 and 0 when none), and the links
    to the pages on either side."""

    first: int
    last: int
    size: int
    default_size: int
    moved: bool  # not the first page asked for

    def _args(self, keep: Mapping[str, str], **where: int) -> dict[str, Any]:
        sized = {"size": self.size} if self.size != self.default_size else {}
        return {**keep, **where, **sized}

    def previous_args(
        self, more_before: bool, ids: Sequence[int], keep: Mapping[str, str]
    ) -> dict[str, Any] | None:
        """The URL arguments of the page before, or ``None`` when this page is the first."""
        if not more_before or not ids:
            return None
        return self._args(keep, before=ids[0], start=max(self.first - self.size, 1))

    def next_args(
        self, more_after: bool, ids: Sequence[int], keep: Mapping[str, str]
    ) -> dict[str, Any] | None:
        """The URL arguments of the page after, or ``None`` when this page is the last."""
        if not more_after or not ids:
            return None
        return self._args(keep, after=ids[-1], start=self.last + 1)

    def first_args(self, keep: Mapping[str, str]) -> dict[str, Any] | None:
        """The URL arguments of the first page, when this is not it."""
        return self._args(keep) if self.moved else None


def _number(args: Mapping[str, str], name: str, what: str, low: int, high: int) -> int | None:
    """The whole number ``args[name]`` within ``[low, high]``; ``None`` when not given."""
    text = args.get(name, "").strip()
    if not text:
        return None
    # At most 19 digits (a BIGINT's): int() of a huge digit string is slow, or refused.
    fits = text.isascii() and text.isdigit() and len(text) <= 19
    if not fits or not low <= int(text) <= high:
        abort(400, description=f"{name} must be {what}, not {text[:40]!r}.")
    return int(text)
