"""Health checks: ``GET /healthz`` (the process is alive) and ``GET /readyz`` (it can work).

``/healthz`` touches nothing but the process: a load balancer or supervisor restarts
the process when it fails. ``/readyz`` answers 200 only when a venue connection is
configured, the database is reachable, its schema is the one this code needs
(:func:`storage.migrate.is_current`) and the venue connections are resolved; otherwise
503 with the reason in the receiver's JSON error shape (``not_configured``,
``database_unavailable`` or ``schema_not_current``), so traffic waits for it. The web
role starts whatever the database's state, and ``/healthz`` answers meanwhile: a
database that is away makes the process not ready, not dead.
"""

from __future__ import annotations

from flask import Blueprint, Response, jsonify

from receiver.context import current_receiver
from receiver.errors import (
    DATABASE_UNAVAILABLE,
    DatabaseUnavailable,
    NotConfigured,
    SchemaNotCurrent,
    describe_database_error,
)
from storage.migrate import is_current

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz() -> Response:
    """The process is alive and serving requests."""
    return jsonify(status="ok")


@bp.get("/readyz")
def readyz() -> Response:
    """A venue is configured, the database is reachable and migrated, and the venue
    connections are resolved.

    Raises:
        NotConfigured: no venue connection is configured: every webhook would be refused.
        DatabaseUnavailable: the database cannot be reached.
        SchemaNotCurrent: the database's schema is not this code's.
    """
    receiver = current_receiver()
    if not receiver.settings.connections:
        raise NotConfigured(
            "no venue connection configured: set OTACM_TENANT, OTACM_COMPANY and "
            "OTACM_API_KEY, or list [[connections]] in the OTACM_CONFIG_FILE file"
        )
    try:
        current = is_current(receiver.engine)
    except DATABASE_UNAVAILABLE as exc:
        raise DatabaseUnavailable(describe_database_error(exc)) from exc
    if not current:
        raise SchemaNotCurrent()
    connections = receiver.connection_ids()
    return jsonify(status="ok", connections=len(connections))
