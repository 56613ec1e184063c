"""``otacm`` as subprocesses, configured through ``OTACM_*`` as an operator would.

:func:`otacm_environment` turns test :class:`Settings` into the environment of a process,
:class:`OtacmProcess` runs a long-lived role (``web``, ``worker``, ``scheduler``) with its
output in a file, :func:`run_otacm` runs a command to its end.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from otacm.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
"""The repository: the processes' working directory."""


def foreign_environment() -> dict[str, str]:
    """This process's environment without ``OTACM_*`` (nor the metrics directory a test
    may have set): what a process's own configuration is added to."""
    return {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("OTACM_") and name != "PROMETHEUS_MULTIPROC_DIR"
    }


def otacm_environment(settings: Settings, **extra: str) -> dict[str, str]:
    """This process's environment without ``OTACM_*``, plus ``settings`` as ``OTACM_*``."""
    (venue,) = settings.connections
    environment = foreign_environment()
    environment.update(
        {
            "OTACM_DATABASE_URL": settings.database_url,
            "OTACM_API_BASE_URL": venue.api_base_url,
            "OTACM_TENANT": venue.tenant,
            "OTACM_ENVIRONMENT": venue.environment,
            "OTACM_COMPANY": venue.company,
            "OTACM_API_KEY": venue.api_key.get_secret_value(),
            "OTACM_PARTNER_IDS": ",".join(venue.partner_ids),
            "OTACM_WEBHOOK_CLIENT_STATES": ",".join(
                state.get_secret_value() for state in venue.webhook_client_states
            ),
            "OTACM_API_TOKENS": ",".join(t.get_secret_value() for t in settings.api_tokens),
            "OTACM_DB_LOCK_TIMEOUT": str(settings.db_lock_timeout),
            "OTACM_WEBHOOK_MAX_BYTES": str(settings.webhook_max_bytes),
            "OTACM_INBOX_LEASE_SECONDS": str(settings.inbox_lease_seconds),
            "OTACM_OUTBOX_LEASE_SECONDS": str(settings.outbox_lease_seconds),
            "OTACM_WORKER_BATCH_SIZE": str(settings.worker_batch_size),
            "OTACM_LOG_LEVEL": "INFO",
            **extra,
        }
    )
    return environment


class OtacmProcess:
    """``python -m otacm ARGS`` as a subprocess, its output in a file."""

    def __init__(self, args: list[str], environment: dict[str, str], log: Path) -> None:
        self.args = args
        self.log = log
        self._output = log.open("wb")
        try:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "otacm", *args],
                cwd=ROOT,
                env=environment,
                stdin=subprocess.DEVNULL,
                stdout=self._output,
                stderr=subprocess.STDOUT,
            )
        except BaseException:
            self._output.close()
            raise

    def output(self) -> str:
        """Everything the process has written so far."""
        if not self._output.closed:
            self._output.flush()
        return self.log.read_text(encoding="utf-8", errors="replace")

    def alive(self) -> bool:
        """Whether the process is still running."""
        return self.popen.poll() is None

    def kill(self) -> int:
        """SIGKILL: no clean-up, no goodbye; its exit status."""
        self.popen.send_signal(signal.SIGKILL)
        return self.popen.wait(timeout=30)

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM, then SIGKILL if it lingers; its exit status. Closes the log."""
        try:
            if self.popen.poll() is None:
                self.popen.terminate()
                try:
                    self.popen.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    self.popen.kill()
                    self.popen.wait(timeout=30)
            return self.popen.returncode
        finally:
            self._output.close()


def run_otacm(*args: str, environment: dict[str, str], timeout: float = 60) -> str:
    """Run an ``otacm`` command to its end; its standard output.

    Raises:
        AssertionError: it exited non-zero; with its output.
    """
    done = subprocess.run(
        [sys.executable, "-m", "otacm", *args],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, f"otacm {' '.join(args)}: {done.returncode}\n{done.stderr}"
    return done.stdout
