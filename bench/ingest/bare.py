"""The stack's own limit: a bare Flask endpoint that only stores one row per POST.

``python bare.py --database-url URL --bind HOST:PORT [--workers N]`` serves it under
gunicorn with otacm's production options (:func:`otacm.processes.gunicorn_options`),
on an engine made by otacm's :func:`storage.engine.make_engine` with the receiver's
lock timeout, so the only difference from ``otacm web`` is otacm's own work: no
envelope, no validation, no dedup key, no metrics, no logging per POST.

``POST /webhooks/ota-cm`` reads the body and inserts it as one row of a one-table
database (``hits``) in its own transaction, then answers ``{"stored": 1}``;
``GET /readyz`` answers once the table exists.
"""

from __future__ import annotations

import argparse
import datetime as dt
from typing import Any

import sqlalchemy as sa
from flask import Flask, Response, jsonify, request

from otacm.processes import gunicorn_options
from otacm.settings import Settings
from storage.engine import make_engine

TABLE = "hits"
WEBHOOK_PATH = "/webhooks/ota-cm"

_metadata = sa.MetaData()
hits = sa.Table(
    TABLE,
    _metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("body", sa.Text, nullable=False),
)


def create_bare_app(database_url: str) -> Flask:
    """The bare endpoint's app, with an engine of its own (one per gunicorn worker)."""
    lock_timeout = Settings.model_fields["db_lock_timeout"].default
    engine = make_engine(database_url, lock_timeout=lock_timeout)
    insert = hits.insert()
    app = Flask(__name__)

    @app.post(WEBHOOK_PATH)
    def store_one() -> Response:
        body = request.get_data(as_text=True)
        with engine.begin() as connection:
            connection.execute(insert, {"received_at": dt.datetime.now(dt.UTC), "body": body})
        return jsonify(stored=1)

    @app.get("/readyz")
    def ready() -> Response:
        with engine.connect() as connection:
            connection.execute(sa.select(sa.func.count()).select_from(hits)).scalar_one()
        return jsonify(status="ok")

    return app


def create_table(database_url: str) -> None:
    """Create the one table, empty."""
    engine = make_engine(database_url)
    try:
        _metadata.create_all(engine)
    finally:
        engine.dispose()


def serve(database_url: str, options: dict[str, Any]) -> None:
    """Serve :func:`create_bare_app` under gunicorn with ``options`` until stopped."""
    from gunicorn.app.base import BaseApplication

    class BareApplication(BaseApplication):  # type: ignore[misc]
        def load_config(self) -> None:
            for key, value in options.items():
                self.cfg.set(key, value)

        def load(self) -> Any:
            return create_bare_app(database_url)

    BareApplication().run()


def main() -> None:
    """Create the table and serve the bare endpoint (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--bind", required=True)
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args()
    create_table(args.database_url)
    options = gunicorn_options(args.bind, args.workers)
    options["proc_name"] = "otacm-bench-bare"
    serve(args.database_url, options)


if __name__ == "__main__":
    main()
