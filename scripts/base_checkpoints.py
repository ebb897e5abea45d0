"""Writes the torch checkpoints distill-back starts from, for the shipped default base.

models/pick-place-v3-student.safetensors: the exact weights of models/pick-place-v3-student.onnx
(read from its initializers; the digest must equal the export record's ``checkpoint_sha256``).
models/pick-place-v3-teacher.safetensors: a flow teacher for it, made from the student's network
read as a velocity field and trained by flow matching on the default demonstrations
(regenerated into data/default/pick-place-mixed when missing); see
``vlarl.learning.distill_back.teacher_from_student``. Deterministic on CPU with one thread.

    PYTHONPATH=src nice -n 5 python scripts/base_checkpoints.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEACHER_STEPS = 3000
TEACHER_LR = 3e-4


def main() -> int:
    from vlarl.learning.checkpoint import load_checkpoint
    from vlarl.learning.distill_back import (
        DEFAULT_DEMOS,
        DistillBackConfig,
        ensure_demonstrations,
        student_from_onnx,
        teacher_from_student,
    )
    from vlarl.learning.runs import set_seed, set_threads

    set_threads(1)
    set_seed(0)
    models = ROOT / "models"
    record = json.loads((models / "pick-place-v3-student.export.json").read_text())
    student_path = models / "pick-place-v3-student.safetensors"
    digest = student_from_onnx(models / "pick-place-v3-student.onnx", student_path)
    if digest != record["checkpoint_sha256"]:
        print(f"student digest {digest} != exported {record['checkpoint_sha256']}", file=sys.stderr)
        return 1
    print(f"{student_path}: sha256 {digest} (= the export record's checkpoint_sha256)")
    demos = ensure_demonstrations(ROOT / DEFAULT_DEMOS)
    cfg = DistillBackConfig(
        finetune_steps=TEACHER_STEPS, finetune_lr=TEACHER_LR, finetune_ema=0.999
    )
    teacher = teacher_from_student(
        load_checkpoint(student_path),
        [demos],
        ROOT / "runs/default/teacher-from-student/teacher.safetensors",
        cfg,
    )
    out = models / "pick-place-v3-teacher.safetensors"
    out.write_bytes((ROOT / "runs/default/teacher-from-student/teacher.safetensors").read_bytes())
    print(f"{out}: sha256 {teacher}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
