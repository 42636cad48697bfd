"""Risk alerts: the risk consumer flags payers as the log grows, and says so in the ledger.

A scripted scenario trips each rule exactly once; normal traffic trips none; a batch
applied again after a crash appends nothing new; operators list the alerts at
`GET /v1/risk/alerts`, which says how fresh the list is.
"""

from __future__ import annotations

import base64
import uuid
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from ledger import errors
from ledger.events import PaymentDeclined, RiskAlertRaised, risk_stream
from ledger.projections import LIVE_SCHEMA, READ_MODELS, Projection
from ledger.projector import apply_batch
from ledger.risk_consumer import (
    Alert,
    PayerMemory,
    RiskThresholds,
    alert_event_id,
    append_alert,
    on_initiated,
    risk_consumer,
)
from ledger.store import EventStore, NewEvent, RecordedEvent
from tests.harness.api import Api
from tests.harness.ledger import Payment, fund, open_account
from tests.harness.postgres import IsolatedDatabase
from tests.harness.read_side import connect_app, project

# Small enough for a scenario to trip, the same for the normal traffic that must not.
THRESHOLDS = RiskThresholds(
    velocity_window_s=60,
    velocity_count_max=8,
    amount_stddevs=3,
    amount_history_min=4,
    declines_in_row_max=3,
)
# Varied amounts whose every payment stays within 3 standard deviations of the payer's
# earlier ones (the largest is 2.83, for the rotation starting at 1000).
NORMAL_AMOUNTS = [1_200, 800, 1_000, 1_100, 900, 1_050, 950]


@dataclass(frozen=True)
class Trip:
    """Where a rule should fire: the payer, the payment and the event that trips it."""

    account_id: str
    rule: str
    payment_id: str
    trigger_seq: int


async def pay(store: EventStore, payer: str, amount_minor: int) -> tuple[Payment, int]:
    """A settled payment to bob; the global_seq of its PaymentInitiated."""
    payment = Payment(store, payer, "bob", amount_minor)
    results = await payment.settle_fully()
    return payment, results[0].event.global_seq


async def decline(store: EventStore, payer: str, amount_minor: int = 1_000) -> tuple[Payment, int]:
    """A payment declined by the processor; the global_seq of its PaymentDeclined."""
    payment = Payment(store, payer, "bob", amount_minor)
    await payment.run("initiated")
    declined = await store.append(
        payment.new(
            "decline",
            PaymentDeclined(
                payment_id=payment.payment_id,
                declined_by="processor",
                reason="card declined",
                rule=None,
            ),
        )
    )
    return payment, declined.event.global_seq


async def scripted_scenario(store: EventStore) -> list[Trip]:
    """carol bursts, dave pays far above his habit, erin is declined again and again.

    Each rule fires once: carol's burst goes on past the crossing, dave pays normally
    again after his outlier, and erin's streak is reset once by a settled payment and
    runs on past the threshold.
    """
    for payer in ("carol", "dave", "erin"):
        await open_account(store, payer)
        await fund(store, payer, 100_000)

    carol_amounts = (1_000, 1_100, 900, 1_050, 950, 1_000, 1_020, 980, 1_010, 990)
    carol = [await pay(store, "carol", amount) for amount in carol_amounts]
    crossing, crossing_seq = carol[THRESHOLDS.velocity_count_max]

    for amount in (2_000, 2_400, 1_800, 2_200):
        await pay(store, "dave", amount)
    outlier, outlier_seq = await pay(store, "dave", 50_000)
    await pay(store, "dave", 2_100)

    await decline(store, "erin")
    await decline(store, "erin")
    await pay(store, "erin", 1_000)  # the streak ends
    await decline(store, "erin")
    await decline(store, "erin")
    third, third_seq = await decline(store, "erin")
    await decline(store, "erin")

    return [
        Trip("carol", "velocity", crossing.payment_id, crossing_seq),
        Trip("dave", "amount_outlier", outlier.payment_id, outlier_seq),
        Trip("erin", "decline_streak", third.payment_id, third_seq),
    ]


async def run_consumer(store: EventStore, database: IsolatedDatabase) -> None:
    """The consumer and the alerts read model, twice: alerts the first pass appends lie
    beyond its horizon, and the second pass lists them."""
    models = [risk_consumer(store, THRESHOLDS), READ_MODELS["risk_alerts"]]
    await project(store, database, models)
    await project(store, database, models)


async def raised(store: EventStore) -> list[RecordedEvent]:
    """Every RiskAlertRaised in the log, in order."""
    events = []
    after = 0
    while batch := await store.read_range(after_seq=after, limit=1_000):
        events += [e for e in batch if e.event_type == "RiskAlertRaised"]
        after = batch[-1].global_seq
    return events


