"""`loraplex serve` as vLLM users start it: `--lora-modules NAME=PATH`, one `--api-key`, and a start-up that says
which adapter store it serves (run outside the repository, `./adapters` is another, empty directory).
"""

import shutil
from pathlib import Path

import httpx
import openai
import pytest

from live_server import LiveServer, server_config
from loraplex.cli import serve_config
from loraplex.cli_options import OptionError
from loraplex.config import EngineConfig, ServerConfig
from test_cli import serve_options
from test_serve_process import ServeProcess, free_port

KEY = "sk-only-key-3e9c1a"


def test_serve_takes_repeated_lora_modules_and_one_api_key(tmp_path):
    options = serve_options("--model", str(tmp_path), "--lora-modules", "a=/srv/a", "--lora-modules", "b=/srv/b", "--api-key", KEY)
    config = serve_config(options)
    assert config.lora_module_paths() == [("a", Path("/srv/a")), ("b", Path("/srv/b"))]
    assert config.api_key == KEY and KEY not in repr(config)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"lora_modules": ("just-a-name",)}, "--lora-modules 'just-a-name': expected NAME=PATH"),
        ({"lora_modules": ("=/srv/a",)}, "--lora-modules '=/srv/a': expected NAME=PATH"),
        ({"lora_modules": ("a=/srv/a", "a=/srv/b")}, "--lora-modules names a more than once"),
        ({"lora_modules": ("a=/srv/a",), "merge_adapter": "m"}, "--merge-adapter turns LoRA off"),
        ({"api_key": KEY, "api_keys": "keys.toml"}, "not both"),
        ({"api_key": "sk-1234"}, "at least 8 characters"),
        ({"metrics_auth": "key"}, "needs --api-keys or --api-key"),
    ],
    ids=["no-path", "no-name", "twice", "merged", "key-and-file", "short-key", "metrics-auth"],
)
def test_the_config_refuses_bad_entries_naming_them_and_never_shows_the_key(tmp_path, fields, message):
    with pytest.raises(ValueError, match=message) as refused:
        ServerConfig(engine=EngineConfig(model=str(tmp_path)), **fields)
    assert "sk-1234" not in str(refused.value) and KEY not in str(refused.value)


def test_serve_names_the_flag_and_hides_a_short_key(tmp_path):
    with pytest.raises(OptionError) as refused:
        serve_config(serve_options("--model", str(tmp_path), "--api-key", "sk-1234"))
    assert "--api-key must be a string of at least 8 characters" in str(refused.value)
    assert "sk-1234" not in str(refused.value)


def test_a_lora_module_that_cannot_be_served_stops_start_up_naming_it(llama, tmp_path):
    config = server_config(llama.model_dir, tmp_path / "store").model_copy(
        update={"lora_modules": (f"good={llama.adapter_dirs['r4-qv']}", f"ghost={tmp_path / 'missing'}")}
    )
    with pytest.raises(ValueError, match=f"--lora-modules ghost={tmp_path / 'missing'}: "):
        LiveServer(config).__enter__()


def test_serve_outside_the_repository_says_which_store_and_that_it_is_empty(llama, tmp_path, monkeypatch):
    """Run from another directory with a relative --adapters: the store printed is absolute, and empty;
    --lora-modules still serves its adapter, and one --api-key guards every /v1 route (never printed)."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    module = shutil.copytree(llama.adapter_dirs["r4-qv"], tmp_path / "modules" / "sql")
    monkeypatch.chdir(elsewhere)
    server = ServeProcess(
        llama.model_dir, "adapters", free_port(), COLUMNS="1000", LORAPLEX_API_KEY=KEY, LORAPLEX_LORA_MODULES=f"sql={module}"
    )
    try:
        server.wait_ready()
        store = elsewhere / "adapters"
        assert f"adapters in {store}: none" in server.output
        assert f"warning: the adapter store {store} holds no adapter (--adapters adapters is relative" in server.output
        assert "adapters from --lora-modules: sql" in server.output
        assert "no --api-keys" not in server.output
        assert httpx.get(server.url + "/v1/models", timeout=60).status_code == 401
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
        assert [model.id for model in client.models.list()] == ["tiny-base", "sql"]
        assert client.completions.create(model="sql", prompt="hello", max_tokens=2).usage.completion_tokens >= 1
    finally:
        assert server.stop() == 0
    assert KEY not in server.output
