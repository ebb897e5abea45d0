#!/usr/bin/env bash
# Rebuilds the shipped default policy models/pick-place-v3-student.onnx from nothing:
# mixed-quality scripted-expert demonstrations -> plain BC (baseline) and flow teacher ->
# consistency-distilled one-step student -> ONNX (checked against PyTorch) -> 50-episode check.
# Every stage is a `vlarl` verb; every run folder under runs/default keeps its config.json and
# metrics next to its checkpoint. Deterministic seeds throughout (CPU; 15-20 min on 2 free cores).
#
#   scripts/build_default_model.sh            # writes data/default, runs/default, models/
#   FRESH=1 scripts/build_default_model.sh    # start over (deletes data/default, runs/default)
set -euo pipefail
cd "$(dirname "$0")/.."
VLARL=${VLARL:-vlarl}
DATA=data/default/pick-place-mixed
RUNS=runs/default
MODEL=models/pick-place-v3-student.onnx
VERSION=${VERSION:-1}
REPLAN=${REPLAN:-4}

if [ "${FRESH:-0}" = 1 ]; then rm -rf "$DATA" "$RUNS"; fi

# 1. Demonstrations: 400 episodes, expert noise sigma in {0, 0.5, 1, 2} round-robin (episode i
#    starts from seed i). The executed noisy actions are what the models learn from.
[ -f "$DATA/metrics.json" ] || $VLARL collect --out "$DATA" --tasks pick-place-v3 \
  --episodes 400 --sigmas 0,0.5,1.0,2.0 --seed 0

# 2. Plain BC and the flow-matching teacher: same data, chunks of 8, 3x512 MLPs.
COMMON=(--data "$DATA" --chunk-length 8 --hidden 512 --depth 3 --train-steps 20000 --seed 0)
[ -f "$RUNS/bc/bc.safetensors" ] || $VLARL train-bc "${COMMON[@]}" --out "$RUNS/bc"
[ -f "$RUNS/teacher/teacher.safetensors" ] || $VLARL train-teacher "${COMMON[@]}" \
  --steps 10 --out "$RUNS/teacher"

# 3. Consistency distillation into a 3x256 one-step student.
[ -f "$RUNS/student/student.safetensors" ] || $VLARL distill \
  --teacher "$RUNS/teacher/teacher.safetensors" --data "$DATA" --out "$RUNS/student" \
  --hidden 256 --train-steps 10000 --lr 3e-4 --seed 0

# 4. Export with the model contract's metadata (TensorRT engine too when a GPU is present).
$VLARL export --checkpoint "$RUNS/student/student.safetensors" --out "$MODEL" \
  --model-id pick-place-v3-student --version "$VERSION" --overwrite

# 5. The deployed file, 50 fixed-seed episodes in-process, chunks as the policy node runs them.
$VLARL evaluate --policy "$MODEL" --tasks pick-place-v3 --episodes 50 \
  --replan-every "$REPLAN" --out "$RUNS/eval-default-model.json"
