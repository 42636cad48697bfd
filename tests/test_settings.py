"""Configuration: one class, read from the environment or `.env`, strict about secrets."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from ledger.risk_consumer import RiskThresholds
from paysaga.settings import Settings


def load(monkeypatch: pytest.MonkeyPatch, **env: str) -> Settings:
    for name in Settings.env_names():
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return Settings(_env_file=None)


def test_defaults_run_the_embedded_stack_on_the_documented_ports(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = load(monkeypatch)
    assert settings.uses_embedded_postgres
    assert settings.uses_dev_temporal
    assert settings.temporal_target == "127.0.0.1:7233"
    assert settings.temporal_ui_url == "http://127.0.0.1:8233"
    assert settings.api_url == "http://127.0.0.1:8000"
    assert settings.task_queue == "payments"
    assert settings.data_dir == Path(".paysaga")


@pytest.mark.parametrize(
    ("host", "url"),
    [
        ("::1", "http://[::1]:8000"),
        ("::", "http://127.0.0.1:8000"),
        ("10.0.0.5", "http://10.0.0.5:8000"),
    ],
)
def test_the_api_url_writes_an_ipv6_host_in_brackets(
    monkeypatch: pytest.MonkeyPatch, host: str, url: str
) -> None:
    assert load(monkeypatch, PAYSAGA_API_HOST=host).api_url == url


def test_external_servers_come_from_their_conventional_variables(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = load(
        monkeypatch,
        DATABASE_URL="postgresql://paysaga@db.internal:5432/paysaga",
        TEMPORAL_ADDRESS="temporal.internal:7233",
        TEMPORAL_NAMESPACE="payments-prod",
        PAYSAGA_DATA_DIR="/var/lib/paysaga",
    )
    assert not settings.uses_embedded_postgres
    assert not settings.uses_dev_temporal
    assert settings.temporal_target == "temporal.internal:7233"
    assert settings.temporal_namespace == "payments-prod"
    assert settings.temporal_ui_url is None
    assert settings.data_path == Path("/var/lib/paysaga")


def test_the_services_login_alone_does_not_mean_the_embedded_server(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = load(monkeypatch, DATABASE_APP_URL="postgresql://paysaga_app@db.internal/paysaga")
    assert not settings.uses_embedded_postgres
    assert settings.database_url is None


def test_settings_are_read_from_a_dotenv_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in Settings.env_names():
        monkeypatch.delenv(name, raising=False)
    dotenv = tmp_path / ".env"
    dotenv.write_text("PAYSAGA_API_PORT=9000\nTEMPORAL_NAMESPACE=from-dotenv\n")
    settings = Settings(_env_file=dotenv)
    assert settings.api_port == 9000
    assert settings.temporal_namespace == "from-dotenv"


@pytest.mark.parametrize("env", ["production", "test"])
@pytest.mark.parametrize("secret", [None, "changeme", "short-secret"])
def test_placeholder_secrets_are_refused_outside_development(
    monkeypatch: pytest.MonkeyPatch, env: str, secret: str | None
) -> None:
    extra = {} if secret is None else {"PAYSAGA_API_KEY_SECRET": secret}
    with pytest.raises(ValidationError, match="PAYSAGA_API_KEY_SECRET"):
        load(monkeypatch, PAYSAGA_ENV=env, **extra)


def test_a_real_secret_is_accepted_in_production(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load(
        monkeypatch, PAYSAGA_ENV="production", PAYSAGA_API_KEY_SECRET="x" * 16 + "-real-secret"
    )
    assert settings.env == "production"


def test_the_placeholder_secret_is_fine_in_development(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load(monkeypatch).api_key_secret.get_secret_value() == "dev-insecure-change-me"


def test_the_risk_alert_thresholds_come_from_their_variables(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # `paysaga projector` gives the risk consumer `Settings.risk_thresholds()`;
    # test_projector.py's killed projector, restarted with two of these, alerts by them.
    settings = load(
        monkeypatch,
        PAYSAGA_RISK_ALERT_VELOCITY_WINDOW_S="600",
        PAYSAGA_RISK_ALERT_VELOCITY_COUNT_MAX="7",
        PAYSAGA_RISK_ALERT_AMOUNT_STDDEVS="5",
        PAYSAGA_RISK_ALERT_AMOUNT_HISTORY_MIN="12",
        PAYSAGA_RISK_ALERT_DECLINES_IN_ROW="4",
    )
    assert settings.risk_thresholds() == RiskThresholds(
        velocity_window_s=600,
        velocity_count_max=7,
        amount_stddevs=5,
        amount_history_min=12,
        declines_in_row_max=4,
    )
    assert load(monkeypatch).risk_thresholds() == RiskThresholds(
        velocity_window_s=60,
        velocity_count_max=20,
        amount_stddevs=4,
        amount_history_min=10,
        declines_in_row_max=3,
    )
    with pytest.raises(ValidationError, match="risk_alert_amount_history_min"):
        load(monkeypatch, PAYSAGA_RISK_ALERT_AMOUNT_HISTORY_MIN="1")


def test_secrets_are_not_shown_in_reprs(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load(monkeypatch, PAYSAGA_API_KEY_SECRET="super-secret-value-123")
    assert "super-secret-value-123" not in repr(settings)


@pytest.mark.parametrize(
    ("variable", "value"),
    [("PAYSAGA_API_PORT", "0"), ("PAYSAGA_API_PORT", "port"), ("PAYSAGA_ENV", "staging")],
)
def test_invalid_values_are_refused(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    with pytest.raises(ValidationError, match=variable.removeprefix("PAYSAGA_").lower()):
        load(monkeypatch, **{variable: value})


def test_env_names_lists_every_variable() -> None:
    names = Settings.env_names()
    assert {"DATABASE_URL", "DATABASE_APP_URL", "TEMPORAL_ADDRESS", "TEMPORAL_NAMESPACE"} <= names
    assert {"PAYSAGA_DATA_DIR", "PAYSAGA_API_PORT", "PAYSAGA_API_KEY_SECRET"} <= names
    assert len(names) == len(Settings.model_fields)
