"""Hostile input to every ``otacm`` command that takes some (ids, texts, dates, files),
generated from a fixed seed, on SQLite and PostgreSQL.

Every run either does its work (exit 0) or is refused: a non-zero exit, no traceback,
the reason as the last line of standard error, and the database exactly as it was. Most
runs go through click's ``CliRunner`` in this process (fast, and it can pass a NUL);
the defects an operator met run as real processes too, where a traceback is printed as
a user would see it.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from otacm.cli import main
from storage.engine import make_sessions
from tests.finance.conftest import PARTNER, Seeded, seed_run
from tests.support.database import dump
from tests.support.processes import ROOT

SEED = 20261207
"""The fuzz's seed: the same runs every time, so a failure can be replayed."""
RUNS_PER_COMMAND = 30

# Texts no column should take, or that look like something else (a number, an option, SQL).
HOSTILE_TEXTS = [
    "", " ", "\x00", "note\x00", "\ud800", "\udcff", "\r\n", "\t", "x" * 101, "x" * 5000,
    "\u00df" * 60, "\ufb03" * 40, "%s%n%x", "'; DROP TABLE ledger_line; --", "../../etc/passwd",
    "\u202eevil", "\U0001f600" * 30, "-1", "0", "null", "{}", "\\", "\x7f", "\ufeff",
]  # fmt: skip
HOSTILE_IDS = [
    "0", "-1", "1", "2", str(2**31), str(2**63 - 1), str(2**63), str(2**64), "9" * 40,
    "1e3", "0x10", " 7", "\u0661", "", "abc", str(-(2**63) - 1),
]  # fmt: skip
HOSTILE_DATES = [
    "9999-12-31", "9999-12-31T23:59:59", "9999-12-31T23:30:00-01:00", "0001-01-01",
    "0001-01-02", "0001-01-01T00:30:00+01:00", "2025-13-01", "2025-02-30", "now", "",
    "2025-01-01T00:00:00+25:00", "99999-01-01", "2025-06-01", "2025-06-01T12:00:00Z",
    "2025-06-01T12:00:00.1234567", "\x00", "\ud800",
]  # fmt: skip
HOSTILE_VALUES: list[Any] = [
    *HOSTILE_TEXTS, 2**63, 2**64, -1, 1.5, 10**400, True, None, [], {}, ["\ud800"], "1e3",
    "9" * 5000, "NaN", "9223372036855", "2147483648",
]  # fmt: skip
HOSTILE_REVISIONS = ["nope", "", "head+1", "-1", "0001", "base", "heads", "0011@head", "\x00"]


def _good_sale(reference: str) -> dict[str, Any]:
    return {
        "partner_id": PARTNER,
        "reference": reference,
        "sold_at": "2025-06-10T09:30:00+02:00",
        "quantity": 2,
        "amount": "200.00",
        "currency": "EUR",
    }


