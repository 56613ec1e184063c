"""The webhook subscription: made by ``otacm subscribe``, kept alive by the scheduler.

The venue POSTs ``ota_cm_order_processed`` to the URL a subscription names, with the
``clientState`` the subscription was made with (``spec/WEBHOOKS.md``). Subscriptions are
company-scoped, have no documented expiry, and can silently stop: listed no more or, if
the venue says so, inactive. :func:`subscribe` makes sure one usable subscription for a
URL exists at a connection; :func:`check_subscriptions`, a scheduled job, does that for
every connection and says when it had to recreate one; :func:`record_checks` keeps what
it found per connection in the database (``subscription_check``), where ``/metrics``
reads it whichever process ran the check.

A subscription is *usable* when it names the URL and the event, is not reported
inactive (``subscriptionState`` or a like field other than active: see ``_STATUS_FIELDS``),
and carries a client state the receiver accepts (when the venue shows it). An unusable
one counts as missing: a new one is made first, then the unusable one is deleted.
Deleting an inactive one loses nothing (Business Central does not reactivate it by
itself) and keeps an administrator's later reactivation from doubling every delivery.
A create answered with an empty body (as Business Central's may be) is found by
listing again.
The state for a new subscription is the first of the connection's states
(:meth:`venue.connection.VenueConnection.client_states`: the configured ones, then those
in its states file). When the connection has none, or a rotation is asked for, a new
one is generated and appended to the states file (0600, in a 0700 directory) *before*
the subscription is made: a crash in between leaves a spare state, never a subscription
whose secret is lost. The receiver picks the file up without a restart. A rotation
deletes the old subscriptions once the new one exists, then removes from the file the
states no remaining subscription carries.

Client states are never logged, printed or put in a result: only the file's path.
"""

from __future__ import annotations

import datetime as dt
import hmac
import logging
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import SecretStr
from sqlalchemy.orm import Session, sessionmaker

from heartbeat.coordination import describe_error
from storage.records import SubscriptionCheck
from venue.client import VenueClient
from venue.connection import (
    SettingsError,
    VenueConnection,
    add_client_state,
    check_webhook_url,
    read_client_states,
    remove_client_states,
)
from venue.errors import VenueError, VenueNotFound
from venue.retry import RetryPolicy
from venue.webhooks import ORDER_PROCESSED_EVENT, Subscription

logger = logging.getLogger(__name__)

COMMAND_RETRY = RetryPolicy(attempts=2, deadline=10.0, wait_initial=0.5, wait_max=2.0)
"""The client retry policy of ``otacm subscribe``: a person waits, so a venue that does
not answer is reported within seconds rather than after a minute of retries."""

STATE_BYTES = 24
"""Random bytes in a generated client state: 32 URL-safe characters, within the 50 the
venue allows."""

# What a venue might call a subscription's state, and the values that mean "working".
# Business Central's external event subscriptions carry ``subscriptionState`` (its
# subscription list page shows a subscription "not active" after repeated 4xx answers);
# the others are the names other webhook APIs use. Field names compare case-blind.
_STATUS_FIELDS = ("subscriptionstate", "state", "status", "subscriptionstatus")
_ACTIVE_FIELDS = ("isactive", "active", "enabled")
_ACTIVE_VALUES = frozenset({"active", "enabled", "ok", "running", "subscribed"})


class SubscriptionError(Exception):
    """``subscribe`` could not do what was asked; the message says why, one line."""


@dataclass(frozen=True)
class SubscribeResult:
    """What :func:`subscribe` did; holds no client state.

    Attributes:
        connection: the venue connection's name.
        url: the notification URL.
        created: a new subscription was made (else one already existed).
        subscription_id: the subscription that now serves ``url``.
        secrets_file: the connection's generated client states file.
        state_generated: a new client state was generated into ``secrets_file``.
        deleted: subscriptions removed: the old ones of a rotation, or unusable ones
            replaced (inactive, or carrying a state the receiver does not accept).
        retired_states: how many states of a rotation were removed from the file.
        warnings: what a person should still do or know.
    """

    connection: str
    url: str
    created: bool
    subscription_id: str
    secrets_file: Path
    state_generated: bool = False
    deleted: tuple[str, ...] = ()
    retired_states: int = 0
    warnings: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """The result for ``--json``."""
        return {
            "connection": self.connection,
            "url": self.url,
            "created": self.created,
            "subscriptionId": self.subscription_id,
            "secretsFile": str(self.secrets_file),
            "stateGenerated": self.state_generated,
            "deleted": list(self.deleted),
            "retiredStates": self.retired_states,
            "warnings": list(self.warnings),
        }

    def describe(self) -> str:
        """One line for a person."""
        if not self.created:
            return (
                f"subscription {self.subscription_id} for {self.url} already exists at "
                f"connection {self.connection}; nothing created"
            )
        parts = [
            f"subscription {self.subscription_id} for {self.url} created at connection "
            f"{self.connection}"
        ]
        if self.state_generated:
            parts.append(f"new client state stored in {self.secrets_file}")
        if self.deleted:
            parts.append(f"deleted {', '.join(self.deleted)}")
        if self.retired_states:
            parts.append(f"{self.retired_states} old client state(s) retired")
        return "; ".join(parts)


