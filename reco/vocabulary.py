"""Building a whole vocabulary in this process: the order in which concepts are built and what
each may peel off (``BankConfig.context_from_vocabulary``).

Orders (``BankConfig.context_order``):

* ``given`` / ``archive-size`` / ``confidence``: every concept peels off *every* concept built
  before it (sequential peeling). A concept whose archive is diffuse (thin objects, crops that are
  mostly other things) seeds on whatever its archive shares, e.g. the road under the poles, and
  then peels that region from every concept built after it: a cascade.
* ``ownership``: references that cannot cascade. Every concept is first co-segmented alone; its
  reference's *ownership margin* is the share of its own archive it claims minus the largest share
  it claims of any other concept's archive (:func:`ownership_margins`). A concept whose reference
  is more about another concept's archive than its own (margin <= ``own_margin``) is diffuse: it
  never peels anything, and it is built last, with the owners peeled off. Owners are built first,
  by decreasing margin, each peeling the owners before it (``owners_peel``) or each keeping its
  plain co-segmentation (its archive is about it: nothing needs peeling).
* ``enrichment``: no order and no peeling (:mod:`reco.enrichment`). Every archive token is
  weighted by how much better it is matched by its own concept's archive than by the best other
  archive of the vocabulary (co-segmentation scores against each archive); each concept is then
  co-segmented once with these weights. A diffuse archive's road tokens are matched better by
  the road archive and get a low weight in the diffuse concept, while road's own archive keeps
  its road: nothing one concept builds can change another concept's reference.

* ``others``: no order. Every concept is first co-segmented alone; each is then co-segmented
  again with the plain references of *all* the other concepts peeled off (the paper's context
  elimination with the whole vocabulary as context). Only plain references peel, so nothing
  propagates beyond one step; with the paper's flat weight (``peel_temperature`` 1,
  ``peel_offset`` 0) a diffuse concept's road-like reference only lowers the road's weight in the
  road archive, as every other concept's does, and cannot remove it.

``ownership``, ``enrichment`` and ``others`` need every archive's features at once: they are built in one
process (:meth:`reco.bank.ConceptBank.build`); :func:`build_order` refuses ``ownership`` without the
margins it is ordered by, and ``enrichment`` and ``others`` always (they have no order), so the
distributed bank job's peeling chain refuses them instead of building something else.
"""

from __future__ import annotations

import logging
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .builder import ConceptBuilder, ConceptReference, ContextLike, reused_reference
from .config import BankConfig
from .enrichment import enrichment_margins, enrichment_weights
from .errors import ConfigError

logger = logging.getLogger(__name__)


def build_order(
    config: BankConfig,
    names: Sequence[str],
    archive_sizes: Optional[Mapping[str, int]] = None,
    confidences: Optional[Mapping[str, float]] = None,
) -> List[str]:
    """The order in which vocabulary concepts are built when each eliminates the earlier ones
    (``config.context_from_vocabulary``): "given" keeps ``names``; "archive-size" puts larger
    archives first; "confidence" puts the concepts whose archives agree most on a region first
    (their plain co-segmentation's mean seed score, :meth:`ConceptBuilder.confidence`);
    "ownership" puts the owners (``confidences`` = ownership margins above ``config.own_margin``)
    first by decreasing margin, then the diffuse concepts, also by margin. Ties keep
    the vocabulary order, so the order is deterministic."""
    names = list(names)
    pos = {n: i for i, n in enumerate(names)}
    if config.context_order == "given":
        return names
    if config.context_order == "archive-size":
        if archive_sizes is None:
            raise ConfigError("context_order 'archive-size' needs the archive sizes")
        return sorted(names, key=lambda n: (-int(archive_sizes[n]), pos[n]))
    if config.context_order in ("enrichment", "others"):
        raise ConfigError(
            f"context_order {config.context_order!r} has no build order: it weighs every archive against all "
            "the others at once (reco.bank.ConceptBank.build, one process)"
        )
    if confidences is None:
        raise ConfigError(f"context_order {config.context_order!r} needs each concept's confidence")
    if config.context_order == "ownership":
        return sorted(
            names, key=lambda n: (_finite(confidences[n]) <= config.own_margin, -_finite(confidences[n]), pos[n])
        )
    return sorted(names, key=lambda n: (-_finite(confidences[n]), pos[n]))


