"""Concept references: the builder (spec steps 2-4) and the :class:`ConceptBank` facade."""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from .coseg import cosegment
from .config import BankConfig, config_hash, to_dict
from .encoders import ClipModel, DenseEncoder
from .errors import ClipUnavailableError, ConfigError, EmptyArchiveError, ReCoError, UnknownConceptError
from .image import ImageLike, resize_center_crop, to_pil
from .text import text_embeddings
from .weighting import context_weights, language_weights

logger = logging.getLogger(__name__)

BANK_FORMAT_VERSION = 2  # 2: names + metadata inside the safetensors header
_HEADER_KEY = "reco_bank"
_TENSORS_FILE = "bank.safetensors"
_META_FILE = "bank.json"


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

    def __init__(self, dense: Optional[DenseEncoder], clip: Optional[ClipModel] = None,
                 config: BankConfig = BankConfig()):
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
        size = _snap(self.config.image_size, self.dense.patch_size)
        new = []
        bs = self.config.batch_size
        for i in range(0, len(todo), bs):
            x = self._prepare(todo[i : i + bs], size).to(self.device)
            new.append(self.dense(self.dense.normalize(x)).float().cpu())
        feats = torch.cat(new, dim=0) if new else None
        if memo is None:
            assert feats is not None
            return feats
        for j, im in enumerate(todo):
            memo[id(im)] = (im, feats[j])  # the image is kept alive so its id stays unique
        return torch.stack([memo[id(im)][1] for im in images])

    @torch.no_grad()
    def archive_dense_clip(self, images: Sequence[ImageLike]) -> torch.Tensor:
        """k images -> (k, E, h', w') MaskCLIP features at CLIP's input size."""
        if self.clip is None:
            raise ClipUnavailableError("language guidance needs CLIP weights")
        size = _snap(self.clip.image_size, self.clip.patch_size)
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
            lang = language_weights(self.archive_dense_clip(images), text, tuple(feats.shape[-2:]),
                                    self.config.language_temperature)
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
            return _reused(name, context[name])
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
    ) -> ConceptReference:
        """:meth:`build` on precomputed (k, D, h, w) archive features (and optional (k, h, w)
        language weights, see :meth:`prepare`)."""
        context = dict(context or {})
        if name in context:
            return _reused(name, context[name])
        if features.shape[0] == 0:
            raise EmptyArchiveError(f"archive of concept {name!r} holds no usable image")
        cfg = self.config
        dev = self.compute_device
        feats = features.float().to(dev)
        k, _, h, w = feats.shape
        weights = torch.ones(k, h, w, device=dev)
        if language is not None:
            weights = weights * language.float().to(dev)
        used_ctx: Tuple[str, ...] = ()
        if context and cfg.context_elimination:
            used_ctx = tuple(context)
            weights = weights * context_weights(feats, context_vectors(context).to(dev), cfg.context_temperature,
                                                cfg.context_offset)
        peel = {n: v for n, v in (peel or {}).items() if n != name and n not in context}
        if peel and cfg.context_from_vocabulary:
            used_ctx += tuple(peel)
            weights = weights * context_weights(feats, context_vectors(peel).to(dev), cfg.peel_temperature,
                                                cfg.peel_offset)
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
        return ConceptReference(name, _cpu(res.reference), _cpu(res.seed_index), (h, w), k, language is not None,
                                used_ctx, seed_scores=_cpu(seed_scores), prototypes=_cpu(protos),
                                calibration=_cpu(calib), member_sums=_cpu(res.member_sums) if keep else None,
                                member_counts=_cpu(res.member_counts) if keep else None, scores=_cpu(res.scores))

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


