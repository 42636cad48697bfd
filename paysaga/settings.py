"""All of paysaga's configuration, in one class read from the environment or a `.env` file.

Most variables carry the `PAYSAGA_` prefix. The connection settings that other tools
share keep their conventional names: `DATABASE_URL`, `DATABASE_APP_URL`,
`TEMPORAL_ADDRESS` and `TEMPORAL_NAMESPACE`. Leaving `DATABASE_URL` or
`TEMPORAL_ADDRESS` unset means "use the embedded server that `paysaga up` starts".
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ledger.risk_consumer import (
    AMOUNT_HISTORY_MIN_MAX,
    AMOUNT_STDDEVS_MAX,
    DECLINES_IN_ROW_MAX_MAX,
    VELOCITY_COUNT_MAX_MAX,
    VELOCITY_WINDOW_S_MAX,
    RiskThresholds,
)

# Secrets that ship in the repository. Fine on a laptop, refused anywhere else.
PLACEHOLDER_SECRETS = frozenset({"dev-insecure-change-me", "changeme", "change-me", "secret", ""})

Environment = Literal["development", "test", "production"]
# Addresses that bind every interface, so they collide with any other on the same port.
_ANY_HOST = frozenset({"0.0.0.0", "::", ""})


DEFAULT_TASK_QUEUE = "payments"
# PAYSAGA_TRACING=otlp sends spans over OTLP/HTTP with this optional package's exporter.
OTLP_EXPORTER_MODULE = "opentelemetry.exporter.otlp.proto.http.trace_exporter"
# Worker processes `paysaga up` may run; each is a Python process with its own pollers.
WORKERS_MAX = 8


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


class Settings(BaseSettings):
    """paysaga's configuration. Field docs name the environment variable that sets each one."""

    model_config = SettingsConfigDict(
        env_prefix="PAYSAGA_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        populate_by_name=True,
    )

    env: Environment = Field(
        default="development",
        description="PAYSAGA_ENV: development, test or production. Outside development, "
        "placeholder secrets are refused.",
    )
    data_dir: Path = Field(
        default=Path(".paysaga"),
        description="PAYSAGA_DATA_DIR: where the embedded PostgreSQL, the Temporal SQLite "
        "file and the logs live.",
    )

    # --- PostgreSQL -------------------------------------------------------------------
    database_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("DATABASE_URL", "database_url"),
        description="DATABASE_URL: an external PostgreSQL, logged in as the schema owner "
        "(migrations and administrative commands; never the services). Unset: the "
        "embedded PostgreSQL.",
    )
    database_app_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("DATABASE_APP_URL", "database_app_url"),
        description="DATABASE_APP_URL: the services' own login, as the application role. "
        "A service needs it whenever DATABASE_URL is set; `paysaga up` provisions one "
        "when it is unset.",
    )
    db_app_role: str = Field(
        default="paysaga_app",
        pattern=r"^[a-z_][a-z0-9_]{0,62}$",
        description="PAYSAGA_DB_APP_ROLE: the role the services log in as. It holds SELECT "
        "on the ledger and EXECUTE on its functions, nothing more.",
    )
    db_pool_size: int = Field(default=10, ge=1, le=200, description="PAYSAGA_DB_POOL_SIZE")
    db_pool_overflow_max: int = Field(
        default=10, ge=0, le=200, description="PAYSAGA_DB_POOL_OVERFLOW_MAX"
    )

    # --- Temporal ---------------------------------------------------------------------
    temporal_address: str | None = Field(
        default=None,
        validation_alias=AliasChoices("TEMPORAL_ADDRESS", "temporal_address"),
        description="TEMPORAL_ADDRESS: an external Temporal frontend, host:port. "
        "Unset: the dev server that `paysaga up` starts.",
    )
    temporal_namespace: str = Field(
        default="default",
        validation_alias=AliasChoices("TEMPORAL_NAMESPACE", "temporal_namespace"),
        description="TEMPORAL_NAMESPACE",
    )
    temporal_port: int = Field(
        default=7233,
        ge=1,
        le=65535,
        description="PAYSAGA_TEMPORAL_PORT: the dev server's frontend.",
    )
    temporal_ui_port: int = Field(
        default=8233, ge=1, le=65535, description="PAYSAGA_TEMPORAL_UI_PORT: the dev server's UI."
    )
    temporal_ui: str | None = Field(
        default=None,
        pattern=r"^https?://[^\s/?#]+(/[^\s?#]*)?$",
        max_length=200,
        description="PAYSAGA_TEMPORAL_UI: where operators open the Temporal UI "
        "(http://host:port), for the console's links when Temporal runs elsewhere. Unset: "
        "the dev server's UI, or no links with TEMPORAL_ADDRESS.",
    )
    task_queue: str = Field(default=DEFAULT_TASK_QUEUE, description="PAYSAGA_TASK_QUEUE")

    # --- Worker -----------------------------------------------------------------------
    worker_activities_max: int = Field(
        default=64, ge=1, le=1000, description="PAYSAGA_WORKER_ACTIVITIES_MAX"
    )
    worker_local_activities_max: int = Field(
        default=64, ge=1, le=1000, description="PAYSAGA_WORKER_LOCAL_ACTIVITIES_MAX"
    )
    worker_workflow_tasks_max: int = Field(
        default=32, ge=1, le=1000, description="PAYSAGA_WORKER_WORKFLOW_TASKS_MAX"
    )
    workers: int = Field(
        default=1,
        ge=1,
        le=WORKERS_MAX,
        description="PAYSAGA_WORKERS: how many worker processes `paysaga up` runs on the task "
        "queue (`worker`, `worker-2`, ...). One by default: the supervisor restarts a crashed "
        "worker within a second, and each more costs a Python process and its pollers on a "
        "small machine. Two let the other take over at once while one is down (the "
        "reliability suite runs two).",
    )
    worker_metrics_host: str = Field(
        default="127.0.0.1",
        description="PAYSAGA_WORKER_METRICS_HOST: the interface of PAYSAGA_WORKER_METRICS_PORT.",
    )
    worker_metrics_port: int | None = Field(
        default=None,
        ge=1,
        le=65535,
        description="PAYSAGA_WORKER_METRICS_PORT: a worker serves the Temporal SDK's own "
        "Prometheus metrics (workflow and activity completions, latencies, slots, polls) "
        "at /metrics on this port. `paysaga up` gives its workers this port and the next "
        "ones (`worker-2` gets port + 1, ...); unset, it picks free ports and shows them. "
        "Unset for `paysaga worker`: none.",
    )
    worker_shutdown_grace_s: int = Field(
        default=20,
        ge=0,
        le=600,
        description="PAYSAGA_WORKER_SHUTDOWN_GRACE_S: how long in-flight activities may run "
        "on SIGTERM before they are cancelled (and retried elsewhere).",
    )

    # --- Payments (captured into each payment's policy when it starts) -----------------
    approval_threshold_minor: int = Field(
        default=1_000_000,
        ge=1,
        le=2**63 - 1,
        description="PAYSAGA_APPROVAL_THRESHOLD_MINOR: at or above this amount, a payment "
        "waits for an operator's approval.",
    )
    approval_deadline_s: int = Field(
        default=86_400,
        ge=1,
        le=30 * 86_400,
        description="PAYSAGA_APPROVAL_DEADLINE_S: an approval not given by then rejects the "
        "payment.",
    )
    hold_expiry_s: int = Field(
        default=3_600,
        ge=1,
        le=30 * 86_400,
        description="PAYSAGA_HOLD_EXPIRY_S: a hold not settled by then is released.",
    )
    processor_timeout_s: int = Field(
        default=30, ge=1, le=3_600, description="PAYSAGA_PROCESSOR_TIMEOUT_S: per call."
    )
    processor_heartbeat_s: int = Field(
        default=5,
        ge=1,
        le=600,
        description="PAYSAGA_PROCESSOR_HEARTBEAT_S: a processor call silent this long is "
        "presumed lost (its worker died) and retried.",
    )
    processor_attempts_max: int = Field(
        default=3, ge=1, le=20, description="PAYSAGA_PROCESSOR_ATTEMPTS_MAX"
    )
    risk_payment_limit_minor: int = Field(
        default=10**12,
        ge=1,
        le=2**63 - 1,
        description="PAYSAGA_RISK_PAYMENT_LIMIT_MINOR: the largest single payment.",
    )
    risk_velocity_window_s: int = Field(
        default=60, ge=1, le=86_400, description="PAYSAGA_RISK_VELOCITY_WINDOW_S"
    )
    risk_velocity_count_max: int = Field(
        default=10_000,
        ge=1,
        le=10**9,
        description="PAYSAGA_RISK_VELOCITY_COUNT_MAX: payments one payer may start per window. "
        "External (funding) accounts are exempt.",
    )
    # The risk consumer's alerts (ledger/risk_consumer.py): flagged, never declined.
    risk_alert_velocity_window_s: int = Field(
        default=60,
        ge=1,
        le=VELOCITY_WINDOW_S_MAX,
        description="PAYSAGA_RISK_ALERT_VELOCITY_WINDOW_S: the sliding window of the velocity "
        "alert.",
    )
    risk_alert_velocity_count_max: int = Field(
        default=20,
        ge=1,
        le=VELOCITY_COUNT_MAX_MAX,
        description="PAYSAGA_RISK_ALERT_VELOCITY_COUNT_MAX: a payer that starts more payments "
        "than this within the window raises a velocity alert.",
    )
    risk_alert_amount_stddevs: int = Field(
        default=4,
        ge=1,
        le=AMOUNT_STDDEVS_MAX,
        description="PAYSAGA_RISK_ALERT_AMOUNT_STDDEVS: a payment more than this many standard "
        "deviations above the mean of the payer's earlier payments raises an alert.",
    )
    risk_alert_amount_history_min: int = Field(
        default=10,
        ge=2,
        le=AMOUNT_HISTORY_MIN_MAX,
        description="PAYSAGA_RISK_ALERT_AMOUNT_HISTORY_MIN: earlier payments a payer needs "
        "before the amount alert applies.",
    )
    risk_alert_declines_in_row: int = Field(
        default=3,
        ge=1,
        le=DECLINES_IN_ROW_MAX_MAX,
        description="PAYSAGA_RISK_ALERT_DECLINES_IN_ROW: this many declined payments of one "
        "payer in a row (no settled one between) raise an alert.",
    )
    projector_batch_events_max: int = Field(
        default=5_000,
        ge=1,
        le=100_000,
        description="PAYSAGA_PROJECTOR_BATCH_EVENTS_MAX: events one projector batch applies.",
    )
    projector_poll_s: float = Field(
        default=1.0,
        gt=0,
        le=60,
        description="PAYSAGA_PROJECTOR_POLL_S: how often the projector looks for new events "
        "when no notification woke it.",
    )
    fee_bps: int = Field(
        default=0, ge=0, le=10_000, description="PAYSAGA_FEE_BPS: fee in basis points."
    )
    fee_fixed_minor: int = Field(
        default=0, ge=0, le=2**63 - 1, description="PAYSAGA_FEE_FIXED_MINOR"
    )
    fees_account_id: str | None = Field(
        default=None,
        description="PAYSAGA_FEES_ACCOUNT_ID: where fees go; required if a fee is set.",
    )

    # --- API --------------------------------------------------------------------------
    api_host: str = Field(default="127.0.0.1", description="PAYSAGA_API_HOST")
    api_port: int = Field(default=8000, ge=1, le=65535, description="PAYSAGA_API_PORT")
    api_key_secret: SecretStr = Field(
        default=SecretStr("dev-insecure-change-me"),
        description="PAYSAGA_API_KEY_SECRET: the HMAC key under which API keys are hashed "
        "at rest. Must be a real secret outside development.",
    )

    api_key_cache_s: float = Field(
        default=5.0,
        ge=0,
        le=300,
        description="PAYSAGA_API_KEY_CACHE_S: how long a verified API key is remembered; "
        "a revoked key stops working within this many seconds.",
    )

    api_update_wait_s: float = Field(
        default=10.0,
        gt=0,
        le=300,
        description="PAYSAGA_API_UPDATE_WAIT_S: how long a payment's cancel, approve and "
        "reject, and a discrepancy's resolve, wait for the workflow to take the request. "
        "Past it (its worker down or busy) they answer 503 `workflow_unresponsive`; the "
        "workflow may still take the request later.",
    )

    metrics_host: str | None = Field(
        default=None,
        description="PAYSAGA_METRICS_HOST: the interface for PAYSAGA_METRICS_PORT. "
        "Unset: PAYSAGA_API_HOST.",
    )
    metrics_port: int | None = Field(
        default=None,
        ge=1,
        le=65535,
        description="PAYSAGA_METRICS_PORT: serve the Prometheus metrics on this port of their "
        "own, and not on the API (whose /metrics then answers 404). Unset: metrics are "
        "served by the API at /metrics.",
    )

    sweep_interval_s: int = Field(
        default=60,
        ge=5,
        le=86_400,
        description="PAYSAGA_SWEEP_INTERVAL_S: how often the sweeper looks for open payments "
        "whose workflow is gone (terminated, timed out, unknown) and repairs them.",
    )
    sweep_idle_s: float = Field(
        default=30.0,
        ge=0,
        le=86_400,
        description="PAYSAGA_SWEEP_IDLE_S: a payment whose last ledger event is younger than "
        "this is left alone by the sweeper (it is in the middle of a step).",
    )

    # --- Reconciliation ---------------------------------------------------------------
    recon_interval_s: int = Field(
        default=300,
        ge=10,
        le=86_400,
        description="PAYSAGA_RECON_INTERVAL_S: how often the `recon-continuous` schedule "
        "runs an incremental reconciliation.",
    )
    recon_daily_hour_utc: int = Field(
        default=2,
        ge=0,
        le=23,
        description="PAYSAGA_RECON_DAILY_HOUR_UTC: the hour (UTC) of the `recon-daily` full run.",
    )
    recon_daily_catchup_window_s: int = Field(
        default=6 * 3600,
        ge=60,
        le=7 * 86_400,
        description="PAYSAGA_RECON_DAILY_CATCHUP_WINDOW_S: a daily run missed while Temporal "
        "was down still runs if Temporal is back within this long.",
    )
    recon_inbox_dir: Path | None = Field(
        default=None,
        description="PAYSAGA_RECON_INBOX_DIR: where statements dropped for reconciliation "
        "wait (default: <data dir>/inbox). Ingested files move to its `done/`, refused ones "
        "to `refused/` with the reason beside them.",
    )
    recon_inbox_poll_s: float = Field(
        default=1.0,
        gt=0,
        le=60,
        description="PAYSAGA_RECON_INBOX_POLL_S: how often the worker looks for new files in "
        "the inbox; a new file starts matching at once.",
    )
    recon_amount_tolerance_minor: int = Field(
        default=0,
        ge=0,
        le=1_000_000,
        description="PAYSAGA_RECON_AMOUNT_TOLERANCE_MINOR: the rule pass matches a line and a "
        "settlement with the same reference and currency whose amounts differ by at most this.",
    )
    recon_date_window_days: int = Field(
        default=3,
        ge=0,
        le=31,
        description="PAYSAGA_RECON_DATE_WINDOW_DAYS: how far apart a line's value date and its "
        "settlement's may be in the rule pass (batched payouts come on or after the day).",
    )
    recon_settlement_window_s: int = Field(
        default=2 * 86_400,
        ge=0,
        le=31 * 86_400,
        description="PAYSAGA_RECON_SETTLEMENT_WINDOW_S: a settlement on no statement is "
        "`missing_in_statement` only once it is older than this.",
    )
    recon_batch_payouts: bool = Field(
        default=True,
        description="PAYSAGA_RECON_BATCH_PAYOUTS: one line may match the sum of a day's "
        "settlements in its currency (a daily payout), and several lines one settlement.",
    )
    recon_discrepancy_alert_age_s: int = Field(
        default=86_400,
        ge=60,
        le=90 * 86_400,
        description="PAYSAGA_RECON_DISCREPANCY_ALERT_AGE_S: an open discrepancy older than "
        "this counts in the `paysaga_discrepancies_overdue` alert metric.",
    )

    # --- Ledger -----------------------------------------------------------------------
    seal_interval_s: float = Field(
        default=2.0,
        gt=0,
        le=60,
        description="PAYSAGA_SEAL_INTERVAL_S: how often the sealer chains new events into a "
        "block; an event is sealed within about two intervals of its commit.",
    )

    # --- Operations console (/console) -------------------------------------------------
    console_session_idle_s: int = Field(
        default=900,
        ge=60,
        le=86_400,
        description="PAYSAGA_CONSOLE_SESSION_IDLE_S: a console session with no request for "
        "this long is over; the operator logs in again.",
    )
    console_session_max_s: int = Field(
        default=8 * 3_600,
        ge=300,
        le=7 * 86_400,
        description="PAYSAGA_CONSOLE_SESSION_MAX_S: a console session ends this long after "
        "its login, however busy.",
    )

    # --- Tracing ----------------------------------------------------------------------
    tracing: Literal["off", "console", "otlp"] = Field(
        default="off",
        description="PAYSAGA_TRACING: OpenTelemetry spans for every request, payment "
        "workflow and activity, one trace from the HTTP request to the last activity. "
        "`off` (no tracing code runs), `console` (one JSON span per line on stdout), or "
        "`otlp` (needs `pip install 'paysaga[otlp]'`; the exporter reads the standard "
        "OTEL_EXPORTER_OTLP_* variables).",
    )

    # --- Logging ----------------------------------------------------------------------
    log_level: str = Field(default="INFO", description="PAYSAGA_LOG_LEVEL")
    log_json: bool = Field(
        default=True, description="PAYSAGA_LOG_JSON: structured JSON logs (one object per line)."
    )

    @model_validator(mode="after")
    def _fees_need_an_account(self) -> Settings:
        if (self.fee_bps or self.fee_fixed_minor) and not self.fees_account_id:
            raise ValueError("a fee is configured but PAYSAGA_FEES_ACCOUNT_ID is not")
        return self

    @model_validator(mode="after")
    def _metrics_apart_from_the_api(self) -> Settings:
        if self.metrics_port is None:
            if self.metrics_host is not None:
                raise ValueError("PAYSAGA_METRICS_HOST is set but PAYSAGA_METRICS_PORT is not")
            return self
        hosts = {self.api_host, self.metrics_host or self.api_host}
        if self.metrics_port == self.api_port and (len(hosts) == 1 or hosts & _ANY_HOST):
            raise ValueError(
                "PAYSAGA_METRICS_PORT must differ from PAYSAGA_API_PORT on the same interface"
            )
        return self

    @model_validator(mode="after")
    def _worker_metrics_ports_exist(self) -> Settings:
        if self.worker_metrics_port is None:
            return self
        last = self.worker_metrics_port + self.workers - 1
        if last > 65535:
            raise ValueError(
                f"PAYSAGA_WORKER_METRICS_PORT {self.worker_metrics_port} leaves no port for "
                f"each of the {self.workers} workers (the last would be {last})"
            )
        taken = {self.api_port, self.metrics_port}
        if taken & set(range(self.worker_metrics_port, last + 1)):
            raise ValueError(
                "PAYSAGA_WORKER_METRICS_PORT (one port per worker) must not include "
                "PAYSAGA_API_PORT or PAYSAGA_METRICS_PORT"
            )
        return self

    @model_validator(mode="after")
    def _otlp_needs_its_exporter(self) -> Settings:
        if self.tracing == "otlp" and not _importable(OTLP_EXPORTER_MODULE):
            raise ValueError(
                "PAYSAGA_TRACING=otlp needs the OTLP exporter: pip install 'paysaga[otlp]' "
                "(or set PAYSAGA_TRACING=console or off)"
            )
        return self

    @model_validator(mode="after")
    def _refuse_placeholder_secrets(self) -> Settings:
        if self.env != "development":
            secret = self.api_key_secret.get_secret_value()
            if secret in PLACEHOLDER_SECRETS or len(secret) < 16:
                raise ValueError(
                    "PAYSAGA_API_KEY_SECRET is a placeholder (or shorter than 16 characters); "
                    f"set a real secret when PAYSAGA_ENV={self.env}"
                )
        return self

    # --- Derived values ----------------------------------------------------------------
    def risk_thresholds(self) -> RiskThresholds:
        """When the risk consumer raises an alert."""
        return RiskThresholds(
            velocity_window_s=self.risk_alert_velocity_window_s,
            velocity_count_max=self.risk_alert_velocity_count_max,
            amount_stddevs=self.risk_alert_amount_stddevs,
            amount_history_min=self.risk_alert_amount_history_min,
            declines_in_row_max=self.risk_alert_declines_in_row,
        )

    @property
    def data_path(self) -> Path:
        return self.data_dir.expanduser().resolve()

    @property
    def recon_inbox_path(self) -> Path:
        inbox = self.recon_inbox_dir or self.data_dir / "inbox"
        return inbox.expanduser().resolve()

    @property
    def uses_embedded_postgres(self) -> bool:
        return self.database_url is None and self.database_app_url is None

    @property
    def uses_dev_temporal(self) -> bool:
        return self.temporal_address is None

    @property
    def temporal_target(self) -> str:
        return self.temporal_address or f"127.0.0.1:{self.temporal_port}"

    @property
    def temporal_ui_url(self) -> str | None:
        if self.temporal_ui is not None:
            return self.temporal_ui.rstrip("/")
        return f"http://127.0.0.1:{self.temporal_ui_port}" if self.uses_dev_temporal else None

    @property
    def api_url(self) -> str:
        host = "127.0.0.1" if self.api_host in ("0.0.0.0", "::") else self.api_host
        if ":" in host:
            host = f"[{host}]"  # an IPv6 address, as a URL writes it
        return f"http://{host}:{self.api_port}"

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        """Where metrics are served apart from the API; None when the API serves them."""
        if self.metrics_port is None:
            return None
        return self.metrics_host or self.api_host, self.metrics_port

    @property
    def metrics_url(self) -> str:
        """Where Prometheus scrapes: the API's /metrics, or the port of their own."""
        if self.metrics_address is None:
            return f"{self.api_url}/metrics"
        host, port = self.metrics_address
        host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        return f"http://{host}:{port}/metrics"

    @classmethod
    def env_names(cls) -> frozenset[str]:
        """Every environment variable this class reads, in upper case."""
        prefix = str(cls.model_config.get("env_prefix", ""))
        names: set[str] = set()
        for name, field in cls.model_fields.items():
            alias = field.validation_alias
            if isinstance(alias, AliasChoices):
                names.update(str(choice).upper() for choice in alias.choices)
            else:
                names.add(f"{prefix}{name}".upper())
        return frozenset(names)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return Settings()
