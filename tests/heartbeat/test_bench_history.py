"""``bench/history`` runs end to end on a tiny history, on SQLite and PostgreSQL, and a
second run finds the history it built in its cache."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.process

ROOT = Path(__file__).resolve().parents[2]
ORDERS = 200


@pytest.fixture
def cache() -> Iterator[Path]:
    """The benchmark's cache directory: outside pytest's private tree, which PostgreSQL's
    server, as ``postgres``, could not reach."""
    directory = Path(tempfile.mkdtemp(prefix="otacm-bench-history-"))
    directory.chmod(0o755)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def _run(
    tmp_path: Path, cache: Path, database: str, *only: str
) -> subprocess.CompletedProcess[str]:
    environment = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("OTACM_") and name != "PROMETHEUS_MULTIPROC_DIR"
    }
    command = [
        "bench/history", "--db", database, "--sizes", str(ORDERS),
        "--cache-dir", str(cache), "--import-lines", "200",
        "--out", str(tmp_path / "figures.json"),
    ]  # fmt: skip
    if only:
        command += ["--only", ",".join(only)]
    return subprocess.run(
        [sys.executable, *command],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_a_tiny_history_is_built_once_and_every_figure_measured(
    tmp_path: Path, cache: Path, database: str
) -> None:
    """Every figure of the table comes out, the webhooks were all acknowledged, and the
    history is built on the first run only."""
    first = _run(tmp_path, cache, database)
    assert first.returncode == 0, first.stdout + first.stderr
    assert f"{database} {ORDERS}: built in" in first.stdout
    figures = json.loads((tmp_path / "figures.json").read_text())[database][str(ORDERS)]
    expected = {
        "claim ms", "metric_figures job s", "command start s", "scrape ms", "run page 100 s",
        "export 100 s", "export 100 MiB", "feed pass s", "reconcile 7 days s",
        "webhook p99 idle ms", "webhook p99 busy ms", "webhook failed busy",
        "reconcile during s", "import during s", "busy rounds",
    }  # fmt: skip
    assert set(figures) == expected
    assert figures["webhook failed busy"] == 0
    # A tiny history's load is short: it is run again, up to five rounds, for more webhooks.
    assert 1 < figures["busy rounds"] <= 5
    assert all(value > 0 for name, value in figures.items() if name != "webhook failed busy")
    assert f"{database}: figure by orders of history" in first.stdout

    again = _run(tmp_path, cache, database, "claim")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "built in" not in again.stdout
    assert set(json.loads((tmp_path / "figures.json").read_text())[database][str(ORDERS)]) == {
        "claim ms"
    }
