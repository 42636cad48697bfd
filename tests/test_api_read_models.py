"""The read models over HTTP: the statement with running balances, balances now and at
any instant, the payments list, and how far each read model trails the ledger.

Every answer here is checked against the log itself: the brute force below folds the
events table, never a read model.
"""

from __future__ import annotations

import asyncio
import itertools
import random
from collections import defaultdict
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import httpx
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from ledger.projections import READ_MODELS
from ledger.read_models import BALANCE_AS_OF_SQL, ENTRIES_SQL, STATEMENT_CHECKPOINT
from ledger.store import EventStore
from tests.harness.api import Api
from tests.harness.ledger import Payment, fund, open_account
from tests.harness.postgres import IsolatedDatabase
from tests.harness.read_side import project

COUNTERS = ("debits_pending", "debits_posted", "credits_pending", "credits_posted")
ONE_US = timedelta(microseconds=1)
CONCURRENT_REQUESTS = 16


# --- the brute force: a fold of the events table ----------------------------------------------
@dataclass(frozen=True)
class Movement:
    global_seq: int
    recorded_at: datetime
    deltas: tuple[int, int, int, int]  # in the order of COUNTERS


async def movements_in_the_log(engine: AsyncEngine) -> dict[str, list[Movement]]:
    """Every account's movements in global_seq order, folded from the events table."""
    async with engine.connect() as conn:
        rows = (
            await conn.execute(
                text(
                    "SELECT global_seq, stream_id, event_type, payload, recorded_at "
                    "FROM events ORDER BY global_seq"
                )
            )
        ).all()
    holds: dict[str, dict[str, Any]] = {}
    movements: dict[str, list[Movement]] = defaultdict(list)
    for row in rows:
        if row.event_type == "PaymentInitiated":
            holds[row.stream_id] = row.payload
        if row.event_type not in ("FundsReserved", "FundsReleased", "PaymentSettled"):
            continue
        hold = holds[row.stream_id]
        sign = 1 if row.event_type == "FundsReserved" else -1
        moved: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
        moved[hold["payer_account_id"]][0] += sign * hold["amount_minor"]
        moved[hold["payee_account_id"]][2] += sign * hold["amount_minor"]
        for posting in row.payload.get("postings", []):
            side = 1 if posting["side"] == "debit" else 3
            moved[posting["account_id"]][side] += posting["amount_minor"]
        for account_id, deltas in moved.items():
            movements[account_id].append(
                Movement(
                    row.global_seq, row.recorded_at, (deltas[0], deltas[1], deltas[2], deltas[3])
                )
            )
    return movements


def balance_at(
    movements: Iterable[Movement], instant: datetime
) -> tuple[dict[str, int], int | None]:
    """The four counters summed over every movement recorded at or before `instant`, and
    the last such movement in time order (None: none)."""
    totals = [0, 0, 0, 0]
    last: tuple[datetime, int] | None = None
    for movement in movements:
        if movement.recorded_at <= instant:
            totals = [t + d for t, d in zip(totals, movement.deltas, strict=True)]
            key = (movement.recorded_at, movement.global_seq)
            last = key if last is None or key > last else last
    return dict(zip(COUNTERS, totals, strict=True)), (last[1] if last else None)


# --- helpers ----------------------------------------------------------------------------------
async def checkpoint(engine: AsyncEngine, name: str) -> int:
    async with engine.connect() as conn:
        return int(
            (
                await conn.execute(
                    text("SELECT last_seq FROM projection.checkpoints WHERE projection = :n"),
                    {"n": name},
                )
            ).scalar_one()
        )


async def head_seq(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(text("SELECT max(global_seq) FROM events"))).scalar_one())


async def bounded_gather(requests: list[Awaitable[httpx.Response]]) -> list[httpx.Response]:
    out: list[httpx.Response] = []
    for start in range(0, len(requests), CONCURRENT_REQUESTS):
        out += await asyncio.gather(*requests[start : start + CONCURRENT_REQUESTS])
    return out


