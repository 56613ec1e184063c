"""Logging for otacm's processes: text or JSON lines, and secrets scrubbed before anything
is written.

Modules log with ``logging.getLogger(__name__)`` and %-style arguments, and never pass a
key, a client state, a name or an e-mail. :func:`configure_logging` sends every record to
standard error through one handler, in one of :data:`LOG_FORMATS`: ``text`` for people,
one line per record (a traceback below it), or ``json`` for collectors, one JSON object per
line (python-json-logger), with the fields of :data:`JSON_FIELDS`, a traceback in
``exc_info`` and any ``extra`` a library adds. gunicorn's own logs go through the same
handler (:func:`otacm.processes.gunicorn_options`). As a second line of defence, the
handler's formatter replaces any configured secret that still reaches a line (in the
message, a traceback or an extra field) with ``****`` (:class:`Redactor`).

Libraries' chatter stays out unless asked for with ``DEBUG``: Alembic's INFO lines
("Context impl SQLiteImpl", "Running upgrade ...") and httpx's request lines.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable

from pydantic import SecretStr
from pythonjsonlogger.json import JsonFormatter

from otacm.settings import Settings

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
"""The ``text`` format."""

LOG_FORMATS = ("text", "json")
"""The formats ``OTACM_LOG_FORMAT`` (``--log-format``) chooses from."""

JSON_FIELDS = {"levelname": "level", "name": "logger", "process": "pid", "message": "message"}
"""A JSON line's fields, by the record attribute each comes from; besides them ``time``
(ISO 8601, UTC) and, when there is one, ``exc_info`` (the traceback)."""

QUIET_LOGGERS = ("alembic", "httpx")
"""Libraries kept at WARNING unless the level is DEBUG: Alembic announces every migration
step at INFO (``otacm db upgrade`` prints its own result), httpx every request URL (the
venue client logs its own calls)."""


class Redactor:
    """Replaces known secret values in a formatted line with ``****``.

    Args:
        secrets: the values; those shorter than 4 characters are not secrets worth the
            name, and masking them would mangle ordinary words.
    """

    def __init__(self, secrets: Iterable[str]) -> None:
        found = {s for s in secrets if len(s) >= 4}
        # As written in a JSON string too (a quote or backslash in a secret is escaped);
        # longest first, so a secret that contains another is masked whole.
        found |= {json.dumps(s)[1:-1] for s in found}
        self._secrets = sorted(found, key=len, reverse=True)

    def __call__(self, line: str) -> str:
        """``line`` with every secret masked."""
        for secret in self._secrets:
            line = line.replace(secret, "****")
        return line


class TextFormatter(logging.Formatter):
    """:data:`LOG_FORMAT` lines, secrets masked."""

    def __init__(self, redact: Redactor) -> None:
        super().__init__(LOG_FORMAT)
        self._redact = redact

    def format(self, record: logging.LogRecord) -> str:
        """The record as text, traceback included, secrets masked."""
        return self._redact(super().format(record))


class JsonLineFormatter(JsonFormatter):
    """One JSON object per record (:data:`JSON_FIELDS`), secrets masked."""

    def __init__(self, redact: Redactor) -> None:
        super().__init__(
            list(JSON_FIELDS),
            rename_fields={k: v for k, v in JSON_FIELDS.items() if k != v},
            timestamp="time",
        )
        self._redact = redact

    def format(self, record: logging.LogRecord) -> str:
        """The record as one JSON line (a traceback is one escaped string), secrets masked."""
        return self._redact(super().format(record))


def make_formatter(log_format: str, secrets: Iterable[str] = ()) -> logging.Formatter:
    """The formatter of ``log_format`` (one of :data:`LOG_FORMATS`), masking ``secrets``.

    Raises:
        ValueError: an unknown format.
    """
    redact = Redactor(secrets)
    if log_format == "text":
        return TextFormatter(redact)
    if log_format == "json":
        return JsonLineFormatter(redact)
    raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, not {log_format!r}")


def settings_secrets(settings: Settings) -> list[SecretStr]:
    """What must never be written in a log line: the venue keys, the webhook client states
    (configured and generated), the API tokens, the finance users' entries and a
    configured session key. Reads the states files; creates nothing. (The database's
    password is masked wherever its URL is shown, :func:`otacm.settings.mask_database_url`,
    and the drivers never quote it.)
    """
    from venue.connection import SettingsError

    secrets = [c.api_key for c in settings.connections]
    for connection in settings.connections:
        try:
            secrets += connection.client_states(settings.secrets_dir)
        except SettingsError:
            # An unreadable states file is reported by the commands that need it.
            secrets += connection.webhook_client_states
    secrets += [*settings.api_tokens, *settings.finance_users]
    if settings.session_key is not None:
        secrets.append(settings.session_key)
    return secrets


def configured_formatter() -> logging.Formatter | None:
    """The formatter :func:`configure_logging` gave this process's handler, if it ran: for
    the handlers of a library that writes its own (gunicorn's), so its lines match."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler.formatter, TextFormatter | JsonLineFormatter):
            return handler.formatter
    return None


def configure_logging(
    level: str, secrets: Iterable[SecretStr] = (), log_format: str = "text"
) -> None:
    """Send all logs to stderr at ``level`` as ``log_format``, masking ``secrets``.

    Python's warnings are logged too (``py.warnings``), so that a JSON stream stays JSON.

    Raises:
        ValueError: an unknown format.
    """
    handler = logging.StreamHandler()
    handler.setFormatter(make_formatter(log_format, (s.get_secret_value() for s in secrets)))
    # werkzeug raises its logger to INFO and adds its own handler unless the level is set.
    logging.getLogger("werkzeug").setLevel(level.upper())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    quiet = logging.NOTSET if level.upper() == "DEBUG" else logging.WARNING
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(quiet)
    logging.captureWarnings(True)