class Inputs:
    """The fuzz's inputs: argument lists for each command, from one random generator."""

    def __init__(self, rng: random.Random, directory: Path) -> None:
        self.rng = rng
        self.directory = directory
        self.files = 0

    def pick(self, values: list[Any]) -> Any:
        return self.rng.choice(values)

    def file(self, content: bytes, suffix: str) -> str:
        self.files += 1
        path = self.directory / f"input-{self.files}{suffix}"
        path.write_bytes(content)
        return str(path)

    def output_path(self) -> str:
        choices = [
            self.directory / "missing" / "report.csv",  # a folder that does not exist
            self.directory,  # a directory
            Path("/dev/full"),  # no room left
            self.directory / f"report-{self.files}.csv",  # fine
            Path(self.file(b"", ".txt")) / "inside-a-file.csv",
        ]
        return str(self.pick(choices))

    def report(self) -> list[str]:
        args = ["report", self.pick(HOSTILE_IDS)]
        if self.rng.random() < 0.5:
            args += ["--format", self.pick(["csv", "xlsx", "html", "json", "pdf", ""])]
        if self.rng.random() < 0.6:
            args += ["-o", self.output_path()]
        return args

    def exception_action(self) -> list[str]:
        args = ["exceptions", self.pick(["resolve", "accept"]), self.pick(HOSTILE_IDS)]
        if self.rng.random() < 0.8:
            args += ["--note", self.pick([*HOSTILE_TEXTS, "fixed at the venue"])]
        if self.rng.random() < 0.6:
            args += ["--actor", self.pick([*HOSTILE_TEXTS, "bob"])]
        return args

    def inbox_replay(self) -> list[str]:
        args = ["inbox", "replay"]
        for _ in range(self.rng.randint(1, 3)):
            args += ["--id", self.pick(HOSTILE_IDS)]
        if self.rng.random() < 0.3:
            args += ["--connection", self.pick(HOSTILE_TEXTS)]
        return args

    def inbox_list(self) -> list[str]:
        args = ["inbox", "list"]
        if self.rng.random() < 0.5:
            args += ["--state", self.pick([*HOSTILE_TEXTS, "dead", "done"])]
        if self.rng.random() < 0.3:
            args.append("--dead")
        if self.rng.random() < 0.5:
            args += ["--before", self.pick(HOSTILE_IDS)]
        if self.rng.random() < 0.5:
            args += ["--limit", self.pick(HOSTILE_IDS)]
        if self.rng.random() < 0.3:
            args += ["--connection", self.pick(HOSTILE_TEXTS)]
        if self.rng.random() < 0.5:
            args.append("--json")
        return args

    def runs_list(self) -> list[str]:
        args = ["runs", "list"]
        for option in ("--after", "--limit"):
            if self.rng.random() < 0.5:
                args += [option, self.pick(HOSTILE_IDS)]
        if self.rng.random() < 0.3:
            args += ["--connection", self.pick(HOSTILE_TEXTS)]
        if self.rng.random() < 0.5:
            args.append("--json")
        return args

    def exceptions_list(self) -> list[str]:
        args = ["exceptions", "list"]
        for option in ("--run", "--after", "--limit"):
            if self.rng.random() < 0.5:
                args += [option, self.pick(HOSTILE_IDS)]
        for option in ("--state", "--category"):
            if self.rng.random() < 0.4:
                args += [option, self.pick([*HOSTILE_TEXTS, "open", "orphan"])]
        if self.rng.random() < 0.3:
            args.append("--closed")
        if self.rng.random() < 0.5:
            args.append("--json")
        return args

    def reconcile(self) -> list[str]:
        args = ["reconcile"]
        if self.rng.random() < 0.7:
            args += ["--from", self.pick(HOSTILE_DATES)]
        if self.rng.random() < 0.7:
            args += ["--to", self.pick(HOSTILE_DATES)]
        if self.rng.random() < 0.4:
            args += ["--actor", self.pick(HOSTILE_TEXTS)]
        if self.rng.random() < 0.2:
            args += ["--connection", self.pick(HOSTILE_TEXTS)]
        return args

    def ledger_import(self) -> list[str]:
        kind = self.pick(["jsonl", "jsonl", "csv", "deep", "binary"])
        if kind == "deep":
            path = self.file(("[" * 5000 + "]" * 5000 + "\n").encode(), ".jsonl")
        elif kind == "binary":
            path = self.file(bytes(self.rng.randrange(256) for _ in range(200)), ".jsonl")
        else:
            rows = []
            for n in range(self.rng.randint(1, 4)):
                row = _good_sale(f"FUZZ-{self.files}-{n}")
                for _ in range(self.rng.randint(1, 2)):
                    row[self.pick([*row, "n\ud800te"])] = self.pick(HOSTILE_VALUES)
                rows.append(row)
            if kind == "csv":
                columns = list(_good_sale(""))
                lines = [",".join(columns)] + [
                    ",".join(_csv_field(row.get(column)) for column in columns) for row in rows
                ]
                path = self.file("\n".join(lines).encode("utf-8", "surrogatepass"), ".csv")
            else:
                text = "".join(json.dumps(row) + "\n" for row in rows)
                path = self.file(text.encode(), ".jsonl")
        args = ["ledger", "import", path]
        if self.rng.random() < 0.2:
            args += ["--format", self.pick(["csv", "jsonl", "xml"])]
        if self.rng.random() < 0.3:
            args.append("--skip-bad")
        if self.rng.random() < 0.2:
            args += ["--connection", self.pick(HOSTILE_TEXTS)]
        return args

    def order_file(self) -> str:
        """An order request that cannot be submitted: each is refused before it is sent."""
        order = {
            "partnerId": PARTNER,
            "sellToOrderReference": "FUZZ-SUBMIT",
            "items": [{"itemNo": "ADULT", "quantity": 1, "visitDate": "2030-01-01"}],
        }
        broken = self.pick(["deep", "binary", "surrogate", "nul", "quantity", "partner", "array"])
        if broken == "deep":
            return self.file(b"[" * 5000, ".json")
        if broken == "binary":
            return self.file(b"\xff\xfe\x00{", ".json")
        if broken == "surrogate":
            order["sellToOrderReference"] = "R\ud800"
        elif broken == "nul":
            order["sellToName"] = "Jane\x00"
        elif broken == "quantity":
            order["items"] = [{"itemNo": "ADULT", "quantity": 2**64}]
        elif broken == "partner":
            order["partnerId"] = self.pick(HOSTILE_VALUES)
        else:
            return self.file(b"[[[]]]", ".json")
        return self.file(json.dumps(order).encode(), ".json")

    def submit(self) -> list[str]:
        return ["submit", self.order_file()]

    def orders(self) -> list[str]:
        key = self.pick([t for t in HOSTILE_TEXTS if t.strip()])
        action = self.pick(["show", "cancel", "replace", "errors"])
        if action == "replace":
            return ["orders", "replace", key, self.order_file()]
        if action == "errors":
            return ["orders", "errors", "--connection", key]
        return ["orders", action, key]

    def config(self) -> list[str]:
        """A settings file that is no TOML, or TOML with hostile values."""
        kind = self.pick(["binary", "toml", "values"])
        if kind == "binary":
            content = bytes(self.rng.randrange(256) for _ in range(100))
        elif kind == "toml":
            content = self.pick([b"[[connections]", b"a = ", b"x = 1\nx = 2", b"\x00"])
        else:
            value = json.dumps(self.pick(HOSTILE_TEXTS)).replace("\\ud", "\\u00")
            content = f"db_lock_timeout = {value}\n[[connections]]\nname = {value}\n".encode()
        return ["--config", self.file(content, ".toml"), "report", "1"]

    def db_upgrade(self) -> list[str]:
        return ["db", "upgrade", "--revision", self.pick(HOSTILE_REVISIONS)]


