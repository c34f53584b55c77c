"""Co-segmentation and reference embeddings (spec step 4).

Given the dense features of a concept's k archive images, every token p gets the score

    score(p) = mean_j max_{q in image j} <f_p, f_q> * w_q

(w: pixel weights of the *target* token q; f: L2-normalised features), each image's seed is its
highest-scoring token, and the reference embedding is the normalised mean of the k seeds.

This is the *intended* per-image maximum: the public reference code slices image j's columns as
``start:start+end`` and so takes the max over images j..2j. The affinity is computed in row
blocks, so memory is O(block * k * hw) instead of O((k * hw)^2).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .precision import fp32


@dataclass(frozen=True)
class CosegResult:
    """Output of :func:`cosegment`.

    reference:     (D,)   L2-normalised reference embedding
    seed_index:    (k,)   flat token index of each image's seed (row-major in h x w)
    seed_features: (k, D) L2-normalised seed features
    scores:        (k, h, w) co-segmentation score of every token
    """

    reference: torch.Tensor
    seed_index: torch.Tensor
    seed_features: torch.Tensor
    scores: torch.Tensor


def _flatten(features: torch.Tensor) -> torch.Tensor:
    """(k, D, h, w) -> (k, h*w, D) L2-normalised."""
    k, d, h, w = features.shape
    return F.normalize(features.float().permute(0, 2, 3, 1).reshape(k, h * w, d), dim=-1)


@fp32
def coseg_scores(
    features: torch.Tensor,
    weights: Optional[torch.Tensor] = None,
    block_size: int = 256,
    exclude_own_image: bool = False,
) -> torch.Tensor:
    """Blockwise co-segmentation scores.

    Args:
        features: (k, D, h, w) dense features of the k archive images (any scale).
        weights: (k, h, w) pixel weights in [0, 1] of the target tokens, or None (all 1).
        block_size: rows of the (k*hw) x (k*hw) affinity computed at once.
        exclude_own_image: average over the k-1 *other* images (needs k >= 2).
    Returns:
        (k, h, w) scores.
    """
    k, _, h, w = features.shape
    n = h * w
    flat = _flatten(features).reshape(k * n, -1)  # (k*n, D)
    wflat = None
    if weights is not None:
        if weights.shape != (k, h, w):
            raise ValueError(f"weights must be (k, h, w) = {(k, h, w)}, got {tuple(weights.shape)}")
        wflat = weights.float().reshape(1, k, n).to(flat.device)
    if exclude_own_image and k < 2:
        exclude_own_image = False  # nothing else to compare with: fall back to the paper's mean
    out = torch.empty(k * n, device=flat.device)
    for start in range(0, k * n, block_size):
        stop = min(start + block_size, k * n)
        sim = (flat[start:stop] @ flat.T).reshape(stop - start, k, n)  # (b, k, n)
        if wflat is not None:
            sim = sim * wflat
        per_image = sim.amax(dim=2)  # (b, k): max over each image's tokens
        if exclude_own_image:
            own = torch.arange(start, stop, device=flat.device) // n
            per_image[torch.arange(stop - start, device=flat.device), own] = 0.0
            out[start:stop] = per_image.sum(dim=1) / (k - 1)
        else:
            out[start:stop] = per_image.mean(dim=1)
    return out.reshape(k, h, w)


@fp32
def coseg_scores_dense(
    features: torch.Tensor, weights: Optional[torch.Tensor] = None, exclude_own_image: bool = False
) -> torch.Tensor:
    """Reference (non-blockwise) implementation: materialises the whole affinity matrix.

    Only for tests and small inputs; same contract as :func:`coseg_scores`.
    """
    k, _, h, w = features.shape
    n = h * w
    flat = _flatten(features).reshape(k * n, -1)
    adj = flat @ flat.T
    if weights is not None:
        adj = adj * weights.float().reshape(1, k * n)
    grid = torch.stack([adj[:, j * n : (j + 1) * n].max(dim=1).values for j in range(k)], dim=1)
    if exclude_own_image and k >= 2:
        own = torch.arange(k * n) // n
        grid[torch.arange(k * n), own] = 0.0
        return (grid.sum(dim=1) / (k - 1)).reshape(k, h, w)
    return grid.mean(dim=1).reshape(k, h, w)


@fp32
def cosegment(
    features: torch.Tensor,
    weights: Optional[torch.Tensor] = None,
    block_size: int = 256,
    exclude_own_image: bool = False,
) -> CosegResult:
    """Seeds and reference embedding of one concept's archive.

    Args:
        features: (k, D, h, w) dense features.
        weights: (k, h, w) target-token weights in [0, 1] or None.
    """
    if features.dim() != 4 or features.shape[0] < 1:
        raise ValueError(f"features must be (k, D, h, w) with k >= 1, got {tuple(features.shape)}")
    if weights is not None and (weights.min() < -1e-6 or weights.max() > 1 + 1e-6):
        raise ValueError("pixel weights must lie in [0, 1]")
    k = features.shape[0]
    scores = coseg_scores(features, weights, block_size, exclude_own_image)
    seed_index = scores.reshape(k, -1).argmax(dim=1)
    flat = _flatten(features)
    seeds = flat[torch.arange(k), seed_index]
    reference = F.normalize(seeds.mean(dim=0), dim=-1)
    return CosegResult(reference=reference, seed_index=seed_index, seed_features=seeds, scores=scores)
