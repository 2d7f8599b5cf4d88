"""The `loraplex` commands from a shell; `serve`'s flags are the config fields, with the configs' defaults.

`generate` prints the same completion the engine API returns; `serve` has one flag (and one
`LORAPLEX_*` variable) per `EngineConfig` / `ServerConfig` field, whose values build the configs
the server runs with, refused by the configs' own bounds; the README's flag and field tables
list exactly those, with the same defaults.
"""

import re
import subprocess
import sys
from itertools import dropwhile, takewhile
from pathlib import Path

import pytest
import typer
from pydantic_core import PydanticUndefined

from live_server import cli_env
from loraplex.cli import PLAN_ENGINE_FIELDS, app, serve_config
from loraplex.cli_options import OptionError
from loraplex.config import EngineConfig, ServerConfig
from loraplex.engine.engine import Engine
from loraplex.engine.request import SamplingParams

LORAPLEX = str(Path(sys.executable).with_name("loraplex"))
SERVE_FIELDS = [
    *(name for name in EngineConfig.model_fields if name not in ("enable_lora", "tenant_weights")),
    *(name for name in ServerConfig.model_fields if name != "engine"),
]
README = Path(__file__).resolve().parents[1] / "README.md"


def command_params(name: str) -> dict[str, typer.core.TyperOption]:
    """A command's options, by flag."""
    return {param.opts[0]: param for param in typer.main.get_command(app).commands[name].params if param.name != "help"}


def serve_options(*args: str) -> dict:
    """The option values `loraplex serve ARGS` would run with (environment included), by field name."""
    with typer.main.get_command(app).commands["serve"].make_context("serve", list(args)) as ctx:
        return ctx.params


def shown_default(param: typer.core.TyperOption) -> str:
    """The default an option's --help gives: its value, a stand-in's text, or the description's "(default: ...)"."""
    if isinstance(param.show_default, str):
        return param.show_default
    if param.default not in (None, [], ()):
        return str(param.default)
    stated = re.search(r"\(default: ([^)]*)\)", param.help)
    return stated[1] if stated else "none"


def readme_table(heading: str) -> dict[str, list[str]]:
    """The rows of the first table under `heading` in README.md, by first cell; backticks dropped."""
    lines = README.read_text().split(f"\n{heading}\n", 1)[1].splitlines()
    table = list(takewhile(lambda line: line.startswith("|"), dropwhile(lambda line: not line.startswith("|"), lines)))
    rows = [[cell.strip().replace("`", "") for cell in line.strip("|").split("|")] for line in table[2:]]
    return {row[0]: row[1:] for row in rows}


def test_generate_prints_the_adapters_greedy_completion(llama):
    adapter = llama.adapter_dirs["r8-attn"]
    result = subprocess.run(
        [LORAPLEX, "generate", "--model", str(llama.model_dir), "--adapter", str(adapter),
         "--prompt", "name: Ada, city: Paris", "--max-tokens", "12"],
        capture_output=True, text=True, timeout=300, check=True,
    )
    engine = Engine(EngineConfig(model=str(llama.model_dir)))
    engine.load_adapter(adapter.name, adapter)
    prompt_ids = engine.base.tokenizer("name: Ada, city: Paris")["input_ids"]
    expected = engine.generate([prompt_ids], [adapter.name], SamplingParams(max_tokens=12, temperature=0))[0]
    assert result.stdout == expected.text + "\n"
    assert "finish reason" in result.stderr