def build_vocabulary(
    builder: ConceptBuilder,
    names: Sequence[str],
    prepare,
    archive_sizes: Mapping[str, int],
    context: Optional[Mapping[str, ContextLike]] = None,
) -> Tuple[Dict[str, ConceptReference], List[str]]:
    """Build every concept of a vocabulary in this process: ``prepare(name)`` gives its
    (features, language weights) (see :meth:`ConceptBuilder.prepare`). Without
    ``context_from_vocabulary`` every concept sees only ``context``; with it the concepts are
    built in :func:`build_order`, each peeling off those built before it. Returns the
    references by name and the build order."""
    cfg = builder.config
    context = dict(context or {})
    refs: Dict[str, ConceptReference] = {}
    if not cfg.context_from_vocabulary:
        for n in names:
            f, lang = prepare(n)
            refs[n] = builder.build_from_features(n, f, context, lang)
        return refs, list(names)
    cache: Dict[str, Tuple[torch.Tensor, Optional[torch.Tensor]]] = {}
    confidences = None
    if cfg.context_order == "ownership":
        return _build_by_ownership(builder, names, prepare, context)
    if cfg.context_order == "enrichment":
        return _build_by_enrichment(builder, names, prepare, context)
    if cfg.context_order == "others":
        return _build_against_others(builder, names, prepare, context)
    if cfg.context_order == "confidence":
        confidences = {}
        for n in names:
            if n in context:
                confidences[n] = float("inf")  # reused as it is: nothing to peel
                continue
            cache[n] = prepare(n)
            confidences[n] = builder.confidence(*cache[n])
    order = build_order(cfg, names, archive_sizes, confidences)
    for n in order:
        f, lang = cache.pop(n) if n in cache else (prepare(n) if n not in context else (None, None))
        if f is None:
            refs[n] = reused_reference(n, context[n])
        else:
            refs[n] = builder.build_from_features(n, f, context, lang, dict(refs))
    return refs, order


def _finite(x: float) -> float:
    return float(x) if x == x else float("-inf")


@torch.no_grad()
def claimed_share(vectors: torch.Tensor, features: torch.Tensor, temperature: float, offset: float) -> float:
    """Share of an archive's tokens that a concept with prototypes ``vectors`` (P, D) would peel:
    the mean over the (k, D, h, w) ``features`` of sigmoid(T (max_p cos(f, v_p) - offset))."""
    f = F.normalize(features.float(), dim=1).permute(0, 2, 3, 1).reshape(-1, features.shape[1])
    sim = (f @ F.normalize(vectors.float().reshape(-1, f.shape[1]), dim=1).T).max(dim=1).values
    return float(torch.sigmoid(temperature * (sim - offset)).mean())


def ownership_margins(
    refs: Mapping[str, ConceptReference], features: Mapping[str, torch.Tensor], temperature: float, offset: float
) -> Dict[str, float]:
    """Per concept: the share of its own archive its reference claims minus the largest share it
    claims of another concept's archive (:func:`claimed_share`, the peeling weight). Positive:
    the region is what this archive is about; negative: another archive is more about it."""
    out = {}
    for n, r in refs.items():
        own = claimed_share(r.vectors, features[n], temperature, offset)
        other = max(
            (claimed_share(r.vectors, features[m], temperature, offset) for m in features if m != n), default=0.0
        )
        out[n] = own - other
    return out


