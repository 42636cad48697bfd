"""What the rule pass of reconciliation may match beyond the exact pass, and when an
unmatched settlement counts as missing. Every knob has a bound, named here once."""

from __future__ import annotations

from dataclasses import dataclass

AMOUNT_TOLERANCE_MINOR_MAX = 1_000_000
DATE_WINDOW_DAYS_MAX = 31
SETTLEMENT_WINDOW_S_MAX = 31 * 86_400

AMOUNT_TOLERANCE_MINOR_DEFAULT = 0
DATE_WINDOW_DAYS_DEFAULT = 3
# A settlement not on any statement two days after it was posted is missing.
SETTLEMENT_WINDOW_S_DEFAULT = 2 * 86_400


@dataclass(frozen=True)
class MatchRules:
    """The rule pass and the classification's settings.

    - `amount_tolerance_minor`: a line and a settlement with the same reference and
      currency whose amounts differ by at most this much match (0: never).
    - `date_window_days`: how far apart a line's value date may be from its settlement's
      in the rule pass (a tolerance match; a batched payout, which comes on or after the
      day it sums).
    - `batch_payouts`: one line may match every unmatched settlement of one day and
      currency when it is exactly their sum (a daily payout).
    - `split_lines`: several lines with one reference may match one settlement when they
      are exactly its amount together (a capture paid out in parts).
    - `settlement_window_s`: an unmatched settlement is `missing_in_statement` only once
      it is older than this; a line that arrives within it matches and raises nothing.
    """

    amount_tolerance_minor: int = AMOUNT_TOLERANCE_MINOR_DEFAULT
    date_window_days: int = DATE_WINDOW_DAYS_DEFAULT
    batch_payouts: bool = True
    split_lines: bool = True
    settlement_window_s: int = SETTLEMENT_WINDOW_S_DEFAULT

    def __post_init__(self) -> None:
        bounds = {
            "amount_tolerance_minor": (self.amount_tolerance_minor, AMOUNT_TOLERANCE_MINOR_MAX),
            "date_window_days": (self.date_window_days, DATE_WINDOW_DAYS_MAX),
            "settlement_window_s": (self.settlement_window_s, SETTLEMENT_WINDOW_S_MAX),
        }
        for name, (value, value_max) in bounds.items():
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= value_max:
                raise ValueError(f"{name} must be an integer from 0 to {value_max}, not {value!r}")