def assert_problem(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["code"] == code


async def some_traffic(store: EventStore) -> None:
    """alice pays bob: settled, settled with a fee, released, left on hold, and a few more."""
    await Payment(store, "alice", "bob", 10_000).settle_fully()
    with_fee = Payment(store, "alice", "bob", 20_000)
    await with_fee.run("initiated", "authorized", "reserved")
    await store.append(with_fee.settled(fee_minor=500))
    await Payment(store, "alice", "bob", 5_000).run(
        "initiated", "authorized", "reserved", "released", "voided", "failed"
    )
    await Payment(store, "alice", "bob", 1_000).run("initiated", "authorized", "reserved")
    for i in range(3):
        await Payment(store, "alice", "bob", 100 + i).settle_fully()


# --- the statement ----------------------------------------------------------------------------
async def test_the_statement_pages_through_every_movement_with_its_running_balance(
    api: Api, bank: EventStore, database: IsolatedDatabase
) -> None:
    await some_traffic(bank)
    await project(bank, database)
    as_of_seq = await checkpoint(bank.engine, STATEMENT_CHECKPOINT)

    entries: list[dict[str, Any]] = []
    pages = 0
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 3, **({"cursor": cursor} if cursor else {})}
        response = await api.get("/v1/accounts/alice/entries", params=params)
        assert response.status_code == 200, response.text
        page = response.json()
        assert page["as_of_seq"] == as_of_seq and page["account_id"] == "alice"
        entries += page["entries"]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
        assert len(page["entries"]) == 3

    # Funding, four payments moving alice twice (hold, then settlement or release), one
    # hold still open, three more: 15 entries, exactly five full pages and no sixth.
    assert (len(entries), pages) == (15, 5)
    in_the_log = (await movements_in_the_log(bank.engine))["alice"]
    assert [(e["global_seq"], tuple(e["movement"][c] for c in COUNTERS)) for e in entries] == [
        (m.global_seq, m.deltas) for m in in_the_log
    ]
    running = dict.fromkeys(COUNTERS, 0)
    for entry in entries:
        running = {c: running[c] + entry["movement"][c] for c in COUNTERS}
        after = entry["balance_after"]
        assert {c: after[c] for c in COUNTERS} == running
        assert after["posted"] == after["credits_posted"] - after["debits_posted"]
        assert after["pending"] == after["credits_pending"] - after["debits_pending"]
    by_payment: dict[str, list[str]] = defaultdict(list)
    for entry in entries:
        by_payment[entry["payment_id"]].append(entry["event_type"])
    held = [e for e in entries if by_payment[e["payment_id"]] == ["FundsReserved"]]
    assert [e["movement"]["debits_pending"] for e in held] == [1_000]

    # The last running balance is the account's position, which the ledger keeps itself.
    position = (await api.get("/v1/accounts/alice")).json()["position"]
    assert entries[-1]["balance_after"] == {
        key: position[key] for key in (*COUNTERS, "posted", "pending")
    }


async def test_the_statement_refuses_a_cursor_it_did_not_give_and_an_unknown_account(
    api: Api, bank: EventStore, database: IsolatedDatabase
) -> None:
    await project(bank, database)
    fees = (await api.get("/v1/accounts/fees/entries")).json()
    assert (fees["entries"], fees["next_cursor"]) == ([], None)
    payments_cursor = "NQ"  # what GET /v1/payments hands out for seq 5
    for bad in ("!!", "bm9wZQ", payments_cursor, "ZTow", "ZTot"):  # "nope", "e:0", "e:-"
        response = await api.get("/v1/accounts/alice/entries", params={"cursor": bad})
        assert_problem(response, 400, "invalid_cursor")
    for limit in (0, 201):
        response = await api.get("/v1/accounts/alice/entries", params={"limit": limit})
        assert_problem(response, 422, "validation_failed")
    for path in ("/v1/accounts/nobody/entries", "/v1/accounts/%20bad/entries"):
        assert_problem(await api.get(path), 404, "account_not_found")
    for path in ("/v1/accounts/nobody/balance", "/v1/accounts/%20bad/balance"):
        assert_problem(await api.get(path), 404, "account_not_found")
    forbidden = await api.get("/v1/accounts/alice/entries", caller="ops")
    assert_problem(forbidden, 403, "insufficient_scope")


