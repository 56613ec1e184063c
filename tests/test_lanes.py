"""The suite's lanes: which tests are in the ``process`` lane, and the guard that keeps a
test outside it from starting a process (:mod:`tests.support.lanes`)."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import subprocess
from collections.abc import Callable

import pytest

from tests.support.lanes import ProcessOutsideLane, guarded

pytest_plugins = ["pytester"]


def _noop() -> None:
    """A child's work (module level: ``spawn`` pickles it by name)."""


def _popen() -> None:
    subprocess.run(["true"], check=True)


def _asyncio() -> None:
    async def run() -> None:
        child = await asyncio.create_subprocess_exec("true")
        await child.wait()

    asyncio.run(run())


def _spawn() -> None:
    child = multiprocessing.get_context("spawn").Process(target=_noop)
    child.start()
    child.join()


def _system() -> None:
    os.system("true")  # noqa: S605 (the call under test)


def _fork() -> None:
    pid = os.fork()
    if pid == 0:  # never reached: the guard refuses before the fork
        os._exit(0)
    os.waitpid(pid, 0)


@pytest.mark.parametrize(
    "start",
    [_popen, _asyncio, _spawn, _system, _fork],
    ids=["subprocess", "asyncio", "multiprocessing-spawn", "os.system", "os.fork"],
)
def test_a_test_outside_the_lane_cannot_start_a_process(
    start: Callable[[], None], request: pytest.FixtureRequest
) -> None:
    with (
        pytest.raises(ProcessOutsideLane, match=r"mark the test `@pytest\.mark\.process`"),
        guarded(request.node),
    ):
        start()


def test_a_refused_start_the_code_swallowed_still_fails_the_test(
    request: pytest.FixtureRequest,
) -> None:
    # The code under test might swallow any error, the guard's too.
    with (
        pytest.raises(ProcessOutsideLane, match="test_a_refused_start"),
        guarded(request.node),
        contextlib.suppress(Exception),
    ):
        _popen()


@pytest.mark.process
def test_a_test_in_the_lane_starts_processes() -> None:
    done = subprocess.run(["echo", "started"], capture_output=True, text=True, check=True)
    assert done.stdout == "started\n"


def test_the_lane_is_chosen_by_fixture_marker_and_kind(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(
        """
        import pytest
        from tests.support import lanes
        from tests.support.lanes import starts_processes

        def pytest_collection_modifyitems(items):
            lanes.mark_process_lane(items)

        @pytest.fixture
        @starts_processes
        def server():
            yield

        @pytest.fixture
        def client(server):
            yield
        """
    )
    pytester.makepyfile(
        test_one="""
        import pytest

        def test_plain(): pass
        def test_through_a_fixture(client): pass
        @pytest.mark.process
        def test_marked(): pass
        @pytest.mark.browser
        def test_browser(): pass
        @pytest.mark.image
        def test_image(): pass
        @pytest.mark.systemd
        def test_systemd(): pass
        """
    )
    markers = ("process", "browser", "image", "systemd")
    ini = "\n".join(["[pytest]", "markers ="] + [f"    {name}: x" for name in markers])
    pytester.makeini(ini)

    result = pytester.runpytest_inprocess("--co", "-q", "-m", "process", "--strict-markers")

    selected = sorted(line.split("::")[1] for line in result.outlines if "::" in line)
    assert selected == [
        "test_browser",
        "test_image",
        "test_marked",
        "test_systemd",
        "test_through_a_fixture",
    ]


def test_starts_processes_put_above_the_fixture_decorator_is_refused() -> None:
    from tests.support.lanes import starts_processes

    with pytest.raises(TypeError, match=r"under @pytest\.fixture"):

        @starts_processes
        @pytest.fixture
        def server() -> None:
            """A fixture pytest would never see as starting processes."""
