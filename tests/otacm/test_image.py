"""The container image's Python payload, built as deploy/Dockerfile builds it, runs every role.

There is no Docker daemon where the tests run, so the test does what the Dockerfile's
steps do: the build context as Docker sends it (the repository less what .dockerignore
names, computed by Docker's own Python client), the wheel built from that copy alone,
then a fresh virtualenv given the runtime lock with ``--require-hashes`` and the wheel
with ``--no-deps``. Every role then runs from that virtualenv, outside the repository.
``DOCKERFILE_RUNS`` is what the Dockerfile runs, word for word; a test holds them equal.
(Unlike in the image, pip's download cache is kept and no bytecode is compiled, so the
suite stays quick.)
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import venv
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from docker.utils.build import exclude_paths

from otacm.liveness import check
from tests.support.processes import ROOT, otacm_environment
from tests.support.stack import sandbox_settings, serve_sandbox, wait_until

pytestmark = pytest.mark.image

DOCKERFILE = ROOT / "deploy" / "Dockerfile"
DOCKERFILE_RUNS = [
    "pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .",
    "pip install --no-cache-dir --require-hashes -r /tmp/requirements.lock"
    " && rm /tmp/requirements.lock",
    "pip install --no-cache-dir --no-deps /wheels/*.whl && rm -rf /wheels && pip check",
    "useradd --system --uid 10001 --user-group --create-home --home-dir /var/lib/otacm otacm"
    " && install -d -o otacm -g otacm -m 0700 /var/lib/otacm/secrets",
]


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """The Dockerfile's instructions as ``(KEYWORD, arguments)``, continuations joined."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        keyword, _, arguments = (pending + line).partition(" ")
        instructions.append((keyword.upper(), " ".join(arguments.split())))
        pending = ""
    return instructions


