#!/usr/bin/env bash
# The CUDA check of data-parallel training (docs/training.md, "Several processes, machines and
# GPUs"), to run as is from the repository root on a machine with NVIDIA GPUs whose python has
# torch with CUDA and this project's runtime packages (numpy, Pillow, onnx, onnxruntime):
#
#     bash benchmarks/gpu_check.sh            # PYTHON=..., DATA=..., OUT=... to override
#
# 1. a short run on one GPU (--device cuda), 2. the same on every GPU (--nproc <GPU count>,
# NCCL, SyncBatchNorm), 3. export of each run to ONNX, 4. parity of the ONNX file on the CPU
# (onnxruntime) against the checkpoint in torch on the CPU on 64 validation films, 5. training
# images per second of each run's last epoch (its history.json). Everything lands under $OUT;
# the summary is $OUT/gpu_check.json. Data: $DATA, default ../shared/data/chest_xray, else a
# synthetic set written under $OUT (the tests' generator). Exits non-zero at the first failure.
set -euo pipefail

PYTHON=${PYTHON:-python}
OUT=${OUT:-runs/gpu_check}
EPOCHS=${EPOCHS:-1}
MAX_IMAGES=${MAX_IMAGES:-1024}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"

nvidia-smi || true
GPUS=$("$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'torch sees no CUDA GPU'; print(torch.cuda.device_count())")
"$PYTHON" -c "import torch, numpy, PIL, onnx, onnxruntime; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpus', torch.cuda.device_count())"

DATA=${DATA:-../shared/data/chest_xray}
if [ ! -d "$DATA" ]; then
    DATA="$OUT/synthetic"
    "$PYTHON" -c "
import sys; sys.path.insert(0, 'tests')
from pathlib import Path
from conftest import make_split
make_split(Path('$DATA') / 'train', 256, seed=1, size=256)
"
fi

train() {  # train NAME NPROC
    local start end
    start=$(date +%s)
    "$PYTHON" -m pneumonia.cli train --data "$DATA" --out "$OUT/$1" --device cuda --nproc "$2" \
        --epochs "$EPOCHS" --max-images "$MAX_IMAGES" --no-progress
    end=$(date +%s)
    echo "$1: $((end - start)) s wall" | tee -a "$OUT/wall.txt"
    "$PYTHON" -m pneumonia.cli export "$OUT/$1" --out "$OUT/$1.onnx"
}

train gpu-1 1
if [ "$GPUS" -gt 1 ]; then
    train "gpu-$GPUS" "$GPUS"
fi

"$PYTHON" - "$OUT" <<'PY'
import json
import sys
from pathlib import Path

import numpy as np
import torch

from pneumonia.data import load_images
from pneumonia.predictor import Predictor
from pneumonia.training.config import TrainConfig
from pneumonia.training.run import RunFolder, load_split
from pneumonia.training.train import load_member

out = Path(sys.argv[1])
summary = {"torch": torch.__version__, "cuda": torch.version.cuda, "runs": {}}
for run_dir in sorted(p for p in out.glob("gpu-*") if p.is_dir()):
    run = RunFolder(run_dir)
    cfg = TrainConfig.load(run.config)
    val = load_images(load_split(run).val[:64], cfg.preprocess)
    member = run.members()[0]
    with torch.no_grad():
        want = load_member(member / "best.pt")(torch.from_numpy(val.x)).numpy().reshape(-1)
    got = Predictor(run_dir.with_suffix(".onnx"), refuse=False).run(val.x.astype(np.float32))[0]
    # One member: the file's logit is the member's (several: their mean; compare the first).
    diff = float(np.max(np.abs(got - want))) if len(cfg.seeds) == 1 else None
    last = json.loads((member / "history.json").read_text())[-1]
    n_train = sum(run.read_data()["train"].values())
    env = json.loads(run.environment.read_text())["train"]
    summary["runs"][run_dir.name] = {
        "train_images": n_train,
        "last_epoch_s": last["seconds"],
        "images_per_s": round(n_train / last["seconds"], 1),
        "val_auc": last["val_auc"],
        "onnx_cpu_vs_torch_cpu_max_abs_logit_diff": diff,
        "environment": env,
    }
    if diff is not None and diff > 1e-3:
        raise SystemExit(f"{run_dir.name}: ONNX on the CPU differs from torch by {diff}")
(out / "gpu_check.json").write_text(json.dumps(summary, indent=1) + "\n")
print(json.dumps(summary, indent=1))
PY
