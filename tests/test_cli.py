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
