"""Deployments of kind "anthropic" and "gemini" in the config file, and the catalog built
from them."""

from __future__ import annotations

from pathlib import Path

import pytest

from modelyard.config import ConfigError, RouterConfig, load_config
from modelyard.providers.anthropic_upstream import AnthropicDeployment
from modelyard.providers.gemini_upstream import GeminiDeployment
from modelyard.router.catalog import RoutedModel, build_catalog

NATIVE = """
[[models]]
id = "claude"
[[models.deployments]]
kind = "anthropic"
base_url = "https://api.anthropic.com/v1"
api_key_env = "ANTHROPIC_KEY"
upstream_model = "claude-sonnet-4-5"

[[models]]
id = "gemini"
[[models.deployments]]
kind = "gemini"
base_url = "https://generativelanguage.googleapis.com/v1beta"
api_key_env = "GEMINI_KEY"
upstream_model = "gemini-2.5-flash"
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "modelyard.toml"
    path.write_text(text)
    return path


def test_native_kinds_load_and_build_their_deployments(tmp_path: Path) -> None:
    environ = {"ANTHROPIC_KEY": "a-key", "GEMINI_KEY": "g-key"}
    config = load_config(_write(tmp_path, NATIVE), environ=environ)
    claude, gemini = config.models
    assert claude.deployments[0].kind == "anthropic"
    assert gemini.deployments[0].kind == "gemini"
    catalog = build_catalog(config.models, RouterConfig(), environ, None)
    anthropic_model, gemini_model = catalog["claude"], catalog["gemini"]
    assert isinstance(anthropic_model, RoutedModel) and isinstance(gemini_model, RoutedModel)
    [route] = anthropic_model.routes
    assert isinstance(route.deployment, AnthropicDeployment)
    assert route.deployment.key_headers("a-key") == {"anthropic-version": "2023-06-01",
                                                     "x-api-key": "a-key"}
    [route] = gemini_model.routes
    assert isinstance(route.deployment, GeminiDeployment)
    assert route.deployment.key_headers("g-key") == {"x-goog-api-key": "g-key"}


def test_a_native_kinds_key_variable_must_be_set(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"deployments\[0\]\.api_key_env: the environment "
                                          r"variable GEMINI_KEY is not set"):
        load_config(_write(tmp_path, NATIVE), environ={"ANTHROPIC_KEY": "a-key"})


@pytest.mark.parametrize("text, error", [
    ('kind = "anthropic"\nbase_url = "api.anthropic.com"', "must be an http:// or https:// URL"),
    ('kind = "claude"\nbase_url = "https://x"', "must be one of"),
])
def test_bad_native_deployments_name_the_key(tmp_path: Path, text: str, error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        load_config(_write(tmp_path, f'[[models]]\nid = "m"\n[[models.deployments]]\n{text}\n'),
                    environ={})


def test_embedding_models_take_no_native_deployments(tmp_path: Path) -> None:
    text = NATIVE.replace('id = "gemini"', 'id = "gemini"\ntask = "embedding"')
    with pytest.raises(ConfigError, match="openai deployments only"):
        load_config(_write(tmp_path, text), environ={"ANTHROPIC_KEY": "a", "GEMINI_KEY": "g"})
