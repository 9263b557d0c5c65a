"""Configuration: defaults, a TOML file, the environment, command-line overrides."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import modelyard.config
from modelyard.config import (
    DEFAULT_MODEL_ID,
    DEFAULT_MODEL_SOURCE,
    Config,
    ConfigError,
    EngineConfig,
    load_config,
    with_overrides,
)


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "modelyard.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_without_a_file() -> None:
    config = load_config(None, environ={})
    assert config.host == "127.0.0.1"
    assert config.port == 8000
    assert config.engine == EngineConfig()
    assert config.model.id == DEFAULT_MODEL_ID
    assert config.model.source == DEFAULT_MODEL_SOURCE
    assert config.models_dir == config.data_dir / "models"


def test_values_from_a_toml_file(tmp_path: Path) -> None:
    path = write_config(tmp_path, f"""
host = "0.0.0.0"
port = 9001
data_dir = "{tmp_path / 'data'}"
log_level = "debug"

[model]
id = "my-model"
source = "/models/m.gguf"
default_max_tokens = 256

[engine]
max_sequences = 4
context_per_sequence = 1024
step_token_budget = 128
max_waiting = 10
threads = 2
flash_attention = true
""")
    config = load_config(path, environ={})
    assert (config.host, config.port, config.log_level) == ("0.0.0.0", 9001, "debug")
    assert config.data_dir == tmp_path / "data"
    assert config.models_dir == tmp_path / "data" / "models"
    assert (config.model.id, config.model.source) == ("my-model", "/models/m.gguf")
    assert config.model.default_max_tokens == 256
    assert config.engine == EngineConfig(max_sequences=4, context_per_sequence=1024,
                                         step_token_budget=128, max_waiting=10, threads=2,
                                         gpu_layers=0, flash_attention=True)


def test_a_partial_section_keeps_the_other_defaults(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, "[engine]\nmax_sequences = 2\n"), environ={})
    assert config.engine.max_sequences == 2
    assert config.engine.context_per_sequence == EngineConfig().context_per_sequence


def test_drafting_from_the_accounts_outputs_is_on_unless_turned_off(tmp_path: Path) -> None:
    assert load_config(None, environ={}).engine.speculation_history is True
    path = write_config(tmp_path, "[engine]\nspeculation = true\nspeculation_history = false\n")
    engine = load_config(path, environ={}).engine
    assert (engine.speculation, engine.speculation_history) == (True, False)


def test_interrupting_heavy_steps_is_on_unless_the_file_turns_it_off(tmp_path: Path) -> None:
    assert EngineConfig().interrupt_heavy_steps is True
    assert load_config(None, environ={}).engine.interrupt_heavy_steps is True
    path = write_config(tmp_path, "[engine]\ninterrupt_heavy_steps = false\n")
    engine = load_config(path, environ={}).engine
    assert engine.interrupt_heavy_steps is False
    assert engine.pause_heavy_every == EngineConfig().pause_heavy_every   # only the switch


def test_data_dir_expands_the_home_directory(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    config = load_config(write_config(tmp_path, 'data_dir = "~/my-data"\n'), environ={})
    assert config.data_dir == tmp_path / "my-data"


def test_env_data_dir_overrides_the_file(tmp_path: Path) -> None:
    path = write_config(tmp_path, f'data_dir = "{tmp_path / "from-file"}"\n')
    config = load_config(path, environ={"MODELYARD_DATA_DIR": str(tmp_path / "from-env")})
    assert config.data_dir == tmp_path / "from-env"


def test_env_data_dir_is_read_from_the_process_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MODELYARD_DATA_DIR", str(tmp_path / "env-data"))
    assert load_config().data_dir == tmp_path / "env-data"


def test_empty_env_data_dir_is_ignored(tmp_path: Path) -> None:
    path = write_config(tmp_path, f'data_dir = "{tmp_path / "from-file"}"\n')
    assert load_config(path, environ={"MODELYARD_DATA_DIR": ""}).data_dir == tmp_path / "from-file"


@pytest.mark.parametrize(
    ("text", "names"),
    [
        # unknown keys
        ("colour = 'blue'\n", ["colour"]),
        ("[engine]\nmax_sequence = 2\n", ["engine", "max_sequence"]),
        ("[model]\nname = 'x'\n", ["model", "name"]),
        # wrong types
        ("port = '8000'\n", ["port"]),
        ("port = true\n", ["port"]),
        ("host = 1\n", ["host"]),
        ("log_level = false\n", ["log_level"]),
        ("data_dir = 5\n", ["data_dir"]),
        ("engine = 5\n", ["engine"]),
        ("model = 'x'\n", ["model"]),
        ("[engine]\nmax_sequences = '2'\n", ["engine.max_sequences"]),
        ("[engine]\nmax_sequences = 2.0\n", ["engine.max_sequences"]),
        ("[engine]\nthreads = true\n", ["engine.threads"]),
        ("[engine]\nflash_attention = 1\n", ["engine.flash_attention"]),
        ("[engine]\ninterrupt_heavy_steps = 'yes'\n", ["engine.interrupt_heavy_steps"]),
        ("[engine]\ninterrupt_heavy_steps = 1\n", ["engine.interrupt_heavy_steps"]),
        ("[engine]\ninterrupt_heavy_steps = 0\n", ["engine.interrupt_heavy_steps"]),
        ("[engine]\nspeculation_history = 'no'\n", ["engine.speculation_history"]),
        ("[engine]\nkv_cache_type = 8\n", ["engine.kv_cache_type"]),
        ("[engine]\nkv_cache_type = 'q4_0'\n", ["engine.kv_cache_type"]),
        ("[engine]\nkv_cache_type = 'Q8_0'\n", ["engine.kv_cache_type"]),
        ("[engine]\nflash_attention = false\nkv_cache_type = 'q8_0'\n",
         ["engine.kv_cache_type", "engine.flash_attention = true"]),
        ("[model]\nid = 5\n", ["model.id"]),
        ("[model]\ndefault_max_tokens = '100'\n", ["model.default_max_tokens"]),
        ("[model]\ndefault_max_tokens = true\n", ["model.default_max_tokens"]),
        # out of range
        ("[engine]\nmax_sequences = 0\n", ["engine.max_sequences"]),
        ("[engine]\nmax_sequences = 257\n", ["engine.max_sequences"]),
        ("[engine]\ncontext_per_sequence = 63\n", ["engine.context_per_sequence"]),
        ("[engine]\nmax_sequences = 8\nstep_token_budget = 7\n", ["engine.step_token_budget"]),
        ("[engine]\nmax_waiting = -1\n", ["engine.max_waiting"]),
        ("[engine]\nthreads = -1\n", ["engine.threads"]),
        ("[engine]\ngpu_layers = -1\n", ["engine.gpu_layers"]),
        ("port = 65536\n", ["port"]),
        ("port = -1\n", ["port"]),
        ("[model]\nid = ''\n", ["model.id"]),
        ("[model]\ndefault_max_tokens = 0\n", ["model.default_max_tokens"]),
    ],
)
def test_bad_values_raise_config_error_naming_the_key(
    tmp_path: Path, text: str, names: list[str]
) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write_config(tmp_path, text), environ={})
    for name in names:
        assert name in str(info.value)


@pytest.mark.parametrize(
    "text",
    [
        "port = 0\n",                                      # any free port
        "port = 65535\n",
        "[engine]\nmax_sequences = 256\nstep_token_budget = 256\n",
        "[engine]\ncontext_per_sequence = 64\n",
        "[engine]\nmax_waiting = 0\n",
        "[engine]\nkv_cache_type = 'q8_0'\n",
        "[engine]\nflash_attention = true\nkv_cache_type = 'q8_0'\n",
        "[engine]\nflash_attention = false\nkv_cache_type = 'f16'\n",
        "[model]\ndefault_max_tokens = 1\n",
    ],
)
def test_boundary_values_are_accepted(tmp_path: Path, text: str) -> None:
    assert isinstance(load_config(write_config(tmp_path, text), environ={}), Config)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml", environ={})


def test_invalid_toml_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write_config(tmp_path, "port = \n"), environ={})


# -- with_overrides ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "model_id"),
    [
        ("/models/My-Model.Q4_K_M.gguf", "My-Model.Q4_K_M"),
        ("relative/dir/tiny.gguf", "tiny"),
        ("hf:owner/repo/file-q8.gguf", "file-q8"),
        ("pypi:some-model", "some-model"),
    ],
)
def test_model_override_derives_the_model_id(source: str, model_id: str) -> None:
    config = with_overrides(load_config(None, environ={}), model=source)
    assert config.model.source == source
    assert config.model.id == model_id


def test_explicit_model_id_wins_over_the_derived_one() -> None:
    config = with_overrides(load_config(None, environ={}), model="/m/x.gguf", model_id="chosen")
    assert (config.model.source, config.model.id) == ("/m/x.gguf", "chosen")


def test_default_source_keeps_the_default_id() -> None:
    config = with_overrides(load_config(None, environ={}), model=DEFAULT_MODEL_SOURCE)
    assert config.model.id == DEFAULT_MODEL_ID


def test_default_source_keeps_a_configured_id(tmp_path: Path) -> None:
    base = load_config(write_config(tmp_path, "[model]\nid = 'my-alias'\n"), environ={})
    assert with_overrides(base, model=DEFAULT_MODEL_SOURCE).model.id == "my-alias"
    assert with_overrides(base, model="/m/other.gguf").model.id == "other"


def test_model_id_alone_renames_the_model() -> None:
    config = with_overrides(load_config(None, environ={}), model_id="alias")
    assert (config.model.source, config.model.id) == (DEFAULT_MODEL_SOURCE, "alias")


def test_none_means_not_given() -> None:
    base = load_config(None, environ={})
    assert with_overrides(base, host=None, port=None, model=None, model_id=None) == base


def test_host_and_port_overrides_are_validated() -> None:
    base = load_config(None, environ={})
    config = with_overrides(base, host="0.0.0.0", port=1234)
    assert (config.host, config.port) == ("0.0.0.0", 1234)
    with pytest.raises(ConfigError, match="port"):
        with_overrides(base, port=70000)
    with pytest.raises(ConfigError, match=r"model\.id"):
        with_overrides(base, model_id="")


CATALOG = """
[[models]]
id = "deepseek-ai/DeepSeek-V3"
input_price = 0.27
output_price = 1.1
capabilities = ["tools", "reasoning"]
[models.defaults]
temperature = 0.6
[[models.deployments]]
base_url = "http://10.0.0.5:8000/v1"
api_key_env = "VLLM_KEY"
upstream_model = "deepseek-v3"
profile = "vllm"
weight = 3
[[models.deployments]]
base_url = "http://10.0.0.6:8000/v1"
profile = "sglang"
"""


def test_a_catalog_of_upstream_models(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, CATALOG), environ={"VLLM_KEY": "x"})
    [model] = config.models
    assert model.id == "deepseek-ai/DeepSeek-V3" and model.defaults.given() == {"temperature": 0.6}
    assert [d.profile for d in model.deployments] == ["vllm", "sglang"]
    assert model.deployments[0].weight == 3.0 and model.capabilities == ("tools", "reasoning")
    assert not config.local_model  # [[models]] without [model]: no built-in engine
    config = load_config(write_config(tmp_path, "[model]\n" + CATALOG),
                         environ={"VLLM_KEY": "x"})
    assert config.local_model


@pytest.mark.parametrize(("edit", "message"), [
    (('profile = "vllm"', 'profile = "tgi"'), r"deployments\[0\]\.profile must be one of"),
    (("weight = 3", "weight = 0"), r"DeepSeek-V3\)\.deployments\[0\]\.weight must be > 0"),
    (('api_key_env = "VLLM_KEY"', 'api_key_env = "sk-abc-123"'), "name an environment"),
    (('api_key_env = "VLLM_KEY"', 'api_key_env = "MISSING"'), "MISSING is not set"),
    (('base_url = "http://10.0.0.6:8000/v1"', 'base_url = "10.0.0.6"'), r"\[1\]\.base_url"),
    (("weight = 3", "wieght = 3"), r"unknown key in .*deployments\[0\]: wieght"),
    (('capabilities = ["tools", "reasoning"]', 'capabilities = ["telepathy"]'), "capabilities"),
])
def test_bad_catalog_entries_are_named(tmp_path: Path, edit: tuple[str, str],
                                       message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(write_config(tmp_path, CATALOG.replace(*edit)), environ={"VLLM_KEY": "x"})


def test_a_model_may_mix_one_local_deployment_with_upstreams(tmp_path: Path) -> None:
    mixed = CATALOG + '[[models.deployments]]\nkind = "local"\nweight = 2\n'
    config = load_config(write_config(tmp_path, mixed), environ={"VLLM_KEY": "x"})
    assert [d.kind for d in config.models[0].deployments] == ["openai", "openai", "local"]
    assert config.local_model  # the engine runs for its local deployment
    assert not config.engine_model_listed  # but only as that catalog model, at its prices
    with pytest.raises(ConfigError, match="at most one local deployment"):
        load_config(write_config(tmp_path, mixed + '[[models.deployments]]\nkind = "local"\n'),
                    environ={"VLLM_KEY": "x"})


def test_an_error_names_the_file_and_the_key(tmp_path: Path) -> None:
    path = write_config(tmp_path, "[engine]\nthreads = -1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert str(info.value) == f"{path}: engine.threads must be >= 0"


def test_catalog_defaults_keep_each_fields_type(tmp_path: Path) -> None:
    text = CATALOG.replace("temperature = 0.6", "temperature = 1\ntop_k = 50")
    [model] = load_config(write_config(tmp_path, text), environ={"VLLM_KEY": "x"}).models
    given = model.defaults.given()
    assert given == {"temperature": 1.0, "top_k": 50}
    assert type(given["top_k"]) is int and type(given["temperature"]) is float  # not 50.0
    for bad, message in (("top_k = 50.5", r"defaults\.top_k must be an integer"),
                         ("top_p = 0", r"defaults\.top_p must be > 0"),
                         ("topk = 5", r"unknown key in .*defaults: topk")):
        with pytest.raises(ConfigError, match=message):
            load_config(write_config(tmp_path, CATALOG.replace("temperature = 0.6", bad)),
                        environ={"VLLM_KEY": "x"})


def test_sections_built_in_code_are_validated_too() -> None:
    with pytest.raises(ValueError, match="max_sequences"):
        EngineConfig(max_sequences=0)
    with pytest.raises(ValueError, match="Unexpected keyword argument"):
        EngineConfig(max_sequence=2)  # type: ignore[call-arg]


def test_the_config_imports_nothing_from_the_layers_above_it() -> None:
    package = Path(modelyard.config.__file__).parent
    modules = sorted(package.glob("*.py"))
    assert len(modules) > 1   # the package's modules, not only its __init__
    for module in modules:
        tree = ast.parse(module.read_text(encoding="utf-8"))
        imported = [node.module or "" for node in ast.walk(tree)
                    if isinstance(node, ast.ImportFrom) and not node.level]
        imported += [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                     for alias in node.names]
        assert not [name for name in imported if name.startswith("modelyard.")
                    and not name.startswith("modelyard.config")
                    and name not in ALLOWED_CONFIG_IMPORTS], module.name


ALLOWED_CONFIG_IMPORTS = ("modelyard.units", "modelyard.errors", "modelyard.sampling")


def test_the_embedding_model_is_on_by_default() -> None:
    embedding = load_config(None, environ={}).embedding
    assert (embedding.enabled, embedding.id, embedding.source, embedding.input_price) == (
        True, "all-minilm-l6-v2", "pypi:all-minilm-l6-v2", 0.0)
    assert (embedding.batch_size, embedding.truncatable) == (512, False)


def test_an_embedding_table_and_an_embedding_catalog_model(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, """
[embedding]
id = "mini"
input_price = 0.02
threads = 2
batch_size = 1024

