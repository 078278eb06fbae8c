#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py: tutorial vs TRL vs chattune on one CUDA GPU) with the wheels it needs, on a
# machine that has torch, peft, accelerate, pyarrow (>= 24, as datasets needs), pandas and xxhash but not TRL or
# datasets (and maybe an older transformers than chattune needs), and no network.
#
#   bash bench/gpu_check.sh wheels   # here, with network to PyPI: fill .whl/ (git-ignored, ~20 MiB), i.e.
#       pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#         trl==1.16.0 datasets==5.2.0 transformers==5.24.0 dill==0.4.1 multiprocess==0.70.19 liger-kernel==0.8.5
#   bash bench/gpu_check.sh          # on the GPU machine, from the repository root (carry .whl); < 10 minutes
#   bash bench/gpu_check.sh --smoke  # anywhere (CPU): the same script on a tiny model, to check it runs
# Results: $OUT/gpu_check.json when $OUT is set (the device machine), else bench/results/gpu_check.json.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "wheels" ]]; then
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    trl==1.16.0 datasets==5.2.0 transformers==5.24.0 dill==0.4.1 multiprocess==0.70.19 liger-kernel==0.8.5
  du -sh .whl
  exit 0
fi

# the carried wheels, unless this Python already has TRL, datasets and a new enough transformers (a dev venv)
if ! python3 -c "import trl, datasets, transformers; from packaging.version import Version as V; assert V(transformers.__version__) >= V('5.24')" 2>/dev/null; then
  SITE=$(mktemp -d /tmp/gpu-check-site-XXXX)
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" .whl/*.whl
  export PYTHONPATH=$SITE:src
else
  export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -c "import torch, transformers, trl, datasets, peft, accelerate as a; print('torch', torch.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__, 'datasets', datasets.__version__, 'peft', peft.__version__, 'accelerate', a.__version__)"
if [[ -n "${OUT:-}" ]]; then nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true; fi
python3 bench/gpu_check.py "$@"
