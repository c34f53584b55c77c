import numpy as np
import pytest
import torch

from reco.config import CRFConfig, SegmenterConfig
from reco.crf import dense_crf


def _toy(classes: int, seed: int = 0):
    """Colour regions with segmenter-like scores: sigmoid(cos) with cos 0.45 for the true
    concept and 0.35 for the others plus noise, i.e. scores in (0.5, 0.67) as the Segmenter
    produces them (not logits)."""
    rng = np.random.default_rng(seed)
    h, w = 40, 60
    truth = np.zeros((h, w), dtype=np.int64)
    truth[:, w // 2 :] = 1
    colours = [(200, 40, 40), (30, 60, 210), (40, 200, 40)]
    if classes == 3:
        truth[15:25, 10:20] = 2  # a small object inside class 0
    image = np.zeros((h, w, 3), dtype=np.uint8)
    for c in range(classes):
        image[truth == c] = colours[c]
    cos = np.where(np.stack([truth == c for c in range(classes)]), 0.45, 0.35)
    cos = cos + rng.normal(0, 0.08, size=cos.shape)
    return image, torch.sigmoid(torch.from_numpy(cos).float()), truth


@pytest.mark.parametrize("classes", [2, 3])
def test_crf_at_the_segmenters_default_cleans_noisy_scores(classes):
    image, scores, truth = _toy(classes)
    assert scores.min() > 0.5 and scores.max() < 0.7  # the flat range the CRF must cope with
    noisy = scores.argmax(0).numpy()
    cfg = CRFConfig()  # exactly what `SegmenterConfig(crf=CRFConfig())` and `--crf` use
    assert cfg.unary_scale == 1.0
    q = dense_crf(image, scores, cfg)
    assert q.shape == scores.shape
    assert torch.allclose(q.sum(0), torch.ones(truth.shape), atol=1e-4)
    out = q.argmax(0).numpy()
    assert (noisy == truth).mean() < 0.85
    assert (out == truth).mean() > 0.98
    if classes == 3:  # the small object survives the smoothing
        assert (noisy[truth == 2] == 2).mean() < 0.85
        assert (out[truth == 2] == 2).mean() > 0.95


def test_crf_rejects_mismatched_inputs():
    image, scores, _ = _toy(2)
    with pytest.raises(ValueError, match="differ in size"):
        dense_crf(image[:10], scores, CRFConfig())
    with pytest.raises(ValueError, match="uint8"):
        dense_crf(image.astype(np.float32), scores, CRFConfig())
    assert SegmenterConfig(crf=CRFConfig()).crf.unary_scale == CRFConfig().unary_scale
