"""The deployment files say what the code does."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from otacm.settings import Settings
from otacm.web import gunicorn_options

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


@pytest.mark.process
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


# --- the dependency locks ----------------------------------------------------------------

ROOT = DEPLOY.parent
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")


def _pins(lock: str) -> dict[str, tuple[str, list[str]]]:
    """A lock file's pins: canonical name → (version, what it is required by)."""
    pins: dict[str, tuple[str, list[str]]] = {}
    name = ""
    for line in (ROOT / lock).read_text(encoding="utf-8").splitlines():
        pinned = PIN.match(line)
        if pinned:
            name = canonicalize_name(pinned.group(1))
            pins[name] = (pinned.group(2), [])
        elif name and line.strip().startswith("# via"):
            via = line.strip().removeprefix("# via").strip()
            if via:
                pins[name][1].append(via)
        elif name and line.strip().startswith("#   "):
            pins[name][1].append(line.strip().removeprefix("#").strip())
    return pins


def _pyproject_requirements(extra: str | None) -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    listed = list(project["dependencies"])
    if extra:
        listed += project["optional-dependencies"][extra]
    return [Requirement(text) for text in listed]


@pytest.mark.parametrize(
    ("lock", "extra"), [("requirements.lock", None), ("requirements-dev.lock", "dev")]
)
def test_the_lock_pins_every_dependency_of_pyproject_within_its_range(
    lock: str, extra: str | None
) -> None:
    """Each requirement of pyproject.toml (and of the extras it asks for) is pinned, at a
    version it allows; nothing is locked as pyproject's that pyproject no longer lists.
    When this fails, run scripts/lock."""
    pins = _pins(lock)
    wanted = _pyproject_requirements(extra)
    problems = []
    for requirement in wanted:
        name = canonicalize_name(requirement.name)
        if name not in pins:
            problems.append(f"{requirement} is not in {lock}")
            continue
        if not requirement.specifier.contains(pins[name][0], prereleases=True):
            problems.append(f"{lock} pins {name}=={pins[name][0]}, outside {requirement}")
        for extra_name in requirement.extras:
            # The extra's own requirements, from the installed package's metadata.
            for needed in map(Requirement, metadata.requires(requirement.name) or []):
                marker = needed.marker
                extra_only = (
                    marker is not None
                    and marker.evaluate({"extra": extra_name})
                    and not marker.evaluate({"extra": ""})
                )
                if extra_only and canonicalize_name(needed.name) not in pins:
                    problems.append(f"{needed.name} (from {requirement}) is not in {lock}")
    listed = {canonicalize_name(requirement.name) for requirement in wanted}
    for name, (_, required_by) in pins.items():
        if "otacm (pyproject.toml)" in required_by and name not in listed:
            problems.append(f"{lock} locks {name} for pyproject.toml, which no longer lists it")
    assert not problems, "run scripts/lock: " + "; ".join(problems)


def test_every_pin_has_its_hashes_and_ci_tests_what_the_image_ships() -> None:
    """Every pin carries hashes (pip --require-hashes needs them), and the dev lock pins
    each runtime package at the runtime lock's version."""
    for lock in ("requirements.lock", "requirements-dev.lock"):
        text = (ROOT / lock).read_text(encoding="utf-8")
        entries = re.split(r"\n(?=[A-Za-z0-9])", text.split("\n", 2)[2])
        for entry in entries:
            assert "--hash=sha256:" in entry, f"{lock}: no hash for {entry.splitlines()[0]}"
    runtime, dev = _pins("requirements.lock"), _pins("requirements-dev.lock")
    assert {name: dev[name][0] for name in runtime if name in dev} == {
        name: version for name, (version, _) in runtime.items()
    }


# --- the container image -----------------------------------------------------------------

PACKAGES_FOUND = (
    "otacm",
    "venue",
    "storage",
    "orders",
    "receiver",
    "heartbeat",
    "reconciler",
    "sandbox",
)


def test_the_dockerfile_builds_the_whole_project_not_a_list_of_folders() -> None:
    """The build stage copies the whole context and the wheel is built from it, so
    whatever pyproject.toml's package discovery finds is in the image."""
    from tests.otacm.test_image import dockerfile_instructions

    instructions = dockerfile_instructions((DEPLOY / "Dockerfile").read_text())
    copies = [args.split() for keyword, args in instructions if keyword == "COPY"]
    assert [".", "."] in copies
    sources = {part.rstrip("/").removeprefix("./") for args in copies for part in args[:-1]}
    assert not sources & set(PACKAGES_FOUND), "a package folder is copied by name"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert {f"{p}*" for p in PACKAGES_FOUND} == set(
        project["tool"]["setuptools"]["packages"]["find"]["include"]
    )


def test_the_image_has_one_health_check_for_every_role() -> None:
    """HEALTHCHECK runs `otacm health`, which needs the liveness directory the image sets."""
    from tests.otacm.test_image import dockerfile_instructions

    instructions = dockerfile_instructions((DEPLOY / "Dockerfile").read_text())
    (check,) = [args for keyword, args in instructions if keyword == "HEALTHCHECK"]
    assert check.endswith('CMD ["otacm", "health"]')
    environment = " ".join(args for keyword, args in instructions if keyword == "ENV")
    assert "OTACM_LIVENESS_DIR=" in environment


