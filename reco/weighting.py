"""Pixel weights for co-segmentation (spec step 3).

Both functions return weights in [0, 1] on the dense encoder's token grid; the co-segmentation
multiplies the affinity to each *target* token by its weight.
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

from .precision import fp32


@fp32
def language_weights(
    dense_clip: torch.Tensor, text: torch.Tensor, size: Tuple[int, int], temperature: float = 10.0
) -> torch.Tensor:
    """Language-guided co-segmentation: sigmoid(T * cos(denseCLIP(pixel), text_c)).

    Args:
        dense_clip: (k, E, h', w') dense CLIP features of the archive images.
        text: (E,) the concept's text embedding.
        size: (h, w) token grid of the dense encoder to resize to (bilinear).
    Returns:
        (k, h, w) weights in (0, 1).
    """
    feats = F.normalize(dense_clip.float(), dim=1)
    cos = torch.einsum("kehw,e->khw", feats, F.normalize(text.float(), dim=0))
    w = torch.sigmoid(temperature * cos)[:, None]
    if tuple(w.shape[-2:]) != tuple(size):
        w = F.interpolate(w, size=size, mode="bilinear", align_corners=False)
    return w[:, 0].clamp(0.0, 1.0)


@fp32
def context_weights(
    features: torch.Tensor, context_refs: torch.Tensor, temperature: float = 1.0, offset: float = 0.0
) -> torch.Tensor:
    """Context elimination: prod_c (1 - sigmoid(T * (cos(f, ref_c) - offset))) over the context references.

    The paper's weight is T = 1, offset = 0 (the default here).

    Args:
        features: (k, D, h, w) dense features of the archive images.
        context_refs: (M, D) reference embeddings (or prototypes) of the context concepts (M may be 0).
        temperature, offset: sharpness and centre of the elimination in cosine units.
    Returns:
        (k, h, w) weights in (0, 1]; all ones when M == 0.
    """
    k, _, h, w = features.shape
    if context_refs.numel() == 0:
        return torch.ones(k, h, w, device=features.device)
    cos = torch.einsum("kdhw,md->kmhw", F.normalize(features.float(), dim=1), F.normalize(context_refs.float(), dim=1))
    return torch.prod(1.0 - torch.sigmoid(temperature * (cos - offset)), dim=1)
