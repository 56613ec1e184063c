"""Hostile ledger files: every row a database could not take is a bad row with its line
and reason, on SQLite and PostgreSQL alike, and never a traceback or a stored row."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from sqlalchemy.orm import Session, sessionmaker

from otacm.cli import main
from reconciler.ledger import import_ledger
from storage.models import LedgerLine, ensure_connection
from tests.reconciler.test_ledger import T0, sale

# (what the row holds, the column at fault, a part of the reason)
HOSTILE_ROWS: list[tuple[str, dict[str, Any], str, str]] = [
    ("an amount over the ledger's maximum", {"amount": "9223372036855"}, "amount", "largest"),
    ("an amount of 5,000 digits", {"amount": "9" * 5000}, "amount", "largest"),
    ("a quantity beyond 64 bits", {"quantity": 2**64}, "quantity", "more than"),
    ("a quantity beyond a 32-bit column", {"quantity": 2**31}, "quantity", "more than"),
    ("a quantity of 5,000 digits", {"quantity": "9" * 5000}, "quantity", "more than"),
    ("a sold_at past year 9999 in UTC", {"sold_at": "9999-12-31T23:30:00-01:00"}, "sold_at",
     "out of range"),
    ("a sold_at before year 1 in UTC", {"sold_at": "0001-01-01T00:30:00+01:00"}, "sold_at",
     "out of range"),
    ("a lone surrogate in the reference", {"reference": "R-\ud800"}, "reference", "surrogate"),
    ("a NUL in the reference", {"reference": "R-\x00"}, "reference", "NUL"),
    ("a NUL in the payment reference", {"payment_reference": "P\x00"}, "payment_reference",
     "NUL"),
    ("a surrogate in a wallet number", {"external_reference_numbers": ["E-1", "\udfff"]},
     "external_reference_numbers", "surrogate"),
    ("a reference too wide once upper-cased", {"reference": "\ufb03" * 50}, "reference",
     "upper case"),
    ("a non-ASCII digit quantity", {"quantity": "\u00b2"}, "quantity", "whole number"),
]  # fmt: skip


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return path


def _stored(sessions: sessionmaker[Session]) -> int:
    with sessions() as session:
        return session.scalar(sa.select(sa.func.count()).select_from(LedgerLine)) or 0


@pytest.mark.parametrize(
    ("changes", "column", "reason"),
    [pytest.param(c, col, r, id=name) for name, c, col, r in HOSTILE_ROWS],
)
def test_a_row_no_column_takes_is_a_bad_row(
    sessions: sessionmaker[Session],
    tmp_path: Path,
    changes: dict[str, Any],
    column: str,
    reason: str,
) -> None:
    """Each hostile value is a bad row naming its line and column; nothing is written."""
    with sessions.begin() as session:
        connection_id = ensure_connection(session, "default")
    path = _write(
        tmp_path / "sales.jsonl",
        [json.dumps(sale("GOOD-1")), json.dumps({**sale("BAD-1"), **changes})],
    )

    result = import_ledger(sessions, path, connection_id=connection_id, now=T0)

    assert [(bad.line, bad.column) for bad in result.bad_rows] == [(2, column)]
    assert reason in result.bad_rows[0].reason
    assert not result.written
    assert _stored(sessions) == 0


def test_deeply_nested_json_and_odd_keys_are_bad_rows(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    """A 5,000-deep JSON line and an unknown key holding a surrogate: bad rows, shown escaped."""
    with sessions.begin() as session:
        connection_id = ensure_connection(session, "default")
    odd_key = json.dumps({**sale("ODD-1"), "n\ud800te": "x"})
    path = _write(tmp_path / "sales.jsonl", ["[" * 5000 + "]" * 5000, odd_key])

    result = import_ledger(sessions, path, connection_id=connection_id, now=T0)

    assert [bad.line for bad in result.bad_rows] == [1, 2]
    assert "nested too deeply" in result.bad_rows[0].reason
    assert result.bad_rows[1].column == "'n\\ud800te'"
    assert "unknown column" in result.bad_rows[1].reason
    assert _stored(sessions) == 0


def test_the_command_prints_each_hostile_row_on_one_line(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    """`otacm ledger import` lists every hostile row (line and reason), exits 1, no traceback."""
    url = sessions.kw["bind"].url.render_as_string(hide_password=False)
    rows = [json.dumps({**sale(f"BAD-{n}"), **changes}) for n, (_, changes, _, _) in
            enumerate(HOSTILE_ROWS)]  # fmt: skip
    path = _write(tmp_path / "sales.jsonl", ["[" * 5000 + "]" * 5000, *rows])

    result = CliRunner().invoke(
        main,
        ["ledger", "import", str(path)],
        env={
            "OTACM_DATABASE_URL": url,
            "OTACM_API_BASE_URL": "http://127.0.0.1:9",
            "OTACM_TENANT": "t",
            "OTACM_COMPANY": "CRONUS",
            "OTACM_API_KEY": "ledger-secret-key",
        },
    )

    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    numbers = [re.match(r"bad: line (\d+)[,:]", line) for line in result.stdout.splitlines()]
    assert [int(m.group(1)) for m in numbers if m] == list(range(1, len(HOSTILE_ROWS) + 2))
    assert "Traceback" not in result.output
    assert _stored(sessions) == 0
