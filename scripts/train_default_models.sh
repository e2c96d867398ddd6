#!/usr/bin/env bash
# The exact commands that produced the two default models in weights/ (also recorded in
# each manifest's training.command). CPU, 2 cores: about 3 h (DenseNet121) and 4 h (ResNet50).
# Each run checkpoints every epoch under runs/ and resumes if started again.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data/cxr}
PY=${PYTHON:-.venv/bin/python}

# DenseNet121 1.1.0: 1.0.0's recipe plus the sharpness augmentation.
"$PY" -m cxr_core train "$DATA" --arch densenet121 --out weights/densenet121-covid3 --version 1.1.0 \
    --name "DenseNet121 COVID-19 / normal / viral pneumonia" \
    --classes covid,normal,viral_pneumonia --schedule 128:12,176:3,224:2 \
    --batch-size 32 --lr 2e-3 --weight-decay 1e-2 --label-smoothing 0.05 --balance weights \
    --sharpness 1.0 --target-sensitivity 0.97 --seed 0 --run-dir runs/densenet121-covid3-v1.1

# ResNet50 1.0.0 predates the sharpness augmentation (--sharpness 0 reproduces it).
"$PY" -m cxr_core train "$DATA" --arch resnet50 --out weights/resnet50-covid-binary \
    --name "ResNet50 COVID-19 vs other" \
    --binary covid --schedule 128:8,176:2,224:2 \
    --batch-size 32 --lr 2e-3 --weight-decay 1e-2 --label-smoothing 0.05 --balance weights \
    --sharpness 0 --target-sensitivity 0.97 --seed 0
