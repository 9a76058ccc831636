#!/usr/bin/env bash
# Prepare, on a connected machine, what an air-gapped CUDA machine (Python 3.12, torch/transformers/peft/triton
# already there) needs to run ./gpu_checks.sh, in .offline-bundle/ (git-ignored; copy it to that machine):
#   forks.tar.gz  the materialized, patched fork sources (transformers/, unsloth/), so that
#                 neither git nor the upstream archives are needed there
#   wheels/       the packages that machine lacks, for CPython 3.12 manylinux x86_64
# Then, there:  ./gpu_checks.sh   (it installs from .offline-bundle/ into /tmp when it finds it)
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
out=.offline-bundle
rm -rf "$out"
mkdir -p "$out/wheels"
"$py" tools/forks.py materialize >/dev/null
tar czf "$out/forks.tar.gz" -C transformers/tree/src transformers -C ../../../unsloth/tree unsloth unsloth_cli unsloth.egg-info
# What such a machine lacks: what hrpo_gsm8k.py and unsloth import, less torch, transformers, peft and triton.
wanted="trl==1.15.0 datasets==4.8.5 dill multiprocess unsloth_zoo==2026.10.9 msgspec tyro docstring-parser
        typeguard shtab"
platforms=""
for n in 17 27 28; do platforms="$platforms --platform manylinux_2_${n}_x86_64"; done
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version "${PYVER:-3.12}" --implementation cp \
  $platforms --platform manylinux2014_x86_64 --platform any -d "$out/wheels" $wanted
du -sh "$out" "$out"/*