@pytest.mark.process
def test_the_dockerfile_passes_hadolint() -> None:
    """hadolint (from the dev lock) finds nothing, not even an info, in the Dockerfile."""
    hadolint = Path(sys.executable).with_name("hadolint")
    done = subprocess.run(
        [str(hadolint), "--no-color", "--failure-threshold", "info", str(DEPLOY / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")


def test_compose_keeps_secrets_on_a_volume_and_no_password_in_the_file() -> None:
    """Every otacm service mounts one named volume at the image's OTACM_SECRETS_DIR; the
    database reads its password from a secret file; no password is written in compose.yaml."""
    text = (DEPLOY / "compose.yaml").read_text()
    compose = yaml.safe_load(text)
    services = compose["services"]
    otacm = {name: s for name, s in services.items() if s.get("build")}
    assert set(otacm) == {"migrate", "web", "worker", "scheduler"}
    for name, service in otacm.items():
        secrets_dir = service["environment"]["OTACM_SECRETS_DIR"]
        assert f"otacm-secrets:{secrets_dir}" in service["volumes"], name
        assert service["env_file"] == "otacm.env", name
        assert "OTACM_DATABASE_URL" not in service["environment"], name
    assert "otacm-secrets" in compose["volumes"]
    db = services["db"]["environment"]
    assert "POSTGRES_PASSWORD" not in db
    assert db["POSTGRES_PASSWORD_FILE"] == "/run/secrets/db-password"
    assert compose["secrets"]["db-password"] == {"file": "./secrets/db-password"}
    assert not re.search(r"://[^/\s:@]+:[^@\s]+@", text), "a URL with a password"


def test_the_env_example_names_every_setting() -> None:
    """deploy/otacm.env.example names each OTACM_ setting (set or as a commented default);
    only the lists of connections and of shop endpoints need the TOML file."""
    example = (DEPLOY / "otacm.env.example").read_text()
    named = set(re.findall(r"^#? ?(OTACM_[A-Z_]+)=", example, flags=re.MULTILINE))
    lists = ("connections", "shop_endpoints")
    expected = {f"OTACM_{name.upper()}" for name in Settings.model_fields if name not in lists}
    expected |= {"OTACM_CONFIG_FILE", "OTACM_BIND", "OTACM_LOG_LEVEL", "OTACM_LOG_FORMAT"}
    assert sorted(expected - named) == []
    assert sorted(named - expected) == []


# --- systemd -----------------------------------------------------------------------------

SYSTEMD = DEPLOY / "systemd"
SERVICES = ("otacm-migrate", "otacm-web", "otacm-worker", "otacm-scheduler")
MAX_EXPOSURE = 3.0


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (scripts/ensure-systemd installs it)")
    return path


def _unit(name: str) -> dict[str, list[str]]:
    """A unit file's settings, ``Section.Key`` → every value it is given."""
    values: dict[str, list[str]] = {}
    section = ""
    for raw in (SYSTEMD / name).read_text().splitlines():
        line = raw.strip()
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
        elif line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            values.setdefault(f"{section}.{key}", []).append(value)
    return values


@pytest.mark.systemd
@pytest.mark.parametrize("service", SERVICES)
def test_every_unit_is_sandboxed_to_an_exposure_of_3_or_less(service: str, tmp_path: Path) -> None:
    """deploy/systemd installed as an operator installs it (into /etc/systemd/system, the
    hardening drop-in with it), rated by `systemd-analyze security`; no key it ignores."""
    analyze = _tool("systemd-analyze")
    shutil.copytree(SYSTEMD, tmp_path / "etc" / "systemd" / "system")
    done = subprocess.run(
        [analyze, "security", "--offline=true", f"--root={tmp_path}", f"{service}.service"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == "", done.stderr  # an unknown or misplaced key is a warning here
    exposure = re.search(r"Overall exposure level for \S+: ([\d.]+)", done.stdout)
    assert exposure, done.stdout
    assert float(exposure.group(1)) <= MAX_EXPOSURE, done.stdout


@pytest.mark.systemd
def test_sysusers_creates_the_service_user_with_the_state_directory_as_home(
    tmp_path: Path,
) -> None:
    sysusers = _tool("systemd-sysusers")
    (tmp_path / "etc").mkdir()
    done = subprocess.run(
        [sysusers, f"--root={tmp_path}", str(SYSTEMD / "otacm.sysusers")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    (entry,) = [
        line
        for line in (tmp_path / "etc" / "passwd").read_text().splitlines()
        if line.startswith("otacm:")
    ]
    fields = entry.split(":")
    assert fields[5] == "/var/lib/otacm"
    assert fields[6].endswith("nologin")
    hardening = _unit("otacm-.service.d/hardening.conf")
    assert hardening["Service.User"] == ["otacm"]
    assert hardening["Service.StateDirectory"] == ["otacm"]


def test_restarting_the_target_runs_the_migration_again_before_the_roles() -> None:
    """`systemctl restart otacm.target` restarts what is PartOf it: the migration (a
    oneshot, so it runs again) and the roles, which start after it and need it."""
    migrate = _unit("otacm-migrate.service")
    assert migrate["Service.Type"] == ["oneshot"]
    assert migrate["Unit.PartOf"] == ["otacm.target"]
    assert "otacm-migrate.service" in _unit("otacm.target")["Unit.Wants"][0].split()
    for role in SERVICES[1:]:
        unit = _unit(f"{role}.service")
        assert unit["Unit.PartOf"] == ["otacm.target"]
        assert "otacm-migrate.service" in unit["Unit.Requires"][0].split()
        assert "otacm-migrate.service" in unit["Unit.After"][0].split()
        assert unit["Install.WantedBy"] == ["otacm.target"]