[[models]]
id = "up/embed"
task = "embedding"
input_price = 0.1
[[models.deployments]]
base_url = "http://10.0.0.5:8000/v1"
"""), environ={})
    assert (config.embedding.id, config.embedding.input_price, config.embedding.threads,
            config.embedding.batch_size) == ("mini", 0.02, 2, 1024)
    assert [(m.id, m.task) for m in config.models] == [("up/embed", "embedding")]


@pytest.mark.parametrize(("text", "message"), [
    ("[embedding]\nbatch_size = 32\n", "embedding.batch_size must be >= 64"),
    ("[embedding]\nenabled = 1\n", "embedding.enabled must be true or false"),
    ("[embedding]\ninput_price = -1.0\n", "embedding.input_price"),
    ("[embedding]\nbatch = 64\n", "unknown key in embedding: batch"),
    ('[embedding]\nid = "qwen2.5-coder-0.5b-instruct"\n', "already a model's"),
    ('[[models]]\nid = "e"\ntask = "rerank"\n[[models.deployments]]\n'
     'base_url = "http://h/v1"\n', "models[0] (e).task must be one of"),
    ('[[models]]\nid = "e"\ntask = "embedding"\n[[models.deployments]]\nkind = "local"\n',
     "openai deployments only"),
])
def test_bad_embedding_settings_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(write_config(tmp_path, text), environ={})


def test_a_disabled_embedding_model_takes_no_id(tmp_path: Path) -> None:
    config = load_config(write_config(
        tmp_path, '[embedding]\nenabled = false\nid = "qwen2.5-coder-0.5b-instruct"\n'),
        environ={})
    assert not config.embedding.enabled
