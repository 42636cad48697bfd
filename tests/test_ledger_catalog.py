"""The event catalog, money rules and state machines, checked without a database."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from ledger import errors
from ledger.events import EVENT_TYPES, AccountOpened, PaymentInitiated, parse_event
from ledger.money import AMOUNT_MINOR_MAX, currency_exponent, format_amount
from ledger.state_machine import (
    NEW,
    PAYMENT_STATUS_BY_STATE,
    PAYMENT_TRANSITIONS,
    TERMINAL_STATES,
    replay,
)

PAYMENT = {
    "payment_id": "p1",
    "payer_account_id": "a",
    "payee_account_id": "b",
    "amount_minor": 12500,
    "currency": "EUR",
}


def test_currency_exponents_come_from_iso_4217() -> None:
    assert (currency_exponent("EUR"), currency_exponent("JPY"), currency_exponent("KWD")) == (
        2,
        0,
        3,
    )
    with pytest.raises(ValueError, match="not an ISO 4217"):
        currency_exponent("ZZZ")
    with pytest.raises(ValueError, match="no minor unit"):
        currency_exponent("XAU")


def test_amounts_format_from_integers() -> None:
    assert format_amount(12500, "EUR") == "125.00 EUR"
    assert format_amount(5, "EUR") == "0.05 EUR"
    assert format_amount(500, "JPY") == "500 JPY"
    assert format_amount(1234567, "KWD") == "1234.567 KWD"
    assert format_amount(AMOUNT_MINOR_MAX, "EUR") == "92233720368547758.07 EUR"


@pytest.mark.parametrize("amount", ["12500", 125.0, True, 0, -1, 2**63, 1.5])
def test_amounts_are_strict_positive_int64_integers(amount: Any) -> None:
    with pytest.raises(ValidationError):
        PaymentInitiated(**{**PAYMENT, "amount_minor": amount})


def test_the_largest_amount_is_accepted() -> None:
    assert PaymentInitiated(**{**PAYMENT, "amount_minor": 2**63 - 1}).amount_minor == 2**63 - 1


@pytest.mark.parametrize("currency", ["eur", "EURO", "ZZZ", "XAU", ""])
def test_currencies_are_iso_4217_codes_with_a_minor_unit(currency: str) -> None:
    with pytest.raises(ValidationError):
        PaymentInitiated(**{**PAYMENT, "currency": currency})


def test_payer_and_payee_must_differ() -> None:
    with pytest.raises(ValidationError, match="must differ"):
        PaymentInitiated(**{**PAYMENT, "payee_account_id": "a"})


def test_metadata_is_json_without_floats() -> None:
    assert PaymentInitiated(**PAYMENT, metadata={"order": {"id": 7, "tags": ["x"]}}).metadata
    with pytest.raises(ValidationError, match="floating-point"):
        PaymentInitiated(**PAYMENT, metadata={"rate": {"value": 1.5}})


def test_only_external_accounts_may_be_unlimited() -> None:
    assert AccountOpened(
        account_id="w", currency="EUR", kind="external", overdraft_limit_minor=None
    )
    with pytest.raises(ValidationError, match="only an external"):
        AccountOpened(account_id="c", currency="EUR", kind="customer", overdraft_limit_minor=None)


def test_every_event_type_parses_back_from_its_payload() -> None:
    event = PaymentInitiated(**PAYMENT)
    assert parse_event("PaymentInitiated", 1, event.payload()) == event
    with pytest.raises(ValueError, match="no reader"):
        parse_event("PaymentInitiated", 99, event.payload())
    with pytest.raises(ValueError, match="unknown event type"):
        parse_event("PaymentTeleported", 1, {})
    assert all(name == cls.event_type for name, cls in EVENT_TYPES.items())


def _paths(state: str = NEW, seen: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    outgoing = [(event, to) for (frm, event), to in PAYMENT_TRANSITIONS.items() if frm == state]
    if not outgoing:
        return [seen]
    return [path for event, to in outgoing for path in _paths(to, (*seen, event))]


def test_no_path_through_the_payment_machine_repeats_an_event_type() -> None:
    paths = _paths()
    assert len(paths) > 10
    for path in paths:
        assert len(path) == len(set(path)), path


def test_every_path_ends_in_exactly_one_terminal_state() -> None:
    for path in _paths():
        assert replay("payment-x", path) in TERMINAL_STATES
    assert not [s for (s, _) in PAYMENT_TRANSITIONS if s in TERMINAL_STATES]


def test_failure_paths_compensate_in_reverse_before_their_terminal_event() -> None:
    for path in _paths():
        if path[-1] == "PaymentSettled":
            continue
        if "FundsReserved" in path:
            assert path.index("FundsReserved") < path.index("FundsReleased"), path
        if "PaymentAuthorized" in path:
            assert "AuthorizationVoided" in path, path
        if "FundsReleased" in path:
            assert path.index("FundsReleased") < path.index("AuthorizationVoided"), path
        assert path[-1] in {
            "PaymentDeclined",
            "PaymentFailed",
            "PaymentCancelled",
            "PaymentRejected",
        }


def test_a_rejection_closes_only_a_payment_that_waited_for_approval() -> None:
    assert (
        replay(
            "payment-x",
            [
                "PaymentInitiated",
                "PaymentAuthorized",
                "ApprovalRequested",
                "AuthorizationVoided",
                "PaymentRejected",
            ],
        )
        == "rejected"
    )
    with pytest.raises(errors.InvalidTransition):
        replay(
            "payment-x",
            ["PaymentInitiated", "PaymentAuthorized", "AuthorizationVoided", "PaymentRejected"],
        )


def test_every_state_has_an_api_status() -> None:
    states = {to for to in PAYMENT_TRANSITIONS.values()}
    assert states <= PAYMENT_STATUS_BY_STATE.keys()
