"""`loraplex generate` from a shell prints the same completion the engine API returns."""

import subprocess
import sys
from pathlib import Path

from loraplex.config import EngineConfig
from loraplex.engine.engine import Engine
from loraplex.engine.request import SamplingParams

LORAPLEX = str(Path(sys.executable).with_name("loraplex"))


def test_generate_prints_the_adapters_greedy_completion(llama):
    adapter = llama.adapter_dirs["r8-attn"]
    result = subprocess.run(
        [LORAPLEX, "generate", "--model", str(llama.model_dir), "--adapter", str(adapter),
         "--prompt", "name: Ada, city: Paris", "--max-tokens", "12"],
        capture_output=True, text=True, timeout=120, check=True,
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
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "config.json is missing" in result.stderr


def test_serve_help_names_every_flag_and_its_environment_variable():
    result = subprocess.run([LORAPLEX, "serve", "--help"], capture_output=True, text=True, timeout=120, check=True,
                            env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"})
    for flag in ("model", "served-model-name", "adapters", "quantize", "dtype", "device", "host", "port", "max-loras",
                 "max-lora-rank", "max-num-seqs", "max-model-len", "max-queue", "max-adapter-bytes", "api-keys"):
        assert f"--{flag}" in result.stdout
        assert f"LORAPLEX_{flag.upper().replace('-', '_')}" in result.stdout


def test_serve_reports_a_bad_api_keys_file_and_exits(llama, tmp_path):
    keys = tmp_path / "keys.toml"
    keys.write_text('[[keys]]\nkey = "short"\ntenant = "acme"\n')
    result = subprocess.run(
        [LORAPLEX, "serve", "--model", str(llama.model_dir), "--api-keys", str(keys), "--adapters", str(tmp_path / "a")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "at least 8 characters" in result.stderr and "short" not in result.stderr.replace("key = ", "")


def test_plan_prints_every_figure_from_the_config_alone(llama):
    result = subprocess.run(
        [LORAPLEX, "plan", "--model", str(llama.model_dir / "config.json"), "--dtype", "float32", "--max-loras", "4"],
        capture_output=True, text=True, timeout=120, check=True, env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    for label in ("base weights", "KV cache", "adapter slots", "host memory per adapter", "full finetune", "LoRA finetune"):
        assert label in result.stdout


def test_plan_reports_a_missing_model(tmp_path):
    result = subprocess.run(
        [LORAPLEX, "plan", "--model", str(tmp_path / "absent")],
        capture_output=True, text=True, timeout=120, env={"COLUMNS": "300", "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert result.returncode == 2
    assert "does not exist" in result.stderr


def test_export_writes_a_checkpoint_from_a_store_adapter_and_refuses_to_overwrite(llama, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    (store / "acme").symlink_to(llama.adapter_dirs["r4-qv"], target_is_directory=True)
    command = [LORAPLEX, "export", "--model", str(llama.model_dir), "--adapters", str(store), "--adapter", "acme"]
    wide = {"COLUMNS": "300", "PATH": "/usr/bin:/bin"}  # rich wraps at the terminal width
    first = subprocess.run([*command, "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120, env=wide)
    assert first.returncode == 0, first.stderr
    assert "merged acme into 4 weights" in first.stderr
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {path.name for path in (tmp_path / "out").iterdir()}
    again = subprocess.run([*command, "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120, env=wide)
    assert again.returncode == 2 and "not empty" in again.stderr