def test_generate_reports_a_bad_model_directory(tmp_path):
    result = subprocess.run(
        [LORAPLEX, "generate", "--model", str(tmp_path), "--prompt", "hi"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2
    assert "config.json is missing" in result.stderr


def test_serve_has_a_flag_for_every_config_field_but_enable_lora_and_engine():
    assert list(command_params("serve")) == ["--" + name.replace("_", "-") for name in SERVE_FIELDS]


def test_serve_help_shows_each_flag_its_variable_and_the_configs_default():
    result = subprocess.run([LORAPLEX, "serve", "--help"], capture_output=True, text=True, timeout=300, check=True,
                            env=cli_env(COLUMNS="400"))
    rows = {line.strip("│ ").split(" ")[0]: line for line in result.stdout.splitlines() if line.strip("│ ").startswith("--")}
    for name in SERVE_FIELDS:
        field = (EngineConfig if name in EngineConfig.model_fields else ServerConfig).model_fields[name]
        row = rows["--" + name.replace("_", "-")]
        assert f"LORAPLEX_{name.upper()}" in row and field.description in row
        if isinstance(field.default, bool):  # typer names a switch's default by its flag
            assert f"[default: {'' if field.default else 'no-'}{name.replace('_', '-')}]" in row
        elif field.default not in (None, (), PydanticUndefined):
            assert f"[default: {field.default}]" in row
    assert "[default: (the bundled demo)]" in rows["--model"]


def test_serve_flags_left_unset_run_the_configs_defaults(tmp_path):
    config = serve_config(serve_options("--model", str(tmp_path)))
    assert config == ServerConfig(engine=EngineConfig(model=str(tmp_path)))
    assert config.engine.max_queue == 256


def test_the_token_budget_block_size_and_kv_size_reach_the_engine_config(tmp_path):
    args = ["--model", str(tmp_path), "--max-num-batched-tokens", "1024", "--block-size", "32", "--num-kv-blocks", "300"]
    engine = serve_config(serve_options(*args)).engine
    assert engine == EngineConfig(model=str(tmp_path), max_num_batched_tokens=1024, block_size=32, num_kv_blocks=300)


def test_every_serve_flag_reads_its_environment_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAPLEX_MODEL", str(tmp_path))
    monkeypatch.setenv("LORAPLEX_MAX_QUEUE", "7")
    monkeypatch.setenv("LORAPLEX_LORA_ROOTS", "/srv/a:/srv/b")
    monkeypatch.setenv("LORAPLEX_METRICS_COMPAT", "vllm")
    config = serve_config(serve_options())
    assert (config.engine.model, config.engine.max_queue) == (str(tmp_path), 7)
    assert (config.lora_roots, config.metrics_compat) == ((Path("/srv/a"), Path("/srv/b")), "vllm")
    assert all(param.envvar == "LORAPLEX_" + param.name.upper() for param in command_params("serve").values())


@pytest.mark.parametrize(
    ("flag", "value", "reason"),
    [
        ("--max-loras", "0", "greater than or equal to 1"),
        ("--max-num-batched-tokens", "8", "greater than or equal to 16"),
        ("--block-size", "0", "greater than or equal to 1"),
        ("--port", "70000", "less than or equal to 65535"),
        ("--chat-template-timeout", "0.0", "greater than 0"),
    ],
)
def test_serve_refuses_a_value_outside_the_configs_bounds_naming_the_flag(tmp_path, flag, value, reason):
    with pytest.raises(OptionError, match=f"^{flag} {value}: Input should be {reason}$"):
        serve_config(serve_options("--model", str(tmp_path), flag, value))


def test_serve_exits_2_on_an_out_of_bounds_flag(tmp_path):
    result = subprocess.run(
        [LORAPLEX, "serve", "--model", str(tmp_path), "--max-loras", "0"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 2
    assert "--max-loras 0: Input should be greater than or equal to 1" in result.stderr


def test_the_readme_serve_table_lists_exactly_the_serve_flags_with_their_defaults():
    table = readme_table("## Serve")
    params = command_params("serve")
    assert set(table) == set(params)
    for flag, (env, default, _meaning) in table.items():
        assert env == params[flag].envvar, flag
        expected = shown_default(params[flag])
        assert default == expected or default.startswith(expected + " ("), flag


def test_the_readme_engine_config_table_lists_every_field_with_its_default():
    table = readme_table("## Configuration (`EngineConfig`)")
    assert list(table) == list(EngineConfig.model_fields)
    for name, (default, _meaning) in table.items():
        field = EngineConfig.model_fields[name]
        stated = re.search(r"\(default: ([^)]*)\)", field.description)
        expected = "required" if field.is_required() else str(field.default) if field.default is not None else stated[1]
        assert default == expected, name


@pytest.mark.parametrize("command", ["plan", "generate"])
def test_plan_and_generate_take_their_engine_options_from_engine_config(command):
    params = command_params(command)
    names = PLAN_ENGINE_FIELDS if command == "plan" else ("model", "dtype", "device", "quantize")
    for name in names:
        field, param = EngineConfig.model_fields[name], params["--" + name.replace("_", "-")]
        assert param.help.startswith(field.description)
        assert param.required if field.is_required() else param.default == field.default
    if command == "plan":
        assert "here auto is bfloat16" in params["--dtype"].help


def test_serve_reports_a_bad_api_keys_file_and_exits(llama, tmp_path):
    keys = tmp_path / "keys.toml"
    keys.write_text('[[keys]]\nkey = "short"\ntenant = "acme"\n')
    result = subprocess.run(
        [LORAPLEX, "serve", "--model", str(llama.model_dir), "--api-keys", str(keys), "--adapters", str(tmp_path / "a")],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2
    assert "at least 8 characters" in result.stderr and "short" not in result.stderr.replace("key = ", "")


def test_plan_prints_every_figure_from_the_config_alone(llama):
    result = subprocess.run(
        [LORAPLEX, "plan", "--model", str(llama.model_dir / "config.json"), "--dtype", "float32", "--max-loras", "4"],
        capture_output=True, text=True, timeout=300, check=True, env=cli_env(COLUMNS="200"),
    )  # fmt: skip
    for label in ("base weights", "KV cache", "adapter slots", "host memory per adapter", "full finetune", "LoRA finetune"):
        assert label in result.stdout


def test_plan_reports_a_missing_model(tmp_path):
    result = subprocess.run(
        [LORAPLEX, "plan", "--model", str(tmp_path / "absent")],
        capture_output=True, text=True, timeout=300, env=cli_env(COLUMNS="300"),
    )  # fmt: skip
    assert result.returncode == 2
    assert "does not exist" in result.stderr


def test_export_writes_a_checkpoint_from_a_store_adapter_and_refuses_to_overwrite(llama, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    (store / "acme").symlink_to(llama.adapter_dirs["r4-qv"], target_is_directory=True)
    command = [LORAPLEX, "export", "--model", str(llama.model_dir), "--adapters", str(store), "--adapter", "acme"]
    wide = cli_env(COLUMNS="300")  # rich wraps at the terminal width
    first = subprocess.run([*command, "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=300, env=wide)
    assert first.returncode == 0, first.stderr
    assert "merged acme into 4 weights" in first.stderr
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {path.name for path in (tmp_path / "out").iterdir()}
    again = subprocess.run([*command, "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=300, env=wide)
    assert again.returncode == 2 and "not empty" in again.stderr
