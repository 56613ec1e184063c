"""What several test packages build on: the stack against the sandbox, otacm's processes.

:mod:`tests.support.stack` (the sandbox, otacm's settings for it, the live receiver, the
worker until idle, and the helpers that act at the venue and read the mirror) and
:mod:`tests.support.processes` (``otacm`` as subprocesses). The conftests of ``tests/e2e``
and ``tests/heartbeat`` import from here and keep only what is their own.
"""

import pytest

# The helpers assert; rewritten, a failing check shows its values as in a test module.
pytest.register_assert_rewrite("tests.support.stack", "tests.support.processes")
