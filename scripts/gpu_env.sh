# Sourced by gpu_checks.sh: sets $py to a Python with the forks and every package in place.
# Either ./setup.sh made .venv, or .offline-bundle/ (scripts/prepare_offline_bundle.sh) came along and
# is installed into /tmp here, on top of the machine's own torch / transformers / peft /
# triton (an air-gapped CUDA machine).
py=${PYTHON:-.venv/bin/python}
if [ ! -x "$py" ] && [ -d .offline-bundle ]; then
  site=/tmp/hrpo-site
  rm -rf "$site" && mkdir -p "$site/forks" "$site/lib"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site/lib" \
    .offline-bundle/wheels/*.whl || exit 1
  tar xzf .offline-bundle/forks.tar.gz -C "$site/forks" || exit 1
  export PYTHONPATH="$site/forks:$site/lib:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  py=python3
fi
"$py" -c "import transformers.hrpo_fork, unsloth.hrpo_fork, trl, unsloth_zoo; print('forks in place:', transformers.__file__)" \
  || { echo "the forks or a package are missing (run ./setup.sh, or bring .offline-bundle/ from a connected machine)"; exit 1; }
