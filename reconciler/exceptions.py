"""Finance's actions on reconciliation exceptions, and the list of runs (paged by keyset).

Runs open, see, reopen and close exceptions (:mod:`reconciler.engine`); people resolve
(the difference was fixed) or accept (the difference is right as it is) an *open*
exception, always with a note. Each action is an :class:`~storage.records.ExceptionEvent`
with who did it and when, so an exception's history is complete. A resolved or accepted
exception that a later run no longer finds is closed by that run; one that keeps being
found stays as finance left it.

Errors::

    ValueError
    ├── NoteRequired            a blank note
    ├── TextRefused             a note or actor no text column takes
    └── ExceptionNotOpen        the exception is not open
    LookupError
    └── ExceptionNotFound       no exception with that id

The functions take a session and never commit: the caller owns the transaction.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.orm import Session

from storage.models import ACTOR
from storage.records import (
    ExceptionAction,
    ExceptionEvent,
    ExceptionState,
    ReconException,
    ReconRun,
)
from storage.types import ID_MAX, text_problem


class NoteRequired(ValueError):
    """Resolving or accepting an exception needs a note saying why."""

    def __init__(self, exception_id: int) -> None:
        super().__init__(f"a note is required to resolve or accept exception {exception_id}")
        self.exception_id = exception_id


class TextRefused(ValueError):
    """A note or an actor's name that no text column takes (or too long, for a name)."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"the {field} {problem}")
        self.field = field


class ExceptionNotFound(LookupError):
    """No reconciliation exception has this id."""

    def __init__(self, exception_id: int) -> None:
        super().__init__(f"no reconciliation exception {exception_id}")
        self.exception_id = exception_id


class ExceptionNotOpen(ValueError):
    """Only open exceptions can be resolved or accepted."""

    def __init__(self, exception_id: int, state: str) -> None:
        super().__init__(
            f"exception {exception_id} is {state}: only open exceptions can be resolved or accepted"
        )
        self.exception_id = exception_id
        self.state = state


def resolve(
    session: Session, exception_id: int, *, actor: str, note: str, now: dt.datetime
) -> ReconException:
    """Mark an open exception resolved: the difference was fixed.

    Args:
        session: the caller's session; flushed, not committed.
        exception_id: the exception's id.
        actor: who resolves it.
        note: why; required.
        now: when (aware).

    Returns:
        The exception, now ``resolved``.

    Raises:
        NoteRequired: the note is blank.
        TextRefused: the note or the actor's name holds a NUL character or an unpaired
            surrogate, or the name is longer than its column.
        ExceptionNotFound: no such exception.
        ExceptionNotOpen: the exception is not open.
    """
    return _act(session, exception_id, ExceptionAction.RESOLVED, actor=actor, note=note, now=now)


def accept(
    session: Session, exception_id: int, *, actor: str, note: str, now: dt.datetime
) -> ReconException:
    """Mark an open exception accepted: the difference is right as it is.

    Args:
        session: the caller's session; flushed, not committed.
        exception_id: the exception's id.
        actor: who accepts it.
        note: why; required.
        now: when (aware).

    Returns:
        The exception, now ``accepted``.

    Raises:
        NoteRequired: the note is blank.
        TextRefused: the note or the actor's name holds a NUL character or an unpaired
            surrogate, or the name is longer than its column.
        ExceptionNotFound: no such exception.
        ExceptionNotOpen: the exception is not open.
    """
    return _act(session, exception_id, ExceptionAction.ACCEPTED, actor=actor, note=note, now=now)


def list_runs(
    session: Session, connection_id: int | None = None, limit: int = 50
) -> list[ReconRun]:
    """The latest reconciliation runs, newest first.

    Args:
        session: the caller's session.
        connection_id: only this connection's runs (default: every connection's).
        limit: at most this many.
    """
    return runs_page(session, connection_id=connection_id, size=limit).runs


@dataclass(frozen=True)
class RunsPage:
    """A page of the runs list, and whether others lie on either side of it."""

    runs: list[ReconRun]
    more_before: bool
    more_after: bool


