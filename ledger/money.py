"""Money: integer amounts in a currency's minor unit, with ISO 4217 data from `iso4217`.

There are no floats anywhere in a money path. Formatting for people (summaries,
statements) goes through `decimal` from the integer, never the other way round.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated

from iso4217 import Currency
from pydantic import AfterValidator, Field, StrictInt

# Amounts are stored in PostgreSQL bigint: the largest is 2^63 - 1.
AMOUNT_MINOR_MAX = 2**63 - 1


def currency_exponent(code: str) -> int:
    """The number of minor-unit digits of an ISO 4217 currency (EUR 2, JPY 0, KWD 3).

    Raises ValueError for an unknown code, or for a code with no minor unit (XAU, XDR),
    which cannot be held as an integer amount.
    """
    try:
        currency = Currency(code)
    except ValueError:
        raise ValueError(f"{code!r} is not an ISO 4217 currency code") from None
    if currency.exponent is None:
        raise ValueError(f"{code} has no minor unit, so it cannot be held as an integer amount")
    return int(currency.exponent)


def _valid_currency(code: str) -> str:
    currency_exponent(code)
    return code


CurrencyCode = Annotated[
    str, Field(pattern=r"^[A-Z]{3}$", examples=["EUR"]), AfterValidator(_valid_currency)
]
# Strict: a JSON string, float or boolean is refused, never coerced.
AmountMinor = Annotated[StrictInt, Field(gt=0, le=AMOUNT_MINOR_MAX, examples=[12500])]
NonNegativeMinor = Annotated[StrictInt, Field(ge=0, le=AMOUNT_MINOR_MAX)]


def format_amount(amount_minor: int, currency: str) -> str:
    """`12500, "EUR"` → `"125.00 EUR"`; `500, "JPY"` → `"500 JPY"`."""
    exponent = currency_exponent(currency)
    value = Decimal(amount_minor).scaleb(-exponent)
    return f"{value:.{exponent}f} {currency}"
