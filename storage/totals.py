"""An order's totals, derived from its items and wallets.

:func:`order_totals` is the one computation, used by the session hook that keeps a
mirrored order's totals (:mod:`storage.flush`) and by the migrations that fill them for
orders already stored (:mod:`storage.refill`). It reads figures through small protocols
(:class:`ItemFigures`, :class:`WalletFigures`), so plain rows serve as well as mapped ones.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from decimal import Decimal
from typing import Protocol

from venue.values import reference_set_key


class WalletFigures(Protocol):
    """What the totals read of a wallet: a :class:`storage.models.Wallet`, or any such row."""

    @property
    def unit_price_incl_vat(self) -> Decimal | None: ...
    @property
    def unit_price_excl_vat(self) -> Decimal | None: ...
    @property
    def currency_code(self) -> str | None: ...
    @property
    def external_reference_number(self) -> str | None: ...


class ItemFigures(Protocol):
    """What the totals read of an item: a :class:`storage.models.OrderItem`, or any such row."""

    @property
    def quantity(self) -> int: ...
    @property
    def wallets(self) -> Sequence[WalletFigures]: ...


@dataclasses.dataclass(frozen=True)
class OrderTotals:
    """What an order's items and wallets come to; the columns of the same names keep it.

    Attributes:
        items_quantity: the items' quantities added up (``None`` without items).
        amount_incl_vat: what the items come to with VAT (see :func:`order_totals`).
        amount_excl_vat: the same without VAT.
        wallet_currencies: the wallets' currency codes, upper-cased, each once, sorted,
            joined by "/" (``"EUR"``, ``"EUR/GBP"``).
        wallet_external_references: the wallets' external reference numbers as one
            :func:`~venue.values.reference_set_key`.
    """

    items_quantity: int | None
    amount_incl_vat: Decimal | None
    amount_excl_vat: Decimal | None
    wallet_currencies: str | None
    wallet_external_references: str | None


def order_totals(items: Sequence[ItemFigures]) -> OrderTotals:
    """The totals of an order with these items.

    The amounts are what the wallets carry, added up: the venue prices each wallet with
    everything it holds (CMTicketIssuer ``AccumulatePriceOnWallet``, CMCouponIssuer), so a
    single ticket's wallet carries its unit price, a group ticket's one wallet the
    per-person price times the quantity, and a package's wallet its components and
    coupons together. Only priced wallets add up; an amount is ``None`` when no wallet
    has a price on its VAT basis.
    """
    wallets = [wallet for item in items for wallet in item.wallets]
    currencies = {
        wallet.currency_code.strip().upper()
        for wallet in wallets
        if wallet.currency_code and wallet.currency_code.strip()
    }
    return OrderTotals(
        items_quantity=sum(item.quantity for item in items) if items else None,
        amount_incl_vat=_amount(items, lambda wallet: wallet.unit_price_incl_vat),
        amount_excl_vat=_amount(items, lambda wallet: wallet.unit_price_excl_vat),
        wallet_currencies="/".join(sorted(currencies)) or None,
        wallet_external_references=reference_set_key(
            wallet.external_reference_number for wallet in wallets
        ),
    )


def _amount(
    items: Sequence[ItemFigures], price: Callable[[WalletFigures], Decimal | None]
) -> Decimal | None:
    prices = [
        known for item in items for wallet in item.wallets if (known := price(wallet)) is not None
    ]
    return sum(prices, Decimal(0)) if prices else None