@dataclass(frozen=True)
class ConnectionCheck:
    """What the check found at one connection.

    Attributes:
        usable: a usable subscription for the URL is there after the check (found, or
            made now).
        recreated: none was usable (missing, inactive, or with a state we refuse), so
            one was made now.
        error: why the check failed, when it did (``usable`` is then ``False``).
    """

    usable: bool
    recreated: bool = False
    error: str | None = None


@dataclass
class SubscriptionReport:
    """What one :func:`check_subscriptions` run did, counted in connections.

    Attributes:
        checked: connections whose subscriptions were listed (or tried).
        present: connections that had a usable subscription for the URL.
        created: connections where one was (re)created.
        errors: connections the check failed for; tried again at the next run.
        found: what was found at each connection checked, by connection row id.
    """

    checked: int = 0
    present: int = 0
    created: int = 0
    errors: int = 0
    found: dict[int, ConnectionCheck] = field(default_factory=dict)

    def as_dict(self) -> dict[str, int]:
        """The counts by name, for logs and ``--json``."""
        return {
            "checked": self.checked,
            "present": self.present,
            "created": self.created,
            "errors": self.errors,
        }


def subscribe(
    connection: VenueConnection,
    client: VenueClient,
    *,
    url: str,
    secrets_dir: Path,
    new_state: bool = False,
) -> SubscribeResult:
    """Make sure ``url`` has a usable subscription at ``connection`` (module docstring).

    Args:
        connection: the venue connection.
        client: its venue client; the caller creates and closes it.
        url: the receiver's public webhook URL (absolute http or https).
        secrets_dir: where generated client states are kept (the settings' ``secrets_dir``).
        new_state: rotate: generate a new state, subscribe with it, then delete the old
            subscriptions for ``url`` and retire their states from the file.

    Returns:
        What was done.

    Raises:
        SubscriptionError: ``url`` is not an absolute http(s) URL, or the states file
            cannot be read or written.
        VenueError: the venue could not list or create the subscription.
    """
    try:
        url = check_webhook_url(url)
        states = connection.client_states(secrets_dir)
    except (ValueError, SettingsError) as exc:
        raise SubscriptionError(str(exc)) from None
    secrets_file = connection.client_state_file(secrets_dir)

    listed = client.list_subscriptions()
    ours, usable = find_subscriptions(listed, url, states)
    if usable and not new_state:
        return SubscribeResult(
            connection=connection.name,
            url=url,
            created=False,
            subscription_id=usable[0].id,
            secrets_file=secrets_file,
        )

    generated = new_state or not states
    if generated:
        state = SecretStr(secrets.token_urlsafe(STATE_BYTES))
        try:
            add_client_state(secrets_file, state)
        except OSError as exc:
            raise SubscriptionError(
                f"cannot write the client states file {secrets_file}: {exc.strerror}"
            ) from None
    else:
        state = states[0]
    created = client.create_subscription(url, state) or _find_created(
        client, url, state, before={s.id for s in listed}
    )
    logger.info(
        "webhook subscription %s for %s created at connection %s%s",
        created.id,
        url,
        connection.name,
        " with a new client state" if generated else "",
    )

    # A rotation replaces every old subscription for the URL; otherwise only those that
    # cannot deliver (inactive, or with a state the receiver refuses) are replaced.
    stale = ours if new_state else [s for s in ours if s not in usable]
    deleted, warnings = _delete(client, stale, connection.name)
    retired = 0
    if new_state:
        others = [s for s in listed if s not in stale]
        retired, more = _retire_states(secrets_file, state, others, failed=bool(warnings))
        warnings.extend(more)
        if connection.webhook_client_states:
            warnings.append(
                "the configured client states (webhook_client_states) are still accepted, "
                "and the first of them is what a recreated subscription would use: remove "
                "them from the configuration to finish the rotation"
            )
    return SubscribeResult(
        connection=connection.name,
        url=url,
        created=True,
        subscription_id=created.id,
        secrets_file=secrets_file,
        state_generated=generated,
        deleted=tuple(deleted),
        retired_states=retired,
        warnings=tuple(warnings),
    )


