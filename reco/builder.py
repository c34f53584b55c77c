"""Concept references: the :class:`ConceptBuilder` (spec steps 2-4) and its statistics."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union, overload

import torch
import torch.nn.functional as F

from .config import BankConfig
from .coseg import cosegment
from .encoders import ClipModel, DenseEncoder
from .errors import ClipUnavailableError, EmptyArchiveError, ReCoError
from .image import ImageLike, resize_center_crop, snap_to_patch, to_pil
from .text import text_embeddings
from .weighting import context_weights, language_weights

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConceptReference:
    """One concept's co-segmentation result.

    reference:  (D,) L2-normalised reference embedding
    seed_index: (k,) seed token of each archive image (row-major in the h x w grid)
    seed_scores: (k,) co-segmentation score of each seed (None for a reused context reference)
    grid:       (h, w) token grid of the archive features
    prototypes: (P, D) L2-normalised prototypes (None: the reference is the only one)
    calibration: (2,) (mean, std) of the concept's similarity over its own archive tokens, or None
    member_sums / member_counts: (k, P, D) / (k, P) each archive image's contribution to each
                prototype (kept with ``BankConfig.keep_members``, for leave-one-out inference)
    scores:     (k, h, w) co-segmentation score of every archive token (the archive browser's
                heat-maps); None for a reused context reference built elsewhere
    """

    name: str
    reference: torch.Tensor
    seed_index: torch.Tensor
    grid: Tuple[int, int]
    num_images: int
    language_guidance: bool
    context: Tuple[str, ...]
    reused_context: bool = False
    seed_scores: Optional[torch.Tensor] = None  # (k,) co-segmentation score of each seed
    prototypes: Optional[torch.Tensor] = None
    calibration: Optional[torch.Tensor] = None
    member_sums: Optional[torch.Tensor] = None
    member_counts: Optional[torch.Tensor] = None
    scores: Optional[torch.Tensor] = None

    @property
    def vectors(self) -> torch.Tensor:
        """(P, D) what this concept is matched with: its prototypes, or its reference alone."""
        return self.prototypes if self.prototypes is not None else self.reference[None]

    @property
    def confidence(self) -> float:
        """Mean co-segmentation score of the seeds: how much the archive agrees on the region."""
        if self.seed_scores is None or self.seed_scores.numel() == 0:
            return float("nan")
        return float(self.seed_scores.float().mean())


ContextLike = Union[torch.Tensor, ConceptReference]


def context_vectors(context: Mapping[str, ContextLike]) -> torch.Tensor:
    """Stack the vectors to eliminate: every prototype of each context concept ((D,) or (P, D)
    tensors are taken as given)."""
    vecs = []
    for v in context.values():
        t = v.vectors if isinstance(v, ConceptReference) else v
        t = t.float()
        vecs.append(t[None] if t.dim() == 1 else t)
    return torch.cat(vecs, dim=0) if vecs else torch.empty(0)


class ConceptBuilder:
    """Turns a concept's archive (k images) into a reference embedding.

    Holds the encoders; one instance per process/actor. Language guidance needs CLIP with a
    dense head and a text embedding; without CLIP it is switched off and reported as such.
    ``dense=None`` gives a features-only builder: :meth:`build_from_features` works (it needs
    only the config), everything that encodes images raises.
    """

    def __init__(
        self, dense: Optional[DenseEncoder], clip: Optional[ClipModel] = None, config: BankConfig = BankConfig()
    ):
        self.dense = dense.eval() if dense is not None else None
        self.clip = clip.eval() if clip is not None else None
        self.config = config
        self._memo: Optional[Dict[int, Tuple[Any, torch.Tensor]]] = None

    @property
    def device(self) -> torch.device:
        if self.dense is None:
            raise ReCoError("this ConceptBuilder holds no dense encoder (features-only builder)")
        return next(self.dense.parameters()).device

    @property
    def uses_language(self) -> bool:
        return bool(self.config.language_guidance and self.clip is not None and self.clip.supports_dense)

    def _prepare(self, images: Sequence[ImageLike], size: int) -> torch.Tensor:
        return torch.stack([resize_center_crop(to_pil(im), size) for im in images])

    @torch.no_grad()
    def archive_features(self, images: Sequence[ImageLike]) -> torch.Tensor:
        """k images -> (k, D, h, w) dense features at ``config.image_size`` (centre crops).

        Inside :meth:`ConceptBank.build` an image object shared by several archives (or by the
        context archives) is encoded once."""
        if len(images) == 0:
            raise EmptyArchiveError("archive is empty")
        if self.dense is None:
            raise ReCoError("this ConceptBuilder holds no dense encoder (features-only builder)")
        memo = getattr(self, "_memo", None)
        todo = [im for im in images if memo is None or id(im) not in memo]
        todo = list({id(im): im for im in todo}.values())
        size = snap_to_patch(self.config.image_size, self.dense.patch_size)
        new = []
        bs = self.config.batch_size
        for i in range(0, len(todo), bs):
            x = self._prepare(todo[i : i + bs], size).to(self.device)
            new.append(self.dense(self.dense.normalize(x)).float().cpu())
        feats = torch.cat(new, dim=0) if new else None
        if memo is None:
            assert feats is not None
            return feats
        if feats is not None:  # None when every image was memoised already
            for j, im in enumerate(todo):
                memo[id(im)] = (im, feats[j])  # the image is kept alive so its id stays unique
        return torch.stack([memo[id(im)][1] for im in images])

    @torch.no_grad()
    def archive_dense_clip(self, images: Sequence[ImageLike]) -> torch.Tensor:
        """k images -> (k, E, h', w') MaskCLIP features at CLIP's input size."""
        if self.clip is None:
            raise ClipUnavailableError("language guidance needs CLIP weights")
        size = snap_to_patch(self.clip.image_size, self.clip.patch_size)
        out = []
        for i in range(0, len(images), self.config.batch_size):
            x = self._prepare(images[i : i + self.config.batch_size], size).to(self.clip.device)
            out.append(self.clip.dense(self.clip.normalize(x)).float().cpu())
        return torch.cat(out, dim=0)

    def text_embeddings(self, names: Sequence[str]) -> torch.Tensor:
        if self.clip is None:
            raise ClipUnavailableError("text embeddings need CLIP weights")
        return text_embeddings(self.clip.encode_text, names).cpu()

    @torch.no_grad()
    def prepare(
        self, images: Sequence[ImageLike], text: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """An archive's (k, D, h, w) dense features and its (k, h, w) language weights (None
        without CLIP or text): what :meth:`build_from_features` needs."""
        feats = self.archive_features(images)
        lang = None
        if self.uses_language and text is not None:
            lang = language_weights(
                self.archive_dense_clip(images),
                text,
                (feats.shape[-2], feats.shape[-1]),
                self.config.language_temperature,
            )
        return feats, lang

    @torch.no_grad()
    def build(
        self,
        name: str,
        images: Sequence[ImageLike],
        text: Optional[torch.Tensor] = None,
        context: Optional[Mapping[str, ContextLike]] = None,
        peel: Optional[Mapping[str, ContextLike]] = None,
    ) -> ConceptReference:
        """Co-segment one concept's archive.

        Args:
            name: concept name.
            images: its k archive images.
            text: (E,) its text embedding (needed for language guidance).
            context: ordered context-concept references to eliminate (the paper's context
                elimination, weight ``context_temperature``/``context_offset``), ``{name: ref}``
                where a reference is a (D,) / (P, D) tensor or a :class:`ConceptReference`
                (whose prototypes are then all eliminated). A concept that is itself in
                ``context`` reuses that reference (with its seeds, when a ConceptReference is
                given).
            peel: the vocabulary concepts built before this one (``context_from_vocabulary``,
                in :func:`build_order`), peeled off with ``peel_temperature``/``peel_offset``.
        """
        context = dict(context or {})
        if name in context:
            return reused_reference(name, context[name])
        if len(images) == 0:
            raise EmptyArchiveError(f"archive of concept {name!r} holds no usable image")
        feats, lang = self.prepare(images, text)
        return self.build_from_features(name, feats, context, lang, peel)

    @torch.no_grad()
    def build_from_features(
        self,
        name: str,
        features: torch.Tensor,
        context: Optional[Mapping[str, ContextLike]] = None,
        language: Optional[torch.Tensor] = None,
        peel: Optional[Mapping[str, ContextLike]] = None,
        token_weights: Optional[torch.Tensor] = None,
    ) -> ConceptReference:
        """:meth:`build` on precomputed (k, D, h, w) archive features (and optional (k, h, w)
        language weights, see :meth:`prepare`). ``token_weights``: further (k, h, w) weights in
        [0, 1] of the target tokens (``context_order="enrichment"``, :mod:`reco.enrichment`)."""
        context = dict(context or {})
        if name in context:
            return reused_reference(name, context[name])
        if features.shape[0] == 0:
            raise EmptyArchiveError(f"archive of concept {name!r} holds no usable image")
        cfg = self.config
        dev = self.compute_device
        feats = features.float().to(dev)
        k, _, h, w = feats.shape
        weights = torch.ones(k, h, w, device=dev)
        if language is not None:
            weights = weights * language.float().to(dev)
        if token_weights is not None:
            weights = weights * token_weights.float().to(dev)
        used_ctx: Tuple[str, ...] = ()
        if context and cfg.context_elimination:
            used_ctx = tuple(context)
            weights = weights * context_weights(
                feats, context_vectors(context).to(dev), cfg.context_temperature, cfg.context_offset
            )
        peel = {n: v for n, v in (peel or {}).items() if n != name and n not in context}
        if peel and cfg.context_from_vocabulary:
            used_ctx += tuple(peel)
            weights = weights * context_weights(
                feats, context_vectors(peel).to(dev), cfg.peel_temperature, cfg.peel_offset
            )
        res = cosegment(feats, weights, cfg.block_size, cfg.exclude_own_image, cfg.seed_tokens, cfg.prototypes)
        seed_scores = res.scores.reshape(k, -1).gather(1, res.seed_index[:, None])[:, 0]
        protos = res.prototypes if res.prototypes is not None and res.prototypes.shape[0] > 1 else None
        calib = None
        if cfg.calibration != "none":
            vecs = protos if protos is not None else res.reference[None]
            calib = similarity_stats(feats, vecs)
            if cfg.calibration == "archive-threshold":
                calib = threshold_stats(feats, vecs, res.scores, calib)
        keep = cfg.keep_members
        return ConceptReference(
            name,
            _cpu(res.reference),
            _cpu(res.seed_index),
            (h, w),
            k,
            language is not None,
            used_ctx,
            seed_scores=_cpu(seed_scores),
            prototypes=_cpu(protos),
            calibration=_cpu(calib),
            member_sums=_cpu(res.member_sums) if keep else None,
            member_counts=_cpu(res.member_counts) if keep else None,
            scores=_cpu(res.scores),
        )

    @property
    def compute_device(self) -> torch.device:
        """Where co-segmentations run: the dense encoder's device (a GPU actor co-segments on its
        GPU), the CPU for a features-only builder. Results always come back on the CPU."""
        return self.device if self.dense is not None else torch.device("cpu")

    @torch.no_grad()
    def confidence(self, features: torch.Tensor, language: Optional[torch.Tensor] = None) -> float:
        """Mean seed score of a plain co-segmentation of the archive (no context eliminated):
        how strongly the archive agrees on one region. Orders concepts for "confidence" peeling."""
        from .coseg import coseg_scores

        dev = self.compute_device
        weights = None if language is None else language.float().to(dev)
        scores = coseg_scores(features.float().to(dev), weights, self.config.block_size, self.config.exclude_own_image)
        return float(scores.reshape(scores.shape[0], -1).max(dim=1).values.mean())

    def build_context(
        self,
        archives: Mapping[str, Sequence[ImageLike]],
        texts: Optional[Mapping[str, torch.Tensor]] = None,
    ) -> Dict[str, torch.Tensor]:
        """Context references in order, each built with the earlier ones eliminated."""
        return {n: r.reference for n, r in self.build_context_references(archives, texts).items()}

    def build_context_references(
        self,
        archives: Mapping[str, Sequence[ImageLike]],
        texts: Optional[Mapping[str, torch.Tensor]] = None,
    ) -> Dict[str, ConceptReference]:
        """:meth:`build_context` keeping whole :class:`ConceptReference` objects (seeds included),
        so a target that is also a context concept keeps its seeds when it reuses them."""
        refs: Dict[str, ConceptReference] = {}
        for name in self.config.context_concepts:
            if name not in archives:
                raise EmptyArchiveError(f"no archive given for context concept {name!r}")
            refs[name] = self.build(name, archives[name], (texts or {}).get(name), refs)
        return refs


@overload
def _cpu(t: torch.Tensor) -> torch.Tensor: ...
@overload
def _cpu(t: None) -> None: ...
@overload
def _cpu(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]: ...
def _cpu(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.cpu()


def reused_reference(name: str, ctx: ContextLike) -> ConceptReference:
    if isinstance(ctx, ConceptReference):
        return replace(ctx, name=name, reused_context=True)
    ref = F.normalize(ctx.float().reshape(-1, ctx.shape[-1]).mean(0), dim=0)
    return ConceptReference(name, ref, torch.empty(0, dtype=torch.long), (0, 0), 0, False, (), True)


@torch.no_grad()
def similarity_stats(features: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """(mean, std) over all tokens of (N, D, h, w) features of their best cosine to (P, D) vectors."""
    f = F.normalize(features.float(), dim=1).permute(0, 2, 3, 1).reshape(-1, features.shape[1])
    sim = (f @ F.normalize(vectors.float(), dim=1).T).max(dim=1).values
    return torch.stack([sim.mean(), sim.std() if sim.numel() > 1 else sim.new_tensor(1.0)])


@torch.no_grad()
def threshold_stats(
    features: torch.Tensor, vectors: torch.Tensor, coseg: torch.Tensor, stats: torch.Tensor
) -> torch.Tensor:
    """Move the (mean, std) calibration of a concept so that z = 0 falls on its own
    foreground/background boundary in its archive: the foreground is the co-segmentation's
    (scores above the Otsu threshold of all the archive's scores), the boundary is the midpoint
    of the mean z of the foreground and of the rest. Returns (mean', std) with
    mean' = mean + boundary * std."""
    f = F.normalize(features.float(), dim=1).permute(0, 2, 3, 1).reshape(-1, features.shape[1])
    sim = (f @ F.normalize(vectors.float(), dim=1).T).max(dim=1).values
    z = (sim - stats[0]) / stats[1].clamp_min(1e-6)
    boundary = otsu_threshold(z)
    return torch.stack([stats[0] + boundary * stats[1], stats[1]])


def otsu_threshold(values: torch.Tensor, bins: int = 128) -> float:
    """Otsu's threshold of 1-D values (maximal between-class variance over ``bins`` cuts)."""
    v = values.float().reshape(-1).cpu()
    lo, hi = float(v.min()), float(v.max())
    if hi - lo < 1e-12:
        return lo
    hist = torch.histc(v, bins=bins, min=lo, max=hi).double()
    centres = torch.linspace(lo, hi, bins + 1, dtype=torch.float64)
    centres = 0.5 * (centres[1:] + centres[:-1])
    w0 = hist.cumsum(0)
    w1 = hist.sum() - w0
    m0 = (hist * centres).cumsum(0) / w0.clamp_min(1e-12)
    m1 = ((hist * centres).sum() - (hist * centres).cumsum(0)) / w1.clamp_min(1e-12)
    between = w0 * w1 * (m0 - m1) ** 2
    cut = int(between[:-1].argmax())
    return float(0.5 * (centres[cut] + centres[cut + 1]))
