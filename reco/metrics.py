"""Running confusion-matrix segmentation metrics (the spec's evaluation protocol)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch


@dataclass(frozen=True)
class SegMetrics:
    """mIoU = nan-mean of per-class IoU; pixel accuracy = trace / total (ignore excluded)."""

    miou: float
    pixel_accuracy: float
    iou: List[float]  # per class, nan where the class never occurs in prediction or truth
    class_names: Optional[List[str]] = None

    def as_dict(self) -> Dict[str, object]:
        names = self.class_names or [str(i) for i in range(len(self.iou))]
        return {
            "miou": self.miou,
            "pixel_accuracy": self.pixel_accuracy,
            "iou": {n: (None if v != v else v) for n, v in zip(names, self.iou)},
        }


class ConfusionMatrix:
    """Accumulates an (N, N) confusion matrix (rows: truth, columns: prediction)."""

    def __init__(self, num_classes: int, ignore_index: Optional[int] = 255):
        if num_classes < 1:
            raise ValueError("num_classes must be >= 1")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """pred, target: integer tensors of the same shape (any number of dims)."""
        if pred.shape != target.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ")
        pred = pred.reshape(-1).long().cpu()
        target = target.reshape(-1).long().cpu()
        keep = torch.ones_like(target, dtype=torch.bool)
        if self.ignore_index is not None:
            keep &= target != self.ignore_index
        pred, target = pred[keep], target[keep]
        if target.numel() and (target.min() < 0 or target.max() >= self.num_classes):
            raise ValueError(f"target holds ids outside [0, {self.num_classes}) other than the ignore index")
        if pred.numel() and (pred.min() < 0 or pred.max() >= self.num_classes):
            raise ValueError(f"prediction holds ids outside [0, {self.num_classes})")
        idx = target * self.num_classes + pred
        self.matrix += torch.bincount(idx, minlength=self.num_classes**2).reshape(self.num_classes, -1)

    def merge(self, other: "ConfusionMatrix") -> None:
        self.matrix += other.matrix

    def compute(self, class_names: Optional[Sequence[str]] = None) -> SegMetrics:
        m = self.matrix.double()
        tp = m.diag()
        union = m.sum(0) + m.sum(1) - tp
        iou = torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))
        valid = ~torch.isnan(iou)
        miou = float(iou[valid].mean()) if valid.any() else float("nan")
        total = m.sum()
        acc = float(tp.sum() / total) if total > 0 else float("nan")
        return SegMetrics(miou, acc, [float(v) for v in iou], list(class_names) if class_names else None)