def _build_by_ownership(
    builder: ConceptBuilder, names: Sequence[str], prepare, context: Mapping[str, ContextLike]
) -> Tuple[Dict[str, ConceptReference], List[str]]:
    cfg = builder.config
    prepared = {n: prepare(n) for n in names if n not in context}
    plain = {n: builder.build_from_features(n, f, context, lang) for n, (f, lang) in prepared.items()}
    margins = ownership_margins(plain, {n: f for n, (f, _) in prepared.items()}, cfg.peel_temperature, cfg.peel_offset)
    margins.update({n: float("inf") for n in names if n in context})
    order = build_order(cfg, names, None, margins)
    owners = {n for n in names if margins[n] > cfg.own_margin}
    refs: Dict[str, ConceptReference] = {}
    for n in order:
        if n in context:
            refs[n] = reused_reference(n, context[n])
            continue
        peel = {m: refs[m] for m in refs if m in owners}
        if not peel or (n in owners and not cfg.owners_peel):
            refs[n] = plain[n]
            continue
        f, lang = prepared[n]
        refs[n] = builder.build_from_features(n, f, context, lang, peel)
    logger.info(
        "ownership margins: %s; owners peel: %s",
        {n: round(v, 3) for n, v in margins.items()},
        [n for n in order if n in owners],
    )
    return refs, order


def _build_by_enrichment(
    builder: ConceptBuilder, names: Sequence[str], prepare, context: Mapping[str, ContextLike]
) -> Tuple[Dict[str, ConceptReference], List[str]]:
    """``context_order="enrichment"``: the enrichment margin of every archive token against all
    the vocabulary's archives (context concepts' included), then one weighted co-segmentation per
    concept; a concept that is also a context concept reuses its reference. With
    ``enrichment_peel_others`` each concept is then co-segmented once more (same weights) with the
    other concepts' enrichment references peeled (weight ``peel_temperature`` / ``peel_offset``):
    order-free, and what peels is already what each archive is about."""
    cfg = builder.config
    dev = builder.compute_device
    prepared = {n: prepare(n) for n in names}
    margins = enrichment_margins([prepared[n][0].to(dev) for n in names], cfg.block_size)
    refs: Dict[str, ConceptReference] = {}
    for n, m in zip(names, margins):
        if n in context:
            refs[n] = reused_reference(n, context[n])
            continue
        f, lang = prepared[n]
        w = enrichment_weights(m, cfg.enrichment_temperature)
        refs[n] = builder.build_from_features(n, f, context, lang, token_weights=w)
    if cfg.enrichment_peel_others:
        first = dict(refs)
        for n, m in zip(names, margins):
            others = {o: r for o, r in first.items() if o != n}
            if n in context or not others:
                continue
            f, lang = prepared[n]
            w = enrichment_weights(m, cfg.enrichment_temperature)
            refs[n] = builder.build_from_features(n, f, context, lang, others, token_weights=w)
    logger.info(
        "enrichment: share of each archive's tokens with a positive margin: %s",
        {n: round(float((m > 0).float().mean()), 3) for n, m in zip(names, margins)},
    )
    return refs, list(names)


def _build_against_others(
    builder: ConceptBuilder, names: Sequence[str], prepare, context: Mapping[str, ContextLike]
) -> Tuple[Dict[str, ConceptReference], List[str]]:
    """``context_order="others"``: plain co-segmentations, then each concept again with every
    other concept's plain reference peeled; context concepts reuse their references."""
    prepared = {n: prepare(n) for n in names if n not in context}
    plain = {n: builder.build_from_features(n, f, context, lang) for n, (f, lang) in prepared.items()}
    refs: Dict[str, ConceptReference] = {}
    for n in names:
        if n in context:
            refs[n] = reused_reference(n, context[n])
            continue
        f, lang = prepared[n]
        others = {m: r for m, r in plain.items() if m != n}
        refs[n] = builder.build_from_features(n, f, context, lang, others) if others else plain[n]
    return refs, list(names)
