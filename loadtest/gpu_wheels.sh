#!/usr/bin/env bash
# Fetch, here (where PyPI is reachable), the wheels the GPU machine lacks, into .whl/ (git-ignored).
# The lent H200 has Python 3.12, torch 2.11 for CUDA 13, triton 3.6, transformers, peft, numpy,
# httpx and pytest, but not the server's own stack: fastapi, uvicorn, pydantic, python-multipart,
# msgspec, httptools, bitsandbytes, nor the openai SDK the server test drives it with. Nothing can
# be downloaded there, so loadtest/gpu_check.sh installs these from .whl/ with --no-index.
#
#     bash loadtest/gpu_wheels.sh [.whl]
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:-.whl}
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf "$dest" && mkdir -p "$dest"
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
fetch() { python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" -d "$dest" "$@"; }
# The server's stack with what it needs, resolved together (pydantic pins its pydantic-core).
fetch "fastapi>=0.115" "uvicorn>=0.30" "pydantic>=2.6" "python-multipart>=0.0.9" "msgspec>=0.18" "httptools>=0.6" \
      "openai>=1.40" "pytest-timeout>=2.3"
# bitsandbytes alone: its own requirements (torch, numpy) are the machine's.
fetch --no-deps "bitsandbytes>=0.45"
# What the machine's image already holds (its KINDS.md list): one version of each, theirs.
for name in anyio click h11 idna packaging pluggy iniconfig pygments pytest typing_extensions httpx httpcore certifi tqdm; do
    rm -f "$dest/${name}"-[0-9]*.whl
done
ls "$dest"
du -sh "$dest"