def as_trips(events: list[RecordedEvent]) -> list[Trip]:
    return [
        Trip(
            e.payload["account_id"],
            e.payload["rule"],
            e.payload["payment_id"],
            e.payload["trigger_seq"],
        )
        for e in events
    ]


async def risk_payers(engine: AsyncEngine) -> list[tuple[object, ...]]:
    async with engine.connect() as conn:
        rows = (
            await conn.execute(text("SELECT * FROM projection.risk_payers ORDER BY account_id"))
        ).all()
    return [tuple(row) for row in rows]


async def checkpoint(engine: AsyncEngine, name: str) -> int:
    async with engine.connect() as conn:
        seq = (
            await conn.execute(
                text("SELECT last_seq FROM projection.checkpoints WHERE projection = :name"),
                {"name": name},
            )
        ).scalar_one()
    return int(seq)


class Crash(Exception):
    """A projector dying in the middle of a batch."""


async def apply_and_crash(consumer: Projection, database: IsolatedDatabase, *, upto: int) -> None:
    """Apply the consumer to (0, upto] in a transaction that then dies: the alerts it
    appended are in the ledger, its memory and checkpoint are not."""
    conn = await connect_app(database)
    try:
        async with conn.transaction():
            await consumer.apply(conn, LIVE_SCHEMA, 0, upto)
            raise Crash
    except Crash:
        pass
    finally:
        await conn.close()


async def forget(owner_engine: AsyncEngine) -> None:
    """Reset the consumer to the start of the log, as its owner would to rebuild it."""
    async with owner_engine.begin() as conn:
        await conn.execute(text("DELETE FROM projection.risk_payers"))
        await conn.execute(
            text("UPDATE projection.checkpoints SET last_seq = 0 WHERE projection = :name"),
            {"name": "risk_consumer"},
        )


# --- the rules ----------------------------------------------------------------------------
async def test_a_scripted_scenario_trips_each_rule_once_naming_payer_and_payment(
    bank: EventStore, database: IsolatedDatabase
) -> None:
    trips = await scripted_scenario(bank)
    await run_consumer(bank, database)

    events = await raised(bank)
    assert sorted(as_trips(events), key=lambda t: t.trigger_seq) == trips
    for event in events:
        payer, rule = event.payload["account_id"], event.payload["rule"]
        assert event.stream_id == risk_stream(payer)
        assert event.event_id == alert_event_id(payer, rule, event.payload["trigger_seq"])
    reasons = {e.payload["rule"]: e.payload["reason"] for e in events}
    assert reasons["velocity"] == "payer carol started 9 payments within 60 s (at most 8)"
    assert reasons["amount_outlier"].startswith(
        "amount 50000 is more than 3 standard deviations above the mean of payer dave's 4 "
        "earlier payments (mean 2100, standard deviation "
    )
    assert reasons["decline_streak"] == "payer erin had 3 payments declined in a row (alert at 3)"

    # The memory of each payer is a fold of its payments; funding accounts have none.
    payers = {row[0]: row for row in await risk_payers(bank.engine)}
    assert set(payers) == {"carol", "dave", "erin"}
    assert payers["dave"][1:4] == (
        6,
        2_000 + 2_400 + 1_800 + 2_200 + 50_000 + 2_100,
        (2_000**2 + 2_400**2 + 1_800**2 + 2_200**2 + 50_000**2 + 2_100**2),
    )


async def test_normal_traffic_raises_no_alert(bank: EventStore, database: IsolatedDatabase) -> None:
    payers = [f"payer-{n}" for n in range(6)]
    for n, payer in enumerate(payers):
        await open_account(bank, payer)
        await fund(bank, payer, 200_000)
        # Each payer its own scale and order of amounts, a few payments each.
        amounts = NORMAL_AMOUNTS[n:] + NORMAL_AMOUNTS[:n]
        for i, amount in enumerate(amounts):
            await pay(bank, payer, amount * (n + 1))
            if i == 3 and n % 2 == 0:
                await decline(bank, payer)  # the odd decline, never several in a row
    for amount in (5_000, 12_000, 700):
        await pay(bank, "alice", amount)

    await run_consumer(bank, database)

    assert await raised(bank) == []
    rows = {row[0]: row for row in await risk_payers(bank.engine)}
    assert set(rows) == {*payers, "alice"}
    assert rows["payer-0"][1:3] == (len(NORMAL_AMOUNTS) + 1, sum(NORMAL_AMOUNTS) + 1_000)
    assert await checkpoint(bank.engine, "risk_alerts") == await checkpoint(
        bank.engine, "risk_consumer"
    )


