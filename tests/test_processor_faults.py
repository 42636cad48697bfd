"""The processor simulator's outages: a window in which every call errors, or hangs.

The chaos run (`paysaga chaos run`) and operators (`paysaga processor fault`) open
them as the schema owner; the services may only read them.
"""

from __future__ import annotations

import json
import time

import pytest
from sqlalchemy import text
from sqlalchemy.exc import ProgrammingError
from sqlalchemy.ext.asyncio import AsyncEngine

from activities.processor import (
    ProcessorUnavailable,
    SimulatedProcessor,
    close_fault_windows,
    open_fault_window,
)
from ledger.store import EventStore
from tests.harness.postgres import IsolatedDatabase
from tests.harness.stack import clean_env, paysaga
from workflows.models import AuthorizationRequest, CaptureRequest, FenceRequest, VoidRequest


def _authorization(payment_id: str) -> AuthorizationRequest:
    return AuthorizationRequest(
        payment_id=payment_id, amount_minor=1_000, currency="EUR", payer_account_id="alice"
    )


async def _calls(engine: AsyncEngine, payment_id: str) -> list[tuple[str, str]]:
    async with engine.connect() as conn:
        rows = await conn.execute(
            text(
                "SELECT operation, outcome FROM processor_calls WHERE payment_id = :p "
                "ORDER BY call_id"
            ),
            {"p": payment_id},
        )
        return [(row.operation, row.outcome) for row in rows]


async def test_during_an_error_window_every_call_fails_retryably_and_is_logged(
    store: EventStore, owner_engine: AsyncEngine
) -> None:
    processor = SimulatedProcessor(store.engine)
    await open_fault_window(owner_engine, "error", 60, reason="test")
    calls = [
        processor.authorize(_authorization("p-1"), 1),
        processor.capture(CaptureRequest(payment_id="p-1", amount_minor=1_000, currency="EUR"), 1),
        processor.fence_capture(FenceRequest(payment_id="p-1", reason="test"), 1),
        processor.void(VoidRequest(payment_id="p-1", reason="test"), 1),
        processor.capture_of("p-1"),
    ]
    for call in calls:
        with pytest.raises(ProcessorUnavailable, match="outage window"):
            await call
    assert await _calls(store.engine, "p-1") == [
        ("authorize", "fault_error"),
        ("capture", "fault_error"),
        ("fence_capture", "fault_error"),
        ("void", "fault_error"),
    ]
    # Nothing happened at the processor meanwhile.
    async with owner_engine.connect() as conn:
        authorizations = await conn.execute(
            text("SELECT count(*) FROM processor_authorizations WHERE payment_id = 'p-1'")
        )
        assert authorizations.scalar_one() == 0

    (ended,) = await close_fault_windows(owner_engine)
    assert ended.mode == "error"
    assert (await processor.authorize(_authorization("p-1"), 2)).approved


async def test_a_hang_answers_nothing_until_its_window_ends_then_the_call_goes_on(
    store: EventStore, owner_engine: AsyncEngine
) -> None:
    processor = SimulatedProcessor(store.engine)
    window = await open_fault_window(owner_engine, "hang", 1.5)
    started = time.monotonic()
    result = await processor.authorize(_authorization("p-2"), 1)
    waited_s = time.monotonic() - started
    assert result.approved
    assert waited_s >= 1.0, waited_s
    assert waited_s <= (window.ends_at - window.starts_at).total_seconds() + 2.0
    assert await _calls(store.engine, "p-2") == [
        ("authorize", "fault_hang"),
        ("authorize", "authorized"),
    ]


async def test_the_services_may_read_the_windows_but_never_open_or_end_one(
    app_engine: AsyncEngine, owner_engine: AsyncEngine
) -> None:
    await open_fault_window(owner_engine, "error", 0.5)
    with pytest.raises(ProgrammingError, match="permission denied"):
        await open_fault_window(app_engine, "error", 60)
    for statement in (
        "UPDATE processor_faults SET ends_at = clock_timestamp() + interval '1 hour'",
        "DELETE FROM processor_faults",
    ):
        with pytest.raises(ProgrammingError, match="permission denied"):
            async with app_engine.begin() as conn:
                await conn.execute(text(statement))
    async with app_engine.connect() as conn:
        assert (await conn.execute(text("SELECT count(*) FROM processor_faults"))).scalar() == 1


async def test_a_window_is_bounded(owner_engine: AsyncEngine) -> None:
    for duration_s in (0, -1, 3_601):
        with pytest.raises(ValueError, match="window lasts"):
            await open_fault_window(owner_engine, "hang", duration_s)


def test_paysaga_processor_fault_opens_and_clears_a_window(database: IsolatedDatabase) -> None:
    env = clean_env(DATABASE_URL=database.urls.owner_url)
    opened = paysaga("processor", "fault", "--mode", "hang", "--for-s", "30", env=env)
    assert opened.returncode == 0, opened.stderr
    window = json.loads(opened.stdout)
    assert window["mode"] == "hang"
    cleared = paysaga("processor", "fault", "--clear", env=env)
    assert cleared.returncode == 0, cleared.stderr
    assert json.loads(cleared.stdout)["fault_id"] == window["fault_id"]
    refused = paysaga("processor", "fault", "--mode", "slow", env=env)
    assert refused.returncode == 2
