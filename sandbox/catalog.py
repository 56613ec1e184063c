"""The simulated venue's catalog: the items it sells and what each one issues.

The catalog is a JSON file (``catalog.json`` beside this module is the default) of items,
each of one *kind*:

- ``ticket``: one wallet per unit of quantity, each holding one ticket;
- ``group``: one wallet per line whatever the quantity, holding one group ticket;
- ``package``: one wallet per package, holding one asset per component (tickets, and
  coupons where the package yields them); only packages accept ``componentSchedule``;
- ``coupon``: one wallet per unit, holding one coupon.

Prices are per unit of quantity, excluding and including VAT, in the company's currency
(every wallet carries the one code :attr:`sandbox.config.SandboxConfig.currency_code`),
each rounded to 0.01 before anything is multiplied. A wallet carries the price of
everything it holds (:meth:`CatalogItem.wallet_price`, as CMTicketIssuer
``AccumulatePriceOnWallet`` and CMCouponIssuer price the venue's wallets): a ticket's or
coupon's wallet its unit price, a group ticket's one wallet the per-person price times
the quantity, and a package's wallet the prices of its components (tickets and coupons)
added up. A package lists each component's price, and its own unit price must be their
sum, so that the catalog's package price is what its wallet carries.

Packages are the only items that accept ``wallet.componentSchedule`` (its rules are the
venue's request parser's, :mod:`sandbox.requests`).
"""

from __future__ import annotations

import json
import re
from decimal import ROUND_HALF_UP, Decimal
from enum import StrEnum
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.alias_generators import to_camel

_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_TIME = re.compile(r"^\d{2}:\d{2}:\d{2}$")
_CENT = Decimal("0.01")


def round_price(amount: Decimal) -> Decimal:
    """``amount`` rounded to 0.01, halves away from zero, as the venue's ``Round(x, 0.01)``."""
    return amount.quantize(_CENT, rounding=ROUND_HALF_UP)


class CatalogError(ValueError):
    """The catalog file cannot be read or is not a valid catalog; the message says why."""


class ItemKind(StrEnum):
    """How an item turns into wallets."""

    TICKET = "ticket"
    GROUP = "group"
    PACKAGE = "package"
    COUPON = "coupon"


class _CatalogModel(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, frozen=True, extra="forbid"
    )


class Component(_CatalogModel):
    """One asset a package issues: a ticket or a coupon."""

    item_number: str = Field(min_length=1)
    description: str
    type: Literal["ticket", "coupon"]
    unit_price_excl_vat: Decimal = Field(default=Decimal(0), ge=0)
    unit_price_incl_vat: Decimal = Field(default=Decimal(0), ge=0)


