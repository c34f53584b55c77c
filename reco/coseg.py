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

    reference:     (D,)   L2-normalised reference embedding (mean of the seed region)
    seed_index:    (k,)   flat token index of each image's seed (row-major in h x w)
    seed_features: (k, D) L2-normalised seed features
    scores:        (k, h, w) co-segmentation score of every token
    region_index:  (k, n) the n seed-region tokens of each image (n = ``seed_tokens``; column 0
                   is the seed)
    prototypes:    (P, D) L2-normalised prototypes (P = 1: the reference itself)
    member_sums:   (k, P, D) each image's sum of seed-region features assigned to each prototype
    member_counts: (k, P) how many of each image's region tokens each prototype received
    """

    reference: torch.Tensor
    seed_index: torch.Tensor
    seed_features: torch.Tensor
    scores: torch.Tensor
    region_index: Optional[torch.Tensor] = None
    prototypes: Optional[torch.Tensor] = None
    member_sums: Optional[torch.Tensor] = None
    member_counts: Optional[torch.Tensor] = None


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
    seed_tokens: int = 1,
    prototypes: int = 1,
) -> CosegResult:
    """Seeds and reference embedding(s) of one concept's archive.

    Args:
        features: (k, D, h, w) dense features.
        weights: (k, h, w) target-token weights in [0, 1] or None.
        seed_tokens: tokens per image in the seed region (its top tokens by co-segmentation
            score; 1 = the paper's single seed).
        prototypes: number of prototypes (spherical k-means of the seed-region features; 1 =
            the paper's mean reference).
    """
    if features.dim() != 4 or features.shape[0] < 1:
        raise ValueError(f"features must be (k, D, h, w) with k >= 1, got {tuple(features.shape)}")
    if weights is not None and (weights.min() < -1e-6 or weights.max() > 1 + 1e-6):
        raise ValueError("pixel weights must lie in [0, 1]")
    if seed_tokens < 1 or prototypes < 1:
        raise ValueError("seed_tokens and prototypes must be >= 1")
    k, d, h, w = features.shape
    scores = coseg_scores(features, weights, block_size, exclude_own_image)
    flat_scores = scores.reshape(k, -1)
    n = min(seed_tokens, h * w)
    # ties broken towards the lower index, as argmax does: column 0 is always the argmax
    region = torch.sort(flat_scores, dim=1, descending=True, stable=True).indices[:, :n]
    seed_index = region[:, 0].contiguous()
    flat = _flatten(features)
    ar = torch.arange(k, device=flat.device)
    seeds = flat[ar, seed_index]
    region_feats = flat[ar[:, None], region]  # (k, n, D)
    reference = F.normalize(region_feats.reshape(-1, d).mean(dim=0), dim=-1)
    tokens = region_feats.reshape(-1, d)
    if prototypes > 1 and tokens.shape[0] > 1:
        protos, assign = spherical_kmeans(tokens, prototypes)
    else:
        protos, assign = reference[None], torch.zeros(tokens.shape[0], dtype=torch.long, device=tokens.device)
    p = protos.shape[0]
    onehot = F.one_hot(assign, p).float().reshape(k, n, p)  # (k, n, P)
    member_sums = torch.einsum("knp,knd->kpd", onehot, region_feats)
    member_counts = onehot.sum(dim=1)
    return CosegResult(
        reference=reference,
        seed_index=seed_index,
        seed_features=seeds,
        scores=scores,
        region_index=region,
        prototypes=protos,
        member_sums=member_sums,
        member_counts=member_counts,
    )


@fp32
def spherical_kmeans(x: torch.Tensor, k: int, iterations: int = 30, seed: int = 0):
    """Deterministic spherical k-means (k-means++ init from a fixed seed) of (M, D) features.

    Returns ((k', D) L2-normalised centroids, (M,) assignment); k' = min(k, number of distinct
    points). Empty clusters are dropped and the assignment re-indexed.
    """
    x = F.normalize(x.float(), dim=-1)
    m = x.shape[0]
    k = max(1, min(k, m))
    g = torch.Generator().manual_seed(seed)
    centres = [x[int(torch.randint(m, (1,), generator=g))]]
    for _ in range(1, k):
        sim = (x @ torch.stack(centres).T).max(dim=1).values
        dist = (1.0 - sim).clamp_min(0)
        if float(dist.sum()) <= 1e-8:
            break  # every remaining point coincides with a centre
        centres.append(x[int(torch.multinomial(dist.cpu(), 1, generator=g))])  # the seeded generator is a CPU one
    c = torch.stack(centres)
    assign = torch.zeros(m, dtype=torch.long, device=x.device)
    for _ in range(iterations):
        new = (x @ c.T).argmax(dim=1)
        if _ > 0 and torch.equal(new, assign):
            break
        assign = new
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        keep = torch.bincount(assign, minlength=c.shape[0]) > 0
        c = torch.where(keep[:, None], F.normalize(sums, dim=-1), c)
    used = torch.unique(assign)
    remap = torch.full((c.shape[0],), -1, dtype=torch.long, device=x.device)
    remap[used] = torch.arange(len(used), device=x.device)
    return c[used], remap[assign]
