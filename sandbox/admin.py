"""The sandbox's own endpoints: they need no key and live only under ``/_sandbox/``.

- ``GET /_sandbox/config``: tenant, environment, company, apiKey, partners, catalog,
  and ``baseUrl`` (the API base on this server);
- ``GET /_sandbox/stats`` (``DELETE`` zeroes it): see :mod:`sandbox.stats`, and under
  ``limits`` the gateway's limits and counters per API identity (:mod:`sandbox.limits`);
- ``GET``/``POST /_sandbox/faults``: read or change faults; fields in :mod:`sandbox.faults`;
- ``POST /_sandbox/tick``: run one pickup cycle now, answer what it did;
- ``POST /_sandbox/orders/{orderId}/reprocess``: a venue operator re-processes a
  Submitted or Error order (announced by webhook); answers the order;
- ``POST /_sandbox/webhooks/{id}/state``: ``{"subscriptionState": "Inactive"}`` (or
  ``"Active"``) sets a subscription's state; an inactive one gets no deliveries;
- ``GET``/``POST /_sandbox/clock``: the sandbox's time; ``{"advanceSeconds": N}`` moves it
  forward (the sweeper's hour in an instant);
- ``POST /_sandbox/restore``: simulate a restore of the venue's database: every order's
  ``rowVersion`` is renumbered 1..n in its current order and the counter reset to n, so
  later changes take versions below those a client has seen (a backwards change feed);
  answers ``{"orders": n, "rowVersion": n}``.
"""

from __future__ import annotations

import datetime as dt
import logging

from flask import Blueprint, Response, request
from pydantic import ValidationError

from sandbox.errors import InvalidRequest, ResourceNotFound
from sandbox.orders import describe_validation_error
from sandbox.state import ACTIVE, INACTIVE, SUBSCRIPTION_STATE
from sandbox.web import current_runtime, json_response, request_body
from sandbox.wire import order_json

logger = logging.getLogger(__name__)

admin = Blueprint("sandbox", __name__, url_prefix="/_sandbox")


@admin.get("/config")
def show_config() -> Response:
    """What a client needs to configure itself against this sandbox."""
    config = current_runtime().config
    base_path = f"/{config.tenant}/{config.environment}/{config.company_path}"
    return json_response(
        {**config.public_json(), "baseUrl": request.host_url.rstrip("/") + base_path}
    )


@admin.get("/stats")
def show_stats() -> Response:
    """The call, webhook and pipeline counters, and the gateway's limits per identity."""
    runtime = current_runtime()
    return json_response({**runtime.stats.snapshot(), "limits": runtime.limits.snapshot()})


@admin.delete("/stats")
def reset_stats() -> Response:
    """Zero the counters."""
    runtime = current_runtime()
    runtime.stats.reset()
    runtime.limits.reset()
    return json_response({**runtime.stats.snapshot(), "limits": runtime.limits.snapshot()})


@admin.get("/faults")
def show_faults() -> Response:
    """The faults in force."""
    return json_response(current_runtime().faults.faults.to_json())


@admin.post("/faults")
def set_faults() -> Response:
    """Change some faults (fields in :mod:`sandbox.faults`); answers all now in force."""
    body = request_body()
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object of faults")
    try:
        faults = current_runtime().faults.update(body)
    except ValidationError as exc:
        raise InvalidRequest(describe_validation_error(exc)) from None
    logger.info("faults changed: %s", ", ".join(sorted(body)))
    return json_response(faults.to_json())


@admin.post("/webhooks/<subscription_id>/state")
def set_subscription_state(subscription_id: str) -> Response:
    """Set a subscription's state: ``{"subscriptionState": "Inactive"}`` stops its
    deliveries, as Business Central does after repeated 4xx answers; ``Active`` resumes."""
    body = request_body()
    state = body.get(SUBSCRIPTION_STATE) if isinstance(body, dict) else None
    if state not in (ACTIVE, INACTIVE):
        raise InvalidRequest(f"{SUBSCRIPTION_STATE} must be '{ACTIVE}' or '{INACTIVE}'")
    subscription = current_runtime().store.set_subscription_state(subscription_id, state)
    if subscription is None:
        raise ResourceNotFound(f"Subscription '{subscription_id}' was not found")
    logger.info("webhook subscription %s set %s", subscription.id, state)
    return json_response(subscription.to_wire())


@admin.post("/tick")
def tick() -> Response:
    """Run one pickup cycle now."""
    return json_response(current_runtime().pipeline.run_cycle().to_json())


@admin.post("/orders/<order_id>/reprocess")
def reprocess_order(order_id: str) -> Response:
    """A venue operator re-processes a Submitted or Error order (CMJobQueueRunner
    ReProcessSingleOrder): it runs through issuance now and its outcome is announced by
    webhook; answers the order as getOrder shows it."""
    runtime = current_runtime()
    runtime.orders.get(order_id)  # the venue's 400/404 for a bad or unknown id
    return json_response(order_json(runtime.pipeline.reprocess(order_id)))


@admin.get("/clock")
def show_clock() -> Response:
    """The sandbox's time and how far it runs ahead of the real time."""
    return _clock_json()


@admin.post("/clock")
def advance_clock() -> Response:
    """Move the sandbox's time forward: ``{"advanceSeconds": N}``."""
    body = request_body()
    seconds = body.get("advanceSeconds") if isinstance(body, dict) else None
    if not isinstance(seconds, int | float) or isinstance(seconds, bool) or seconds < 0:
        raise InvalidRequest("advanceSeconds must be a number of seconds, at least 0")
    current_runtime().clock.advance(dt.timedelta(seconds=seconds))
    return _clock_json()


@admin.post("/restore")
def restore() -> Response:
    """Renumber every order's row version 1..n, as after a database restore."""
    count = current_runtime().store.renumber_row_versions()
    logger.info("row versions renumbered 1..%d (simulated restore)", count)
    return json_response({"orders": count, "rowVersion": count})


def _clock_json() -> Response:
    clock = current_runtime().clock
    return json_response(
        {
            "now": clock.now().strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "offsetSeconds": clock.offset.total_seconds(),
        }
    )
