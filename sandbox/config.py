"""The sandbox's configuration: who the simulated venue is and how it behaves.

A :class:`SandboxConfig` names the tenant, environment, company and API key the sandbox
answers to, the partners it knows (active or not), its catalog, the pickup cadence,
where its state lives, the webhook delivery settings, the older synchronous mode and the
faults it starts with. It is built once at the edge (``otacm sandbox`` or a test) and
passed down; nothing here reads the environment.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from sandbox.catalog import Catalog, load_catalog
from sandbox.faults import Faults
from venue.connection import CompanyPathForm, encode_company

DEFAULT_TENANT = "01234567-89ab-cdef-0123-456789abcdef"
DEFAULT_ENVIRONMENT = "sandbox"
DEFAULT_COMPANY = "CRONUS International Ltd."
DEFAULT_API_KEY = "sandbox-api-key"
DEFAULT_PICKUP_INTERVAL = 60.0
GATEWAY_MAX_IN_FLIGHT = 5
GATEWAY_RATE_LIMIT = 6000
GATEWAY_RATE_PERIOD = 300.0
"""The gateway's limits per API identity (``spec/API.md``, "Rate limits")."""
MEMORY = ":memory:"


class Partner(BaseModel):
    """A partnership the venue knows (CMPartnerSetup); orders from an inactive one are rejected.

    Attributes:
        id: the partner's GUID, lower case without braces as the venue writes it.
        active: whether createOrder accepts its orders.
        name: the partner's name, which the venue's messages quote (ChannelMgrOrderAgent
            CreateOrder, TryGetPartnerSetup); "Partner" and the id's first block when none
            is given.
        design_template: whether the partner has a design template
            (``NPDesignerTemplateId``): without one the venue builds no manifests
            (CMOrderIssuer BuildManifestForOrder).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(min_length=1)
    active: bool = True
    name: str = Field(default="", max_length=100)
    design_template: bool = True

    @field_validator("id")
    @classmethod
    def _lowercase_guid(cls, value: str) -> str:
        # The venue writes GUIDs lowercase without braces.
        return value.strip().strip("{}").lower()

    @model_validator(mode="after")
    def _default_name(self) -> Partner:
        if not self.name.strip():
            # Frozen model: the default is set once, here, from the id.
            object.__setattr__(self, "name", f"Partner {self.id[:8].upper()}")
        return self

    @classmethod
    def parse(cls, text: str) -> Partner:
        """``ID[:inactive][:no-template][=NAME]`` (the CLI's and environment's form).

        Raises:
            ValueError: a flag after a colon is not ``active``, ``inactive`` or
                ``no-template``.
        """
        head, _, name = text.strip().partition("=")
        partner_id, *flags = head.strip().split(":")
        unknown = [f for f in flags if f not in ("", "active", "inactive", "no-template")]
        if unknown:
            raise ValueError(
                f"partner flags must be 'active', 'inactive' or 'no-template', not {unknown[0]!r}"
            )
        return cls(
            id=partner_id,
            active="inactive" not in flags,
            name=name.strip(),
            design_template="no-template" not in flags,
        )

    def to_text(self) -> str:
        """The partner in the form :meth:`parse` reads."""
        flags = ("" if self.active else ":inactive") + (
            "" if self.design_template else ":no-template"
        )
        return f"{self.id}{flags}={self.name}"


DEFAULT_PARTNERS = (
    Partner(id="21e8c1d2-3f4a-4c5b-9e6d-7f8a9b0c1d2e", name="Nordic Tours"),
    Partner(id="5b7c9d1e-2f3a-4b5c-8d6e-7f8091a2b3c4", name="Castle Trips"),
    Partner(id="9f8e7d6c-5b4a-4392-8170-6f5e4d3c2b1a", active=False, name="Old Partner"),
)


class SandboxConfig(BaseModel):
    """Everything a sandbox is started with. Tests build it by hand.

    Attributes:
        pickup_interval: seconds between automatic pickup cycles (the venue's cadence is
            about 60 s); 0 turns the automatic cycle off — ``POST /_sandbox/tick`` only.
        state_path: ``":memory:"`` or a SQLite file that keeps orders, row versions and
            subscriptions across restarts.
        legacy_sync: behave like the older synchronous API version (seeds 000 and 003).
        webhook_max_batch: most notifications in one webhook POST.
        webhook_max_attempts: POSTs per batch before giving up (1 = no retry).
        webhook_backoff: seconds before the first retry; doubles with each retry.
        timezone: the venue's local time zone; "visitDate not in the past" uses its date.
        currency_code: the company's local currency (General Ledger Setup ``LCY Code``, a
            Code[10]); every wallet carries it, whatever the item (CMTicketIssuer,
            CMCouponIssuer).
        company_path_form: the one way of writing the company in the path the venue
            answers (``percent``: ``%20``, ``double``: ``%2520``, ``plus``: ``+``); any
            other is 404, as for an unknown company.
        webhook_create_empty_body: answer ``POST /webhook`` with 201 and no body, as
            Business Central's external event subscriptions may.
        webhook_list_paths: which subscription list paths are served: ``both``, or only
            ``webhooks`` or ``webhook`` (the other is 404).
        gateway_max_in_flight: calls of one API identity in process at once; more are
            answered 429 (:mod:`sandbox.limits`); 0 for no bound.
        gateway_rate_limit: calls of one API identity per ``gateway_rate_period`` seconds
            (a sliding window); more are answered 429; 0 for no limit.
        gateway_rate_period: the rate's window, in seconds.
        webhook_deactivate_after: mark a subscription inactive (``subscriptionState``
            ``Inactive``; no more deliveries) after this many consecutive final 4xx
            answers from its receiver, as Business Central does; 0 never.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    tenant: str = Field(default=DEFAULT_TENANT, min_length=1, pattern=r"^[^/]+$")
    environment: str = Field(default=DEFAULT_ENVIRONMENT, min_length=1, pattern=r"^[^/]+$")
    company: str = Field(default=DEFAULT_COMPANY, min_length=1)
    api_key: SecretStr = SecretStr(DEFAULT_API_KEY)
    partners: tuple[Partner, ...] = DEFAULT_PARTNERS
    catalog: Catalog = Field(default_factory=load_catalog)
    pickup_interval: float = Field(default=DEFAULT_PICKUP_INTERVAL, ge=0)
    state_path: str = MEMORY
    legacy_sync: bool = False
    faults: Faults = Faults()
    webhook_max_batch: int = Field(default=100, ge=1)
    webhook_max_attempts: int = Field(default=5, ge=1)
    webhook_backoff: float = Field(default=1.0, ge=0)
    webhook_timeout: float = Field(default=10.0, gt=0)
    company_path_form: CompanyPathForm = "percent"
    webhook_create_empty_body: bool = False
    webhook_list_paths: Literal["both", "webhooks", "webhook"] = "both"
    webhook_deactivate_after: int = Field(default=0, ge=0)
    gateway_max_in_flight: int = Field(default=GATEWAY_MAX_IN_FLIGHT, ge=0)
    gateway_rate_limit: int = Field(default=GATEWAY_RATE_LIMIT, ge=0)
    gateway_rate_period: float = Field(default=GATEWAY_RATE_PERIOD, gt=0)
    timezone: str = "Europe/Copenhagen"
    currency_code: str = Field(default="DKK", min_length=1, max_length=10)
    api_version: str = "2025-06-01"
    manifest_base_url: str = "https://manifests.npretail.app/wallets/manifest"

    @field_validator("api_key")
    @classmethod
    def _key_set(cls, value: SecretStr) -> SecretStr:
        if not value.get_secret_value():
            raise ValueError("the sandbox needs a non-empty API key")
        return value

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone {value!r}") from exc
        return value

    @property
    def payment_reference_length(self) -> int:
        """CMOrder.PaymentReference is Code[50]; the older synchronous API's was Code[20]."""
        return 20 if self.legacy_sync else 50

    @property
    def company_path(self) -> str:
        """The company as the one path segment this venue answers."""
        return encode_company(self.company, self.company_path_form)

    def partner(self, partner_id: str) -> Partner | None:
        """The partner with ``partner_id`` (any case, braces allowed), or ``None``."""
        wanted = partner_id.strip().strip("{}").lower()
        return next((p for p in self.partners if p.id == wanted), None)

    def local_today(self, now: dt.datetime) -> dt.date:
        """The venue's local date at the instant ``now``."""
        return now.astimezone(ZoneInfo(self.timezone)).date()

    def public_json(self) -> dict[str, Any]:
        """What ``GET /_sandbox/config`` tells a client so it can configure itself."""
        return {
            "tenant": self.tenant,
            "environment": self.environment,
            "company": self.company,
            "companyPathForm": self.company_path_form,
            "apiKey": self.api_key.get_secret_value(),
            "partners": [
                {
                    "id": p.id,
                    "active": p.active,
                    "name": p.name,
                    "designTemplate": p.design_template,
                }
                for p in self.partners
            ],
            "catalog": self.catalog.to_json(),
            "currencyCode": self.currency_code,
            "pickupInterval": self.pickup_interval,
            "legacySync": self.legacy_sync,
            "apiVersion": self.api_version,
        }
