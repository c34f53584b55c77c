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


def roc_auc(pos: torch.Tensor, neg: torch.Tensor) -> float:
    """Mann-Whitney ROC AUC of scores of positives vs negatives (ties broken by order)."""
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError("ROC AUC needs at least one positive and one negative score")
    ranks = torch.cat([pos, neg]).double().argsort().argsort().double() + 1
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def object_background_tokens(
    features: torch.Tensor, mask: torch.Tensor, background: int = 0, ignore_index: int = 255, min_share: float = 0.5
):
    """Tokens of one image labelled object / background from its ground truth.

    Args:
        features: (D, h, w) dense features.
        mask: (H, W) integer labels (``background``, ``ignore_index``, anything else = object).
        min_share: a token is object (background) when at least this share of its pixels is.
    Returns:
        ((h*w, D) L2-normalised tokens, (h*w,) labels: 1 object, 0 background, -1 neither).
    """
    import torch.nn.functional as F

    d, h, w = features.shape
    obj = ((mask != background) & (mask != ignore_index)).float()[None, None]
    bg = (mask == background).float()[None, None]
    obj, bg = F.adaptive_avg_pool2d(obj, (h, w))[0, 0], F.adaptive_avg_pool2d(bg, (h, w))[0, 0]
    lab = torch.full((h, w), -1, dtype=torch.long)
    lab[obj >= min_share] = 1
    lab[bg >= min_share] = 0
    return F.normalize(features.float(), dim=0).reshape(d, -1).T, lab.reshape(-1)


def object_background_auc(tokens: Sequence[torch.Tensor], labels: Sequence[torch.Tensor]) -> List[float]:
    """Per image, the ROC AUC of object vs background tokens scored by their cosine to the mean
    object feature minus that to the mean background feature of the *other* images (leave one
    image out): how well the features separate objects from background. Images without both
    kinds of tokens are left out."""
    import torch.nn.functional as F

    aucs = []
    for i in range(len(tokens)):
        x = torch.cat([tokens[j] for j in range(len(tokens)) if j != i])
        lab = torch.cat([labels[j] for j in range(len(tokens)) if j != i])
        fg, bg = F.normalize(x[lab == 1].mean(0), dim=0), F.normalize(x[lab == 0].mean(0), dim=0)
        score = tokens[i] @ fg - tokens[i] @ bg
        pos, neg = score[labels[i] == 1], score[labels[i] == 0]
        if len(pos) and len(neg):
            aucs.append(roc_auc(pos, neg))
    return aucs
