#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py) with the wheels it needs on a machine that has torch, peft,
# accelerate, pyarrow (>= 24, as datasets needs), pandas and xxhash but not TRL or datasets, and an older
# transformers than chattune needs.
#
#   bash bench/gpu_check.sh wheels   # here, with network to PyPI: fill .whl/ (git-ignored, ~15 MiB)
#   bash bench/gpu_check.sh          # on the GPU machine, from the repository root (carry .whl)
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "wheels" ]]; then
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    trl==1.16.0 datasets==5.2.0 transformers==5.24.0 dill==0.4.1 multiprocess==0.70.19
  du -sh .whl
  exit 0
fi

rm -rf /tmp/site  # a warm machine may hold an earlier set
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:src
python3 -c "import torch, transformers, trl, datasets, peft, accelerate as a; print('torch', torch.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__, 'datasets', datasets.__version__, 'peft', peft.__version__, 'accelerate', a.__version__)"
python3 bench/gpu_check.py "$@"
