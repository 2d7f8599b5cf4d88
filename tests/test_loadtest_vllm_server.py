"""vLLM's command line and environment as the suite builds them; nothing here needs vLLM installed."""

import sys
from pathlib import Path

import pytest

from loadtest.vllm_server import VllmSetupError, lora_rank, preload_libraries, venv_prefix, vllm_args, vllm_env, vllm_launch


def fake_venv(root: Path, with_iomp: bool = True) -> Path:
    """A virtualenv prefix with (or without) intel-openmp's `lib/libiomp5.so`."""
    (root / "lib").mkdir(parents=True)
    if with_iomp:
        (root / "lib" / "libiomp5.so").write_bytes(b"")
    return root


@pytest.fixture
def tcmalloc(tmp_path) -> Path:
    path = tmp_path / "libtcmalloc_minimal.so.4"
    path.write_bytes(b"")
    return path


def test_the_preloads_are_tcmalloc_then_the_venvs_libiomp5(tmp_path, tcmalloc):
    prefix = fake_venv(tmp_path / "venv")
    assert preload_libraries(prefix, tcmalloc) == [tcmalloc, prefix / "lib" / "libiomp5.so"]


def test_a_venv_without_libiomp5_is_a_clear_error(tmp_path, tcmalloc):
    prefix = fake_venv(tmp_path / "venv", with_iomp=False)
    with pytest.raises(VllmSetupError, match=r"libiomp5\.so is missing.*intel-openmp.*vllm_venv\.sh"):
        preload_libraries(prefix, tcmalloc)


def test_a_system_without_tcmalloc_is_a_clear_error(tmp_path):
    with pytest.raises(VllmSetupError, match="libtcmalloc-minimal4"):
        preload_libraries(fake_venv(tmp_path / "venv"), tmp_path / "missing.so")


def test_the_environment_preloads_sizes_the_kv_cache_and_matches_the_other_servers_threads(tmp_path):
    env = vllm_env([Path("/a/tcmalloc.so"), Path("/venv/lib/libiomp5.so")], threads=3, kv_cache_gib=2)
    assert env == {
        "LD_PRELOAD": "/a/tcmalloc.so:/venv/lib/libiomp5.so",
        "VLLM_CPU_KVCACHE_SPACE": "2",
        "OMP_NUM_THREADS": "3",
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    }


def test_the_prefix_comes_from_the_python_itself():
    assert venv_prefix(Path(sys.executable)) == Path(sys.prefix)


def test_a_missing_python_is_a_clear_error(tmp_path):
    with pytest.raises(VllmSetupError, match="does not exist.*vllm_venv.sh"):
        vllm_launch(tmp_path / "bin" / "python", "cpu", threads=1, kv_cache_gib=2)


def test_a_launch_checks_the_libraries_before_anything_runs(tmp_path, tcmalloc):
    """This test's own python has no intel-openmp under its prefix (the project's venv does not need it)."""
    if (Path(sys.prefix) / "lib" / "libiomp5.so").exists():
        pytest.skip("this interpreter's prefix has libiomp5.so")
    with pytest.raises(VllmSetupError, match="libiomp5.so is missing"):
        vllm_launch(Path(sys.executable), "cpu", threads=1, kv_cache_gib=2, tcmalloc=tcmalloc)


def test_on_a_gpu_nothing_is_preloaded():
    launch = vllm_launch(Path(sys.executable), "cuda", threads=1, kv_cache_gib=2)
    assert launch.env == {}


def test_the_command_serves_the_base_as_base_and_every_adapter_by_name(tmp_path):
    adapters = {f"lora-{index}": tmp_path / f"lora-{index}" for index in range(3)}
    args = vllm_args(tmp_path / "base", adapters, 8123, "float32", 208, 32, 2, 16)
    assert args[0] == "vllm.entrypoints.openai.api_server"
    flags = dict(zip(args[1::2], args[2::2], strict=False))
    assert {key: flags[key] for key in ("--model", "--served-model-name", "--host", "--port", "--dtype")} == {
        "--model": str(tmp_path / "base"), "--served-model-name": "base", "--host": "127.0.0.1", "--port": "8123", "--dtype": "float32",
    }  # fmt: skip
    assert args[args.index("--max-model-len") + 1] == "208" and args[args.index("--max-num-seqs") + 1] == "32"
    assert args[args.index("--max-loras") + 1] == "2" and args[args.index("--max-cpu-loras") + 1] == "3"
    assert args[args.index("--max-lora-rank") + 1] == "16"
    assert "--enable-lora" in args and "--no-enable-prefix-caching" in args
    assert "--gpu-memory-utilization" not in args
    assert args[args.index("--lora-modules") + 1 :] == [f"lora-{index}={tmp_path / f'lora-{index}'}" for index in range(3)]


def test_the_cpu_tier_holds_at_least_the_device_slots(tmp_path):
    args = vllm_args(tmp_path, {"lora-0": tmp_path}, 8123, "float32", 208, 32, 4, 16, gpu_memory=0.3)
    assert args[args.index("--max-cpu-loras") + 1] == "4"  # vLLM refuses fewer CPU LoRAs than max_loras
    assert args[args.index("--gpu-memory-utilization") + 1] == "0.3"


@pytest.mark.parametrize("rank, expected", [(1, 1), (4, 8), (8, 8), (16, 16), (17, 32), (512, 512)])
def test_the_max_lora_rank_is_the_smallest_vllm_accepts_that_holds_the_adapters(rank, expected):
    assert lora_rank(rank) == expected


def test_a_rank_beyond_vllms_is_refused():
    with pytest.raises(VllmSetupError, match="up to 512"):
        lora_rank(1024)
