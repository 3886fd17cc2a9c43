"""What share of a training step is the live teacher? The bound on what a cache of its targets can save.

    python benchmarks/teacher_share.py --config configs/distill.yaml --config configs/teachers/ensemble_200.yaml \
        --data.dataset data/letters

Builds the run a `distill fit` with these options would train (its student, teacher or ensemble, feature
imitation, loss) and times, on one synthetic batch of the config's size, one thread, median of `--steps`
after 3 warm-up steps: the teacher's forward (with the feature maps that imitation reads, when it is on),
a whole training step with the live teacher, and the same step with the teacher's outputs already in memory
(what a cache of everything the step reads from the teacher would give). It also prints what such a cache
would hold per view. Speed does not depend on the weights; the teacher files must exist (any trained ones).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distill.training.cli import make_cli  # noqa: E402


def median_seconds(step, steps: int) -> float:
    for _ in range(3):
        step()
    times = []
    for _ in range(steps):
        began = time.perf_counter()
        step()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    known, fit_options = parser.parse_known_args()
    torch.set_num_threads(known.threads)
    cli = make_cli([*fit_options, "--data.num_workers=0", "--trainer.logger=false",
                    "--checkpoint.dirpath=/tmp/teacher_share_unused"], run=False)
    module, data = cli.model.train(), cli.datamodule
    teacher, imitation = module.teacher, module.imitation
    if teacher is None:
        raise SystemExit("this config runs no teacher (model.distillation none, or a teacher cache)")
    teacher.eval()
    images = torch.randn(data.batch_size, 3, data.img_size, data.img_size)
    target = torch.randint(0, data.num_classes, (data.batch_size,))
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-6)

    def run_teacher():
        with torch.no_grad():
            if imitation is None:
                return teacher(images), None
            return teacher.forward_members_with_features(images, imitation.teacher_levels)

    stored = run_teacher()

    def step(live: bool) -> None:
        logits, maps = run_teacher() if live else stored
        if imitation is None:
            cls_logits, dist_logits = module.student.forward_heads(images)
            feature = None
        else:
            cls_logits, dist_logits, student_maps = module.student.forward_heads_and_features(images,
                                                                                             imitation.student_levels)
            feature = imitation(student_maps, maps)
        loss = module.loss(cls_logits, dist_logits, target, logits, feature, 1.0)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    teacher_s = median_seconds(run_teacher, known.steps)
    live_s = median_seconds(lambda: step(True), known.steps)
    stored_s = median_seconds(lambda: step(False), known.steps)
    members = len(getattr(teacher, "members", [teacher]))
    maps_bytes = 0 if stored[1] is None else sum(m[0].numel() for m in stored[1]) * 2  # fp16, per view, all members
    print(f"batch {data.batch_size} at {data.img_size} px, {known.threads} thread(s), {members} teacher member(s), "
          f"feature imitation {'on' if imitation is not None else 'off'}")
    print(f"teacher forward{' with its feature maps' if imitation is not None else ''}: {1000 * teacher_s:.1f} ms; "
          f"whole step with the live teacher: {1000 * live_s:.1f} ms; with its outputs in memory: "
          f"{1000 * stored_s:.1f} ms")
    print(f"the teacher is {100 * (live_s - stored_s) / live_s:.0f}% of a live step: a cache of its outputs makes "
          f"a step at most {live_s / stored_s:.2f}x faster")
    if maps_bytes:
        print(f"such a cache holds, per view, {maps_bytes / 1024:.1f} KiB of feature maps (fp16, every member's) "
              "beside the logits")


if __name__ == "__main__":
    main()
