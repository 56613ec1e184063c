"""Logging for otacm's processes: one format, and secrets scrubbed before anything is written.

Modules log with ``logging.getLogger(__name__)`` and %-style arguments, and never pass a
key, a client state, a name or an e-mail. As a second line of defence, the handler set up
here replaces any configured secret that still reaches a record with ``****``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from pydantic import SecretStr

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class RedactSecrets(logging.Filter):
    """Replaces known secret values in a record's final message."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        # Longest first, so a secret that contains another is masked whole.
        self._secrets = sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True)

    def filter(self, record: logging.LogRecord) -> bool:
        if not self._secrets:
            return True
        message = record.getMessage()
        redacted = message
        for secret in self._secrets:
            redacted = redacted.replace(secret, "****")
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


def configure_logging(level: str, secrets: Iterable[SecretStr] = ()) -> None:
    """Send otacm's logs to stderr at ``level``, scrubbing ``secrets`` from every line."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.addFilter(RedactSecrets(s.get_secret_value() for s in secrets))
    # werkzeug raises its logger to INFO and adds its own handler unless the level is set.
    logging.getLogger("werkzeug").setLevel(level.upper())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # httpx logs every request URL at INFO; our client logs its own calls without noise.
    logging.getLogger("httpx").setLevel(logging.WARNING)
