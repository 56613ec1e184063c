"""The one typed settings object, built once at the edge and passed down.

Values come from ``OTACM_*`` environment variables and, optionally, a TOML file (named by
``OTACM_CONFIG_FILE`` or ``--config``); the environment wins over the file. An OTA sells
for many venues, so the settings hold a list of venue connections: the file lists them as
``[[connections]]`` tables, and a single venue can be configured from the environment
alone (``OTACM_TENANT``, ``OTACM_COMPANY``, ``OTACM_API_KEY``, ...), which adds one
connection named ``OTACM_CONNECTION_NAME`` (default ``default``).

Secrets (API keys, webhook client states, tokens) are ``SecretStr``: they never appear in
``repr``, logs or error messages. A venue connection, and the webhook client states
``otacm subscribe`` keeps for it in files, is :mod:`venue.connection`'s.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import datetime as dt
import os
import re
import secrets
import tempfile
import tomllib
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from venue.connection import (
    DEFAULT_API_BASE_URL,
    CompanyPathForm,
    SettingsError,
    VenueConnection,
    check_webhook_url,
    private_directory,
    split_comma_list,
    sync_directory,
)
from venue.models import REFERENCE_MAX_CHARS
from venue.throttle import DEFAULT_MAX_IN_FLIGHT, DEFAULT_PERIOD, DEFAULT_RATE

DEFAULT_DATABASE_URL = "sqlite:///var/otacm.sqlite3"
MIN_POLL_INTERVAL = 10.0
RETIRED_FEED_OVERLAP = (
    "feed_overlap counted row versions and is no longer read: the change feed's overlap "
    "is a time now; set feed_overlap_minutes (OTACM_FEED_OVERLAP_MINUTES, default 10) "
    "and remove feed_overlap"
)
SESSION_KEY_FILE = "session-key"
"""The file under ``secrets_dir`` holding the generated session key of the finance pages."""
FINANCE_USER_MAX_CHARS = 100
"""A finance user's name is recorded with what they do (an exception's history, their
sign-ins) in columns this wide."""


CommaList = Annotated[list[str], NoDecode]
SecretCommaList = Annotated[list[SecretStr], NoDecode]


class _ConfigFileSetting(BaseSettings):
    """Only ``OTACM_CONFIG_FILE``: where to find the file, before the file is read."""

    model_config = SettingsConfigDict(env_prefix="OTACM_", extra="ignore")

    config_file: Path | None = None


SHOP_SECRET_PREFIX = "whsec_"  # noqa: S105 - the form of a secret, not one
"""How a Standard Webhooks secret is written: this prefix, then the key in base64."""


def check_shop_secret(secret: str) -> bytes:
    """The key of a Standard Webhooks secret (``whsec_`` and base64, or base64 alone).

    Raises:
        ValueError: it is not base64, or its key is not 24 to 64 bytes long (the
            specification's bounds). The message never holds the secret.
    """
    text = secret.strip().removeprefix(SHOP_SECRET_PREFIX)
    try:
        key = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("a shop endpoint secret must be 'whsec_' and base64") from None
    if not 24 <= len(key) <= 64:
        raise ValueError(f"a shop endpoint secret must hold 24 to 64 bytes, not {len(key)}")
    return key


class ShopEndpoint(BaseModel):
    """Where the shop receives otacm's events: a name, a URL, the secrets that sign them.

    Every configured secret signs each event (``webhook-signature`` then holds one
    signature per secret), so a shop can change its secret without missing an event:
    add the new one, let the shop accept it, remove the old. ``connections`` names the
    venue connections whose orders it is told of; empty, every connection's.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    url: str
    secrets: Annotated[list[SecretStr], Field(min_length=1)]
    connections: list[str] = Field(default_factory=list)

    @field_validator("url")
    @classmethod
    def _url_is_absolute(cls, value: str) -> str:
        try:
            return check_webhook_url(value)
        except ValueError:
            # Not the URL itself in the message: it may hold a credential.
            raise ValueError(
                "a shop endpoint URL must be an absolute http(s) URL without a #fragment"
            ) from None

    @field_validator("secrets", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        return split_comma_list(value)

    @field_validator("secrets")
    @classmethod
    def _secrets_are_keys(cls, value: list[SecretStr]) -> list[SecretStr]:
        for secret in value:
            check_shop_secret(secret.get_secret_value())
        return value


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
    # getOrder calls one worker keeps in flight; the key's shared limit bounds them all.
    worker_fetch_concurrency: int = Field(default=4, ge=1, le=64)
    # The outbox: how long a sender holds a claimed row. A live sender renews it every
    # third of it while it works on the row, however long the venue takes; a row whose
    # sender died comes back this long after its last renewal, at the next outbox pass.
    outbox_lease_seconds: float = Field(default=15.0, ge=5)

    # The heartbeat (scheduler role). The change feed re-reads from its high-water mark
    # as it stood this many minutes ago: a long venue transaction can commit a lower
    # row version late, and the row version is one counter for the venue's whole
    # database, so only time says how far back that can be.
    feed_overlap_minutes: float = Field(default=10.0, ge=0)
    # Partners one scheduler process follows at once (each partner's feed is its own
    # unit of work, shared by every scheduler): a partner whose calls are retried for a
    # minute then holds one of these, not the others' passes.
    feed_workers: int = Field(default=4, ge=1, le=32)
    # An order in flight longer than this is looked up directly (getOrder), in case the
    # feed and the webhook both missed it; one in flight longer than stuck_after (the
    # venue's own limit for Processing) is reported as stuck.
    in_flight_check_after: float = Field(default=600.0, ge=MIN_POLL_INTERVAL)
    stuck_after: float = Field(default=3600.0, ge=MIN_POLL_INTERVAL)
    # /metrics reports delivery health, stuck and Error orders and open exceptions as
    # the scheduler computed them this often (heartbeat.metric_figures): a scrape then
    # costs the same at any history, and the figures are at most this old.
    metric_figures_interval: float = Field(default=30.0, ge=MIN_POLL_INTERVAL)
    # Draft and Error orders can be deleted at the venue with no trace in the feed: they
    # are re-read this often on their first day in that status, half as often each time
    # that age doubles, and no longer once it passes recheck_horizon_days (0: never).
    # The feed still brings any other change; an order left open a month is seldom
    # deleted, and thousands of them re-read every 15 minutes would take the key's rate.
    open_order_recheck: float = Field(default=900.0, ge=MIN_POLL_INTERVAL)
    recheck_horizon_days: float = Field(default=30.0, ge=0, le=36500)
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
    # Rows past these days are pruned (heartbeat.retention): processed notifications,
    # sent confirm/replace/delete calls, status changes older than an order's status
    # when the retention began. 0 keeps them all.
    retain_inbox_days: int = Field(default=30, ge=0, le=36500)
    retain_outbox_days: int = Field(default=90, ge=0, le=36500)
    retain_status_changes_days: int = Field(default=180, ge=0, le=36500)
    # Shop deliveries delivered this long ago and the events they leave (but each
    # order's newest) are pruned too (heartbeat.shop_retention). 0 keeps them all.
    retain_shop_events_days: int = Field(default=30, ge=0, le=36500)
    # How much the scheduler and the batch commands (reconcile, ledger import, report,
    # db prune) lower their CPU priority (nice), and the web role the thread computing a
    # report download, so that on a busy box the receiver's answers do not wait for the
    # CPU behind them (otacm.batch, receiver.finance.streaming.at_batch_priority).
    batch_nice: int = Field(default=10, ge=0, le=19)
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

    # Events to the shop (orders.shop_events): the endpoints that receive them, and how
    # long a delivery the endpoint does not take is retried (with backoff) before it is
    # given up (dead; `otacm deliveries replay`). Each POST waits this many seconds.
    shop_endpoints: list[ShopEndpoint] = Field(default_factory=list)
    shop_retry_horizon_days: float = Field(default=3.0, gt=0, le=365)
    shop_request_timeout: float = Field(default=5.0, gt=0, le=60)
    # The single-endpoint form, from the environment alone (every connection's events).
    shop_endpoint_name: str = "shop"
    shop_endpoint_url: str | None = None
    shop_endpoint_secrets: SecretCommaList = Field(default_factory=list)

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
    venue_max_in_flight: int = Field(default=DEFAULT_MAX_IN_FLIGHT, ge=1, le=100)
    venue_rate_limit: int = Field(default=DEFAULT_RATE, ge=1)
    venue_rate_period: float = Field(default=DEFAULT_PERIOD, gt=0, le=86_400)

    @field_validator(
        "partner_ids",
        "webhook_client_states",
        "api_tokens",
        "finance_users",
        "shop_endpoint_secrets",
        mode="before",
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
                venue_max_in_flight=self.venue_max_in_flight,
                venue_rate_limit=self.venue_rate_limit,
                venue_rate_period=self.venue_rate_period,
            )
            if all(c.name != venue.name for c in self.connections):
                object.__setattr__(self, "connections", [*self.connections, venue])
        # Every process keeps one key's limit together, so its connections must agree on it.
        limits: dict[tuple[str, str], Any] = {}
        for venue in self.connections:
            if limits.setdefault(venue.api_identity, venue.limits) != venue.limits:
                raise ValueError(
                    f"connection {venue.name} uses the API key of another with other venue_* limits"
                )
        names = [c.name for c in self.connections]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"venue connection names must be unique: {', '.join(duplicates)}")
        self._fold_shop_endpoint(names)
        return self

    def _fold_shop_endpoint(self, connection_names: list[str]) -> None:
        """The environment's shop endpoint joins the file's; names and connections checked."""
        endpoints = list(self.shop_endpoints)
        if self.shop_endpoint_url is not None and self.shop_endpoint_url.strip():
            if not self.shop_endpoint_secrets:
                raise ValueError(
                    "a shop endpoint from the environment also needs OTACM_SHOP_ENDPOINT_SECRETS"
                )
            single = ShopEndpoint(
                name=self.shop_endpoint_name,
                url=self.shop_endpoint_url,
                secrets=self.shop_endpoint_secrets,
            )
            if all(e.name != single.name for e in endpoints):
                endpoints.append(single)
                object.__setattr__(self, "shop_endpoints", endpoints)
        names = [e.name for e in endpoints]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"shop endpoint names must be unique: {', '.join(duplicates)}")
        for endpoint in endpoints:
            unknown = sorted(set(endpoint.connections) - set(connection_names))
            if unknown:
                raise ValueError(
                    f"shop endpoint {endpoint.name} names no venue connection called "
                    f"{', '.join(unknown)}"
                )

    def shop_endpoint_names(self) -> dict[str, list[str]]:
        """Per venue connection's name, the names of the shop endpoints told of its orders."""
        return {
            connection.name: [
                e.name
                for e in self.shop_endpoints
                if not e.connections or connection.name in e.connections
            ]
            for connection in self.connections
        }

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
            "shop_endpoints": [
                {"name": e.name, "connections": e.connections or "all", "secrets": "****"}
                for e in self.shop_endpoints
            ],
        }


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
    private_directory(path.parent)
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
    sync_directory(path.parent)
    return SecretStr(path.read_text(encoding="ascii").strip())


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