def context_files(root: Path) -> list[str]:
    """The files of ``root`` that ``docker build -f deploy/Dockerfile`` sends as its
    context: ``root/.dockerignore`` applied, by Docker's own Python client."""
    patterns = [
        line.strip()
        for line in (root / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    included = exclude_paths(str(root), patterns, dockerfile="deploy/Dockerfile")
    return sorted(path for path in included if (root / path).is_file())


def build_context(destination: Path) -> Path:
    """A copy of the repository's build context in ``destination``."""
    for relative in context_files(ROOT):
        target = destination / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / relative, target)
    return destination


def _pip(*args: str, cwd: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env={k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")},
    )
    assert done.returncode == 0, f"pip {' '.join(args)}:\n{done.stdout}\n{done.stderr}"


@pytest.fixture(scope="session")
def image_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ``bin`` directory of a virtualenv holding exactly what the image installs.

    The virtualenv has no pip of its own (the image's Python has one): this pip installs
    into it (``--python``), which saves installing pip into every new virtualenv.
    """
    root = tmp_path_factory.mktemp("image")
    context = build_context(root / "src")
    wheels = root / "wheels"
    # RUN pip wheel ... --wheel-dir /wheels .   (in the build stage, WORKDIR /src)
    _pip("wheel", "--no-deps", "--wheel-dir", str(wheels), ".", cwd=context)
    environment = root / "venv"
    venv.create(environment, with_pip=False)
    image = ("--python", str(environment / "bin" / "python"))
    # RUN pip install --require-hashes -r /tmp/requirements.lock (COPY'd from the context)
    lock = str(context / "requirements.lock")
    _pip(*image, "install", "--no-compile", "--require-hashes", "-r", lock, cwd=root)
    # RUN pip install --no-deps /wheels/*.whl && pip check
    (wheel,) = wheels.glob("otacm-*.whl")
    _pip(*image, "install", "--no-compile", "--no-deps", str(wheel), cwd=root)
    _pip(*image, "check", cwd=root)
    return environment / "bin"


def test_the_tests_build_what_the_dockerfile_runs() -> None:
    """The steps image_bin follows are the Dockerfile's own (else update both together)."""
    runs = [
        args
        for keyword, args in dockerfile_instructions(DOCKERFILE.read_text())
        if keyword == "RUN"
    ]
    assert runs == DOCKERFILE_RUNS


def test_the_build_context_holds_the_project_and_no_local_state(tmp_path: Path) -> None:
    """What pyproject.toml packages is in the context; a checkout's state and an operator's
    secrets (deploy/otacm.env, deploy/secrets/) are not."""
    files = context_files(ROOT)
    for package in ("otacm", "venue", "storage", "receiver", "heartbeat", "reconciler", "sandbox"):
        assert f"{package}/__init__.py" in files, package
    assert {"pyproject.toml", "README.md", "requirements.lock"} <= set(files)
    assert not [f for f in files if "__pycache__" in f or f.startswith((".venv/", "var/"))]

    checkout = tmp_path / "checkout"
    for relative in (
        "otacm/__init__.py",
        "deploy/Dockerfile",
        "deploy/otacm.env",
        "deploy/secrets/db-password",
        ".venv/bin/python",
        "var/otacm.sqlite3",
        "otacm/__pycache__/cli.cpython-311.pyc",
        "otacm.egg-info/PKG-INFO",
        ".git",
    ):
        (checkout / relative).parent.mkdir(parents=True, exist_ok=True)
        (checkout / relative).write_text("x")
    shutil.copy(ROOT / ".dockerignore", checkout)
    assert context_files(checkout) == [".dockerignore", "deploy/Dockerfile", "otacm/__init__.py"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _all_healthy(liveness: Path) -> bool:
    verdicts = check(liveness)
    return len(verdicts) == 3 and all(verdict.healthy for verdict in verdicts)


class Role:
    """One ``otacm`` process from the image's virtualenv, in a directory of its own."""

    def __init__(self, image_bin: Path, args: list[str], env: dict[str, str], cwd: Path) -> None:
        self.log = cwd / f"{args[0]}.log"
        with self.log.open("wb") as output:
            self.popen = subprocess.Popen(
                [str(image_bin / "otacm"), *args],
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
            )

    def stop(self) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGCONT)
            self.popen.terminate()
            try:
                self.popen.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=30)
        return self.popen.returncode


def _otacm(
    image_bin: Path, *args: str, env: dict[str, str], cwd: Path
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(image_bin / "otacm"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    """Where the roles run: not the repository, so nothing is imported from it."""
    directory = tmp_path / "run"
    directory.mkdir()
    yield directory


def test_every_role_runs_from_the_image_payload(
    image_bin: Path, engine: sa.Engine, workdir: Path, tmp_path: Path
) -> None:
    """db upgrade, doctor, web, worker and scheduler start from the image's packages, and
    `otacm health` (the image's HEALTHCHECK) passes for each running role and fails for a
    worker whose loop is frozen."""
    python = image_bin / "python"
    where = subprocess.run(
        [str(python), "-c", "import heartbeat, otacm; print(heartbeat.__file__, otacm.__file__)"],
        cwd=workdir,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert str(ROOT) not in where and "site-packages" in where

    port = _free_port()
    with serve_sandbox() as sandbox:
        settings = sandbox_settings(sandbox, engine, {"api_tokens": ["image-token"]})
        env = otacm_environment(
            settings,
            OTACM_LIVENESS_DIR=str(tmp_path / "liveness"),
            OTACM_SECRETS_DIR=str(tmp_path / "secrets"),
        )
        env.pop("PYTHONPATH", None)
        env["PATH"] = f"{image_bin}{os.pathsep}{env.get('PATH', '')}"

        upgraded = _otacm(image_bin, "db", "upgrade", env=env, cwd=workdir)
        assert upgraded.returncode == 0, upgraded.stderr
        assert "database at revision" in upgraded.stdout
        # Going live as an operator does: subscribe (a client state is generated into the
        # secrets directory), then the doctor finds nothing failing.
        url = f"http://127.0.0.1:{port}/webhooks/ota-cm"
        env["OTACM_WEBHOOK_URL"] = url
        subscribed = _otacm(image_bin, "subscribe", "--url", url, env=env, cwd=workdir)
        assert subscribed.returncode == 0, subscribed.stdout + subscribed.stderr
        doctor = _otacm(image_bin, "doctor", env=env, cwd=workdir)
        assert doctor.returncode == 0, doctor.stdout + doctor.stderr

        roles = {
            "web": Role(
                image_bin, ["web", "--bind", f"127.0.0.1:{port}", "--workers", "1"], env, workdir
            ),
            "worker": Role(image_bin, ["worker"], env, workdir),
            "scheduler": Role(image_bin, ["scheduler"], env, workdir),
        }
        liveness = tmp_path / "liveness"
        try:
            # Waited for here (each `otacm health` is a new process); then asked of the image.
            wait_until(lambda: _all_healthy(liveness), timeout=60, what="every role healthy")
            health = _otacm(image_bin, "health", env=env, cwd=workdir)
            assert health.returncode == 0, health.stdout + health.stderr
            lines = health.stdout.splitlines()
            assert [line.partition(":")[0] for line in lines] == ["web", "worker", "scheduler"]
            assert lines[0] == f"web: ok, http://127.0.0.1:{port}/readyz: 200"
            assert all(": ok, " in line for line in lines)
            for path in ("/healthz", "/readyz"):
                assert httpx.get(f"http://127.0.0.1:{port}{path}", timeout=10).status_code == 200
            for name, role in roles.items():
                assert role.popen.poll() is None, f"{name} exited:\n{role.log.read_text()}"

            # A frozen worker loop is seen: its liveness file stops changing.
            roles["worker"].popen.send_signal(signal.SIGSTOP)
            wait_until(
                lambda: not check(liveness, ["worker"], max_age=2)[0].healthy,
                timeout=30,
                what="the frozen worker's file stale",
            )
            stale = _otacm(image_bin, "health", "--max-age", "2", env=env, cwd=workdir)
            assert stale.returncode == 1
            assert "worker: unhealthy, last pass" in stale.stdout
            roles["worker"].popen.send_signal(signal.SIGCONT)
            wait_until(lambda: _all_healthy(liveness), timeout=30, what="the worker again")
        finally:
            statuses = {name: role.stop() for name, role in roles.items()}
        logs = {name: role.log.read_text(errors="replace") for name, role in roles.items()}
        assert statuses == {"web": 0, "worker": 0, "scheduler": 0}, logs
        for name, log in logs.items():
            assert "Traceback" not in log, f"{name}:\n{log}"
