"""Dense inference (spec step 5): reference match x dense CLIP, full-resolution label maps.

Every function here computes in float32 with autocast disabled (:mod:`reco.precision`), so
encoders may run in bf16 without changing which concept wins a pixel.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .precision import fp32


@fp32
def reference_similarity(features: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """cos(f, ref_c) for every token and concept.

    Args:
        features: (B, D, h, w) dense features.
        references: (C, D) reference embeddings.
    Returns:
        (B, C, h, w) cosine similarities.
    """
    return torch.einsum("bdhw,cd->bchw", F.normalize(features.float(), dim=1), F.normalize(references.float(), dim=1))


@fp32
def concept_similarity(
    features: torch.Tensor,
    vectors: torch.Tensor,
    owner: Optional[torch.Tensor] = None,
    num_concepts: Optional[int] = None,
) -> torch.Tensor:
    """Each concept's best cosine over its prototypes: max_{p of c} cos(f, v_p).

    Args:
        features: (B, D, h, w) dense features.
        vectors: (P, D) prototypes (or one reference per concept).
        owner: (P,) concept index of each vector (None: vector i is concept i).
        num_concepts: C (default: max(owner) + 1).
    Returns:
        (B, C, h, w) cosine similarities (-2 for a concept whose vectors are all zero).
    """
    sim = reference_similarity(features, vectors)
    zero = vectors.float().norm(dim=1) < 1e-12
    if zero.any():
        sim[:, zero] = -2.0
    if owner is None:
        return sim
    owner = owner.to(sim.device).long()
    c = int(num_concepts if num_concepts is not None else int(owner.max()) + 1)
    if sim.shape[1] == c and torch.equal(owner, torch.arange(c, device=owner.device)):
        return sim
    out = torch.full((sim.shape[0], c) + tuple(sim.shape[2:]), -2.0, device=sim.device)
    index = owner.view(1, -1, *([1] * (sim.dim() - 2))).expand_as(sim)
    return out.scatter_reduce_(1, index, sim, "amax", include_self=True)


@fp32
def calibrate(similarity: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
    """Standardise similarities per concept: (cos - mean_c) / std_c.

    Args:
        similarity: (B, C, h, w).
        stats: (C, 2) per-concept (mean, std) of cos(f, ref_c) over a calibration pool.
    """
    mean = stats[:, 0].view(1, -1, 1, 1).to(similarity)
    std = stats[:, 1].clamp_min(1e-6).view(1, -1, 1, 1).to(similarity)
    return (similarity - mean) / std


@fp32
def text_similarity(dense_clip: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """cos(denseCLIP(pixel), text_c): (B, E, h', w') x (C, E) -> (B, C, h', w')."""
    return torch.einsum("behw,ce->bchw", F.normalize(dense_clip.float(), dim=1), F.normalize(text.float(), dim=1))


@fp32
def combine_scores(
    ref_logits: torch.Tensor,
    out_size: Tuple[int, int],
    text_sim: Optional[torch.Tensor] = None,
    text_temperature: float = 10.0,
) -> torch.Tensor:
    """s_c = up(sigmoid(ref_logits)) * up(sigmoid(T * text_sim)) (the second factor optional).

    Args:
        ref_logits: (B, C, h, w) reference similarity (raw cosine or calibrated).
        out_size: (H, W) output resolution.
        text_sim: (B, C, h', w') dense-CLIP text similarity or None.
    Returns:
        (B, C, H, W) scores in (0, 1).
    """
    s = F.interpolate(torch.sigmoid(ref_logits), size=out_size, mode="bilinear", align_corners=False)
    if text_sim is not None:
        t = torch.sigmoid(text_temperature * text_sim)
        s = s * F.interpolate(t, size=out_size, mode="bilinear", align_corners=False)
    return s
