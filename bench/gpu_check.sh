#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py) with the wheels it needs on a machine that has torch, peft,
# accelerate, pandas and xxhash but not TRL or datasets, and an older transformers than chattune needs.
#
#   bash bench/gpu_check.sh wheels   # here, with network to PyPI: fill .whl/ (git-ignored, ~53 MiB)
#   bash bench/gpu_check.sh          # on the GPU machine, from the repository root (carry .whl)
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "wheels" ]]; then
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    trl==1.16.0 datasets==5.2.0 transformers==5.24.0 pyarrow==26.0.1 dill==0.4.1 multiprocess==0.70.19
  # pyarrow's Flight and Substrait libraries, headers and tests are not used by datasets; without them the
  # wheels fit the 64 MiB that travels to the GPU machine
  python3 - <<'EOF'
import glob, os, zipfile
drop = ("pyarrow/libarrow_flight", "pyarrow/_flight", "pyarrow/flight.py", "pyarrow/libarrow_substrait",
        "pyarrow/_substrait", "pyarrow/substrait.py", "pyarrow/include/", "pyarrow/tests/", "pyarrow/src/")
for src in glob.glob(".whl/pyarrow-*.whl"):
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(src + ".tmp", "w", zipfile.ZIP_DEFLATED) as zout:
        for item in zin.infolist():
            if item.filename.startswith(drop):
                continue
            data = zin.read(item.filename)
            if item.filename.endswith(".dist-info/RECORD"):
                data = "".join(l + "\n" for l in data.decode().splitlines() if not l.startswith(drop)).encode()
            zout.writestr(item, data)
    os.replace(src + ".tmp", src)
EOF
  du -sh .whl
  exit 0
fi

rm -rf /tmp/site  # a warm machine may hold an earlier set
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:src
python3 -c "import torch, transformers, trl, datasets, peft, accelerate as a; print('torch', torch.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__, 'datasets', datasets.__version__, 'peft', peft.__version__, 'accelerate', a.__version__)"
python3 bench/gpu_check.py "$@"
