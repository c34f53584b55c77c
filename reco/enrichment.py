"""Neighbourhood enrichment: which archive tokens are *about* their concept, judged against the
other concepts' archives of the same vocabulary (``BankConfig.context_order = "enrichment"``).

Every token of every archive is compared with the pooled tokens of all the vocabulary's archives
(its own image excluded). Among its ``K`` nearest neighbours (cosine), the share that comes from
its own concept's archive, divided by that archive's share of the pool, is its *enrichment ratio*

    r(p) = (#{q in kNN(p) : concept(q) = c} / K) / ((N_c - n_i) / (N - n_i))

(c: p's concept, N_c: tokens of c's archive, N: tokens of the pool, n_i: tokens of p's own
image, all excluded from the neighbours). r = 1 is chance; r > 1: the token's neighbourhood is
enriched in its own archive, so it is what that archive is about rather than something every
archive shows. A pole archive that is mostly road has road tokens whose neighbours come from the
road archive (r < 1) and pole tokens whose neighbours come from the pole archive (r > 1).

The co-segmentation weight of a token is ``sigmoid(T * log r) = r^T / (1 + r^T)`` (0.5 at
chance). Nothing is built before anything else, so no concept's reference can remove another's
region: there is no cascade to start. Memory is bounded by blocks of queries against blocks of
the pool (O(block_size * pool_block) similarities), whatever the vocabulary size; the cost is one
pass over all pairs of the vocabulary's archive tokens.
"""

from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn.functional as F

from .precision import fp32


def _tokens(features: torch.Tensor) -> torch.Tensor:
    """(k, D, h, w) -> (k*h*w, D) L2-normalised, image-major."""
    k, d, h, w = features.shape
    return F.normalize(features.float().permute(0, 2, 3, 1).reshape(k * h * w, d), dim=-1)


@fp32
def enrichment_ratios(
    archives: Sequence[torch.Tensor], neighbours: int = 20, block_size: int = 256, pool_block: int = 32768
) -> List[torch.Tensor]:
    """Enrichment ratio of every archive token (see the module docstring).

    Args:
        archives: one (k_c, D, h_c, w_c) feature tensor per concept (sizes and grids may differ).
        neighbours: K nearest neighbours per token (fewer when the pool outside the token's
            image is smaller).
        block_size: query tokens per block.
        pool_block: pool tokens compared with a query block at once.
    Returns:
        one (k_c, h_c, w_c) tensor of ratios per concept (>= 0; 1 = chance). A concept whose
        archive is the only one, or a single image, has no neighbours to judge by: all ones.
    """
    if not archives:
        return []
    device = archives[0].device
    pool = torch.cat([_tokens(f.to(device)) for f in archives])  # (N, D)
    concept = torch.cat(
        [torch.full((f.shape[0] * f.shape[2] * f.shape[3],), c, dtype=torch.long) for c, f in enumerate(archives)]
    ).to(device)
    sizes = [f.shape[2] * f.shape[3] for f in archives]
    image = torch.cat(
        [
            torch.arange(f.shape[0]).repeat_interleave(n) + sum(a.shape[0] for a in archives[:c])
            for c, (f, n) in enumerate(zip(archives, sizes))
        ]
    ).to(device)
    total = pool.shape[0]
    per_concept = torch.bincount(concept, minlength=len(archives)).float()
    image_tokens = torch.bincount(image).float()  # tokens of each image
    ratios = torch.ones(total, device=device)
    for start in range(0, total, block_size):
        stop = min(start + block_size, total)
        q, q_img, q_con = pool[start:stop], image[start:stop], concept[start:stop]
        best = torch.full((stop - start, 0), float("-inf"), device=device)
        best_con = torch.empty((stop - start, 0), dtype=torch.long, device=device)
        for p0 in range(0, total, pool_block):
            p1 = min(p0 + pool_block, total)
            sim = q @ pool[p0:p1].T  # (b, P)
            sim = sim.masked_fill(q_img[:, None] == image[None, p0:p1], float("-inf"))
            local = sim.topk(min(neighbours, p1 - p0), dim=1)
            cand = torch.cat([best, local.values], dim=1)
            cand_con = torch.cat([best_con, concept[p0 + local.indices]], dim=1)
            top = cand.topk(min(neighbours, cand.shape[1]), dim=1)
            best, best_con = top.values, cand_con.gather(1, top.indices)
        found = torch.isfinite(best)  # fewer than K tokens outside the image: count what exists
        hits = ((best_con == q_con[:, None]) & found).sum(1).float()
        share = hits / found.sum(1).clamp_min(1).float()
        own_pool = per_concept[q_con] - image_tokens[q_img]
        chance = own_pool / (total - image_tokens[q_img]).clamp_min(1.0)
        ok = (own_pool > 0) & (found.sum(1) > 0) & (per_concept[q_con] < total)
        ratios[start:stop] = torch.where(ok, share / chance.clamp_min(1e-12), torch.ones_like(share))
    out, at = [], 0
    for f in archives:
        n = f.shape[0] * f.shape[2] * f.shape[3]
        out.append(ratios[at : at + n].reshape(f.shape[0], f.shape[2], f.shape[3]))
        at += n
    return out


def enrichment_weights(ratios: torch.Tensor, temperature: float = 2.0) -> torch.Tensor:
    """Co-segmentation weights in [0, 1] from enrichment ratios: sigmoid(T * log r)
    = r^T / (1 + r^T); 0.5 at chance, 0 for a token none of whose neighbours is its concept's."""
    r = ratios.float().clamp_min(0.0)
    rt = r.pow(temperature)
    return rt / (1.0 + rt)


__all__ = ["enrichment_ratios", "enrichment_weights"]