def _cpu(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.cpu()


def _reused(name: str, ctx: ContextLike) -> ConceptReference:
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
def threshold_stats(features: torch.Tensor, vectors: torch.Tensor, coseg: torch.Tensor,
                    stats: torch.Tensor) -> torch.Tensor:
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


def build_order(
    config: BankConfig,
    names: Sequence[str],
    archive_sizes: Optional[Mapping[str, int]] = None,
    confidences: Optional[Mapping[str, float]] = None,
) -> List[str]:
    """The order in which vocabulary concepts are built when each eliminates the earlier ones
    (``config.context_from_vocabulary``): "given" keeps ``names``; "archive-size" puts larger
    archives first; "confidence" puts the concepts whose archives agree most on a region first
    (their plain co-segmentation's mean seed score, :meth:`ConceptBuilder.confidence`). Ties keep
    the vocabulary order, so the order is deterministic."""
    names = list(names)
    pos = {n: i for i, n in enumerate(names)}
    if config.context_order == "given":
        return names
    if config.context_order == "archive-size":
        if archive_sizes is None:
            raise ConfigError("context_order 'archive-size' needs the archive sizes")
        return sorted(names, key=lambda n: (-int(archive_sizes[n]), pos[n]))
    if confidences is None:
        raise ConfigError("context_order 'confidence' needs each concept's confidence")
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
            refs[n] = _reused(n, context[n])
        else:
            refs[n] = builder.build_from_features(n, f, context, lang, dict(refs))
    return refs, order


def _finite(x: float) -> float:
    return float(x) if x == x else float("-inf")


def _snap(size: int, patch: int) -> int:
    return max(patch, round(size / patch) * patch)


@dataclass
class ConceptBank:
    """Named reference embeddings, optionally with text embeddings, calibration and prototypes.

    names:           C concept names
    references:      (C, D) L2-normalised reference embeddings (dense-encoder space)
    text_embeddings: (C, E) prompt-ensembled CLIP text embeddings, or None (no CLIP)
    calibration:     (C, 2) per-concept (mean, std) of the concept's similarity, or None
    metadata:        JSON-serialisable provenance (encoders, weights, modes, archives, config)
    prototypes:      (P, D) L2-normalised prototypes of all concepts, or None (one per concept:
                     the references); ``prototype_concept`` (P,) says whose each one is
    member_sums:     (R, D) one archive image's contribution to one prototype per row, with
    member_index:    (R, 3) int64 rows (concept, position of the image in the concept's archive,
                     prototype), and ``member_counts`` (R,) its token count; kept with
                     ``BankConfig.keep_members`` for leave-one-out inference
    """

    names: Tuple[str, ...]
    references: torch.Tensor
    text_embeddings: Optional[torch.Tensor] = None
    calibration: Optional[torch.Tensor] = None
    metadata: Dict[str, Any] = field(default_factory=dict)
    prototypes: Optional[torch.Tensor] = None
    prototype_concept: Optional[torch.Tensor] = None
    member_sums: Optional[torch.Tensor] = None
    member_index: Optional[torch.Tensor] = None
    member_counts: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        self.names = tuple(self.names)
        if len(set(self.names)) != len(self.names):
            raise ValueError("concept names must be unique")
        if self.references.dim() != 2 or self.references.shape[0] != len(self.names):
            raise ValueError(f"references must be (C={len(self.names)}, D), got {tuple(self.references.shape)}")
        if self.text_embeddings is not None and self.text_embeddings.shape[0] != len(self.names):
            raise ValueError("text_embeddings must have one row per concept")
        if self.calibration is not None and tuple(self.calibration.shape) != (len(self.names), 2):
            raise ValueError("calibration must be (C, 2)")
        if (self.prototypes is None) != (self.prototype_concept is None):
            raise ValueError("prototypes and prototype_concept go together")
        if self.prototypes is not None:
            pc = self.prototype_concept.long()
            if self.prototypes.dim() != 2 or self.prototypes.shape[1] != self.references.shape[1] \
                    or pc.shape != (self.prototypes.shape[0],):
                raise ValueError("prototypes must be (P, D) with one prototype_concept entry each")
            if pc.numel() and (pc.min() < 0 or pc.max() >= len(self.names)):
                raise ValueError("prototype_concept holds an index outside the concepts")
            if set(pc.tolist()) != set(range(len(self.names))):
                raise ValueError("every concept needs at least one prototype")
            self.prototype_concept = pc
        if self.member_sums is not None:
            if self.member_index is None or self.member_counts is None:
                raise ValueError("member_sums, member_index and member_counts go together")
            if self.member_index.shape != (self.member_sums.shape[0], 3):
                raise ValueError("member_index must be (R, 3)")
            self.member_index = self.member_index.long()

    def __len__(self) -> int:
        return len(self.names)

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise UnknownConceptError(
                f"unknown concept {name!r}; the bank holds: {', '.join(self.names) or '(none)'}"
            ) from None

    def concept_vectors(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """((P, D) vectors every pixel is matched with, (P,) the concept of each): the
        prototypes, or one reference per concept."""
        if self.prototypes is not None:
            return self.prototypes, self.prototype_concept
        return self.references, torch.arange(len(self.names))

    def subset(self, names: Sequence[str]) -> "ConceptBank":
        idx = [self.index(n) for n in names]
        pick = lambda t: None if t is None else t[idx].clone()  # noqa: E731
        protos = owner = None
        if self.prototypes is not None:
            new_of = {old: new for new, old in enumerate(idx)}
            keep = [i for i, c in enumerate(self.prototype_concept.tolist()) if c in new_of]
            keep.sort(key=lambda i: new_of[int(self.prototype_concept[i])])
            protos = self.prototypes[keep].clone()
            owner = torch.tensor([new_of[int(self.prototype_concept[i])] for i in keep], dtype=torch.long)
        sums = index = counts = None
        if self.member_sums is not None:
            new_of = {old: new for new, old in enumerate(idx)}
            proto_map = {old: new for new, old in enumerate(keep)} if self.prototypes is not None else new_of
            rows = [r for r in range(self.member_index.shape[0]) if int(self.member_index[r, 0]) in new_of]
            sums = self.member_sums[rows].clone()
            counts = self.member_counts[rows].clone()
            index = torch.tensor([[new_of[int(self.member_index[r, 0])], int(self.member_index[r, 1]),
                                   proto_map[int(self.member_index[r, 2])]] for r in rows],
                                 dtype=torch.long).reshape(-1, 3)
        return ConceptBank(tuple(names), self.references[idx].clone(), pick(self.text_embeddings),
                           pick(self.calibration), dict(self.metadata), protos, owner, sums, index, counts)

    @property
    def has_text(self) -> bool:
        return self.text_embeddings is not None

    @property
    def has_members(self) -> bool:
        return self.member_sums is not None

    @classmethod
    def from_references(
        cls,
        refs: Sequence[ConceptReference],
        text: Optional[torch.Tensor] = None,
        metadata: Optional[Dict[str, Any]] = None,
    ) -> "ConceptBank":
        """Assemble a bank from built concepts: references, and, when every concept carries
        them, calibration statistics, prototypes (when any concept has several) and archive
        members (leave-one-out)."""
        meta = dict(metadata or {})
        meta.setdefault("concepts", {})
        for r in refs:
            meta["concepts"].setdefault(r.name, {}).update(
                num_images=r.num_images,
                grid=list(r.grid),
                language_guidance=r.language_guidance,
                context_eliminated=list(r.context),
                reused_context_reference=r.reused_context,
                seed_index=r.seed_index.tolist(),
                seed_scores=[] if r.seed_scores is None else [round(float(v), 6) for v in r.seed_scores],
                prototypes=int(r.vectors.shape[0]),
            )
        refs = list(refs)
        references = torch.stack([r.reference for r in refs]).float()
        calibration = None
        if refs and all(r.calibration is not None for r in refs):
            calibration = torch.stack([r.calibration.float() for r in refs])
        protos = owner = None
        if any(r.prototypes is not None for r in refs):
            protos = torch.cat([r.vectors.float() for r in refs])
            owner = torch.cat([torch.full((r.vectors.shape[0],), i, dtype=torch.long) for i, r in enumerate(refs)])
        sums = index = counts = None
        if refs and all(r.member_sums is not None for r in refs):
            s_rows, i_rows, c_rows, base = [], [], [], 0
            for ci, r in enumerate(refs):
                k, p, _ = r.member_sums.shape
                s_rows.append(r.member_sums.reshape(k * p, -1).float())
                c_rows.append(r.member_counts.reshape(-1).float())
                jj, pp = torch.meshgrid(torch.arange(k), torch.arange(p), indexing="ij")
                i_rows.append(torch.stack([torch.full((k * p,), ci), jj.reshape(-1),
                                           (pp.reshape(-1) + base) if protos is not None else torch.full((k * p,), ci)],
                                          dim=1))
                base += p
            sums, index, counts = torch.cat(s_rows), torch.cat(i_rows).long(), torch.cat(c_rows)
        return cls(tuple(r.name for r in refs), references, text, calibration, meta, protos, owner,
                   sums, index, counts)

    @classmethod
    def build(
        cls,
        archives: Mapping[str, Sequence[ImageLike]],
        builder: ConceptBuilder,
        context_archives: Optional[Mapping[str, Sequence[ImageLike]]] = None,
        archive_ids: Optional[Mapping[str, Sequence[str]]] = None,
        archive_mode: str = "exemplar",
    ) -> "ConceptBank":
        """Build a bank in this process (see ``cluster`` for the distributed version).

        With ``context_elimination`` the context concepts are built first from
        ``context_archives``; with ``context_from_vocabulary`` the concepts are then built one
        after the other in :func:`build_order`, each eliminating every concept built before it.
        The bank keeps the vocabulary order of ``archives``.
        """
        names = list(archives)
        if not names:
            raise EmptyArchiveError("no concepts given")
        for n in names:
            if len(archives[n]) == 0:
                raise EmptyArchiveError(f"archive of concept {n!r} holds no usable image")
        builder._memo = {}
        try:
            return cls._build(names, archives, builder, context_archives, archive_ids, archive_mode)
        finally:
            builder._memo = None

    @classmethod
    def _build(cls, names, archives, builder, context_archives, archive_ids, archive_mode) -> "ConceptBank":
        cfg = builder.config
        text = builder.text_embeddings(names) if builder.clip is not None else None
        texts = {n: text[i] for i, n in enumerate(names)} if text is not None else {}
        ctx: Dict[str, ConceptReference] = {}
        if cfg.context_elimination and cfg.context_concepts:
            ctx_texts = (
                dict(zip(cfg.context_concepts, builder.text_embeddings(cfg.context_concepts)))
                if builder.clip is not None else None
            )
            ctx = builder.build_context_references(context_archives or {}, ctx_texts)
        refs, order = build_vocabulary(builder, names, lambda n: builder.prepare(archives[n], texts.get(n)),
                                       {n: len(archives[n]) for n in names}, ctx)
        meta = bank_metadata(builder, archive_mode, archive_ids)
        meta["build_order"] = list(order)
        return cls.from_references([refs[n] for n in names], text, meta)

    @classmethod
    def build_from_features(
        cls,
        features: Mapping[str, torch.Tensor],
        builder: ConceptBuilder,
        context: Optional[Mapping[str, ContextLike]] = None,
        archive_ids: Optional[Mapping[str, Sequence[str]]] = None,
        archive_mode: str = "exemplar",
        language: Optional[Mapping[str, torch.Tensor]] = None,
    ) -> "ConceptBank":
        """:meth:`build` on precomputed archive features ``{name: (k, D, h, w)}`` (optional
        ``language`` weights ``{name: (k, h, w)}``, context references already built)."""
        names = list(features)
        if not names:
            raise EmptyArchiveError("no concepts given")
        refs, order = build_vocabulary(builder, names, lambda n: (features[n], (language or {}).get(n)),
                                       {n: int(features[n].shape[0]) for n in names}, context or {})
        meta = bank_metadata(builder, archive_mode, archive_ids)
        meta["build_order"] = list(order)
        return cls.from_references([refs[n] for n in names], None, meta)

    @torch.no_grad()
    def calibrate(self, pool_features: torch.Tensor) -> None:
        """Store per-concept (mean, std) of each concept's similarity (its best prototype's
        cosine) over a pool of (N, D, h, w) features."""
        from .inference import concept_similarity

        sim = concept_similarity(pool_features.float(), *self.concept_vectors(), len(self.names))
        sim = sim.permute(1, 0, 2, 3).reshape(len(self.names), -1)  # (C, tokens)
        self.calibration = torch.stack([sim.mean(1), sim.std(1)], dim=1)
        self.metadata["calibration_pool_tokens"] = int(sim.shape[1])

    def leave_one_out(self, image_id: str) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """The (vectors, owner) of :meth:`concept_vectors` with ``image_id``'s own contributions
        removed from the concepts whose archive lists it (None when no archive lists it). A
        prototype left without any member becomes a zero vector (it then matches nothing)."""
        if self.member_sums is None:
            raise ReCoError("this bank keeps no archive members (build it with bank.keep_members)")
        concepts = self.metadata.get("concepts", {})
        hits = []
        for ci, name in enumerate(self.names):
            archive = concepts.get(name, {}).get("archive") or []
            if image_id in archive:
                hits.append((ci, archive.index(image_id)))
        if not hits:
            return None
        vectors, owner = self.concept_vectors()
        vectors = vectors.clone().float()
        idx = self.member_index
        totals = torch.zeros_like(vectors).index_add_(0, idx[:, 2], self.member_sums.float())
        counts = torch.zeros(vectors.shape[0]).index_add_(0, idx[:, 2], self.member_counts.float())
        for ci, pos in hits:
            rows = (idx[:, 0] == ci) & (idx[:, 1] == pos)
            for r in torch.nonzero(rows).flatten().tolist():
                p = int(idx[r, 2])
                totals[p] -= self.member_sums[r].float()
                counts[p] -= float(self.member_counts[r])
            for p in torch.nonzero(owner == ci).flatten().tolist():
                vectors[p] = F.normalize(totals[p], dim=0) if counts[p] > 0.5 else torch.zeros_like(totals[p])
        return vectors, owner

    # -- persistence: safetensors + JSON, never pickle -------------------------------------
    def to_bytes(self) -> bytes:
        """The whole bank as one safetensors blob; names and metadata ride in its header.

        One blob is one commit: a reader can never pair tensors with another save's names.
        """
        from safetensors.torch import save

        tensors = {"references": self.references.float().contiguous()}
        if self.text_embeddings is not None:
            tensors["text_embeddings"] = self.text_embeddings.float().contiguous()
        if self.calibration is not None:
            tensors["calibration"] = self.calibration.float().contiguous()
        if self.prototypes is not None:
            tensors["prototypes"] = self.prototypes.float().contiguous()
            tensors["prototype_concept"] = self.prototype_concept.long().contiguous()
        if self.member_sums is not None:
            tensors["member_sums"] = self.member_sums.float().contiguous()
            tensors["member_index"] = self.member_index.long().contiguous()
            tensors["member_counts"] = self.member_counts.float().contiguous()
        return save(tensors, metadata={_HEADER_KEY: json.dumps(self._header(), sort_keys=True)})

    def _header(self) -> Dict[str, Any]:
        return {"format_version": BANK_FORMAT_VERSION, "names": list(self.names), "metadata": self.metadata}

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "<bytes>") -> "ConceptBank":
        """Inverse of :meth:`to_bytes`; ``source`` names the origin in error messages."""
        from safetensors.torch import load

        try:
            header = _safetensors_metadata(data).get(_HEADER_KEY)
            tensors = load(data)
        except Exception as exc:
            raise ReCoError(f"concept bank at {source} is unreadable: {exc}") from exc
        if header is None:
            raise ReCoError(f"concept bank at {source} has no {_HEADER_KEY!r} header (not written by reco-cluster >= 2)")
        return cls._from_parts(json.loads(header), tensors, source)

    @classmethod
    def _from_parts(cls, meta: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], source: str) -> "ConceptBank":
        if meta.get("format_version") not in (1, BANK_FORMAT_VERSION):
            raise ReCoError(
                f"concept bank at {source} has format {meta.get('format_version')}, expected {BANK_FORMAT_VERSION}"
            )
        if "references" not in tensors:
            raise ReCoError(f"concept bank at {source} holds no 'references' tensor")
        try:
            return cls(tuple(meta["names"]), tensors["references"], tensors.get("text_embeddings"),
                       tensors.get("calibration"), dict(meta.get("metadata", {})), tensors.get("prototypes"),
                       tensors.get("prototype_concept"), tensors.get("member_sums"), tensors.get("member_index"),
                       tensors.get("member_counts"))
        except ValueError as exc:
            raise ReCoError(f"concept bank at {source} is inconsistent: {exc}") from exc

    def save(self, directory: Union[str, os.PathLike]) -> Path:
        """Write ``bank.safetensors`` (the commit point: tensors + names + metadata, replaced
        atomically) and ``bank.json`` (a readable copy of the header, written after it)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        _atomic_write(d / _TENSORS_FILE, self.to_bytes())
        _atomic_write(d / _META_FILE, bank_json_bytes(self))
        return d

    @classmethod
    def load(cls, directory: Union[str, os.PathLike]) -> "ConceptBank":
        """Load a bank directory. Only ``bank.safetensors`` is read (``bank.json`` is a copy),
        except for format-1 banks, whose header lived in ``bank.json`` alone."""
        d = Path(directory)
        tpath, mpath = d / _TENSORS_FILE, d / _META_FILE
        if not tpath.is_file():
            raise FileNotFoundError(f"{d} is not a concept bank (needs {_TENSORS_FILE})")
        data = tpath.read_bytes()
        try:
            has_header = _HEADER_KEY in _safetensors_metadata(data)
        except Exception as exc:
            raise ReCoError(f"concept bank at {d} is unreadable: {exc}") from exc
        if has_header or not mpath.is_file():
            return cls.from_bytes(data, str(d))
        try:  # format 1: tensors in safetensors, names + metadata in bank.json
            from safetensors.torch import load

            return cls._from_parts(json.loads(mpath.read_text()), load(data), str(d))
        except ReCoError:
            raise
        except Exception as exc:
            raise ReCoError(f"concept bank at {d} is unreadable: {exc}") from exc


def bank_json_bytes(bank: "ConceptBank") -> bytes:
    """The readable ``bank.json`` copy of a bank's header (names, format, metadata)."""
    return json.dumps(bank._header(), indent=2, sort_keys=True).encode()


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _safetensors_metadata(data: bytes) -> Dict[str, str]:
    """The ``__metadata__`` of a safetensors blob (8-byte little-endian header size, JSON header)."""
    if len(data) < 8:
        raise ValueError("file too short for safetensors")
    n = int.from_bytes(data[:8], "little")
    if n <= 0 or 8 + n > len(data):
        raise ValueError("corrupt safetensors header")
    return dict(json.loads(data[8 : 8 + n].decode("utf-8")).get("__metadata__") or {})


