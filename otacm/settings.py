"""The one typed settings object, built once at the edge and passed down.

Values come from ``OTACM_*`` environment variables and, optionally, a TOML file (named by
``OTACM_CONFIG_FILE`` or ``--config``); the environment wins over the file. An OTA sells
for many venues, so the settings hold a list of venue connections: the file lists them as
``[[connections]]`` tables, and a single venue can be configured from the environment
alone (``OTACM_TENANT``, ``OTACM_COMPANY``, ``OTACM_API_KEY``, ...), which adds one
connection named ``OTACM_CONNECTION_NAME`` (default ``default``).

Secrets (API keys, webhook client states) are ``SecretStr``: they never appear in
``repr``, logs or error messages. The webhook client states of a connection are the
configured ones plus those ``otacm subscribe`` generated and keeps in a file of its own
under ``secrets_dir`` (:meth:`VenueConnection.client_states`; the file is read and
written here too, :func:`read_client_states` and its neighbours), so a generated state
is accepted without editing the configuration.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import re
import secrets
import tempfile
import tomllib
from collections.abc import Collection
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import quote, quote_plus, unquote, urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from venue.models import REFERENCE_MAX_CHARS, parse_guid

DEFAULT_API_BASE_URL = "https://api.npretail.app"
DEFAULT_DATABASE_URL = "sqlite:///var/otacm.sqlite3"
MIN_POLL_INTERVAL = 10.0
RETIRED_FEED_OVERLAP = (
    "feed_overlap counted row versions and is no longer read: the change feed's overlap "
    "is a time now; set feed_overlap_minutes (OTACM_FEED_OVERLAP_MINUTES, default 10) "
    "and remove feed_overlap"
)
CLIENT_STATE_MAX_CHARS = 50
"""The venue keeps a subscription's ``clientState`` to at most this many characters."""
CLIENT_STATES_SUFFIX = ".webhook-client-states"
"""The name of a connection's generated client states file is its name plus this."""
SESSION_KEY_FILE = "session-key"
FINANCE_USER_MAX_CHARS = 100
"""A finance user's name is recorded with what they do (an exception's history, their
sign-ins) in columns this wide."""
"""The file under ``secrets_dir`` holding the generated session key of the finance pages."""
_API_VERSION = re.compile(r"^\d{4}-\d{2}-\d{2}$")


class SettingsError(ValueError):
    """The configuration is unusable; the message names the setting."""


