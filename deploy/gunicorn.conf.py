"""gunicorn settings for the receiver, for running gunicorn directly:

    gunicorn -c deploy/gunicorn.conf.py 'receiver:create_app()'

They are the ones `otacm web` uses (otacm.web.gunicorn_options), read from one place.
Set OTACM_BIND (default 127.0.0.1:8000) and, optionally, OTACM_WEB_WORKERS.
PROMETHEUS_MULTIPROC_DIR must name an empty directory so /metrics sums every worker; the
settings' child_exit hook tells prometheus-client of each worker that exits.
Logs are otacm's, gunicorn's own included: OTACM_LOG_LEVEL and OTACM_LOG_FORMAT (text or
json), with the configured secrets masked, as under `otacm web`.
"""

import os

from otacm.logs import configure_logging, settings_secrets
from otacm.settings import Settings
from otacm.web import gunicorn_options

configure_logging(
    os.environ.get("OTACM_LOG_LEVEL", "INFO"),
    settings_secrets(Settings.load()),
    os.environ.get("OTACM_LOG_FORMAT", "text").lower(),
)
_workers = os.environ.get("OTACM_WEB_WORKERS")
globals().update(
    gunicorn_options(
        os.environ.get("OTACM_BIND", "127.0.0.1:8000"),
        int(_workers) if _workers else None,
    )
)