def test_the_velocity_window_slides_with_the_recorded_times_and_a_burst_alerts_once() -> None:
    """Recorded times are the ledger's, so the window is checked here on a made-up log."""
    memory = PayerMemory("carol")
    start = datetime(2026, 1, 1, tzinfo=UTC)

    def initiated(seq: int, at: datetime) -> list[str]:
        alerts = on_initiated(
            memory,
            THRESHOLDS,
            seq=seq,
            event_id=uuid.uuid4(),
            payment_id=f"p-{seq}",
            amount_minor=1_000,
            recorded_at=at,
        )
        return [a.rule for a in alerts]

    # One payment every 10 s: at most 6 in any 60 s, however long it goes on.
    steady = [initiated(seq, start + timedelta(seconds=10 * seq)) for seq in range(1, 31)]
    assert steady == [[]] * 30
    # Then one every second: the 9th within 60 s crosses (6 steady ones are within it),
    # the rest of the burst raises nothing more.
    burst_start = start + timedelta(seconds=305)
    burst = [initiated(100 + i, burst_start + timedelta(seconds=i)) for i in range(20)]
    assert [i for i, rules in enumerate(burst) if rules] == [2]
    # Exactly 60 s after the previous payment: outside the window, the burst is over.
    calm = burst_start + timedelta(seconds=19 + 60)
    assert initiated(200, calm) == []
    assert memory.velocity_over is False
    again = [initiated(300 + i, calm + timedelta(seconds=1 + i)) for i in range(9)]
    assert [i for i, rules in enumerate(again) if rules] == [7]
    assert len(memory.recent_at) == THRESHOLDS.velocity_count_max


# --- re-running ---------------------------------------------------------------------------
async def test_a_batch_applied_again_after_a_crash_appends_nothing_new(
    bank: EventStore, database: IsolatedDatabase, owner_engine: AsyncEngine
) -> None:
    trips = await scripted_scenario(bank)
    consumer = risk_consumer(bank, THRESHOLDS)
    horizon = await bank.safe_horizon()

    # A batch that appended its alerts, then died before its checkpoint moved.
    await apply_and_crash(consumer, database, upto=horizon.safe_seq)
    first = await raised(bank)
    assert sorted(as_trips(first), key=lambda t: t.trigger_seq) == trips
    assert await checkpoint(bank.engine, "risk_consumer") == 0
    assert await risk_payers(bank.engine) == []

    # The projector applies the same range again: the same alerts, none twice.
    await run_consumer(bank, database)
    assert await raised(bank) == first
    memory = await risk_payers(bank.engine)
    assert {row[0] for row in memory} == {"carol", "dave", "erin"}

    # Rebuilt from scratch by its owner: the same alerts and the same memory.
    await forget(owner_engine)
    await run_consumer(bank, database)
    assert await raised(bank) == first
    assert await risk_payers(bank.engine) == memory


async def test_an_alert_appended_twice_is_stored_once_and_a_different_one_is_refused(
    bank: EventStore, database: IsolatedDatabase
) -> None:
    """A retried append (after a lost connection, say) finds its alert already there."""
    payment, seq = await decline(bank, "alice")
    alert = Alert(
        "alice", "decline_streak", payment.payment_id, seq, uuid.uuid4(), "payer alice had ..."
    )
    conn = await connect_app(database)
    try:
        assert await append_alert(conn, bank, alert) is True
        assert await append_alert(conn, bank, alert) is False
        with pytest.raises(errors.IdempotencyConflict):
            await append_alert(conn, bank, replace(alert, reason="another reason"))
    finally:
        await conn.close()
    assert [e.event_id for e in await raised(bank)] == [alert.event_id]


async def test_the_ledger_answers_a_retried_alert_with_the_stored_event(
    bank: EventStore,
) -> None:
    """A risk stream takes RiskAlertRaised again and again, so only the event id tells a
    retry (whose first attempt committed) from a new alert."""
    payment, seq = await decline(bank, "alice")
    alert = RiskAlertRaised(
        account_id="alice",
        rule="decline_streak",
        payment_id=payment.payment_id,
        trigger_seq=seq,
        reason="payer alice: 3 declines in a row (threshold 3)",
    )
    new = NewEvent(stream_id=risk_stream("alice"), event=alert, event_id=uuid.uuid4(), actor="t")
    first = await bank.append(new)
    again = await bank.append(new)
    assert first.appended and not again.appended
    assert again.event.global_seq == first.event.global_seq
    changed = replace(new, event=alert.model_copy(update={"reason": "another reason"}))
    with pytest.raises(errors.IdempotencyConflict):
        await bank.append(changed)
    elsewhere = replace(
        new, stream_id=risk_stream("bob"), event=alert.model_copy(update={"account_id": "bob"})
    )
    with pytest.raises(errors.IdempotencyConflict):
        await bank.append(elsewhere)
    assert len(await bank.read_stream(risk_stream("alice"))) == 1