def check_subscriptions(
    connections: Mapping[int, VenueConnection],
    clients: Mapping[int, VenueClient],
    *,
    url: str,
    secrets_dir: Path,
) -> SubscriptionReport:
    """The scheduled check: every connection with a client has a usable subscription.

    A connection without one gets it (:func:`subscribe`), and a warning is logged: a
    missing subscription means webhooks were not arriving. Any failure is counted and
    logged, and the next connection is checked.

    Args:
        connections: the venue connections by row id.
        clients: the venue client of each connection id; the caller creates and closes
            them.
        url: the receiver's public webhook URL (the settings' ``webhook_url``).
        secrets_dir: the settings' ``secrets_dir``.

    Returns:
        What the run did.
    """
    report = SubscriptionReport()
    for connection_id, client in clients.items():
        connection = connections.get(connection_id)
        if connection is None:
            continue
        report.checked += 1
        try:
            result = subscribe(connection, client, url=url, secrets_dir=secrets_dir)
        except (VenueError, SubscriptionError) as exc:
            report.errors += 1
            report.found[connection_id] = ConnectionCheck(usable=False, error=describe_error(exc))
            logger.warning("subscription check at connection %s failed: %s", connection.name, exc)
            continue
        report.found[connection_id] = ConnectionCheck(usable=True, recreated=result.created)
        if not result.created:
            report.present += 1
            continue
        report.created += 1
        if result.deleted:
            logger.warning(
                "subscription for %s unusable at connection %s (inactive, or with a client "
                "state we do not accept): replaced by %s",
                url,
                connection.name,
                result.subscription_id,
            )
        else:
            logger.warning(
                "subscription for %s missing at connection %s: recreated as %s",
                url,
                connection.name,
                result.subscription_id,
            )
        for warning in result.warnings:
            logger.warning("connection %s: %s", connection.name, warning)
    return report


def record_checks(
    sessions: sessionmaker[Session], report: SubscriptionReport, *, now: dt.datetime
) -> None:
    """Keep what a check found at each connection in its ``subscription_check`` row.

    ``recreated_at`` moves only when a subscription had to be made; a connection the
    check failed for keeps its earlier ``recreated_at`` and is marked not usable (the
    check could not make sure: the venue refused, or the states file could not be
    written).

    Args:
        sessions: sessions on the database; one transaction for the whole report.
        report: what :func:`check_subscriptions` returned.
        now: the time of the check (aware).
    """
    with sessions.begin() as session:
        for connection_id, check in report.found.items():
            row = session.get(SubscriptionCheck, connection_id)
            if row is None:
                row = SubscriptionCheck(connection_id=connection_id)
                session.add(row)
            row.checked_at = now
            row.usable = check.usable
            row.last_error = check.error
            if check.recreated:
                row.recreated_at = now


def find_subscriptions(
    listed: Sequence[Subscription], url: str | None, states: Sequence[SecretStr]
) -> tuple[list[Subscription], list[Subscription]]:
    """Of the ``listed`` subscriptions, those that send our event to ``url`` (to any URL
    when ``None``), and of those the usable ones (see the module docstring).

    Args:
        listed: the connection's subscriptions, as the venue lists them.
        url: the receiver's webhook URL, if known.
        states: the client states the receiver accepts for the connection.
    """
    ours = [s for s in listed if _serves(s, url)]
    return ours, [s for s in ours if _is_usable(s, states)]


