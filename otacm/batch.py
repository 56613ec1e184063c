"""Batch work runs at a lower CPU priority: :func:`as_batch_work`.

A whole process lowers itself here. The web role cannot: its workers answer the webhooks
and an unprivileged process cannot raise its priority back, so a report download lowers
only the thread that computes it (:func:`receiver.finance.streaming.at_batch_priority`,
by the same ``batch_nice``).
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)


def as_batch_work(nice: int) -> None:
    """Lower this process's CPU priority by ``nice`` (``OTACM_BATCH_NICE``); once, first thing.

    For the scheduler and the batch commands (reconcile, ledger import, report, db
    prune): on a box whose cores they keep busy, the web role's answers (the venue's
    webhooks) would otherwise wait for a CPU behind their computing, their start-up
    included. Measured on two cores with a reconciliation of a year, an import of 100k
    sales and the worker beside the receiver, on SQLite at a million orders: the
    webhooks' p99 fell from 106-266 ms to 36 ms (bench/history). Their writes stay short
    (storage.pacing), so a lowered process holds SQLite's lock little longer. This module
    imports nothing heavy, so that a command lowers itself before its own imports.
    """
    if nice:
        try:
            os.nice(nice)
        except OSError as exc:  # a platform or a sandbox without priorities: run as is
            logger.debug("CPU priority not lowered: %s", exc)