async def test_one_batch_at_a_time_sees_the_same_alerts_as_one_pass(
    bank: EventStore, database: IsolatedDatabase
) -> None:
    """Small batches split bursts and streaks across batches: the memory carries them."""
    trips = await scripted_scenario(bank)
    consumer = risk_consumer(bank, THRESHOLDS)
    horizon = await bank.safe_horizon()
    conn = await connect_app(database)
    try:
        while (
            batch := await apply_batch(conn, consumer, until=horizon.safe_seq, events_max=3)
        ) is not None and batch.upto < horizon.safe_seq:
            pass
    finally:
        await conn.close()
    assert sorted(as_trips(await raised(bank)), key=lambda t: t.trigger_seq) == trips


# --- the API ------------------------------------------------------------------------------
async def test_operators_list_the_alerts_newest_first_with_their_freshness(
    api: Api, bank: EventStore, database: IsolatedDatabase
) -> None:
    trips = await scripted_scenario(bank)
    await run_consumer(bank, database)
    as_of_seq = await checkpoint(bank.engine, "risk_alerts")

    response = await api.get("/v1/risk/alerts", caller="ops")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["as_of_seq"] == as_of_seq
    assert body["next_cursor"] is None
    listed = [
        Trip(a["account_id"], a["rule"], a["payment_id"], a["trigger_seq"]) for a in body["alerts"]
    ]
    assert listed == sorted(trips, key=lambda t: t.trigger_seq, reverse=True)
    assert all(a["global_seq"] <= as_of_seq for a in body["alerts"])
    assert body["alerts"][0]["reason"].startswith("payer erin had 3 payments declined")

    only_erin = await api.get("/v1/risk/alerts", caller="ops", params={"account_id": "erin"})
    assert [a["rule"] for a in only_erin.json()["alerts"]] == ["decline_streak"]
    velocity = await api.get("/v1/risk/alerts", caller="ops", params={"rule": "velocity"})
    assert [a["account_id"] for a in velocity.json()["alerts"]] == ["carol"]
    nobody = await api.get(
        "/v1/risk/alerts", caller="ops", params={"account_id": "carol", "rule": "decline_streak"}
    )
    assert nobody.json() == {"alerts": [], "next_cursor": None, "as_of_seq": as_of_seq}

    first = (await api.get("/v1/risk/alerts", caller="ops", params={"limit": 2})).json()
    assert [a["account_id"] for a in first["alerts"]] == ["erin", "dave"]
    rest = (
        await api.get(
            "/v1/risk/alerts", caller="ops", params={"limit": 2, "cursor": first["next_cursor"]}
        )
    ).json()
    assert [a["account_id"] for a in rest["alerts"]] == ["carol"]
    assert rest["next_cursor"] is None


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"rule": "payment_limit"}, "rule"),
        ({"limit": "0"}, "limit"),
        ({"limit": "201"}, "limit"),
        ({"limit": "many"}, "limit"),
        ({"account_id": "no spaces"}, "account_id"),
    ],
)
async def test_a_bad_filter_or_limit_is_a_422_problem(
    api: Api, params: dict[str, str], field: str
) -> None:
    response = await api.get("/v1/risk/alerts", caller="ops", params=params)
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert [e["field"] for e in response.json()["errors"]] == [field]


@pytest.mark.parametrize(
    "cursor",
    [
        "not-a-cursor",
        base64.urlsafe_b64encode(b"r:0").decode().rstrip("="),
        base64.urlsafe_b64encode(b"5").decode().rstrip("="),  # a payments cursor
    ],
)
async def test_a_cursor_the_api_did_not_give_out_is_a_400_problem(api: Api, cursor: str) -> None:
    response = await api.get("/v1/risk/alerts", caller="ops", params={"cursor": cursor})
    assert response.status_code == 400, response.text
    assert response.json()["code"] == "invalid_cursor"


@pytest.mark.parametrize("caller", ["client", "reader"])
async def test_listing_alerts_needs_the_ops_scope(api: Api, caller: str) -> None:
    response = await api.get("/v1/risk/alerts", caller=caller)
    assert response.status_code == 403
    assert response.json()["code"] == "insufficient_scope"
