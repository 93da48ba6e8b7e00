#!/usr/bin/env bash
# One prepared GPU check for a session that is lent a device machine (see README "GPU checks"). It installs the
# worker stack, confirms CUDA is used with AMP + channels_last, trains MSF/BYOL for a few steps on the CIFAR stem,
# and runs the MSF performance benchmark on the GPU. Everything it prints is written to $OUT/gpu_smoke.log.
#   run with: bash bench/gpu_smoke.sh        (about 5 minutes on an H100/H200, most of it pip)
set -euo pipefail
OUT="${OUT:-/tmp/gpu-smoke}"
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_smoke.log") 2>&1
python3 -m venv /tmp/gpu-venv
/tmp/gpu-venv/bin/pip install --quiet --upgrade pip
/tmp/gpu-venv/bin/pip install --quiet -e '.[worker]' pytest
# The worker image's faiss: faiss-gpu replaces faiss-cpu (same module), as in workers/Dockerfile.
/tmp/gpu-venv/bin/pip uninstall --quiet --yes faiss-cpu
/tmp/gpu-venv/bin/pip install --quiet -e '.[worker-gpu]'
PY=/tmp/gpu-venv/bin/python
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
$PY - <<'PYEOF'
import time, torch
from shared.data import load_dataset
from shared.specs import parse_spec
from workers.ssl_trainer.train import train
assert torch.cuda.is_available(), "CUDA not visible"
print("device:", torch.cuda.get_device_name(0))
from workers.common import faiss_ops
print("faiss GPU index on device:", faiss_ops.gpu_device())
for method, backbone in (("msf", "resnet18"), ("byol", "resnet18"), ("msf", "vit_tiny_p4")):
    spec = parse_spec({"kind": "ssl-train", "method": method, "dataset": "builtin://shapes", "stem": "cifar",
                       "backbone": backbone, "epochs": 2, "batch_size": 256, "bank_size": 4096, "knn_every": 1,
                       "amp": True, "channels_last": True, "num_workers": 4})
    data = load_dataset({"uri": spec.dataset}, image_size=32, limit_train=None, limit_test=None)
    t0 = time.perf_counter()
    result = train(spec, data)
    print(method, backbone, f"{time.perf_counter() - t0:.1f}s", {k: round(v, 4) for k, v in result.items()})
PYEOF
$PY -m pytest tests/unit -q -p no:warnings -m "not integration" -x
if [ -f bench/msf_perf.py ]; then $PY -m bench.msf_perf; fi
