"""The catalog file: the shipped default, and clear errors for broken ones."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import pytest

from sandbox.catalog import CatalogError, load_catalog


def test_default_catalog_has_every_kind() -> None:
    """The shipped catalog covers tickets, a group, packages (one with a coupon), coupons."""
    catalog = load_catalog()
    assert {item.kind for item in catalog.items} == {"ticket", "group", "package", "coupon"}
    package = catalog.get("40100")
    assert package is not None and package.is_package
    assert {c.type for c in package.components} == {"ticket", "coupon"}
    group = catalog.get("31050")
    assert group is not None and group.wallet_count(8) == 1


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("not json", "is not JSON"),
        (json.dumps({"items": []}), "is invalid"),
        (
            json.dumps(
                {
                    "items": [
                        {
                            "itemNumber": "P1",
                            "description": "Empty package",
                            "kind": "package",
                            "unitPriceExclVat": "1",
                            "unitPriceInclVat": "1",
                        }
                    ]
                }
            ),
            "needs at least one ticket component",
        ),
        (
            json.dumps(
                {
                    "items": [
                        {
                            "itemNumber": "P1",
                            "description": "Package",
                            "kind": "package",
                            "unitPriceExclVat": "10.00",
                            "unitPriceInclVat": "12.50",
                            "components": [
                                {
                                    "itemNumber": "T1",
                                    "description": "Ticket",
                                    "type": "ticket",
                                    "unitPriceExclVat": "8.00",
                                    "unitPriceInclVat": "10.00",
                                }
                            ],
                        }
                    ]
                }
            ),
            r"its components' prices added up \(8.00 excl., 10.00 incl. VAT\)",
        ),
    ],
    ids=["not-json", "no-items", "package-without-tickets", "package-price-not-its-sum"],
)
def test_broken_catalogs_are_refused_with_the_reason(
    tmp_path: Path, content: str, problem: str
) -> None:
    """A catalog that is not valid raises CatalogError saying why."""
    path = tmp_path / "catalog.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(CatalogError, match=problem):
        load_catalog(path)


def test_wallet_prices_follow_the_venues_issuers() -> None:
    """CMTicketIssuer CalculateDynamicTicketPrice / AccumulatePriceOnWallet: unit prices
    are rounded to 0.01 before a group's one wallet multiplies them by the quantity; a
    single ticket's wallet carries one unit price whatever the quantity; a package's
    wallet carries its components' (and coupons', CMCouponIssuer) prices added up."""
    catalog = load_catalog()
    group = catalog.get("31050")
    assert group is not None
    odd = group.model_copy(update={"unit_price_excl_vat": Decimal("10.005")})
    assert odd.wallet_price(3)[0] == Decimal("30.03")  # 10.01 x 3, not 30.015 rounded
    single, package = catalog.get("31001"), catalog.get("40100")
    assert single is not None and single.wallet_price(5) == (Decimal("80.00"), Decimal("100.00"))
    assert package is not None and package.wallet_price(2) == (
        Decimal("128.00"),  # 64.00 + 56.00 + 8.00 (the coupon)
        Decimal("160.00"),
    )