def _csv_field(value: Any) -> str:
    text = "" if value is None else str(value)
    return '"' + text.replace('"', '""') + '"'


COMMANDS: dict[str, Callable[[Inputs], list[str]]] = {
    "report": Inputs.report,
    "exceptions": Inputs.exception_action,
    "inbox replay": Inputs.inbox_replay,
    "inbox list": Inputs.inbox_list,
    "runs list": Inputs.runs_list,
    "exceptions list": Inputs.exceptions_list,
    "reconcile": Inputs.reconcile,
    "ledger import": Inputs.ledger_import,
    "submit": Inputs.submit,
    "orders": Inputs.orders,
    "db upgrade": Inputs.db_upgrade,
    "--config": Inputs.config,
}


def _environment(engine: sa.Engine) -> dict[str, str]:
    """One venue connection, never reached (nothing listens on the discard port)."""
    return {
        "OTACM_DATABASE_URL": engine.url.render_as_string(hide_password=False),
        "OTACM_API_BASE_URL": "http://127.0.0.1:9",
        "OTACM_TENANT": "00000000-0000-0000-0000-000000000001",
        "OTACM_COMPANY": "CRONUS",
        "OTACM_API_KEY": "fuzz-secret-key",
        "OTACM_PARTNER_IDS": PARTNER,
    }


