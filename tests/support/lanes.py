"""The suite's two lanes: tests that run real processes (``process``), and the rest.

Both lanes run in CI (``scripts/test``, one after the other); they are split so that the
quick lane, most of the suite, runs on its own in minutes, in parallel, and so that the
slow one can be run alone when processes are what changed.

A test is in the ``process`` lane when

- it uses a fixture that starts processes, declared so with :func:`starts_processes`
  (directly or through another fixture: the whole fixture closure counts);
- it, its class or its module is marked ``process`` (tests that start a process in their
  own body);
- it is marked with a kind of process test: ``browser``, ``image``, ``systemd``.

:func:`mark_process_lane` adds the ``process`` marker to every such test at collection, so
``-m process`` selects the lane and ``-m "not process"`` the rest.

The classification is enforced, not trusted: while a test outside the lane runs (its
set-up, body and tear-down), :func:`guarded` makes every new process — a
``subprocess.Popen`` (which ``subprocess.run`` and asyncio's subprocesses go through),
``os.fork``, ``os.posix_spawn``, ``os.system``, an ``os.exec*``/``os.spawn*``, a
``multiprocessing`` start — fail with a message saying to mark the test. Python's audit
hooks see the first ones wherever they are started from; ``multiprocessing``'s ``spawn``
and ``forkserver`` start methods fork without an audit event, so its ``start`` is checked
itself. The shared PostgreSQL server of the database fixtures is infrastructure of both
lanes: it is started and stopped inside :func:`infrastructure`.
"""

from __future__ import annotations

import multiprocessing.process
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any, TypeVar

import pytest

PROCESS = "process"
"""The lane's marker."""

PROCESS_KINDS = ("browser", "image", "systemd")
"""Markers of kinds of test that run real processes; each is in the lane as well."""

_STARTS_PROCESSES = "_otacm_starts_processes"
"""The attribute :func:`starts_processes` sets on a fixture's function."""

_PROCESS_EVENTS = frozenset(
    {"subprocess.Popen", "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.exec",
     "os.system"}
)  # fmt: skip
"""Audit events that start (or become) another program."""

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")


class ProcessOutsideLane(Exception):
    """A test outside the ``process`` lane started a process."""


def starts_processes(fixture_function: F) -> F:
    """Declare that a fixture starts processes: every test that uses it is in the lane.

    Put it under ``@pytest.fixture``, on the function itself::

        @pytest.fixture
        @starts_processes
        def web(...): ...

    Raises:
        TypeError: it was put above ``@pytest.fixture`` (pytest would not see the mark).
    """
    if not callable(fixture_function) or not hasattr(fixture_function, "__code__"):
        raise TypeError("@starts_processes goes under @pytest.fixture, on the plain function")
    setattr(fixture_function, _STARTS_PROCESSES, True)
    return fixture_function


def _uses_process_fixture(item: pytest.Item) -> bool:
    """Whether any fixture in ``item``'s closure is declared with :func:`starts_processes`."""
    # pytest keeps the resolved fixture definitions of an item here; there is no public
    # accessor, and ``fixturenames`` alone would not tell which definition (a conftest's
    # or a module's own fixture of the same name) the test gets.
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return False
    for name in item.fixturenames:  # type: ignore[attr-defined]
        for definition in info.name2fixturedefs.get(name, ()):
            if getattr(definition.func, _STARTS_PROCESSES, False):
                return True
    return False


def in_process_lane(item: pytest.Item) -> bool:
    """Whether ``item`` belongs to the ``process`` lane (see the module's docstring)."""
    if any(item.get_closest_marker(name) for name in (PROCESS, *PROCESS_KINDS)):
        return True
    return _uses_process_fixture(item)


def mark_process_lane(items: list[pytest.Item]) -> None:
    """Add the ``process`` marker to every collected test of the lane."""
    for item in items:
        if item.get_closest_marker(PROCESS) is None and in_process_lane(item):
            item.add_marker(PROCESS)


class _Guard:
    """Which test is guarded now, and what it started."""

    def __init__(self) -> None:
        self.test: str | None = None
        self.allowed = 0
        self.started: list[str] = []

    def check(self, what: str) -> None:
        """Fail (and remember, in case the failure is swallowed) a start in a guarded test."""
        if self.test is None or self.allowed:
            return
        self.started.append(what)
        raise ProcessOutsideLane(_message(self.test, [what]))


_GUARD = _Guard()


def _message(test: str, started: list[str]) -> str:
    return (
        f"{test} started a process ({'; '.join(started)}) but is not in the `process` "
        "lane: mark the test `@pytest.mark.process` (or its module: `pytestmark = "
        "pytest.mark.process`), or, if a fixture starts it, decorate that fixture with "
        "`@starts_processes` from tests.support.lanes"
    )


def _describe(event: str, args: tuple[Any, ...]) -> str:
    """The event and the program, short (a Popen's arguments may be long)."""
    program = args[0] if event in {"subprocess.Popen", "os.system", "os.exec"} and args else ""
    return f"{event} {str(program)[:200]}".strip()


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if event in _PROCESS_EVENTS and _GUARD.test is not None:
        _GUARD.check(_describe(event, args))


_installed = False


def install_guard() -> None:
    """Install the audit hook and the ``multiprocessing`` check (once per process; an
    audit hook cannot be removed, and does nothing while no test is guarded)."""
    global _installed
    if _installed:
        return
    _installed = True
    sys.addaudithook(_audit)
    start = multiprocessing.process.BaseProcess.start

    def checked_start(self: multiprocessing.process.BaseProcess) -> None:
        _GUARD.check(f"multiprocessing start {self.name}")
        start(self)

    multiprocessing.process.BaseProcess.start = checked_start  # type: ignore[method-assign]


@contextmanager
def guarded(item: pytest.Item) -> Iterator[None]:
    """Guard one phase (set-up, call or tear-down) of ``item`` unless it is in the lane.

    Raises:
        ProcessOutsideLane: the phase started a process, even if the failure of the start
            itself was caught on the way.
    """
    if in_process_lane(item):
        yield
        return
    # What was guarded before is restored after: a guard may be nested in another (the
    # tests of this module guard a block inside their own guarded body).
    outer = _GUARD.test, _GUARD.started
    _GUARD.test, _GUARD.started = item.nodeid, []
    try:
        yield
    finally:
        started = _GUARD.started
        _GUARD.test, _GUARD.started = outer
    if started:
        raise ProcessOutsideLane(_message(item.nodeid, started))


@contextmanager
def _allowed() -> Iterator[None]:
    _GUARD.allowed += 1
    try:
        yield
    finally:
        _GUARD.allowed -= 1


@contextmanager
def infrastructure(context: AbstractContextManager[T]) -> Iterator[T]:
    """Enter and leave ``context``, which starts and stops shared processes (the tests'
    PostgreSQL server), with processes allowed; the block in between stays guarded."""
    with _allowed():
        value = context.__enter__()
    try:
        yield value
    except BaseException:
        with _allowed():
            if not context.__exit__(*sys.exc_info()):
                raise
    else:
        with _allowed():
            context.__exit__(None, None, None)
