"""Webhook bodies for the ingest benchmark: ``ota_cm_order_processed`` as the venue sends it.

Every notification is new: its ``orderId`` is a GUID made of a random prefix per stream
and a counter, and its ``timestamp`` moves on by a millisecond each time, so the inbox's
dedup key (:func:`storage.models.inbox_dedup_key`) never hides work. Bodies are built
from a text template rather than ``json.dumps``, so making them costs the load generator
next to nothing while it runs.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterator

from venue.webhooks import ORDER_PROCESSED_EVENT

APP_ID = "992c2309-cca4-43cb-9e41-911f482ec088"
"""The venue's app id, as its webhooks carry it."""

CLIENT_STATE = "bench-ingest-client-state-0123456789"
"""The ``clientState`` the benchmark configures otacm with and sends."""

WEBHOOK_PATH = "/webhooks/ota-cm"

_NOTIFICATION = (
    f'{{"appId":"{APP_ID}","clientState":"{CLIENT_STATE}","eventName":"{ORDER_PROCESSED_EVENT}",'
    '"eventVersion":"1.0","timestamp":"%s","companyName":"CRONUS International Ltd.",'
    '"payload":{"orderId":"%s","buyFromOrderReference":"CM-%s","status":"Issued"}}'
)
"""One notification; ``%`` fills in its timestamp, orderId and reference number."""
_EPOCH = dt.datetime(2024, 1, 15, 10, 30, tzinfo=dt.UTC)


def notifications() -> Iterator[str]:
    """Endless distinct notifications, each as JSON text."""
    prefix = str(uuid.uuid4())[:24]  # "xxxxxxxx-xxxx-4xxx-yxxx-"
    counter = 0
    while True:
        counter += 1
        stamp = _EPOCH + dt.timedelta(milliseconds=counter)
        timestamp = stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{stamp.microsecond // 1000:03d}Z"
        yield _NOTIFICATION % (timestamp, f"{prefix}{counter:012x}", f"{counter:017d}")


def webhook_bodies(batch: int) -> Iterator[bytes]:
    """Endless distinct webhook bodies, ``{"value": [...]}`` with ``batch`` notifications."""
    if batch < 1:
        raise ValueError("a webhook carries at least one notification")
    source = notifications()
    while True:
        items = ",".join(next(source) for _ in range(batch))
        yield f'{{"value":[{items}]}}'.encode()


def http_requests(host: str, port: int, batch: int, path: str = WEBHOOK_PATH) -> Iterator[bytes]:
    """Endless distinct ``POST`` requests, whole (head and body), one connection each."""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        "Connection: close\r\nContent-Length: "
    ).encode()
    for body in webhook_bodies(batch):
        yield head + str(len(body)).encode() + b"\r\n\r\n" + body
