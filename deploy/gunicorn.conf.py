"""gunicorn settings for the receiver, for running gunicorn directly:

    gunicorn -c deploy/gunicorn.conf.py 'receiver:create_app()'

They are the ones `otacm web` uses (otacm.processes.gunicorn_options), read from one place.
Set OTACM_BIND (default 127.0.0.1:8000) and, optionally, OTACM_WEB_WORKERS.
PROMETHEUS_MULTIPROC_DIR must name an empty directory so /metrics sums every worker; the
settings' child_exit hook tells prometheus-client of each worker that exits.
"""

import os

from otacm.processes import gunicorn_options

_workers = os.environ.get("OTACM_WEB_WORKERS")
globals().update(
    gunicorn_options(
        os.environ.get("OTACM_BIND", "127.0.0.1:8000"),
        int(_workers) if _workers else None,
    )
)
