#!/usr/bin/env bash
# The exact commands that produced the two default models in weights/ (also recorded in
# each manifest's training.command). CPU, 2 cores: about 3.3 h (DenseNet121, bf16 on a CPU with AMX) and 3.3 h (ResNet50, fp32).
# Each run checkpoints every epoch under runs/ and resumes if started again.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data/cxr}
PY=${PYTHON:-.venv/bin/python}

# DenseNet121 1.3.0: loss weights balanced per (source, label) group, zoom 0.85-1.35 and an
# aspect-ratio stretch on top of the sharpness augmentation (all from 1.2.0), and 1.2.0's
# schedule lengthened (34 epochs); bf16 autocast on this CPU (AMX), 3.3 h on 2 cores.
# (-v only logs progress to stderr.)
"$PY" -m cxr_core -v train "$DATA" --arch densenet121 --out weights/densenet121-covid3 --version 1.3.0 \
    --name "DenseNet121 COVID-19 / normal / viral pneumonia" \
    --classes covid,normal,viral_pneumonia --schedule 128:20,176:6,224:8 \
    --batch-size 32 --lr 2e-3 --weight-decay 1e-2 --label-smoothing 0.05 --balance source \
    --sharpness 1.0 --zoom 0.85,1.35 --aspect 0.2 --target-sensitivity 0.97 --seed 0 --run-dir runs/densenet121-covid3-v1.3

# ResNet50 1.0.0 predates the sharpness augmentation (--sharpness 0 reproduces it) and CPU
# bf16 (--no-cpu-bf16 reproduces its fp32 training).
"$PY" -m cxr_core train "$DATA" --arch resnet50 --out weights/resnet50-covid-binary \
    --name "ResNet50 COVID-19 vs other" \
    --binary covid --schedule 128:8,176:2,224:2 \
    --batch-size 32 --lr 2e-3 --weight-decay 1e-2 --label-smoothing 0.05 --balance weights \
    --sharpness 0 --no-cpu-bf16 --target-sensitivity 0.97 --seed 0
