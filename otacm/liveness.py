"""Liveness files: how a health check outside a role tells that the role still works.

A role started with ``liveness_dir`` set keeps a file named after it there. The worker
touches ``worker`` at the start of every pass of its loop and the scheduler touches
``scheduler`` each time one of its jobs has had its turn (run, skipped as not due, or
failed: a database that is away is no fault of the process), so a file that stops
changing means a loop that stopped turning. The web role writes ``web`` once, holding
the address it serves on; its health is its own ``/readyz``.

``otacm health`` (:func:`check`) reads them: it is the container image's health check,
and it needs no role name, since a container runs one role (``otacm serve``: all three)
and each role names itself by its file.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import httpx

ROLES = ("web", "worker", "scheduler")
DEFAULT_MAX_AGE = 120.0
"""Seconds after which a worker's or scheduler's file is stale. The worker touches its file
at least every second when idle and the scheduler every ten (the outbox retry job), so
only a pass or a job stuck for minutes makes it stale."""


def beater(directory: Path | None, role: str) -> Callable[[], None]:
    """A function that marks ``role`` alive in ``directory``; does nothing without one.

    Raises:
        OSError: the directory cannot be made (at the call that makes the function, so a
            role with an unusable ``liveness_dir`` fails at start, not in its loop).
    """
    if directory is None:
        return lambda: None
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / role

    def beat() -> None:
        # A file that cannot be touched (its directory removed under the role) makes the
        # health check fail, which says so; the role's own work goes on.
        with contextlib.suppress(OSError):
            path.touch()

    beat()
    return beat


def announce_web(directory: Path | None, bind: str) -> None:
    """Record where the web role serves (gunicorn's ``--bind``), for :func:`check`.

    Raises:
        OSError: the file cannot be written.
    """
    if directory is not None:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "web").write_text(bind + "\n", encoding="utf-8")


@dataclass(frozen=True)
class Verdict:
    """Whether one role is healthy, with a one-line reason."""

    role: str
    healthy: bool
    detail: str

    def line(self) -> str:
        """``role: ok|unhealthy, detail``."""
        return f"{self.role}: {'ok' if self.healthy else 'unhealthy'}, {self.detail}"


def check(
    directory: Path,
    roles: Sequence[str] = (),
    *,
    max_age: float = DEFAULT_MAX_AGE,
    timeout: float = 5.0,
) -> list[Verdict]:
    """The verdict on each role: ``roles``, or every role that keeps a file in ``directory``.

    A worker or scheduler is healthy while its file changed within ``max_age`` seconds;
    the web role while ``/readyz`` at its recorded address answers 200 within ``timeout``.
    A role with no file has not started (or keeps no files): unhealthy.
    """
    wanted = list(roles) or [role for role in ROLES if (directory / role).exists()]
    return [_verdict(directory / role, role, max_age, timeout) for role in wanted]


def _verdict(path: Path, role: str, max_age: float, timeout: float) -> Verdict:
    try:
        age = time.time() - path.stat().st_mtime
        content = path.read_text(encoding="utf-8").strip()
    except OSError:
        return Verdict(role, False, f"no liveness file {path}: the role has not started")
    if role != "web":
        if age > max_age:
            return Verdict(role, False, f"last pass {age:.0f} s ago (more than {max_age:g} s)")
        return Verdict(role, True, f"last pass {age:.0f} s ago")
    import httpx  # here: the command line imports this module for its constants

    url, transport = _readyz(content)
    try:
        with httpx.Client(transport=transport, timeout=timeout, trust_env=False) as client:
            status = client.get(url).status_code
    except httpx.HTTPError as exc:
        return Verdict(role, False, f"{url}: {type(exc).__name__}")
    return Verdict(role, status == 200, f"{url}: {status}")


def _readyz(bind: str) -> tuple[str, httpx.HTTPTransport | None]:
    """The ``/readyz`` URL of gunicorn's (first) ``--bind``, and a transport for a socket.

    A wildcard host (``0.0.0.0``, ``[::]``, none) is asked on loopback.
    """
    import httpx

    first = bind.split(",")[0].strip()
    if first.startswith("unix:"):
        return "http://localhost/readyz", httpx.HTTPTransport(uds=first.removeprefix("unix:"))
    if ":" in first and not first.endswith("]"):
        host, _, port = first.rpartition(":")
    else:
        host, port = first, "8000"  # gunicorn's port when the bind names none
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "[::]": "[::1]"}.get(host, host)  # noqa: S104 - a bind, asked on loopback
    return f"http://{host}:{port}/readyz", None