# --- balances ---------------------------------------------------------------------------------
async def test_the_balance_read_model_equals_the_ledger_position_once_projected(
    api: Api, bank: EventStore, database: IsolatedDatabase
) -> None:
    await some_traffic(bank)
    await project(bank, database)
    as_of_seq = await checkpoint(bank.engine, "balances")
    assert as_of_seq == await head_seq(bank.engine)
    for account_id in ("alice", "bob", "fees", "world-eur"):
        position = (await api.get(f"/v1/accounts/{account_id}")).json()["position"]
        balance = (await api.get(f"/v1/accounts/{account_id}/balance")).json()
        fields = (*COUNTERS, "posted", "pending", "available")
        assert {f: balance[f] for f in fields} == {f: position[f] for f in fields}, account_id
        assert (balance["as_of"], balance["as_of_seq"]) == (None, as_of_seq)
        assert balance["currency"] == "EUR"
    assert (await api.get("/v1/accounts/world-eur/balance")).json()["available"] is None

    # Until the projector runs again, the read model says how far it has come; the
    # ledger's own read is already there.
    await Payment(bank, "alice", "bob", 2_500).settle_fully()
    await open_account(bank, "late")
    stale = (await api.get("/v1/accounts/alice/balance")).json()
    assert stale["as_of_seq"] == as_of_seq
    assert (
        stale["posted"]
        == (await api.get("/v1/accounts/alice")).json()["position"]["posted"] + 2_500
    )
    late = (await api.get("/v1/accounts/late/balance")).json()
    assert (late["posted"], late["pending"], late["available"], late["last_seq"]) == (0, 0, 0, None)
    assert late["as_of_seq"] == as_of_seq

    await project(bank, database)
    fresh = (await api.get("/v1/accounts/alice/balance")).json()
    assert fresh["posted"] == stale["posted"] - 2_500
    assert fresh["as_of_seq"] == await head_seq(bank.engine)
    assert (await api.get("/v1/accounts/late/balance")).json()["last_seq"] is not None


