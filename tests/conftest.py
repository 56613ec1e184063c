"""Fixtures shared by every test package, one layer each: environment → settings → engine.

Layers further up (sessions, apps, the sandbox) live beside the tests that use them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No test sees the developer's own OTACM_* configuration."""
    import os

    for name in list(os.environ):
        if name.startswith("OTACM_"):
            monkeypatch.delenv(name)
    yield