@pytest.fixture
def seeded(migrated_engine: sa.Engine) -> Iterator[Seeded]:
    """A finished run with two open exceptions, an order and two ledger lines."""
    yield seed_run(make_sessions(migrated_engine))


def _check_refusal(args: list[str], code: int, output: str, errors: str) -> None:
    """A refusal: non-zero, no traceback, and the reason as the last line of stderr."""
    shown = f"otacm {args!r} → {code}\n{output}\n{errors}"
    assert code != 0, shown
    assert "Traceback" not in output + errors, shown
    last = errors.rstrip("\n").rsplit("\n", 1)[-1]
    assert last.startswith(("Error: ", "nothing imported: ")), shown


def test_hostile_input_to_every_command_is_refused_cleanly(
    migrated_engine: sa.Engine, seeded: Seeded, tmp_path: Path
) -> None:
    """A few dozen seeded runs per command: done (exit 0) or refused, database unchanged."""
    rng = random.Random(SEED)
    inputs = Inputs(rng, tmp_path)
    environment = _environment(migrated_engine)
    runner = CliRunner()
    before = dump(migrated_engine)
    refused = 0
    for name, generate in COMMANDS.items():
        for _ in range(RUNS_PER_COMMAND):
            args = generate(inputs)
            result = runner.invoke(main, args, env=environment)
            # An exception other than SystemExit escaped the command: a traceback.
            assert result.exception is None or isinstance(result.exception, SystemExit), (
                name,
                args,
                result.exc_info,
            )
            after = dump(migrated_engine)
            if result.exit_code == 0:
                before = after  # the command did its work
                continue
            refused += 1
            _check_refusal(args, result.exit_code, result.stdout, result.stderr)
            assert after == before, f"otacm {args!r} was refused but changed the database"
    # The fuzz is mostly refusals, and some of each command's runs are.
    assert refused > len(COMMANDS) * RUNS_PER_COMMAND // 2


# The defects an operator met: (arguments, what the one line of error says).
DEFECTS_MET: list[tuple[tuple[str, ...], str]] = [
    (("report", str(2**63)), f"no reconciliation run {2**63}"),
    (("report", "1", "-o", "{tmp}/missing/report.csv"), "cannot write"),
    (("exceptions", "resolve", str(2**64), "--note", "x"), f"no reconciliation exception {2**64}"),
    (("exceptions", "accept", "1", "--note", "x\x00"), "the note holds a NUL character"),
    (("exceptions", "accept", "1", "--note", "x", "--actor", "a" * 101), "--actor is longer"),
    (("reconcile", "--to", "0001-01-02"), "start before year 1"),
    (("reconcile", "--to", "0001-01-01T00:30:00+01:00"), "out of range in UTC"),
    (("reconcile", "--actor", "a" * 101), "--actor is longer than 100 characters"),
    (("db", "upgrade", "--revision", "nope"), "'nope' is not a revision of the schema"),
    (("db", "upgrade", "--revision", ""), "'' is not a revision of the schema"),
    (("orders", "show", "\udcff"), "KEY holds a NUL character or an unpaired surrogate"),
    (("orders", "cancel", "R\x00"), "REF holds a NUL character or an unpaired surrogate"),
    (("--config", "{tmp}/binary.toml", "report", "1"), "binary.toml is not UTF-8 text"),
]