def runs_page(
    session: Session,
    *,
    connection_id: int | None = None,
    after: int | None = None,
    before: int | None = None,
    size: int = 50,
) -> RunsPage:
    """A page of the runs, newest first (by start, then id), read along an index.

    Args:
        session: the caller's session.
        connection_id: only this connection's runs (default: every connection's).
        after: the page that follows run ``after`` in that order.
        before: the page that precedes run ``before`` (when ``after`` is not given).
        size: at most this many runs (at least one).
    """
    size = max(size, 1)
    backwards = after is None and before is not None
    cursor = after if not backwards else before
    query = sa.select(ReconRun)
    if connection_id is not None:
        query = query.where(ReconRun.connection_id == connection_id)
    newest = (ReconRun.started_at.desc(), ReconRun.id.desc())
    oldest = (ReconRun.started_at.asc(), ReconRun.id.asc())
    paged = query
    started: dt.datetime | None = None
    if cursor is not None:
        started = session.scalar(sa.select(ReconRun.started_at).where(ReconRun.id == cursor))
        if started is None:  # no such run: nothing lies beside it
            return RunsPage([], more_before=False, more_after=False)
        paged = query.where(_beside(started, cursor, later=backwards))
    found = list(
        session.scalars(paged.order_by(*(oldest if backwards else newest)).limit(size + 1))
    )
    beyond = len(found) > size
    runs = found[:size]
    if backwards:
        runs.reverse()
        return RunsPage(runs, more_before=beyond, more_after=True)
    more_before = (
        cursor is not None
        and started is not None
        and session.scalar(query.where(~_beside(started, cursor, later=False)).limit(1)) is not None
    )
    return RunsPage(runs, more_before=more_before, more_after=beyond)


def _beside(started: dt.datetime, run_id: int, *, later: bool) -> sa.ColumnElement[bool]:
    """Runs after (``later``) or before the run ``run_id`` started at ``started``, in
    (start, id) order."""
    if later:
        return sa.or_(
            ReconRun.started_at > started,
            sa.and_(ReconRun.started_at == started, ReconRun.id > run_id),
        )
    return sa.or_(
        ReconRun.started_at < started,
        sa.and_(ReconRun.started_at == started, ReconRun.id < run_id),
    )


def count_runs(session: Session, connection_id: int | None = None) -> int:
    """How many runs there are (of one connection, or of every one)."""
    query = sa.select(sa.func.count()).select_from(ReconRun)
    if connection_id is not None:
        query = query.where(ReconRun.connection_id == connection_id)
    return int(session.execute(query).scalar_one())


_STATE_AFTER = {
    ExceptionAction.RESOLVED: ExceptionState.RESOLVED,
    ExceptionAction.ACCEPTED: ExceptionState.ACCEPTED,
}


def _act(
    session: Session,
    exception_id: int,
    action: ExceptionAction,
    *,
    actor: str,
    note: str,
    now: dt.datetime,
) -> ReconException:
    if not note or not note.strip():
        raise NoteRequired(exception_id)
    for field, text, width in (("note", note, None), ("actor", actor, ACTOR.length)):
        problem = text_problem(text, width)
        if problem is not None:
            raise TextRefused(field, problem)
    if exception_id > ID_MAX:
        raise ExceptionNotFound(exception_id)  # no row has it; no query could take it
    # Locked, so two people acting at once apply one after the other (the second fails).
    exception = session.scalars(
        sa.select(ReconException).where(ReconException.id == exception_id).with_for_update()
    ).one_or_none()
    if exception is None:
        raise ExceptionNotFound(exception_id)
    if exception.state != ExceptionState.OPEN:
        raise ExceptionNotOpen(exception_id, str(exception.state))
    exception.state = _STATE_AFTER[action]
    exception.updated_at = now
    session.add(
        ExceptionEvent(exception=exception, action=action, actor=actor, note=note.strip(), at=now)
    )
    session.flush()
    return exception
