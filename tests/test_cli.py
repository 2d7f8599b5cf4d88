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
