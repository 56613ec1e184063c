"""The deployment files say what the code does."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from otacm.processes import gunicorn_options

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def test_gunicorn_conf_is_the_settings_otacm_web_uses(tmp_path: Path) -> None:
    """`gunicorn -c deploy/gunicorn.conf.py` loads the app with otacm web's own options."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTACM_")}
    env.update(OTACM_BIND="127.0.0.1:8123", OTACM_WEB_WORKERS="3")
    env["OTACM_DATABASE_URL"] = f"sqlite:///{tmp_path / 'check.sqlite3'}"
    gunicorn = Path(sys.executable).with_name("gunicorn")
    result = subprocess.run(
        [
            str(gunicorn),
            "-c",
            str(DEPLOY / "gunicorn.conf.py"),
            "--check-config",
            "--print-config",
            "receiver:create_app()",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    printed = dict(
        (line.split("=", 1)[0].strip(), line.split("=", 1)[1].strip())
        for line in result.stdout.splitlines()
        if "=" in line
    )
    expected = gunicorn_options("127.0.0.1:8123", 3)
    assert printed["bind"] == "['127.0.0.1:8123']"
    assert printed["workers"] == "3"
    assert printed["worker_class"] == expected["worker_class"]
    assert printed["timeout"] == str(expected["timeout"])
    assert printed["control_socket_disable"] == "True"


def test_every_role_has_a_unit_that_waits_for_the_migration() -> None:
    """web, worker and scheduler units require the release step (otacm db upgrade)."""
    migrate = (DEPLOY / "systemd" / "otacm-migrate.service").read_text()
    assert "ExecStart=/opt/otacm/bin/otacm db upgrade" in migrate
    for role in ("web", "worker", "scheduler"):
        unit = (DEPLOY / "systemd" / f"otacm-{role}.service").read_text()
        assert f"ExecStart=/opt/otacm/bin/otacm {role}" in unit
        assert "Requires=otacm-migrate.service" in unit
