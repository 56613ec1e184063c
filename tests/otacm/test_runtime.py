"""The worker's and scheduler's runtime: what it does to the database when it opens."""

from __future__ import annotations

import datetime as dt

import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry
from pydantic import SecretStr
from sqlalchemy.orm import Session, sessionmaker

from orders.mirror import upsert_order
from otacm.processes import open_runtime
from otacm.settings import Settings
from receiver import metrics
from receiver.metrics import VenueCallMetrics
from storage.models import ChangeSource, ForeignOrder, VenueOrder, ensure_connection
from venue.connection import VenueConnection
from venue.models import Order

OURS = "21e8c1d2-3f4a-4c5b-9e6d-7f8a9b0c1d2e"
THEIRS = "5b7c9d1e-2f3a-4b5c-8d6e-7f8091a2b3c4"
T0 = dt.datetime(2026, 5, 15, 9, 30, tzinfo=dt.UTC)


def order(order_id: str, partner_id: str) -> Order:
    """A mirrored order of ``partner_id``, with a customer."""
    return Order.model_validate(
        {
            "orderId": order_id,
            "status": "Issued",
            "partnerId": partner_id,
            "sellToOrderReference": f"SHOP-{order_id[:4]}",
            "sellToName": "Jane Doe",
            "sellToEmail": "jane@example.com",
        }
    )


def test_opening_the_runtime_erases_orders_of_partners_no_longer_configured(
    migrated_engine: sa.Engine, sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A partner removed from the settings: its mirrored orders go when a role starts.

    The venue notifies and answers getOrder company-wide (CMOrderWebhooks;
    ChannelMgrOrderAgent ``GetOrder``); otacm keeps only the configured partners' orders.
    """
    ours_id, theirs_id = (
        "11111111-0000-4000-8000-000000000001",
        "22222222-0000-4000-8000-000000000002",
    )
    with sessions.begin() as session:
        connection_id = ensure_connection(session, "venue")
        for order_id, partner in ((ours_id, OURS), (theirs_id, THEIRS)):
            upsert_order(
                session,
                connection_id,
                order(order_id, partner),
                source=ChangeSource.FETCH,
                observed_at=T0,
            )
    settings = Settings(
        database_url=migrated_engine.url.render_as_string(hide_password=False),
        connections=[
            VenueConnection(
                name="venue",
                api_base_url="http://venue.invalid",
                tenant="00000000-0000-0000-0000-000000000001",
                company="CRONUS International Ltd.",
                api_key=SecretStr("key-for-tests"),
                partner_ids=[OURS.upper()],
            )
        ],
    )

    # A registry of the test's own: a worker process registers its metrics once, globally.
    monkeypatch.setattr(
        metrics, "VenueCallMetrics", lambda registry: VenueCallMetrics(CollectorRegistry())
    )
    with open_runtime(settings) as runtime:
        assert runtime.clients[connection_id].serves(OURS)
        assert not runtime.clients[connection_id].serves(THEIRS)

    with sessions.begin() as session:
        assert list(session.scalars(sa.select(VenueOrder.order_id))) == [ours_id]
        assert list(session.scalars(sa.select(ForeignOrder.order_id))) == [theirs_id]
