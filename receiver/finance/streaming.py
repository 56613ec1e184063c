"""Long downloads under gunicorn: the worker stays alive and answers as before.

gunicorn's master kills a sync worker that has not told it it is alive for ``timeout``
seconds (30), and a sync worker tells it only between requests: a report of a million
exceptions, which takes minutes, would be killed mid-stream. gunicorn's
``post_worker_init`` hook (:func:`remember_worker`, set by
:func:`otacm.processes.gunicorn_options`) keeps the worker at hand, and a report's
``progress`` (:func:`keep_alive`, called every thousand rows) tells the master the
worker lives. A report that stops making
progress (a database that no longer answers) is still killed after ``timeout``. Outside
gunicorn (tests, ``flask run``) there is no worker and :func:`keep_alive` does nothing.

A report is also a minute of CPU, in the process that answers the venue's webhooks:
:func:`at_batch_priority` computes it in a thread of its own, lowered by
``batch_nice`` (as the scheduler and the batch commands lower themselves), so that on a
busy box the webhooks do not wait for a CPU behind it. Only that thread is lowered: an
unprivileged process cannot raise its priority back, and the worker's own thread goes
on to serve webhooks after the download (measured on one core beside an XLSX of 200k
exceptions: the webhooks' median answer 6.4-8.6 ms as is, 3.7-5.5 ms so, 4.9 ms idle).
The thread runs at most :data:`HANDOVER_PIECES` pieces ahead of the response's iterator
in the worker's thread (a slow client holds the report back rather than have it gather
in memory). The iterator tells gunicorn of the progress (the worker's liveness is its
own thread's business) and raises the thread's error, if any, as the report would have
itself (the stream ends cut short, gunicorn logs it). A client that goes away (gunicorn
closes the iterator) ends the thread at its next piece. The report holds no session
across threads: each batch of its rows opens its own, in the thread.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, Final, Protocol

logger = logging.getLogger(__name__)


class _Worker(Protocol):
    def notify(self) -> None: ...


_worker: _Worker | None = None


def remember_worker(worker: Any) -> None:
    """gunicorn's ``post_worker_init`` hook: keep the worker this process serves in."""
    global _worker  # one worker per process, set once when it starts
    _worker = worker


def keep_alive() -> None:
    """Tell gunicorn's master that this worker is alive (nothing outside gunicorn)."""
    if _worker is not None:
        _worker.notify()


Produce = Callable[[Callable[[], None]], Iterator[bytes]]
"""A body's pieces, made by a function given what to call as it progresses."""

HANDOVER_PIECES = 4
"""Pieces (of up to 64 KiB for the text formats) made ahead of what the client has taken."""

# Thread priorities are Linux's: there nice is a thread's, and a thread's id is what
# setpriority takes. Elsewhere that id would name a process: no thread there.
THREAD_PRIORITIES: Final = sys.platform == "linux"


def at_batch_priority(produce: Produce, nice: int) -> Iterator[bytes]:
    """The pieces of ``produce``, made in a thread of their own lowered by ``nice``.

    Args:
        produce: makes the body, given the progress to call (every thousand rows); it
            runs in the thread, so whatever it reads from the database it opens there.
        nice: how much lower than the worker's thread the body is made
            (``batch_nice``); ``0``, or a platform without thread priorities, makes it
            in the worker's thread as it asks for it.

    Returns:
        An iterator to hand to the response: it raises what ``produce`` raised, and its
        ``close`` (gunicorn's, when the client goes away) stops the thread.
    """
    if not nice:
        return produce(keep_alive)
    if not THREAD_PRIORITIES:
        logger.debug("no thread priorities on %s: a download runs as is", sys.platform)
        return produce(keep_alive)
    return _LoweredStream(produce, nice)


class _Abandoned(Exception):
    """The reader went away: nothing more is wanted."""


_PROGRESS: Final = object()  # a piece of news, not of the body
_END: Final = object()


class _Handover:
    """Pieces from one thread to another, a few at most waiting; abandoned by the reader."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._items: deque[object] = deque()
        self._changed = threading.Condition()
        self._abandoned = False

    def put(self, item: object, *, always: bool = False) -> None:
        """Add ``item`` when there is room (``always``: at once); raises :class:`_Abandoned`."""
        with self._changed:
            while not always and len(self._items) >= self._size and not self._abandoned:
                self._changed.wait()
            if self._abandoned:
                raise _Abandoned
            self._items.append(item)
            self._changed.notify_all()

    def get(self) -> object:
        """The oldest item, when there is one."""
        with self._changed:
            while not self._items:
                self._changed.wait()
            item = self._items.popleft()
            self._changed.notify_all()
            return item

    def abandon(self) -> None:
        """Drop what waits and refuse what comes: the writer stops at its next item."""
        with self._changed:
            self._abandoned = True
            self._items.clear()
            self._changed.notify_all()


class _LoweredStream(Iterator[bytes]):
    """The response's iterator, in the worker's thread; the thread starts at the first piece."""

    def __init__(self, produce: Produce, nice: int) -> None:
        self._produce = produce
        self._nice = nice
        self._handover = _Handover(HANDOVER_PIECES)
        self._thread: threading.Thread | None = None
        self._done = False

    def __next__(self) -> bytes:
        if self._done:
            raise StopIteration
        if self._thread is None:
            self._thread = threading.Thread(target=self._make, name="report-download", daemon=True)
            self._thread.start()
        while True:
            item = self._handover.get()
            if item is _PROGRESS:
                keep_alive()
            elif isinstance(item, bytes):
                return item
            else:
                self.close()
                if isinstance(item, BaseException):
                    raise item
                raise StopIteration

    def close(self) -> None:
        """Stop the thread (at its next piece) and wait for it: nothing of it outlives the
        response (its database connection is back in the pool)."""
        self._done = True
        self._handover.abandon()
        if self._thread is not None:
            self._thread.join()

    def _make(self) -> None:
        """The thread: lower itself, then make the pieces and hand them over."""
        _lower_this_thread(self._nice)
        handover = self._handover
        pieces: Iterator[bytes] | None = None
        try:
            pieces = self._produce(lambda: handover.put(_PROGRESS))
            for piece in pieces:
                handover.put(piece)
            handover.put(_END, always=True)
        except _Abandoned:
            pass
        except BaseException as exc:  # the reader raises it in the worker's thread
            try:
                handover.put(exc, always=True)
            except _Abandoned:  # nobody to raise it to
                logger.exception("a download failed after its reader went away")
        finally:
            close = getattr(pieces, "close", None)
            if close is not None:  # a generator left at a piece ends its reads now
                close()


def _lower_this_thread(nice: int) -> None:
    """Lower the calling thread's CPU priority by ``nice`` (at most to 19); where the
    system refuses, go on as is."""
    thread = threading.get_native_id()
    try:
        now = os.getpriority(os.PRIO_PROCESS, thread)
        os.setpriority(os.PRIO_PROCESS, thread, min(now + nice, 19))
    except OSError as exc:  # a sandbox without priorities: run as is
        logger.debug("download's CPU priority not lowered: %s", exc)