def split_comma_list(value: Any) -> Any:
    """``"a, b,,c"`` → ``["a", "b", "c"]``: lists in the environment are comma lists."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


CommaList = Annotated[list[str], NoDecode]
SecretCommaList = Annotated[list[SecretStr], NoDecode]


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
            "api_key": mask(self.api_key),
            "partner_ids": list(self.partner_ids),
            "webhook_client_states": [mask(s) for s in self.webhook_client_states],
        }


def mask(secret: SecretStr) -> str:
    """A secret for display: never its characters, only whether it is set."""
    length = len(secret.get_secret_value())
    return f"****({length} chars)" if length else "(empty)"


class _ConfigFileSetting(BaseSettings):
    """Only ``OTACM_CONFIG_FILE``: where to find the file, before the file is read."""

    model_config = SettingsConfigDict(env_prefix="OTACM_", extra="ignore")

    config_file: Path | None = None


class Settings(BaseSettings):
    """Everything otacm is configured with. Tests build it by hand."""

    model_config = SettingsConfigDict(env_prefix="OTACM_", extra="ignore", frozen=True)

    # May carry a password: shown only through masked().
    database_url: str = Field(default=DEFAULT_DATABASE_URL, repr=False)
    poll_interval: float = Field(default=15.0, ge=MIN_POLL_INTERVAL)
    connections: list[VenueConnection] = Field(default_factory=list)

    # The receiver: a webhook body larger than this is refused with 413; a database that
    # cannot take the write within db_lock_timeout seconds gets the venue a 503 (it retries).
    webhook_max_bytes: int = Field(default=1_048_576, ge=1024)
    db_lock_timeout: float = Field(default=5.0, gt=0)
    # The worker: how long a claimed inbox row is held, and how often it is tried before
    # it is dead-lettered for a person (``otacm inbox replay``).
    inbox_lease_seconds: float = Field(default=60.0, gt=0)
    inbox_max_attempts: int = Field(default=8, ge=1)
    worker_batch_size: int = Field(default=50, ge=1)
    # The outbox: how long a sender holds a claimed row. A live sender renews it every
    # third of it while it works on the row, however long the venue takes; a row whose
    # sender died comes back this long after its last renewal, at the next outbox pass.
    outbox_lease_seconds: float = Field(default=15.0, ge=5)

    # The heartbeat (scheduler role). The change feed re-reads from its high-water mark
    # as it stood this many minutes ago: a long venue transaction can commit a lower
    # row version late, and the row version is one counter for the venue's whole
    # database, so only time says how far back that can be.
    feed_overlap_minutes: float = Field(default=10.0, ge=0)
    # An order in flight longer than this is looked up directly (getOrder), in case the
    # feed and the webhook both missed it; one in flight longer than stuck_after (the
    # venue's own limit for Processing) is reported as stuck.
    in_flight_check_after: float = Field(default=600.0, ge=MIN_POLL_INTERVAL)
    stuck_after: float = Field(default=3600.0, ge=MIN_POLL_INTERVAL)
    # Draft and Error orders can be deleted at the venue with no trace in the feed: they
    # are re-read this often to notice it.
    open_order_recheck: float = Field(default=900.0, ge=MIN_POLL_INTERVAL)
    # A sale submitted through otacm that the mirror still lacks after this long is
    # looked up at the venue by its reference.
    submission_grace: float = Field(default=120.0, ge=0)
    # Actions otacm takes on the partner's behalf.
    auto_confirm_drafts: bool = True
    # Where the venue should POST webhooks (this receiver's public URL); when set, the
    # scheduler checks every subscription_check_interval seconds that each connection's
    # subscription exists and recreates it when it is missing.
    webhook_url: str | None = None
    subscription_check_interval: float = Field(default=300.0, ge=MIN_POLL_INTERVAL)
    # Secrets otacm generates itself (webhook client states from `otacm subscribe`) are
    # kept in files here, readable by the owner only.
    secrets_dir: Path = Path("var/secrets")
    # When set, each role keeps a liveness file here for `otacm health` (otacm.liveness):
    # the container image's health check.
    liveness_dir: Path | None = None

    # Reconciliation. An order still in flight this long after the sale counts as an
    # exception (stuck), not as pending; amounts that differ by no more than the
    # tolerance (in the sale's currency) match. The scheduled run, daily, covers the
    # last recon_lookback_days days, so late changes at the venue are seen again.
    recon_grace: float = Field(default=3600.0, ge=0)
    recon_amount_tolerance: Decimal = Field(default=Decimal("0.01"), ge=0)
    recon_lookback_days: int = Field(default=7, ge=1)
    recon_interval: float = Field(default=86400.0, ge=MIN_POLL_INTERVAL)
    # Customers' names and e-mails are erased this many days after the visit date
    # (heartbeat.privacy); amounts, references and ticket numbers stay.
    personal_data_days: int = Field(default=90, ge=1, le=36500)
    # The shop's JSON API (/api/) creates orders with the venue's key: it answers only
    # requests bearing one of these tokens, and is closed while none is configured.
    api_tokens: SecretCommaList = Field(default_factory=list)
    # The finance pages (/finance/): who may sign in, as "name:password-hash" entries
    # (hashes from `otacm finance hash-password`; never a plain password), and the key
    # that signs their session cookie. Without session_key, one is generated once into
    # secrets_dir/session-key (see session_secret). finance_cookie_secure marks the
    # cookie Secure: set it when the pages are served over https, as they should be
    # anywhere but http://localhost.
    finance_users: SecretCommaList = Field(default_factory=list)
    session_key: SecretStr | None = None
    finance_cookie_secure: bool = False
    # A sign-in ends this many seconds after it began, or after this many seconds
    # without a request, whichever comes first (and at sign-out, or when the user's
    # password hash changes).
    finance_session_lifetime: float = Field(default=43200.0, gt=0)
    finance_session_idle_timeout: float = Field(default=3600.0, gt=0)
    # Sign-in throttling, shared by every process through the database: after this many
    # failed sign-ins within the window for one user name, or from one address, further
    # attempts are refused (429) until the oldest of them leaves the window.
    finance_sign_in_window: float = Field(default=900.0, gt=0)
    finance_sign_in_user_failures: int = Field(default=5, ge=1)
    finance_sign_in_address_failures: int = Field(default=20, ge=1)
    # How many reverse proxies in front of the web role set X-Forwarded-For and
    # X-Forwarded-Proto: the client's address (sign-in throttling, logs) and the scheme
    # are read from the headers those proxies add. 0: not behind a proxy, the headers are
    # ignored (a client could forge them).
    trusted_proxies: int = Field(default=0, ge=0)

    # The single-venue form, from the environment alone.
    connection_name: str = "default"
    api_base_url: str = DEFAULT_API_BASE_URL
    tenant: str | None = None
    environment: str = "production"
    company: str | None = None
    company_path_form: CompanyPathForm = "percent"
    payment_reference_max_chars: int = Field(
        default=REFERENCE_MAX_CHARS, ge=1, le=REFERENCE_MAX_CHARS
    )
    api_key: SecretStr | None = None
    api_version: str | None = None
    partner_ids: CommaList = Field(default_factory=list)
    webhook_client_states: SecretCommaList = Field(default_factory=list)

    @field_validator(
        "partner_ids", "webhook_client_states", "api_tokens", "finance_users", mode="before"
    )
    @classmethod
    def _split(cls, value: Any) -> Any:
        return split_comma_list(value)

    @field_validator("finance_users")
    @classmethod
    def _finance_users_are_hashed(cls, value: list[SecretStr]) -> list[SecretStr]:
        # Never the entry in the message: it holds a password hash.
        names = []
        for number, entry in enumerate(value, start=1):
            name, _, password_hash = entry.get_secret_value().partition(":")
            if not name.strip() or "$" not in password_hash:
                raise ValueError(
                    f"finance user {number} must be 'name:password-hash'"
                    " (make the hash with `otacm finance hash-password`)"
                )
            if len(name.strip()) > FINANCE_USER_MAX_CHARS:
                raise ValueError(
                    f"finance user {number}'s name is longer than"
                    f" {FINANCE_USER_MAX_CHARS} characters"
                )
            names.append(name.strip())
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"finance user names must be unique: {', '.join(duplicates)}")
        return value

    @field_validator("webhook_url")
    @classmethod
    def _webhook_url_is_absolute(cls, value: str | None) -> str | None:
        return None if value is None or not value.strip() else check_webhook_url(value)

    @model_validator(mode="before")
    @classmethod
    def _refuse_retired_keys(cls, data: Any) -> Any:
        if isinstance(data, dict) and "feed_overlap" in data:
            raise ValueError(RETIRED_FEED_OVERLAP)
        return data

    @property
    def feed_overlap(self) -> dt.timedelta:
        """The change feed's overlap (``feed_overlap_minutes``) as a duration."""
        return dt.timedelta(minutes=self.feed_overlap_minutes)

    @model_validator(mode="after")
    def _fold_single_venue(self) -> Settings:
        single = (self.tenant, self.company, self.api_key)
        if any(value is not None for value in single):
            missing = [
                f"OTACM_{name.upper()}"
                for name, value in zip(("tenant", "company", "api_key"), single, strict=True)
                if value is None
            ]
            if missing:
                raise ValueError(f"a venue from the environment also needs {', '.join(missing)}")
            venue = VenueConnection(
                name=self.connection_name,
                api_base_url=self.api_base_url,
                tenant=self.tenant,
                environment=self.environment,
                company=self.company,
                company_path_form=self.company_path_form,
                payment_reference_max_chars=self.payment_reference_max_chars,
                api_key=self.api_key,
                api_version=self.api_version,
                partner_ids=self.partner_ids,
                webhook_client_states=self.webhook_client_states,
            )
            if all(c.name != venue.name for c in self.connections):
                object.__setattr__(self, "connections", [*self.connections, venue])
        names = [c.name for c in self.connections]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"venue connection names must be unique: {', '.join(duplicates)}")
        return self

    @classmethod
    def load(cls, config_file: Path | None = None) -> Settings:
        """Settings from the environment, over the TOML ``config_file`` if one is given.

        Without ``config_file``, the file named by ``OTACM_CONFIG_FILE`` (if any) is read:
        this is how processes that have no command line (gunicorn's app factory) find it.

        Raises:
            SettingsError: the file cannot be read or a value is invalid.
        """
        if config_file is None:
            config_file = _ConfigFileSetting().config_file
        file_values: dict[str, Any] = {}
        if config_file is not None:
            try:
                file_values = tomllib.loads(config_file.read_text(encoding="utf-8"))
            except OSError as exc:
                message = f"cannot read config file {config_file}: {exc.strerror}"
                raise SettingsError(message) from exc
            except tomllib.TOMLDecodeError as exc:
                raise SettingsError(f"config file {config_file} is not valid TOML: {exc}") from exc
            except UnicodeDecodeError as exc:
                raise SettingsError(f"config file {config_file} is not UTF-8 text") from exc
        if any(name.upper() == "OTACM_FEED_OVERLAP" for name in os.environ):
            raise SettingsError(f"OTACM_FEED_OVERLAP: {RETIRED_FEED_OVERLAP}")
        try:
            from_env = cls()
            overrides = from_env.model_dump(exclude_unset=True, exclude={"connections"})
            return cls.model_validate({**file_values, **overrides})
        except ValueError as exc:
            raise SettingsError(describe_validation_error(exc)) from None

    def connection(self, name: str) -> VenueConnection:
        """The venue connection called ``name``.

        Raises:
            SettingsError: no connection has that name.
        """
        for venue in self.connections:
            if venue.name == name:
                return venue
        known = ", ".join(c.name for c in self.connections) or "none configured"
        raise SettingsError(f"no venue connection named {name!r} (known: {known})")

    def one_connection(self, name: str | None) -> VenueConnection:
        """The connection called ``name``, or, with no name, the only one configured.

        Raises:
            SettingsError: no connection has that name; none is configured; or several
                are and none was named.
        """
        if name is not None:
            return self.connection(name)
        if len(self.connections) == 1:
            return self.connections[0]
        if not self.connections:
            raise SettingsError(
                "no venue connection is configured (OTACM_TENANT, OTACM_COMPANY, "
                "OTACM_API_KEY, or [[connections]] in the config file)"
            )
        names = ", ".join(c.name for c in self.connections)
        raise SettingsError(f"several venue connections ({names}): name one with --connection")

    def finance_password_hashes(self) -> dict[str, SecretStr]:
        """Each finance user's password hash, by user name (:attr:`finance_users`)."""
        users = {}
        for entry in self.finance_users:
            name, _, password_hash = entry.get_secret_value().partition(":")
            users[name.strip()] = SecretStr(password_hash.strip())
        return users

    def session_secret(self) -> SecretStr:
        """The key that signs the finance pages' session cookie.

        ``session_key`` when configured; otherwise the key in ``secrets_dir/session-key``,
        generated there (owner-only, 0600) the first time: every process of the
        deployment, and every restart, then signs with the same key.

        Raises:
            OSError: the key file cannot be read or written.
        """
        if self.session_key is not None and self.session_key.get_secret_value():
            return self.session_key
        return read_or_create_secret(self.secrets_dir / SESSION_KEY_FILE)

    def masked(self) -> dict[str, Any]:
        """The effective configuration for display, secrets masked."""
        return {
            "database_url": mask_database_url(self.database_url),
            "poll_interval": self.poll_interval,
            "connections": [c.masked() for c in self.connections],
        }