@pytest.mark.parametrize(
    ("case", "message"), DEFECTS_MET, ids=[" ".join(c)[:40] for c, _ in DEFECTS_MET]
)
def test_each_defect_met_is_one_line_and_changes_nothing(
    migrated_engine: sa.Engine, seeded: Seeded, tmp_path: Path, case: tuple[str, ...], message: str
) -> None:
    """Each case exits non-zero with its reason as one `Error:` line; the database is as it was."""
    args = [arg.format(tmp=tmp_path) for arg in case]
    (tmp_path / "binary.toml").write_bytes(b"\xff\xfe\x8f")
    before = dump(migrated_engine)

    result = CliRunner().invoke(main, args, env=_environment(migrated_engine))

    assert result.exception is None or isinstance(result.exception, SystemExit), result.exc_info
    _check_refusal(args, result.exit_code, result.stdout, result.stderr)
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert message in line
    assert dump(migrated_engine) == before


def test_an_id_no_row_can_have_replays_nothing(migrated_engine: sa.Engine, seeded: Seeded) -> None:
    """`inbox replay --id` beyond a BIGINT replays nothing, as any unknown id (not every row)."""
    before = dump(migrated_engine)

    result = CliRunner().invoke(
        main, ["inbox", "replay", "--id", "9" * 30], env=_environment(migrated_engine)
    )

    assert (result.exit_code, result.stdout) == (0, "0 dead-lettered inbox row(s) queued again\n")
    assert dump(migrated_engine) == before


# As real processes, where a traceback or an unprintable character shows as a user sees it.
REAL_PROCESS_CASES: list[tuple[str, ...]] = [
    ("report", str(2**63)),
    ("exceptions", "resolve", str(2**64), "--note", "x"),
    ("reconcile", "--to", "0001-01-02"),
    ("db", "upgrade", "--revision", "nope"),
    ("orders", "show", "\udcff"),  # a byte that is not UTF-8 in the command line
    ("ledger", "import", "{tmp}/hostile.jsonl"),
]


@pytest.mark.process
def test_real_processes_refuse_with_one_line(
    migrated_engine: sa.Engine, seeded: Seeded, tmp_path: Path
) -> None:
    """`python -m otacm`: non-zero, one `Error:` line (or the bad rows), no traceback."""
    rows = [
        {**_good_sale("R-1"), "amount": "9223372036855"},
        {**_good_sale("R-2"), "quantity": 2**64},
        {**_good_sale("R-3"), "sold_at": "9999-12-31T23:30:00-01:00"},
        {**_good_sale("R-4"), "reference": "R\ud800"},
        {**_good_sale("R-5"), "reference": "R\x00"},
        {**_good_sale("R-6"), "n\ud800te": "x"},
    ]
    (tmp_path / "hostile.jsonl").write_text(
        "".join(json.dumps(row) + "\n" for row in rows) + "[" * 5000 + "]" * 5000 + "\n"
    )
    environment = {
        **{k: v for k, v in os.environ.items() if not k.startswith("OTACM_")},
        **_environment(migrated_engine),
    }
    before = dump(migrated_engine)
    # Started together: each spends most of its time importing, not on the database.
    started = [
        (
            args,
            subprocess.Popen(
                [sys.executable, "-m", "otacm", *[os.fsencode(arg) for arg in args]],
                cwd=ROOT,
                env=environment,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            ),
        )
        for args in ([arg.format(tmp=tmp_path) for arg in case] for case in REAL_PROCESS_CASES)
    ]
    for args, process in started:
        out, err = process.communicate(timeout=120)
        output, errors = out.decode(errors="replace"), err.decode(errors="replace")
        _check_refusal(args, process.returncode, output, errors)
        if args[:2] == ["ledger", "import"]:
            assert output.count("bad: line") == len(rows) + 1, output
            assert "'n\\ud800te'" in output  # escaped: no terminal takes a surrogate
        else:
            assert len([line for line in errors.splitlines() if line.startswith("Error: ")]) == 1
    assert dump(migrated_engine) == before


