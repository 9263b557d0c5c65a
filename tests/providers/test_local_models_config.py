"""The config of several local models: sources on local deployments, the memory budget
in bytes or as text, and which configs still run the [model] engine."""

from __future__ import annotations

from pathlib import Path

import pytest

from modelyard.config import ConfigError, load_config, parse_bytes
from modelyard.providers.base import ChatRequest
from modelyard.providers.local_models import engine_config, pooled_deployment


def config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "modelyard.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(("text", "expected"), [
    ("4GiB", 4 << 30), ("512 MB", 512_000_000), ("1.5GiB", 3 << 29), ("1000", 1000),
    ("64kib", 65536)])
def test_byte_sizes_as_text(text: str, expected: int) -> None:
    assert parse_bytes(text) == expected


def test_a_local_deployment_with_a_source_has_an_engine_of_its_own(tmp_path: Path) -> None:
    loaded = load_config(config(tmp_path, """
[engine]
memory_budget = "2GiB"
idle_unload_seconds = 60.0

[[models]]
id = "gemma"
deployments = [{kind = "local", source = "pypi:gemma3-270m", preload = true}]

[[models]]
id = "coder"
deployments = [{kind = "local"}]
"""))
    assert loaded.engine.memory_budget == 2 << 30
    gemma, coder = loaded.models
    pooled = pooled_deployment(gemma)
    assert pooled is not None and pooled.source == "pypi:gemma3-270m" and pooled.preload
    assert pooled_deployment(coder) is None  # no source: the [model] engine, as before
    assert loaded.local_model and not loaded.engine_model_listed


def test_speculation_is_switched_per_local_model(tmp_path: Path) -> None:
    """Each pooled model's engine takes its deployment's speculation switch, and [engine]'s
    other settings (interrupt_heavy_steps here) whether it has a switch or not."""
    loaded = load_config(config(tmp_path, """
[engine]
speculation = false
interrupt_heavy_steps = false

[[models]]
id = "editor"
deployments = [{kind = "local", source = "/models/coder.gguf", speculation = true}]

[[models]]
id = "chat"
deployments = [{kind = "local", source = "/models/gemma.gguf"}]
"""))
    engines = {model.id: engine_config(loaded, model, pooled).engine
               for model in loaded.models if (pooled := pooled_deployment(model))}
    assert {name: engine.speculation for name, engine in engines.items()} == {
        "editor": True, "chat": False}
    assert [engine.interrupt_heavy_steps for engine in engines.values()] == [False, False]
    editor = engine_config(loaded, loaded.models[0], loaded.models[0].deployments[0])
    assert editor.model.id == "editor" and editor.model.source == "/models/coder.gguf"
    assert not loaded.engine.speculation   # the [model] engine's own switch is unchanged


def test_only_pooled_models_start_no_model_engine(tmp_path: Path) -> None:
    loaded = load_config(config(tmp_path, """
[[models]]
id = "gemma"
deployments = [{kind = "local", source = "/models/gemma.gguf", idle_unload_seconds = 5.0}]
"""))
    assert not loaded.local_model


@pytest.mark.parametrize(("text", "message"), [
    ('[[models]]\nid = "m"\ndeployments = [{kind = "local", preload = true}]',
     r"models\[0\] \(m\).deployments\[0\].preload needs a `source`"),
    ('[[models]]\nid = "m"\ndeployments = [{base_url = "http://h/v1", source = "x.gguf"}]',
     r"deployments\[0\].source is for local deployments only"),
    ('[[models]]\nid = "m"\ndeployments = [{kind = "local", speculation = true}]',
     r"deployments\[0\].speculation needs a `source`"),
    ('[[models]]\nid = "m"\ndeployments = [{kind = "local", source = "x.gguf", '
     'speculation = "yes"}]', r"deployments\[0\].speculation"),
    ('[engine]\nmemory_budget = "lots"', "engine.memory_budget must be a number of bytes"),
    ('[engine]\nmemory_budget = -1', "engine.memory_budget must be >= 0"),
])
def test_mistakes_name_their_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(config(tmp_path, text))


def test_the_pool_a_config_names(tmp_path: Path) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from modelyard.providers.local_models import build_local_models
    from tests.models.test_gguf_memory import write_model

    write_model(tmp_path / "tiny.gguf", 2)
    loaded = load_config(config(tmp_path, f"""
[engine]
max_sequences = 2
context_per_sequence = 256

[[models]]
id = "tiny"
default_max_tokens = 7
capabilities = ["json_schema"]
deployments = [{{kind = "local", source = "{tmp_path / 'tiny.gguf'}"}}]
"""))
    registry = CollectorRegistry()
    pool, models = build_local_models(loaded, registry, metrics=None, progress=False)
    assert pool is not None and list(models) == ["tiny"]
    described = models["tiny"].describe()
    assert described["state"] == "unloaded" and described["context_length"] == 256
    assert described["capabilities"]["json_schema"] and not described["capabilities"]["tools"]
    # the file, 512 cells x 4 layers x 2 KV heads x (64 + 32) values x 2 bytes, 2 x 1000 logits
    assert described["memory_bytes"] == (tmp_path / "tiny.gguf").stat().st_size \
        + 512 * 4 * 2 * 96 * 2 + 2 * 1000 * 4
    assert models["tiny"].max_tokens_bound(ChatRequest("r", [])) == 7
    exposed = generate_latest(registry).decode()
    assert 'modelyard_local_model_state{model="tiny",state="unloaded"} 1.0' in exposed