class CatalogItem(_CatalogModel):
    """An item the venue sells, with its price and (for packages) its components."""

    item_number: str = Field(min_length=1, max_length=20)
    description: str
    kind: ItemKind
    unit_price_excl_vat: Decimal = Field(ge=0)
    unit_price_incl_vat: Decimal = Field(ge=0)
    components: tuple[Component, ...] = ()
    # Its admission's capacity is exhausted: the venue accepts the order and its ticket
    # import fails at processing (see :meth:`Catalog.sold_out_number`).
    sold_out: bool = False

    @model_validator(mode="after")
    def _components_fit_kind(self) -> CatalogItem:
        tickets = [c for c in self.components if c.type == "ticket"]
        if self.kind is ItemKind.PACKAGE and not tickets:
            raise ValueError(f"package {self.item_number} needs at least one ticket component")
        if self.kind is not ItemKind.PACKAGE and self.components:
            raise ValueError(f"only packages have components ({self.item_number})")
        if self.unit_price_excl_vat > self.unit_price_incl_vat:
            raise ValueError(f"{self.item_number}: price excl. VAT exceeds price incl. VAT")
        if self.kind is ItemKind.PACKAGE:
            excl, incl = self.wallet_price(1)
            if (excl, incl) != (
                round_price(self.unit_price_excl_vat),
                round_price(self.unit_price_incl_vat),
            ):
                raise ValueError(
                    f"package {self.item_number}: its unit price must be its components'"
                    f" prices added up ({excl} excl., {incl} incl. VAT)"
                )
        return self

    @property
    def is_package(self) -> bool:
        """Whether the item expands into component assets."""
        return self.kind is ItemKind.PACKAGE

    def wallet_count(self, quantity: int) -> int:
        """How many wallets a line of ``quantity`` units issues."""
        return 1 if self.kind is ItemKind.GROUP else quantity

    def wallet_price(self, quantity: int, *, tickets: bool = True) -> tuple[Decimal, Decimal]:
        """What one wallet of a line of ``quantity`` carries, excluding and including VAT.

        CMTicketIssuer ``BuildTicketImportLines`` / ``AccumulatePriceOnWallet`` and
        CMCouponIssuer ``IssueAndAttachForAddOnLine``: unit prices are rounded to 0.01
        first; a group ticket's one wallet carries the unit price times the quantity, a
        package's wallet its components' prices added up, any other wallet its unit price.

        Args:
            quantity: the line's quantity.
            tickets: whether the tickets are priced; they are not when the ticket import
                was an earlier run's (CMOrderIssuer IssueForOrder skips it when the order
                has a job id), and then a wallet carries only its coupons' prices.
        """
        if self.kind is ItemKind.PACKAGE:
            priced = [c for c in self.components if tickets or c.type == "coupon"]
            excl = sum((round_price(c.unit_price_excl_vat) for c in priced), Decimal(0))
            incl = sum((round_price(c.unit_price_incl_vat) for c in priced), Decimal(0))
            return excl, incl
        if not tickets and self.kind is not ItemKind.COUPON:
            return Decimal(0), Decimal(0)
        excl, incl = round_price(self.unit_price_excl_vat), round_price(self.unit_price_incl_vat)
        if self.kind is ItemKind.GROUP:
            return excl * quantity, incl * quantity
        return excl, incl

    def asset_templates(self) -> tuple[Component, ...]:
        """The assets one wallet of this item holds: its components, or the item itself."""
        if self.components:
            return self.components
        asset_type: Literal["ticket", "coupon"] = (
            "coupon" if self.kind is ItemKind.COUPON else "ticket"
        )
        return (
            Component(item_number=self.item_number, description=self.description, type=asset_type),
        )


class Catalog(_CatalogModel):
    """Every item the venue sells, looked up by item number (case-insensitively)."""

    items: tuple[CatalogItem, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _numbers_unique(self) -> Catalog:
        numbers = [item.item_number.upper() for item in self.items]
        duplicates = sorted({n for n in numbers if numbers.count(n) > 1})
        if duplicates:
            raise ValueError(f"item numbers must be unique: {', '.join(duplicates)}")
        return self

    def get(self, item_number: str) -> CatalogItem | None:
        """The item numbered ``item_number``, or ``None`` when the venue does not sell it."""
        wanted = item_number.strip().upper()
        return next((i for i in self.items if i.item_number.upper() == wanted), None)

    def sold_out_number(self, item: CatalogItem, extra: tuple[str, ...] = ()) -> str | None:
        """The first item number ``item`` issues tickets for that is sold out, or ``None``.

        A line issues tickets for its item, or for a package's ticket components
        (CMTicketIssuer BuildTicketImportLines); an item is sold out when the catalog says
        so or ``extra`` (the ``soldOut`` fault) names it, in any case.

        Args:
            item: the line's item.
            extra: further sold-out item numbers.
        """
        wanted = {number.strip().upper() for number in extra}
        numbers = [c.item_number for c in item.components if c.type == "ticket"] or [
            item.item_number
        ]
        for number in numbers:
            listed = self.get(number)
            if number.upper() in wanted or (listed is not None and listed.sold_out):
                return number
        return None

    def to_json(self) -> dict[str, Any]:
        """The catalog as JSON (camelCase, prices as strings), as ``/_sandbox/config`` shows it."""
        return self.model_dump(mode="json", by_alias=True)


def load_catalog(path: Path | None = None) -> Catalog:
    """Read a catalog file; without a path, the default catalog shipped with the sandbox.

    Raises:
        CatalogError: the file cannot be read, is not JSON, or is not a valid catalog.
    """
    try:
        if path is None:
            text = resources.files("sandbox").joinpath("catalog.json").read_text("utf-8")
        else:
            text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CatalogError(f"cannot read catalog {path}: {exc.strerror}") from exc
    try:
        return Catalog.model_validate(json.loads(text))
    except json.JSONDecodeError as exc:
        raise CatalogError(f"catalog {path or 'catalog.json'} is not JSON: {exc}") from exc
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'catalog'}: {e['msg']}" for e in exc.errors()
        )
        raise CatalogError(f"catalog {path or 'catalog.json'} is invalid: {problems}") from exc