# Commands reading tables that a database never migrated lacks.
UNMIGRATED_CASES: list[tuple[str, ...]] = [
    ("orders", "show", "R-1"),
    ("orders", "errors"),
    ("report", "1"),
    ("exceptions", "resolve", "1", "--note", "x"),
    ("inbox", "replay"),
    ("inbox", "list"),
    ("runs", "list"),
    ("exceptions", "list", "--run", "1"),
]


@pytest.mark.parametrize("case", UNMIGRATED_CASES, ids=[" ".join(c) for c in UNMIGRATED_CASES])
def test_a_database_never_migrated_is_one_line_naming_the_fix(
    engine: sa.Engine, case: tuple[str, ...]
) -> None:
    """On an empty database (no `otacm db upgrade` yet) a command says so in one line and
    exits 1, creating nothing."""
    result = CliRunner().invoke(main, list(case), env=_environment(engine))

    assert result.exception is None or isinstance(result.exception, SystemExit), result.exc_info
    _check_refusal(list(case), result.exit_code, result.stdout, result.stderr)
    assert "is not migrated" in result.stderr and "run `otacm db upgrade`" in result.stderr
    assert "fuzz-secret-key" not in result.stderr
    assert sa.inspect(engine).get_table_names() == []


# Every command that opens the database, with what it needs to get that far.
DATABASE_CASES: list[tuple[str, ...]] = [
    ("db", "upgrade"),
    ("db", "current"),
    ("db", "backup", "{tmp}/backup.sqlite3"),
    ("db", "restore", "{tmp}/sales.csv"),
    ("submit", "{tmp}/sales.csv"),
    ("orders", "show", "R-1"),
    ("orders", "cancel", "R-1"),
    ("orders", "errors"),
    ("ledger", "import", "{tmp}/sales.csv"),
    ("report", "1"),
    ("inbox", "replay"),
    ("inbox", "list", "--dead"),
    ("finance", "sign-out-all"),
    ("reconcile",),
    ("exceptions", "accept", "1", "--note", "x"),
    ("privacy", "erase", "--email", "someone@example.com"),
]


@pytest.mark.parametrize(
    "case", DATABASE_CASES, ids=[" ".join(w for w in c[:2] if "{" not in w) for c in DATABASE_CASES]
)
def test_a_database_that_cannot_be_opened_is_one_line_from_every_command(
    tmp_path: Path, case: tuple[str, ...]
) -> None:
    """A SQLite database whose directory cannot be made (a file in its way): every command
    that opens the database says so in one line and exits 1, never a traceback."""
    (tmp_path / "sales.csv").write_text("")
    (tmp_path / "file").write_text("")
    environment = {
        **_environment(sa.create_engine("sqlite://")),
        "OTACM_DATABASE_URL": f"sqlite:///{tmp_path}/file/otacm.sqlite3",
    }
    args = [arg.format(tmp=tmp_path) for arg in case]
    result = CliRunner().invoke(main, args, env=environment)

    assert result.exception is None or isinstance(result.exception, SystemExit), result.exc_info
    _check_refusal(args, result.exit_code, result.stdout, result.stderr)
    assert f"cannot create {tmp_path}/file, the SQLite database's directory" in result.stderr


@pytest.mark.parametrize(
    "args",
    [
        ("doctor", "--timeout", "nan"),
        ("doctor", "--timeout", "inf"),
        ("health", "--max-age", "nan"),
        ("demo", "--pickup-interval", "inf"),
        ("demo", "--timeout", "nan"),
    ],
    ids=lambda args: " ".join(args),
)
def test_seconds_that_are_not_finite_are_refused(tmp_path: Path, args: tuple[str, ...]) -> None:
    """A duration of NaN or infinity is a usage error naming the option (exit 2), before
    anything is started."""
    result = CliRunner().invoke(
        main, list(args), env={"OTACM_DATABASE_URL": f"sqlite:///{tmp_path}/none.sqlite3"}
    )

    assert result.exit_code == 2, result.output
    assert "is not a finite number of seconds" in result.stderr
    assert not (tmp_path / "none.sqlite3").exists()
