"""A venue connection: one venue (tenant and company) the OTA sells for, and its secrets.

:class:`VenueConnection` is what the venue client, the sandbox, the subscriptions job and
the receiver need to know of a venue: its base URL (the company written in one of the
forms :func:`encode_company` knows), its API key, its partners and the webhook client
states it accepts. Those states are the configured ones plus those ``otacm subscribe``
generated and keeps in a file of its own under the settings' ``secrets_dir``
(:meth:`VenueConnection.client_states`; the file is read and written here,
:func:`read_client_states` and its neighbours), so a generated state is accepted without
editing the configuration. The settings (:mod:`otacm.settings`) hold a list of these.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Collection
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote, quote_plus, unquote, urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from venue.models import REFERENCE_MAX_CHARS
from venue.throttle import DEFAULT_MAX_IN_FLIGHT, DEFAULT_PERIOD, DEFAULT_RATE, Limits
from venue.values import parse_guid

DEFAULT_API_BASE_URL = "https://api.npretail.app"
CLIENT_STATE_MAX_CHARS = 50
"""The venue keeps a subscription's ``clientState`` to at most this many characters."""
CLIENT_STATES_SUFFIX = ".webhook-client-states"
"""The name of a connection's generated client states file is its name plus this."""
_API_VERSION = re.compile(r"^\d{4}-\d{2}-\d{2}$")


class SettingsError(ValueError):
    """The configuration is unusable; the message names the setting."""


