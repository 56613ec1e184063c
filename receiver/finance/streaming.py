"""Long downloads under gunicorn: the worker stays alive while a report makes progress.

gunicorn's master kills a sync worker that has not told it it is alive for ``timeout``
seconds (30), and a sync worker tells it only between requests: a report of a million
exceptions, which takes minutes, would be killed mid-stream. gunicorn's
``post_worker_init`` hook (:func:`remember_worker`, set by
:func:`otacm.processes.gunicorn_options`) keeps the worker at hand, and a report's
``progress`` (:func:`keep_alive`, called every thousand rows) tells the master the
worker lives. A report that stops making
progress (a database that no longer answers) is still killed after ``timeout``. Outside
gunicorn (tests, ``flask run``) there is no worker and :func:`keep_alive` does nothing.
"""

from __future__ import annotations

from typing import Any, Protocol


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