def _find_created(
    client: VenueClient, url: str, state: SecretStr, *, before: set[str]
) -> Subscription:
    """The subscription a create answered with an empty body: the new one listed for ``url``.

    Business Central's external event subscriptions can answer 201 with no body
    (``spec/WEBHOOKS.md``); the venue then lists it. New means not listed ``before``;
    when several are new, the last listed, which is the newest on Business Central.

    Raises:
        SubscriptionError: the venue does not list it (the next check tries again).
    """
    made = [
        s
        for s in client.list_subscriptions()
        if s.id not in before and _serves(s, url) and _is_usable(s, [state])
    ]
    if not made:
        raise SubscriptionError(
            f"the venue accepted the subscription for {url} with an empty answer but does "
            "not list it; the next check will try again"
        )
    return made[-1]


def _serves(subscription: Subscription, url: str | None) -> bool:
    """Whether ``subscription`` sends our event to ``url`` (to any URL when ``None``)."""
    event = (subscription.event_name or "").strip().lower()
    target = subscription.notification_url
    if event != ORDER_PROCESSED_EVENT or target is None:
        return False
    return url is None or _same_url(target, url)


def _same_url(left: str, right: str) -> bool:
    # Scheme and host compare case-blind and a default port is no port; the path, the
    # query and a trailing slash are the receiver's own and compare exactly.
    return _url_key(left) == _url_key(right)


def _url_key(url: str) -> tuple[str, str, str, str]:
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    try:
        port = parts.port
    except ValueError:
        port = None
    default = {"http": 80, "https": 443}.get(scheme)
    netloc = host if port in (None, default) else f"{host}:{port}"
    return (scheme, netloc, parts.path or "/", parts.query)


def _is_usable(subscription: Subscription, states: Sequence[SecretStr]) -> bool:
    """Active as far as the venue says, and carrying a state we accept (if it shows one)."""
    if not _is_active(subscription):
        return False
    shown = subscription.client_state
    if shown is None:
        # The venue does not show it; ours if we have any state at all.
        return bool(states)
    candidate = shown.encode("utf-8")
    return any(
        hmac.compare_digest(candidate, state.get_secret_value().encode("utf-8")) for state in states
    )


def _is_active(subscription: Subscription) -> bool:
    """False only when the venue's listing says the subscription is not working.

    The API documents no status field; Business Central's subscriptions may carry one,
    under one of a few names. Absent, the subscription counts as active.
    """
    extra = {key.lower(): value for key, value in (subscription.model_extra or {}).items()}
    for name in _ACTIVE_FIELDS:
        if isinstance(extra.get(name), bool):
            return bool(extra[name])
    for name in _STATUS_FIELDS:
        value = extra.get(name)
        if isinstance(value, str) and value.strip():
            return value.strip().lower() in _ACTIVE_VALUES
    return True


def _delete(
    client: VenueClient, stale: Sequence[Subscription], connection: str
) -> tuple[list[str], list[str]]:
    """Delete ``stale`` subscriptions; the ids deleted, and a warning per one that was not."""
    deleted: list[str] = []
    warnings: list[str] = []
    for subscription in stale:
        try:
            client.delete_subscription(subscription.id)
        except VenueNotFound:
            pass  # gone already: what was wanted
        except VenueError as exc:
            warnings.append(f"could not delete the old subscription {subscription.id}: {exc}")
            continue
        deleted.append(subscription.id)
        logger.info("webhook subscription %s deleted at connection %s", subscription.id, connection)
    return deleted, warnings


def _retire_states(
    secrets_file: Path,
    new: SecretStr,
    others: Sequence[Subscription],
    *,
    failed: bool,
) -> tuple[int, list[str]]:
    """After a rotation: the file's states that no other subscription carries, removed.

    ``others`` are the company's subscriptions that stay (for other URLs, perhaps this
    deployment's too). The states are kept when an old subscription could not be
    deleted (it still delivers with its state), or when the venue does not show some
    other subscription's state (it might be one of them).
    """
    if failed:
        return 0, ["the old client states were kept until the old subscriptions are deleted"]
    if any(s.client_state is None for s in others):
        return 0, [
            "the venue does not show the subscriptions' client states, so the old ones were "
            f"kept in {secrets_file}; remove them by hand once nothing delivers with them"
        ]
    in_use = {s.client_state for s in others} | {new.get_secret_value()}
    try:
        retired = [
            state
            for state in read_client_states(secrets_file)
            if state.get_secret_value() not in in_use
        ]
        return remove_client_states(secrets_file, retired), []
    except (OSError, SettingsError) as exc:
        return 0, [f"could not retire the old client states in {secrets_file}: {exc}"]
