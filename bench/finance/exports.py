"""bench/finance --exports: a run's exports in rows/s, this code against a baseline.

Each export runs in a process of its own (this file run as a script) that imports
otacm from the code it is given: this checkout, or a baseline commit unpacked into the
benchmark's directory (``git archive``), on the same database in the same run. The
process opens the run's report as ``otacm report`` and the finance pages' downloads do
(:func:`reconciler.report.open_run_report`, :func:`reconciler.report_formats.stream_report`)
and writes it to a file; ``read`` only walks the exceptions. It prints one line of JSON:
rows, wall and CPU seconds, bytes, the output's SHA-256 (for an XLSX, of its members'
names and contents: the archive's own bytes carry the time it was written) and its own
peak RSS (``VmHWM``). The bench prints each export's rows/s for both codes, the ratio,
and whether both wrote the same bytes.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPOSITORY = HERE.parents[1]

BASELINE = "e9e2287"
"""The commit before exports read rows as the driver returns them and wrote CSV and JSON
rows with less work per cell."""
FORMATS = ("read", "csv", "json", "xlsx")
"""What ``--exports`` times by default (``html`` too when asked)."""
NOW = dt.datetime(2026, 12, 7, 12, tzinfo=dt.UTC)


@dataclass(frozen=True)
class Export:
    """One export by one code: its figures as the child process printed them."""

    rows: int
    wall: float
    cpu: float
    size: int
    digest: str
    peak_mib: float


def unpack(revision: str, directory: Path) -> Path:
    """The code of ``revision`` of this repository, unpacked under ``directory``."""
    target = directory / f"code-{revision}"
    if not target.exists():
        archive = subprocess.run(
            ["git", "-C", str(REPOSITORY), "archive", revision],
            check=True,
            capture_output=True,
        ).stdout
        target.mkdir()
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(target, filter="data")
    return target


def export(code: Path, url: str, run_id: int, fmt: str, target: Path) -> Export:
    """Run one export in a process importing otacm from ``code``."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("OTACM_")}
    environment["PYTHONPATH"] = str(code)
    found = subprocess.run(
        [sys.executable, str(HERE / "exports.py"), url, str(run_id), fmt, str(target)],
        env=environment,
        check=True,
        capture_output=True,
        text=True,
        cwd=code,
    )
    return Export(**json.loads(found.stdout.strip().splitlines()[-1]))


def compare(
    url: str, runs: dict[int, int], formats: tuple[str, ...], baseline: Path, directory: Path
) -> Iterator[tuple[int, str, Export, Export]]:
    """Each export of each run, by the baseline code then by this one."""
    for size, run_id in runs.items():
        for fmt in formats:
            target = directory / f"export.{fmt}"
            before = export(baseline, url, run_id, fmt, target)
            after = export(REPOSITORY, url, run_id, fmt, target)
            target.unlink(missing_ok=True)
            print_comparison(size, fmt, before, after)
            yield size, fmt, before, after


def print_comparison(size: int, fmt: str, before: Export, after: Export) -> None:
    same = "same output" if before.digest == after.digest else "OUTPUT DIFFERS"
    if before.rows != after.rows:
        same += f" (rows {before.rows} / {after.rows})"
    print(
        f"  {fmt:5} {size:>10,}  before {_rate(before):>9} rows/s ({before.wall:7.1f} s, "
        f"cpu {before.cpu:7.1f} s, {before.peak_mib:5.0f} MiB)  after {_rate(after):>9} "
        f"rows/s ({after.wall:7.1f} s, cpu {after.cpu:7.1f} s, {after.peak_mib:5.0f} MiB)  "
        f"{before.wall / after.wall:4.1f}x wall {before.cpu / after.cpu:4.1f}x cpu  {same}",
        flush=True,
    )


def _rate(figures: Export) -> str:
    return f"{figures.rows / figures.wall:,.0f}" if figures.wall else "-"


def print_table(
    database: str, compared: list[tuple[int, str, Export, Export]], sizes: tuple[int, ...]
) -> None:
    """µs of CPU per row, before → after (the ratio), per export and size."""
    print(f"\n{database}: CPU µs per row, before -> after (ratio); wall s after")
    print(f"{'export':8}" + "".join(f"{size:>34,}" for size in sizes))
    for fmt in dict.fromkeys(fmt for _, fmt, _, _ in compared):
        cells = ""
        for size in sizes:
            found = [(b, a) for s, f, b, a in compared if (s, f) == (size, fmt)]
            if not found or not found[0][1].rows:
                cells += f"{'':>34}"
                continue
            before, after = found[0]
            text = (
                f"{before.cpu / before.rows * 1e6:.1f} -> {after.cpu / after.rows * 1e6:.1f} "
                f"({before.cpu / after.cpu:.1f}x) {after.wall:.1f} s"
            )
            cells += f"{text:>34}"
        print(f"{fmt:8}{cells}")


# --- the child process -------------------------------------------------------------------


def _peak_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _digest(path: Path, fmt: str) -> str:
    digest = hashlib.sha256()
    if fmt == "xlsx":
        with zipfile.ZipFile(path) as archive:
            for name in archive.namelist():
                digest.update(name.encode())
                with archive.open(name) as member:
                    while piece := member.read(1 << 20):
                        digest.update(piece)
        return digest.hexdigest()
    with path.open("rb") as content:
        while piece := content.read(1 << 20):
            digest.update(piece)
    return digest.hexdigest()


def child(url: str, run_id: int, fmt: str, target: Path) -> None:
    """One export, with the otacm on ``sys.path`` first; print its figures as JSON."""
    from reconciler import report as report_module
    from reconciler.report import open_run_report
    from reconciler.report_formats import stream_report
    from storage.engine import make_engine, make_sessions

    code = Path(os.environ["PYTHONPATH"]).resolve()
    if not Path(report_module.__file__ or "").resolve().is_relative_to(code):
        raise SystemExit(f"otacm was imported from {report_module.__file__}, not from {code}")

    engine = make_engine(url)
    try:
        sessions = make_sessions(engine, read_only=True)
        started, cpu = time.perf_counter(), time.process_time()
        report = open_run_report(sessions, run_id, now=NOW)
        rows = len(report.exceptions) + len(report.closed)
        size = 0
        with target.open("wb") as out:
            if fmt == "read":
                for row in report.exceptions:
                    out.write(b"%d\n" % row.id)
            else:
                for piece in stream_report(report, fmt):
                    out.write(piece)
            size = out.tell()
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    finally:
        engine.dispose()
    figures = Export(rows, wall, cpu, size, _digest(target, fmt), _peak_mib())
    print(json.dumps(figures.__dict__))


if __name__ == "__main__":
    child(sys.argv[1], int(sys.argv[2]), sys.argv[3], Path(sys.argv[4]))
