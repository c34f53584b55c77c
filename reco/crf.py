"""Optional DenseCRF refinement (spec step 6) with pydensecrf2 (imports as ``pydensecrf``)."""

from __future__ import annotations

import numpy as np
import torch

from .config import CRFConfig


def dense_crf(image: np.ndarray, scores: torch.Tensor, config: CRFConfig = CRFConfig()) -> torch.Tensor:
    """Refine per-concept scores with a fully connected CRF.

    Args:
        image: (H, W, 3) uint8 RGB image.
        scores: (C, H, W) scores (higher = more likely); unary = -log softmax(scale * scores).
        config: CRF parameters.
    Returns:
        (C, H, W) float32 marginal probabilities after ``config.iterations`` mean-field steps.
    """
    import pydensecrf.densecrf as dcrf

    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    c, h, w = scores.shape
    if (h, w) != image.shape[:2]:
        raise ValueError(f"scores {h}x{w} and image {image.shape[:2]} differ in size")
    if c < 2:
        return torch.ones(c, h, w)
    logp = torch.log_softmax(config.unary_scale * scores.float(), dim=0)
    unary = np.ascontiguousarray((-logp).reshape(c, -1).cpu().numpy(), dtype=np.float32)
    crf = dcrf.DenseCRF2D(w, h, c)
    crf.setUnaryEnergy(unary)
    crf.addPairwiseGaussian(sxy=config.gaussian_sxy, compat=config.gaussian_compat)
    crf.addPairwiseBilateral(
        sxy=config.bilateral_sxy,
        srgb=config.bilateral_srgb,
        rgbim=np.array(image, dtype=np.uint8, order="C", copy=True),
        compat=config.bilateral_compat,
    )
    q = np.array(crf.inference(config.iterations), dtype=np.float32).reshape(c, h, w)
    return torch.from_numpy(q)