# --- generated secrets -------------------------------------------------------------------


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
    _private_directory(path.parent)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        # O_CREAT's mode only applies to a new file; an existing one is narrowed too.
        os.fchmod(descriptor, 0o600)
        os.write(descriptor, f"{value}\n".encode())
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    _sync_directory(path.parent)


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
    _sync_directory(path.parent)
    return removed


def read_or_create_secret(path: Path) -> SecretStr:
    """The secret in the file at ``path``, generated (random, 0600, durable) if there is none.

    Several processes may start at once: the new key is written whole to a file beside
    ``path`` and then linked into place, which fails if another process linked its key
    first; that one is then read. Every process ends up with the same key.

    Raises:
        OSError: the file cannot be read or written.
    """
    try:
        existing = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        existing = ""
    if existing:
        return SecretStr(existing)
    _private_directory(path.parent)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(descriptor, "w", encoding="ascii") as handle:
            os.fchmod(handle.fileno(), 0o600)
            handle.write(secrets.token_urlsafe(48) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        # Another process's key already in place wins; this one is dropped.
        with contextlib.suppress(FileExistsError):
            os.link(temporary, path)
    finally:
        Path(temporary).unlink(missing_ok=True)
    _sync_directory(path.parent)
    return SecretStr(path.read_text(encoding="ascii").strip())


def _private_directory(directory: Path) -> None:
    """Make ``directory`` (and its parents) if need be; the directory itself owner-only."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    directory.chmod(0o700)


def _sync_directory(directory: Path) -> None:
    # A new or renamed file is durable only once its directory entry is.
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def mask_database_url(url: str) -> str:
    """A database URL with any password replaced."""
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1****@", url)


def describe_validation_error(exc: ValueError) -> str:
    """One line per invalid setting, naming it, without echoing the value (it may be secret)."""
    errors = getattr(exc, "errors", None)
    if not callable(errors):
        return str(exc)
    lines = []
    for error in errors():
        where = ".".join(str(part) for part in error.get("loc", ())) or "settings"
        lines.append(f"{where}: {error.get('msg', 'invalid')}")
    return "invalid settings: " + "; ".join(lines)
