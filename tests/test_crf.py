import numpy as np
import torch

from reco.config import CRFConfig
from reco.crf import dense_crf


def test_crf_keeps_shape_and_cleans_noisy_unary():
    rng = np.random.default_rng(0)
    h, w = 40, 60
    truth = np.zeros((h, w), dtype=np.int64)
    truth[:, w // 2 :] = 1
    image = np.zeros((h, w, 3), dtype=np.uint8)
    image[truth == 0] = (200, 40, 40)
    image[truth == 1] = (30, 60, 210)
    clean = torch.from_numpy(np.stack([truth == 0, truth == 1]).astype(np.float32))
    noisy = clean * 0.6 + 0.2 + torch.from_numpy(rng.normal(0, 0.35, size=(2, h, w)).astype(np.float32))
    noisy_acc = (noisy.argmax(0).numpy() == truth).mean()
    q = dense_crf(image, noisy, CRFConfig(unary_scale=5.0))
    assert q.shape == (2, h, w)
    assert torch.allclose(q.sum(0), torch.ones(h, w), atol=1e-4)
    crf_acc = (q.argmax(0).numpy() == truth).mean()
    assert noisy_acc < 0.9
    assert crf_acc > noisy_acc + 0.05
    assert crf_acc > 0.97
