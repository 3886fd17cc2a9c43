"""The metrics a distillation run validates with (torchmetrics): each head, the teacher, their agreement."""
from __future__ import annotations

from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy

__all__ = ["validation_metrics"]


def validation_metrics(prefix: str, num_classes: int, members: int = 0, heads_only: bool = False) -> MetricCollection:
    """Top-1/top-5 of the class head, the distillation head and their average, the heads' and tokens' cosine; unless
    `heads_only` (the EMA's), the teacher's accuracy (and each of `members` ensemble members'), agreement and KL."""
    top5 = min(5, num_classes)
    metrics = {}
    for head in ("cls", "dist", ""):  # class head, distillation head, their average
        name = f"acc_{head}" if head else "acc"
        metrics[name] = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        metrics[f"{name}_top5"] = MulticlassAccuracy(num_classes, top_k=top5, average="micro")
    metrics["head_cosine"] = MeanMetric()  # cosine similarity of the two heads' logits
    metrics["token_cosine"] = MeanMetric()  # of the final class and distillation tokens (DeiT)
    if not heads_only:
        metrics["teacher_acc"] = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        for index in range(members):
            metrics[f"teacher_acc_{index}"] = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        metrics["teacher_agreement"] = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        metrics["teacher_kl"] = MeanMetric()  # KL(teacher || student), averaged head, temperature 1
    return MetricCollection(metrics, prefix=prefix)
