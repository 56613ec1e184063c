"""The web role's process: the receiver app under gunicorn, with otacm's settings.

:func:`gunicorn_options` are the production settings (``otacm web`` and
``deploy/gunicorn.conf.py`` read them from here); :class:`GunicornLogger` writes
gunicorn's lines in otacm's format; :func:`worker_exited` keeps the metrics of a worker
that exited out of the scrape; :func:`run_web` serves until stopped.
"""

from __future__ import annotations

import os
from typing import Any

from gunicorn import glogging

from otacm.settings import Settings


def gunicorn_options(bind: str, workers: int | None = None) -> dict[str, Any]:
    """The production gunicorn settings for the receiver (also ``deploy/gunicorn.conf.py``).

    Sync workers, about two per core plus one: each request is short (parse, one INSERT,
    commit) and the commit waits on the disk, so a few more processes than cores keep the
    cores busy. Requests never wait on the venue: that work is the worker's.
    """
    from receiver.finance.streaming import remember_worker

    return {
        "bind": bind,
        "workers": workers or (2 * (os.cpu_count() or 1) + 1),
        "worker_class": "sync",
        "timeout": 30,
        "graceful_timeout": 20,
        # Webhooks are small; a request line or header beyond these is not the venue.
        "limit_request_line": 8190,
        "limit_request_fields": 100,
        "accesslog": None,
        "errorlog": "-",
        "loglevel": "info",
        "proc_name": "otacm-web",
        # gunicorn's runtime control socket (gunicornc) lives at one per-user path that
        # every gunicorn on the box would share, and fails noisily where the home is
        # read-only (systemd's ProtectHome); otacm's processes are managed by signals.
        "control_socket_disable": True,
        "child_exit": worker_exited,
        # Long downloads tell the master the worker lives (receiver.finance.streaming).
        "post_worker_init": remember_worker,
        "logger_class": GunicornLogger,
    }


class GunicornLogger(glogging.Logger):  # type: ignore[misc]
    """gunicorn's logger, writing its lines (the error log; an access log when one is asked
    for) in otacm's format with otacm's redaction (:mod:`otacm.logs`): one JSON object per
    line when ``OTACM_LOG_FORMAT=json``, like every other line of the process."""

    def setup(self, cfg: Any) -> None:
        """gunicorn's setup, then otacm's formatter on the handlers gunicorn made."""
        from otacm.logs import configured_formatter

        super().setup(cfg)
        formatter = configured_formatter()
        if formatter is None:  # gunicorn started without otacm's logging: its own format
            return
        for log in (self.error_log, self.access_log):
            for handler in log.handlers:
                handler.setFormatter(formatter)


def worker_exited(server: Any, worker: Any) -> None:
    """gunicorn's ``child_exit`` hook, run in the master once a worker has exited (stopped,
    killed, timed out or recycled): its live gauges leave the scrape, as prometheus-client's
    multiprocess mode asks; its counters stay, being counts it made."""
    from receiver.metrics import forget_process

    forget_process(worker.pid)


def run_web(settings: Settings, options: dict[str, Any]) -> None:
    """Serve ``receiver.create_app(settings)`` under gunicorn until it is stopped.

    ``GUNICORN_CMD_ARGS`` (gunicorn's own variable, in its command line's syntax) changes
    any of gunicorn's settings over ``options``, as it would over a configuration file:
    ``--timeout``, ``--max-requests`` and the like.
    """
    from gunicorn.app.base import BaseApplication

    from receiver import create_app

    class WebApplication(BaseApplication):  # type: ignore[misc]
        def load_config(self) -> None:
            for key, value in options.items():
                self.cfg.set(key, value)
            overrides = self.cfg.get_cmd_args_from_env()
            if overrides:
                parsed = self.cfg.parser().parse_args(overrides)
                for key, value in vars(parsed).items():
                    if value is not None and key != "args":
                        self.cfg.set(key.lower(), value)

        def load(self) -> Any:
            return create_app(settings)

    WebApplication().run()
