"""Discriminative co-segmentation: which archive tokens are *about* their concept, judged against
the other concepts' archives of the same vocabulary (``BankConfig.context_order = "enrichment"``).

ReCo's co-segmentation score of a token p of concept c's archive is its mean, over the archive's
other images j, of its best match in j: ``a_c(p) = mean_j max_{q in j} <f_p, f_q>``. The same
statistic against another concept's archive, ``a_c'(p)``, says how common p's look is there.
The *enrichment margin* of p is

    margin(p) = a_c(p) - max_{c' != c} a_c'(p)

positive when p's look is commoner in its own archive than in any other archive of the
vocabulary; negative for what another archive is more about (the road under a pole archive's
poles: the road archive matches road better). The co-segmentation weight of a token is one-sided,
``min(1, 2 sigmoid(T * margin))``: a token that another archive is more about fades out (the
diffuse archive gives up the road), every other token keeps its full weight, so ReCo's own
criterion (the region the archive agrees on) still chooses among them. A symmetric weight would
also favour what is merely *unique* to an archive (the pavement beside the road in road crops)
over what the archive is about but shares with others (its road, also under every pole). Nothing
is built before anything else, so no concept's reference can remove another's region: there is
no cascade to start.

(A token-level version, the share of a token's K nearest pool tokens that come from its own
archive, was measured first and dropped: on video archives consecutive frames of one archive are
each other's nearest neighbours, so nearly every token's neighbours were all its own archive's.
Averaging over the archive's images, as the co-segmentation itself does, is not dominated by a few
near-duplicate images.)

Memory is bounded by blocks of query tokens against blocks of pool images (O(block_size *
pool_tokens) similarities) and O(tokens) for the result, whatever the vocabulary size; the cost is
one pass over all pairs of the vocabulary's archive tokens (C times one concept's co-segmentation
per concept).
"""

from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn.functional as F

from .precision import fp32


def _tokens(features: torch.Tensor) -> torch.Tensor:
    """(k, D, h, w) -> (k, h*w, D) L2-normalised."""
    k, d, h, w = features.shape
    return F.normalize(features.float().permute(0, 2, 3, 1).reshape(k, h * w, d), dim=-1)


@fp32
def _archive_affinity(query: torch.Tensor, pool: torch.Tensor, images_per_block: int) -> torch.Tensor:
    """(b, D) query tokens, (k', n', D) one archive's tokens -> (b, k') best match in each image."""
    out = []
    for j0 in range(0, pool.shape[0], images_per_block):
        chunk = pool[j0 : j0 + images_per_block]  # (m, n', D)
        sim = query @ chunk.reshape(-1, chunk.shape[-1]).T  # (b, m * n')
        out.append(sim.reshape(query.shape[0], chunk.shape[0], chunk.shape[1]).amax(dim=2))
    return torch.cat(out, dim=1)


@fp32
def enrichment_margins(
    archives: Sequence[torch.Tensor], block_size: int = 256, pool_tokens: int = 16384
) -> List[torch.Tensor]:
    """Enrichment margin of every archive token (see the module docstring).

    Args:
        archives: one (k_c, D, h_c, w_c) feature tensor per concept (sizes and grids may differ).
        block_size: query tokens per block.
        pool_tokens: about how many pool tokens a query block is compared with at once (whole
            images: at least one).
    Returns:
        one (k_c, h_c, w_c) tensor of margins per concept. Without another archive (a vocabulary
        of one) the margin is +inf (nothing competes); a one-image archive has no own score to
        compare: its margins are 0 (neutral).
    """
    flat = [_tokens(f) for f in archives]
    out = []
    for c, own in enumerate(flat):
        k, n, _ = own.shape
        q = own.reshape(k * n, -1)
        margin = torch.empty(k * n, device=q.device)
        image = torch.arange(k, device=q.device).repeat_interleave(n)
        for start in range(0, k * n, block_size):
            stop = min(start + block_size, k * n)
            qb = q[start:stop]
            rows = torch.arange(stop - start, device=q.device)
            best_other = torch.full((stop - start,), float("-inf"), device=q.device)
            own_score = torch.zeros(stop - start, device=q.device)
            for c2, pool in enumerate(flat):
                per_image = _archive_affinity(qb, pool.to(q.device), max(1, pool_tokens // pool.shape[1]))
                if c2 != c:
                    best_other = torch.maximum(best_other, per_image.mean(dim=1))
                elif k > 1:
                    per_image[rows, image[start:stop]] = 0.0
                    own_score = per_image.sum(dim=1) / (k - 1)
            if k > 1:
                margin[start:stop] = own_score - best_other
            else:
                margin[start:stop] = torch.where(torch.isinf(best_other), best_other.abs(), 0.0)
        out.append(margin.reshape(k, archives[c].shape[2], archives[c].shape[3]))
    return out


def enrichment_weights(margins: torch.Tensor, temperature: float = 100.0) -> torch.Tensor:
    """Co-segmentation weights in [0, 1] from enrichment margins: min(1, 2 sigmoid(T * margin));
    1 where no other archive is more about the token, towards 0 where one is."""
    return (2.0 * torch.sigmoid(temperature * margins.float())).clamp(max=1.0)


__all__ = ["enrichment_margins", "enrichment_weights"]
