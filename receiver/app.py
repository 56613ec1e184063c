"""The receiver's app factory: :func:`create_app` builds the Flask app of the web role.

The app serves the webhook view (:mod:`receiver.webhook`), the health checks
(:mod:`receiver.health`) and the metrics (:mod:`receiver.metrics`); every error has the
JSON shape of :mod:`receiver.errors`. Gunicorn loads it as ``'receiver:create_app()'``.
"""

from __future__ import annotations

import datetime as dt
import logging

from flask import Flask

from otacm.settings import Settings
from receiver import api, health, metrics, webhook
from receiver.context import EXTENSION, Receiver
from receiver.errors import register_error_handlers
from storage.engine import make_engine, make_sessions

logger = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> Flask:
    """The receiver app, with an engine of its own.

    Reads ``settings.database_url`` (the engine's lock timeout is
    ``settings.db_lock_timeout``, so a locked database is a prompt 503),
    ``settings.webhook_max_bytes`` and each connection's ``name`` and
    ``webhook_client_states``. It then resolves each connection's row id once
    (:func:`storage.models.ensure_connection`); when the database is unreachable or not
    migrated, the app starts anyway, ``/readyz`` says why, the webhook answers 503, and
    the ids are resolved at the first request that finds the database ready.

    The app owns its engine: it is made here and disposed of by
    ``app.extensions["otacm"].close()`` (:meth:`receiver.context.Receiver.close`), which
    whoever made the app calls when done with it; under gunicorn the worker process's
    exit does.

    Args:
        settings: the settings; ``None`` loads them from the environment and the
            optional config file (:meth:`Settings.load`).

    Returns:
        The app; ``app.extensions["otacm"]`` is its :class:`~receiver.context.Receiver`.

    Raises:
        otacm.settings.SettingsError: the settings cannot be loaded, or two
            connections share a webhook client state.
    """
    if settings is None:
        settings = Settings.load()
    app = Flask(__name__)
    engine = make_engine(settings.database_url, lock_timeout=settings.db_lock_timeout)
    try:
        read_sessions = make_sessions(engine, read_only=True)
        receiver = Receiver(
            settings=settings,
            engine=engine,
            sessions=make_sessions(engine),
            read_sessions=read_sessions,
            metrics=metrics.Metrics(
                read_sessions,
                [c.name for c in settings.connections],
                stuck_after=dt.timedelta(seconds=settings.stuck_after),
            ),
        )
    except BaseException:
        engine.dispose()
        raise
    app.extensions[EXTENSION] = receiver
    register_error_handlers(app)
    app.register_blueprint(webhook.bp)
    app.register_blueprint(health.bp)
    app.register_blueprint(metrics.bp)
    app.register_blueprint(api.api)
    if not any(c.webhook_client_states for c in settings.connections):
        logger.warning("no webhook client state configured: every webhook will be refused")
    receiver.try_resolve()
    return app