def split_comma_list(value: Any) -> Any:
    """``"a, b,,c"`` → ``["a", "b", "c"]``: lists in the environment are comma lists."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


def check_webhook_url(url: str) -> str:
    """``url`` trimmed, if it is an absolute http(s) URL the venue can POST webhooks to.

    Raises:
        ValueError: it is not; the message says what is wrong.
    """
    url = url.strip()
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - parsing the port is what raises for a bad one
    except ValueError:
        raise ValueError(f"webhook URL {url!r} does not parse") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"webhook URL {url!r} must be an absolute http(s) URL")
    if parts.fragment:
        raise ValueError(f"webhook URL {url!r} must not have a #fragment")
    return url


CompanyPathForm = Literal["percent", "double", "plus"]
COMPANY_PATH_FORMS: tuple[CompanyPathForm, ...] = ("percent", "double", "plus")
"""How the company name can be written in the API path (``spec/API.md``, "Addressing and
auth"): percent-encoded once (``%20``, the vendor's URL page), twice (``%2520``, the
seeds' examples) or form-encoded (``+`` for a space, the vendor's "API URL" page)."""


def company_name(company: str) -> str:
    """The company's name from any of the forms it may be configured in.

    Raw (``CRONUS International Ltd.``), percent-encoded once or twice, or form-encoded.
    A ``+`` is read as a space only in a text without spaces (a form encoder's output
    has none); a name with a literal ``+`` and no space is written with ``%2B``.
    Percent-escapes are then decoded until nothing changes.
    """
    name = company.strip()
    if " " not in name:
        name = name.replace("+", " ")
    for _ in range(5):
        once_more = unquote(name)
        if once_more == name:
            break
        name = once_more
    return name


def encode_company(company: str, form: CompanyPathForm = "percent") -> str:
    """The company, given in any form :func:`company_name` reads, as one path segment.

    Args:
        company: the company as configured.
        form: ``percent`` (a space is ``%20``), ``double`` (``%2520``) or ``plus`` (``+``);
            every other character that needs it is percent-encoded (``/`` too).
    """
    name = company_name(company)
    if form == "plus":
        return quote_plus(name, safe="")
    once = quote(name, safe="")
    return quote(once, safe="") if form == "double" else once


class VenueConnection(BaseModel):
    """One venue (tenant and company) the OTA sells for, with its own key and partners."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(default="default", min_length=1, max_length=64, pattern=r"^[\w.-]+$")
    api_base_url: str = DEFAULT_API_BASE_URL
    tenant: str = Field(min_length=1)
    environment: str = Field(default="production", min_length=1)
    company: str = Field(min_length=1)
    company_path_form: CompanyPathForm = "percent"
    api_key: SecretStr
    api_version: str | None = None
    partner_ids: list[str] = Field(default_factory=list)
    webhook_client_states: list[SecretStr] = Field(default_factory=list)
    # CMOrder.PaymentReference is a Code[50]; the older synchronous version's was a
    # Code[20] (43834b3b8). Longer references are cut there without a word, so otacm
    # refuses them; 20 for a venue on that version.
    payment_reference_max_chars: int = Field(
        default=REFERENCE_MAX_CHARS, ge=1, le=REFERENCE_MAX_CHARS
    )
    # What every process using this key keeps to together (venue.throttle): requests in
    # flight at once, and starts per period; the defaults stay below the venue's.
    venue_max_in_flight: int = Field(default=DEFAULT_MAX_IN_FLIGHT, ge=1, le=100)
    venue_rate_limit: int = Field(default=DEFAULT_RATE, ge=1)
    venue_rate_period: float = Field(default=DEFAULT_PERIOD, gt=0, le=86_400)

    @field_validator("partner_ids", "webhook_client_states", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        return split_comma_list(value)

    @field_validator("partner_ids")
    @classmethod
    def _partner_ids_are_guids(cls, value: list[str]) -> list[str]:
        # The venue refuses a partner id that is not a GUID ("Invalid partnerId"); say so
        # now, naming it. GUIDs are kept as the venue writes them (lowercase, no braces),
        # to compare them.
        guids = []
        for partner in value:
            guid = parse_guid(partner)
            if guid is None:
                raise ValueError(f"partner id {partner!r} is not a GUID")
            guids.append(guid)
        return guids

    @field_validator("api_version")
    @classmethod
    def _version_is_a_date(cls, value: str | None) -> str | None:
        if value is not None and not _API_VERSION.match(value):
            raise ValueError("api_version must be a date, YYYY-MM-DD")
        return value

    @field_validator("webhook_client_states")
    @classmethod
    def _states_fit(cls, value: list[SecretStr]) -> list[SecretStr]:
        if any(len(state.get_secret_value()) > CLIENT_STATE_MAX_CHARS for state in value):
            raise ValueError("a webhook client state is at most 50 characters")
        return value

    @property
    def base_url(self) -> str:
        """``{api_base_url}/{tenant}/{environment}/{company}``, the company written in
        :attr:`company_path_form`."""
        root = self.api_base_url.rstrip("/")
        company = encode_company(self.company, self.company_path_form)
        return f"{root}/{self.tenant}/{self.environment}/{company}"

    @property
    def api_identity(self) -> tuple[str, str]:
        """What the venue's rate limits count by: the API root and the key."""
        return (self.api_base_url.rstrip("/"), self.api_key.get_secret_value())

    @property
    def limits(self) -> Limits:
        """The limits every process of this connection's API identity keeps to together."""
        return Limits(
            max_in_flight=self.venue_max_in_flight,
            rate=self.venue_rate_limit,
            period=self.venue_rate_period,
        )

    def client_state_file(self, secrets_dir: Path) -> Path:
        """The file of the webhook client states otacm generated for this connection."""
        return secrets_dir / f"{self.name}{CLIENT_STATES_SUFFIX}"

    def client_states(self, secrets_dir: Path) -> list[SecretStr]:
        """Every client state a webhook of this connection may carry, each once.

        The configured states (``webhook_client_states``) first, in their order, then
        those in :meth:`client_state_file`, in the file's order. The first of the list
        is the one new subscriptions use. The file is read at each call, so a state
        that ``otacm subscribe`` added counts without a restart.

        Args:
            secrets_dir: the settings' ``secrets_dir``.

        Raises:
            SettingsError: the file cannot be read or holds an over-long state.
        """
        states = list(self.webhook_client_states)
        seen = {state.get_secret_value() for state in states}
        for state in read_client_states(self.client_state_file(secrets_dir)):
            if state.get_secret_value() not in seen:
                seen.add(state.get_secret_value())
                states.append(state)
        return states

    def masked(self) -> dict[str, Any]:
        """The connection for display: secrets replaced by a hint of their length."""
        return {
            "name": self.name,
            "base_url": self.base_url,
            "company_path_form": self.company_path_form,
            "payment_reference_max_chars": self.payment_reference_max_chars,
            "api_version": self.api_version or "(latest)",
            "venue_limits": (
                f"{self.venue_max_in_flight} in flight, "
                f"{self.venue_rate_limit} per {self.venue_rate_period:g} s"
            ),
            "api_key": mask(self.api_key),
            "partner_ids": list(self.partner_ids),
            "webhook_client_states": [mask(s) for s in self.webhook_client_states],
        }


def mask(secret: SecretStr) -> str:
    """A secret for display: never its characters, only whether it is set."""
    length = len(secret.get_secret_value())
    return f"****({length} chars)" if length else "(empty)"


def read_client_states(path: Path) -> list[SecretStr]:
    """The client states in a generated states file: one a line; blank lines and ``#``
    comments skipped. A file that does not exist (or cannot, its directory being a
    file) holds none; writing one then says what is wrong.

    Raises:
        SettingsError: the file cannot be read, or a line is longer than the venue allows
            (named by its number, never its text).
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError):
        return []
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8"
        raise SettingsError(f"cannot read webhook client states file {path}: {reason}") from None
    states = []
    for number, line in enumerate(text.splitlines(), start=1):
        state = line.strip()
        if not state or state.startswith("#"):
            continue
        if len(state) > CLIENT_STATE_MAX_CHARS:
            raise SettingsError(
                f"{path}, line {number}: a webhook client state is at most "
                f"{CLIENT_STATE_MAX_CHARS} characters"
            )
        states.append(SecretStr(state))
    return states


def add_client_state(path: Path, state: SecretStr) -> None:
    """Append ``state`` to the generated states file at ``path``, durably.

    The directory is made owner-only (0700) and the file owner-readable (0600) before
    anything is written; the line is on disk (fsync) when this returns, so a
    subscription made next with the state can never outlive the only copy of it.

    Raises:
        OSError: the directory or the file cannot be written.
        ValueError: the state is empty, longer than the venue allows, or spans lines.
    """
    value = state.get_secret_value()
    if not value or len(value) > CLIENT_STATE_MAX_CHARS or value != value.strip():
        raise ValueError("a client state is 1 to 50 characters, without surrounding blanks")
    if "\n" in value or "\r" in value or value.startswith("#"):
        raise ValueError("a client state is one line and does not start with '#'")
    private_directory(path.parent)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        # O_CREAT's mode only applies to a new file; an existing one is narrowed too.
        os.fchmod(descriptor, 0o600)
        os.write(descriptor, f"{value}\n".encode())
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    sync_directory(path.parent)


def remove_client_states(path: Path, retired: Collection[SecretStr]) -> int:
    """Rewrite the generated states file at ``path`` without the ``retired`` states.

    The new file replaces the old one atomically (written beside it, 0600, fsynced,
    renamed), so a crash leaves either file whole.

    Returns:
        How many lines were removed.

    Raises:
        SettingsError: the file cannot be read.
        OSError: it cannot be rewritten.
    """
    gone = {state.get_secret_value() for state in retired}
    if not gone or not path.exists():
        return 0
    kept = [s.get_secret_value() for s in read_client_states(path)]
    remaining = [state for state in kept if state not in gone]
    removed = len(kept) - len(remaining)
    if not removed:
        return 0
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            os.fchmod(handle.fileno(), 0o600)
            handle.writelines(f"{state}\n" for state in remaining)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    sync_directory(path.parent)
    return removed


def private_directory(directory: Path) -> None:
    """Make ``directory`` (and its parents) if need be; the directory itself owner-only."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    directory.chmod(0o700)


def sync_directory(directory: Path) -> None:
    """fsync ``directory``: a new or renamed file is durable only once its directory entry is."""
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
