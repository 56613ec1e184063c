"""One running simulated venue: its parts built from a config and wired together.

:class:`SandboxRuntime` holds the clock, the fault injector, the counters, the gateway's
limits, the order store
(opened on ``config.state_path``), the order book, the webhook dispatcher and the
pipeline. The Flask app serves it (:func:`sandbox.app.create_sandbox_app`) and
:class:`sandbox.server.SandboxServer` drives its pickup cadence. Whoever creates a runtime
closes it: :meth:`SandboxRuntime.close` stops webhook delivery and closes the store.
"""

from __future__ import annotations

import random

import httpx

from sandbox.config import SandboxConfig
from sandbox.faults import FaultInjector
from sandbox.limits import GatewayLimits
from sandbox.orders import OrderBook
from sandbox.pipeline import Pipeline
from sandbox.state import Clock, OrderStore
from sandbox.stats import Stats
from sandbox.webhooks import WebhookDispatcher


class SandboxRuntime:
    """The sandbox's state and machinery; no thread runs until a webhook is published.

    Args:
        config: the venue to simulate.
        clock: the time source; a fresh real-time :class:`~sandbox.state.Clock` if omitted.
        webhook_client: the HTTP client webhooks are POSTed with; not closed by the
            runtime when passed in (one is created, and closed, otherwise).
    """

    def __init__(
        self,
        config: SandboxConfig,
        *,
        clock: Clock | None = None,
        webhook_client: httpx.Client | None = None,
    ) -> None:
        self.config = config
        self.clock = clock or Clock()
        self.stats = Stats()
        self.faults = FaultInjector(config.faults)
        self.limits = GatewayLimits(
            config.gateway_max_in_flight, config.gateway_rate_limit, config.gateway_rate_period
        )
        # Seeded like the faults, its own source: the venue's other writes, repeatable.
        self.store = OrderStore(
            config.state_path,
            activity=random.Random(config.faults.seed),  # noqa: S311
        )
        self.orders = OrderBook(self.store, config, self.clock)
        self.dispatcher = WebhookDispatcher(
            self.store, config, self.faults, self.stats, self.clock, client=webhook_client
        )
        self.pipeline = Pipeline(
            self.store, config, self.clock, self.faults, self.dispatcher, self.stats
        )

    def close(self) -> None:
        """Stop webhook delivery and close the store."""
        try:
            self.dispatcher.close()
        finally:
            self.store.close()