def bank_metadata(
    builder: ConceptBuilder, archive_mode: str, archive_ids: Optional[Mapping[str, Sequence[str]]] = None
) -> Dict[str, Any]:
    """Provenance recorded with every bank: encoders, weights, which mode ran, the config."""
    return {
        "dense_encoder": builder.dense.name,
        "dense_weights": builder.dense.weights,
        "dense_weights_id": weights_id(builder.dense),
        "dense_weights_spec": getattr(builder.dense, "weights_spec", None),
        "clip": None if builder.clip is None else builder.clip.name,
        "clip_weights": None if builder.clip is None else builder.clip.weights,
        "clip_weights_id": None if builder.clip is None else weights_id(builder.clip),
        "clip_weights_spec": None if builder.clip is None else getattr(builder.clip, "weights_spec", None),
        "clip_dense_head": None if builder.clip is None else getattr(builder.clip, "dense_head", "maskclip"),
        "archive_mode": archive_mode,
        "language_guidance": builder.uses_language,
        "context_elimination": list(builder.config.context_concepts) if builder.config.context_elimination else [],
        "context_from_vocabulary": (builder.config.context_order if builder.config.context_from_vocabulary
                                    else None),
        "config": to_dict(builder.config),
        "bank_config_hash": config_hash(builder.config),
        "concepts": {n: {"archive": list(ids)} for n, ids in (archive_ids or {}).items()},
    }


def weights_id(encoder: Union[DenseEncoder, ClipModel]) -> str:
    """Portable identity of an encoder's weights: the content digest the loader recorded where
    there is one (the same file at another path on another node compares equal), else the
    weights label (a hub tag, "random-init")."""
    return str(getattr(encoder, "weights_id", None) or encoder.weights)
