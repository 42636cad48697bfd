"""Session-wide real servers, per-test isolation, and a clean exit code.

Fixtures, from the widest scope:

- `pg_server` (session): PostgreSQL with the migrated template database.
- `database` (test): a fresh clone of the template, dropped afterwards.
- `app_engine`, `owner_engine` (test): async engines on that database, as each role.
- `store` (test): the event store on `app_engine`.
- `temporal_env` (session): the Temporal dev server; `temporal_client` its client.
- `time_skipping_env` (session): the time-skipping server, started on first use.
- `task_queue` (test): a queue of the test's own, so workers never steal each other's tasks.
- `settings` (test): Settings pointing at all of the above.
- `payments` (test): a worker with the real activities, and a helper to start payments.
- `api` (test): the API in process over httpx, with a key for each kind of caller.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment

from api.app import create_app
from ledger.store import EventStore
from ledger.verify import check_ledger, verify_chain
from paysaga.db import create_app_engine, create_owner_engine, open_store
from paysaga.settings import Settings
from tests.harness.api import Api, make_keys, serve
from tests.harness.ledger import fund, open_account
from tests.harness.postgres import IsolatedDatabase, PostgresServer, postgres_server
from tests.harness.read_side import project
from tests.harness.saga import Payments
from tests.harness.temporal import start_dev_server, start_time_skipping_server
from worker import build_worker, payment_activities

# --- exit code ------------------------------------------------------------------------------
# A process that used a Temporal client can abort at interpreter exit with
# "Fatal Python error: PyGILState_Release" (exit code 134, sdk-python issue 300),
# turning a green run red. Once pytest has finished everything (reports included),
# leave with the real status and skip interpreter finalisation.
_exit_status: list[int] = []


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _exit_status.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    if not _exit_status:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_exit_status[-1])


# --- PostgreSQL -----------------------------------------------------------------------------
@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    with postgres_server() as server:
        yield server


@pytest.fixture
def database(pg_server: PostgresServer) -> Iterator[IsolatedDatabase]:
    with pg_server.database() as db:
        yield db


@pytest.fixture
async def app_engine(database: IsolatedDatabase) -> AsyncIterator[AsyncEngine]:
    engine = create_app_engine(database.urls, pool_size=5, pool_overflow_max=20)
    yield engine
    await engine.dispose()


@pytest.fixture
async def owner_engine(database: IsolatedDatabase) -> AsyncIterator[AsyncEngine]:
    engine = create_owner_engine(database.urls.owner_url)
    yield engine
    await engine.dispose()


@pytest.fixture
async def store(database: IsolatedDatabase, app_engine: AsyncEngine) -> AsyncIterator[EventStore]:
    """The event store, as the services use it: through the application role."""
    store = await open_store(database.urls, pool_size=4, engine=app_engine)
    yield store
    await store.close()


@pytest.fixture
async def bank(store: EventStore, database: IsolatedDatabase) -> AsyncIterator[EventStore]:
    """alice (5 000.00 EUR), bob (merchant), fees; after the test, the read models are
    brought up to date, and the ledger verifies and checks, read models included."""
    await open_account(store, "alice")
    await open_account(store, "bob", kind="merchant")
    await open_account(store, "fees", kind="fees")
    await fund(store, "alice", 500_000)
    yield store
    await project(store, database)
    for report in (await verify_chain(store.engine), await check_ledger(store.engine)):
        assert report.ok, report.lines()


# --- Temporal -------------------------------------------------------------------------------
@pytest.fixture(scope="session")
async def temporal_env() -> AsyncIterator[WorkflowEnvironment]:
    env = await start_dev_server()
    yield env
    await env.shutdown()


@pytest.fixture(scope="session")
async def time_skipping_env() -> AsyncIterator[WorkflowEnvironment]:
    env = await start_time_skipping_server()
    yield env
    await env.shutdown()


@pytest.fixture
def temporal_client(temporal_env: WorkflowEnvironment) -> Client:
    return temporal_env.client


@pytest.fixture
def task_queue() -> str:
    return f"test-{uuid.uuid4()}"


# --- The payment saga -----------------------------------------------------------------------
@pytest.fixture
async def payments(
    temporal_client: Client, store: EventStore, settings: Settings, task_queue: str
) -> AsyncIterator[Payments]:
    """A worker with the real activities on the test's queue, and a way to start payments."""
    activities = payment_activities(store, temporal_client)
    async with build_worker(
        temporal_client, settings, task_queue=task_queue, activities=activities
    ):
        yield Payments(temporal_client, store, task_queue)


# --- The API --------------------------------------------------------------------------------
@pytest.fixture
async def api(
    payments: Payments,
    settings: Settings,
    store: EventStore,
    temporal_client: Client,
    owner_engine: AsyncEngine,
) -> AsyncIterator[Api]:
    """The API in process, a worker behind it, and a key for each kind of caller."""
    keys = await make_keys(owner_engine, settings.api_key_secret.get_secret_value())
    app = create_app(settings, store=store, temporal_client=temporal_client)
    async with serve(app) as http:
        yield Api(http, keys)


# --- Settings -------------------------------------------------------------------------------
@pytest.fixture
def settings(
    database: IsolatedDatabase, temporal_client: Client, task_queue: str, tmp_path: Path
) -> Settings:
    """Settings for a test: its own database, the session's Temporal, its own queue."""
    return Settings(
        _env_file=None,
        env="test",
        data_dir=tmp_path / "data",
        database_url=database.urls.owner_url,
        database_app_url=database.urls.app_url,
        temporal_address=temporal_client.service_client.config.target_host,
        temporal_namespace=temporal_client.namespace,
        task_queue=task_queue,
        api_key_secret="test-secret-0123456789abcdef",
        worker_shutdown_grace_s=2,
    )
