"""The platform's settings in the config: prices, database, Redis, [platform]."""

from __future__ import annotations

from pathlib import Path

import pytest

from modelyard.config import Config, ConfigError, PlatformConfig, load_config
from modelyard.platform.service import price_table, safe_url


def load(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> Config:
    path = tmp_path / "modelyard.toml"
    path.write_text(text)
    return load_config(path, environ=environ or {})


def test_defaults_are_free_sqlite_in_the_data_dir_and_limits_in_process(
        tmp_path: Path) -> None:
    config = load(tmp_path, f'data_dir = "{tmp_path}"\n')
    assert config.platform == PlatformConfig()
    assert config.platform_database_url == f"sqlite:///{tmp_path / 'modelyard.db'}"
    assert config.redis_url is None
    assert price_table(config)[config.model.id].is_free


def test_prices_database_redis_and_platform_settings(tmp_path: Path) -> None:
    config = load(tmp_path, """
database_url = "postgresql://db/modelyard"
redis_url = "redis://cache:6379/0"

[model]
input_price = 0.15
cached_input_price = 0.075
output_price = 2

[platform]
reservation_ttl_seconds = 5
sweep_interval_seconds = 1.5
usage_retention_days = 30
key_cache_seconds = 1
redis_prefix = "gw"
""")
    assert config.platform_database_url == "postgresql://db/modelyard"
    assert config.redis_url == "redis://cache:6379/0"
    price = price_table(config)[config.model.id]
    assert (price.input, price.cached_input, price.output) == (150_000, 75_000, 2_000_000)
    assert config.platform == PlatformConfig(5.0, 1.5, 30, 1.0, "gw")


def test_the_environment_names_the_database_and_redis(tmp_path: Path) -> None:
    config = load(tmp_path, 'database_url = "sqlite:///a.db"\n', environ={
        "MODELYARD_DATABASE_URL": "postgresql://x/y", "MODELYARD_REDIS_URL": "redis://r"})
    assert (config.database_url, config.redis_url) == ("postgresql://x/y", "redis://r")


@pytest.mark.parametrize(("text", "message"), [
    ("[model]\ninput_price = -1\n", "input_price"),
    ("[model]\noutput_price = 0.0000001\n", "output_price"),
    ('[model]\ninput_price = "1"\n', "must be a number"),
    ("[platform]\nreservation_ttl_seconds = 0\n", "reservation_ttl_seconds"),
    ("[platform]\nusage_retention_days = -1\n", "usage_retention_days"),
    ("[platform]\nnope = 1\n", "unknown key"),
    ("[platform]\nmax_concurrent_per_key = -1\n", "max_concurrent_per_key"),
    ("[platform]\nmax_request_tokens = 0\n", "max_request_tokens"),
    ("[server]\nbody_timeout_seconds = 0\n", "body_timeout_seconds"),
    ("[server]\nprepare_concurrency = 0\n", "prepare_concurrency"),
    ("[server]\nnope = 1\n", "unknown key"),
    ("database_url = 5\n", "database_url must be a string"),
    ("platform = 3\n", "must be a table"),
])
def test_bad_platform_settings_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(tmp_path, text)


def test_urls_in_messages_hide_the_password() -> None:
    assert "secret" not in safe_url("postgresql://u:secret@h/db")
    assert safe_url("::") == "<the configured URL>"
