"""The web role's gunicorn settings as processes see them (the end-to-end lane,
``tests/e2e/test_web_workers.py``, kills real workers)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector

from otacm.metrics_dir import metrics_directory

pytestmark = pytest.mark.process

ROOT = Path(__file__).resolve().parents[2]

_WORKER = textwrap.dedent(
    """
    import os
    from prometheus_client import Counter, Gauge

    Gauge("busy", "A live gauge.", multiprocess_mode="livesum").set(5)
    Counter("handled", "A counter.").inc(3)
    print(os.getpid())
    """
)

_MASTER = textwrap.dedent(
    """
    import sys
    from types import SimpleNamespace
    from otacm.web import gunicorn_options

    gunicorn_options("127.0.0.1:0")["child_exit"](None, SimpleNamespace(pid=int(sys.argv[1])))
    """
)


def _run(script: str, *args: str, directory: Path) -> str:
    environment = {
        **{k: v for k, v in os.environ.items() if not k.startswith("OTACM_")},
        "PROMETHEUS_MULTIPROC_DIR": str(directory),
    }
    return subprocess.run(
        [sys.executable, "-c", script, *args],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout


def _scrape(directory: Path) -> dict[str, float]:
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))  # type: ignore[no-untyped-call]
    return {
        sample.name: sample.value
        for family in registry.collect()
        for sample in family.samples
        if not sample.labels
    }


def test_child_exit_drops_an_exited_workers_live_gauges_and_keeps_its_counts(
    tmp_path: Path,
) -> None:
    """gunicorn's child_exit hook (mark_process_dead): live gauges gone, counters kept."""
    worker = _run(_WORKER, directory=tmp_path).strip()
    assert _scrape(tmp_path) == {"busy": 5.0, "handled_total": 3.0}

    _run(_MASTER, worker, directory=tmp_path)

    assert _scrape(tmp_path) == {"handled_total": 3.0}


def test_a_named_metrics_directory_keeps_the_files_of_running_processes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A role entering a directory the operator (or ``otacm serve``) named removes an
    earlier run's files, but not those of a role that shares it and started first."""
    exited = subprocess.Popen([sys.executable, "-c", "pass"])
    exited.wait()
    running = os.getppid()
    for name in (f"counter_{running}.db", f"counter_{exited.pid}.db", "counter_x.db"):
        (tmp_path / name).write_bytes(b"")
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))

    with metrics_directory() as directory:
        kept = sorted(path.name for path in directory.glob("*.db"))

    assert kept == [f"counter_{running}.db"]
    assert tmp_path.is_dir()