async def test_a_historical_balance_equals_a_fold_of_the_log_at_every_instant(
    api: Api, bank: EventStore, database: IsolatedDatabase
) -> None:
    """Payers settle into one striped merchant all at once, so its credits commit on
    different stripes concurrently (recorded_at and global_seq may disagree on order);
    then the balance at hundreds of instants must equal a brute-force fold of the log."""
    payers = [f"payer-{i}" for i in range(8)]
    await open_account(bank, "shop", kind="merchant")
    for payer in payers:
        await open_account(bank, payer)
        await fund(bank, payer, 100_000)

    async def settle(payer: str, amount_minor: int) -> None:
        payment = Payment(bank, payer, "shop", amount_minor)
        await payment.run("initiated", "authorized", "reserved")
        await bank.append(payment.settled(fee_minor=amount_minor // 10))

    async def release(payer: str, amount_minor: int) -> None:
        await Payment(bank, payer, "shop", amount_minor).run(
            "initiated", "authorized", "reserved", "released", "voided", "failed"
        )

    for round_no in range(4):
        await asyncio.gather(
            *(settle(payer, 1_000 + 10 * round_no + i) for i, payer in enumerate(payers)),
            release(payers[round_no], 333),
        )
    await project(bank, database)
    as_of_seq = await checkpoint(bank.engine, STATEMENT_CHECKPOINT)
    log = await movements_in_the_log(bank.engine)
    shop_by_time = sorted(log["shop"], key=lambda m: (m.recorded_at, m.global_seq))
    out_of_order = sum(a.global_seq > b.global_seq for a, b in itertools.pairwise(shop_by_time))
    print(f"shop: {len(shop_by_time)} movements, {out_of_order} out of global_seq order in time")

    every_event = sorted({m.recorded_at for ms in log.values() for m in ms})
    rng = random.Random(20240501)
    first, last = every_event[0] - timedelta(seconds=1), every_event[-1] + timedelta(seconds=1)
    span_us = (last - first) // ONE_US
    elsewhere = timezone(timedelta(hours=5, minutes=30))
    for account_id in ("payer-0", "shop", "fees"):
        movements = log[account_id]
        instants = set(every_event)
        for movement in movements:
            instants |= {movement.recorded_at - ONE_US, movement.recorded_at + ONE_US}
        instants |= {first + rng.randrange(span_us) * ONE_US for _ in range(200)}
        ordered = sorted(instants)
        # The same instants, written with other offsets: an instant is an instant.
        written = [i.astimezone(elsewhere) if n % 3 == 0 else i for n, i in enumerate(ordered)]
        responses = await bounded_gather(
            [
                api.get(f"/v1/accounts/{account_id}/balance", params={"as_of": i.isoformat()})
                for i in written
            ]
        )
        for instant, response in zip(ordered, responses, strict=True):
            assert response.status_code == 200, response.text
            got = response.json()
            expected, last_seq = balance_at(movements, instant)
            assert {c: got[c] for c in COUNTERS} == expected, (account_id, instant)
            assert got["posted"] == expected["credits_posted"] - expected["debits_posted"]
            assert got["pending"] == expected["credits_pending"] - expected["debits_pending"]
            assert got["last_seq"] == last_seq, (account_id, instant)
            assert got["as_of_seq"] == as_of_seq
            assert datetime.fromisoformat(got["as_of"]) == instant
        # Long after the last event, the balance is the account's position now.
        position = (await api.get(f"/v1/accounts/{account_id}")).json()["position"]
        assert {c: got[c] for c in COUNTERS} == {c: position[c] for c in COUNTERS}


async def test_a_historical_balance_needs_an_instant_with_its_offset(
    api: Api, bank: EventStore, database: IsolatedDatabase
) -> None:
    await project(bank, database)
    for bad in (
        "2024-05-01T12:00:00",  # naive: which 12:00?
        "2024-05-01",
        "yesterday",
        "1714564800",
        "2024-05-01T12:00:00+25:00",
        "2024-05-01T24:00:00Z",
        "2024-05-01T12:00:00 02:00",  # a + sent unencoded arrives as a space
        "",
    ):
        response = await api.get("/v1/accounts/alice/balance", params={"as_of": bad})
        assert_problem(response, 422, "validation_failed")
        assert response.json()["errors"][0]["field"] == "as_of"
    before_it_opened = await api.get(
        "/v1/accounts/alice/balance", params={"as_of": "2001-01-01T00:00:00.5+01:00"}
    )
    assert before_it_opened.status_code == 200
    body = before_it_opened.json()
    assert (body["posted"], body["pending"], body["last_seq"]) == (0, 0, None)
    lowercase = await api.get(
        "/v1/accounts/alice/balance", params={"as_of": "2999-01-01t00:00:00z"}
    )
    assert lowercase.json()["posted"] == 500_000


async def test_a_historical_balance_is_one_index_seek_and_a_statement_page_one_bounded_range(
    bank: EventStore, database: IsolatedDatabase, owner_engine: AsyncEngine
) -> None:
    for i in range(150):
        await Payment(bank, "alice", "bob", 10 + i).settle_fully()
    await project(bank, database)
    async with owner_engine.connect() as conn:
        entries = (
            await conn.execute(
                text("SELECT count(*) FROM projection.entries WHERE account_id = 'alice'")
            )
        ).scalar_one()
        # What autovacuum would have done by now: statistics, not a hint.
        await conn.execute(text("ANALYZE projection.entries"))
    assert entries >= 300
    async with bank.engine.connect() as conn:
        plan = (
            await conn.execute(
                text(f"EXPLAIN (FORMAT JSON) {BALANCE_AS_OF_SQL.text}"),
                {
                    "account": "alice",
                    "as_of": datetime.now(UTC) - timedelta(milliseconds=50),
                    "checkpoint": STATEMENT_CHECKPOINT,
                },
            )
        ).scalar_one()
        seqscan = (await conn.execute(text("SHOW enable_seqscan"))).scalar_one()
    assert seqscan == "on"
    nodes = list(_plan_nodes(plan[0]["Plan"]))
    on_entries = [n for n in nodes if n.get("Relation Name") == "entries"]
    assert [n["Node Type"] for n in on_entries] in (["Index Scan"], ["Index Only Scan"]), plan
    assert on_entries[0]["Index Name"] == "entries_account_id_recorded_at_global_seq_idx"
    assert on_entries[0]["Scan Direction"] == "Backward"
    assert not [n for n in nodes if n["Node Type"] == "Seq Scan"], plan

    # A statement page, from its cursor: one forward range of the (account_id,
    # global_seq) key right under its LIMIT, already in order, so nothing reads or sorts
    # the rest of the account's entries. (The statement's final ORDER BY sorts the page,
    # at most `limit` rows, above the join with the checkpoint row.)
    async with bank.engine.connect() as conn:
        after_seq = (
            await conn.execute(
                text(
                    "SELECT global_seq FROM projection.entries WHERE account_id = 'alice' "
                    "ORDER BY global_seq OFFSET 100 LIMIT 1"
                )
            )
        ).scalar_one()
        plan = (
            await conn.execute(
                text(f"EXPLAIN (FORMAT JSON) {ENTRIES_SQL.text}"),
                {
                    "account": "alice",
                    "after_seq": after_seq,
                    "limit": 51,
                    "checkpoint": STATEMENT_CHECKPOINT,
                },
            )
        ).scalar_one()
    nodes = list(_plan_nodes(plan[0]["Plan"]))
    on_entries = [n for n in nodes if n.get("Relation Name") == "entries"]
    assert [n["Node Type"] for n in on_entries] in (["Index Scan"], ["Index Only Scan"]), plan
    assert on_entries[0]["Index Name"] == "entries_pkey"
    assert on_entries[0]["Scan Direction"] == "Forward"
    assert "global_seq > " in on_entries[0]["Index Cond"], plan
    assert not [n for n in nodes if n["Node Type"] == "Seq Scan"], plan
    bounds = [n for n in nodes if n["Node Type"] == "Limit"]
    assert [b["Plans"] for b in bounds] == [on_entries], f"not one range under a LIMIT: {plan}"


def _plan_nodes(node: dict[str, Any]) -> Iterable[dict[str, Any]]:
    yield node
    for child in node.get("Plans", []):
        yield from _plan_nodes(child)


# --- payments ---------------------------------------------------------------------------------
async def test_the_payments_list_comes_from_its_read_model_and_says_how_fresh_it_is(
    api: Api, bank: EventStore, database: IsolatedDatabase
) -> None:
    await open_account(bank, "carol")
    await fund(bank, "carol", 10_000)
    settled = [Payment(bank, "alice", "bob", 100 + i) for i in range(3)]
    for payment in settled:
        await payment.settle_fully()
    carols = Payment(bank, "carol", "bob", 50)
    await carols.settle_fully()
    failed = Payment(bank, "alice", "bob", 70)
    await failed.run("initiated", "authorized", "voided", "failed")
    held = Payment(bank, "alice", "bob", 80)
    await held.run("initiated", "authorized", "reserved")
    await project(bank, database)
    as_of_seq = await checkpoint(bank.engine, "payments")
    assert as_of_seq == await head_seq(bank.engine)

    async def listed(**params: Any) -> dict[str, Any]:
        response = await api.get("/v1/payments", params=params, caller="reader")
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    everything = await listed(limit=200)
    assert everything["as_of_seq"] == as_of_seq and everything["next_cursor"] is None
    assert [p["id"] for p in everything["payments"][:3]] == [
        held.payment_id,
        failed.payment_id,
        carols.payment_id,
    ]
    only_failed = (await listed(status="FAILED"))["payments"]
    assert [(p["id"], p["status"], p["failure_reason"]) for p in only_failed] == [
        (failed.payment_id, "FAILED", "test")
    ]
    assert [p["id"] for p in (await listed(status="RESERVED"))["payments"]] == [held.payment_id]
    carol = (await listed(account_id="carol"))["payments"]
    # carol's own payment, then the one that funded her.
    assert carol[0]["id"] == carols.payment_id and len(carol) == 2
    assert carol[1]["payee_account_id"] == "carol"
    settled_to_bob = (await listed(account_id="bob", status="SETTLED"))["payments"]
    assert [p["id"] for p in settled_to_bob] == [
        carols.payment_id,
        *(p.payment_id for p in reversed(settled)),
    ]

    pages = []
    cursor = None
    while True:
        page = await listed(account_id="alice", limit=2, **({"cursor": cursor} if cursor else {}))
        assert page["as_of_seq"] == as_of_seq
        pages.append([p["id"] for p in page["payments"]])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    # Six payments of alice's, the last the one that funded her: three full pages.
    newest_first = [p.payment_id for p in (held, failed, *reversed(settled))]
    assert pages[:2] == [newest_first[0:2], newest_first[2:4]]
    assert len(pages) == 3 and pages[2][0] == newest_first[4] and len(pages[2]) == 2

    # A payment the projector has not reached is not listed yet; as_of_seq says so.
    late = Payment(bank, "alice", "bob", 90)
    await late.run("initiated")
    stale = await listed()
    assert late.payment_id not in [p["id"] for p in stale["payments"]]
    assert stale["as_of_seq"] == as_of_seq < await head_seq(bank.engine)
    await project(bank, database)
    fresh = await listed()
    assert fresh["payments"][0]["id"] == late.payment_id
    assert fresh["payments"][0]["status"] == "INITIATED"
    assert fresh["as_of_seq"] == await head_seq(bank.engine)


# --- lag --------------------------------------------------------------------------------------
async def test_read_model_lag_is_in_readyz_and_the_metrics_and_never_makes_the_api_unready(
    api: Api, bank: EventStore, database: IsolatedDatabase
) -> None:
    await project(bank, database)
    caught_up = (await api.http.get("/readyz")).json()
    for name in READ_MODELS:
        assert caught_up["read_models"][name]["events"] == 0
        assert caught_up["read_models"][name]["seconds"] == 0

    await Payment(bank, "alice", "bob", 100).settle_fully()  # four events
    await asyncio.sleep(0.05)
    response = await api.http.get("/readyz")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ready"
    for name in READ_MODELS:
        lag = body["read_models"][name]
        assert lag["events"] == 4, (name, lag)
        assert lag["seconds"] >= 0.05, (name, lag)
        assert lag["last_seq"] == await head_seq(bank.engine) - 4

    metrics = (await api.http.get("/metrics")).text
    for name in READ_MODELS:
        assert f'paysaga_read_model_lag_events{{projection="{name}"}} 4.0' in metrics
        assert f'paysaga_read_model_lag_seconds{{projection="{name}"}} ' in metrics

    await project(bank, database)
    metrics = (await api.http.get("/metrics")).text
    assert 'paysaga_read_model_lag_events{projection="balances"} 0.0' in metrics
    assert 'paysaga_read_model_lag_seconds{projection="balances"} 0.0' in metrics
