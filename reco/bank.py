"""The :class:`ConceptBank` facade: named references, calibration, prototypes, serialisation.

The builder (spec steps 2-4) is :mod:`reco.builder`, whole vocabularies :mod:`reco.vocabulary`;
their public names are re-exported here."""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from .builder import (
    ConceptBuilder,
    ConceptReference,
    ContextLike,
    context_vectors,
    otsu_threshold,
    reused_reference,
    similarity_stats,
    threshold_stats,
)
from .config import config_hash, resolve_context, to_dict
from .encoders import ClipModel, DenseEncoder
from .errors import EmptyArchiveError, ReCoError, UnknownConceptError
from .image import ImageLike
from .vocabulary import build_order, build_vocabulary, claimed_share, ownership_margins

logger = logging.getLogger(__name__)

BANK_FORMAT_VERSION = 2  # 2: names + metadata inside the safetensors header
_HEADER_KEY = "reco_bank"


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
            pc = self._prototype_owner().long()
            if (
                self.prototypes.dim() != 2
                or self.prototypes.shape[1] != self.references.shape[1]
                or pc.shape != (self.prototypes.shape[0],)
            ):
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
            return self.prototypes, self._prototype_owner()
        return self.references, torch.arange(len(self.names))

    def _prototype_owner(self) -> torch.Tensor:
        """``prototype_concept`` of a bank with prototypes (the two are paired by __post_init__)."""
        assert self.prototype_concept is not None, "prototypes without prototype_concept"
        return self.prototype_concept

    def _member_rows(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(member_sums, member_index, member_counts) of a bank that keeps members (the three are
        paired by __post_init__)."""
        sums, index, counts = self.member_sums, self.member_index, self.member_counts
        assert sums is not None and index is not None and counts is not None, "bank keeps no members"
        return sums, index, counts

    def subset(self, names: Sequence[str]) -> "ConceptBank":
        idx = [self.index(n) for n in names]
        pick = lambda t: None if t is None else t[idx].clone()  # noqa: E731
        protos = owner = None
        if self.prototypes is not None:
            new_of = {old: new for new, old in enumerate(idx)}
            old_owner = self._prototype_owner()
            keep = [i for i, c in enumerate(old_owner.tolist()) if c in new_of]
            keep.sort(key=lambda i: new_of[int(old_owner[i])])
            protos = self.prototypes[keep].clone()
            owner = torch.tensor([new_of[int(old_owner[i])] for i in keep], dtype=torch.long)
        sums = index = counts = None
        if self.member_sums is not None:
            old_sums, old_index, old_counts = self._member_rows()
            new_of = {old: new for new, old in enumerate(idx)}
            proto_map = {old: new for new, old in enumerate(keep)} if self.prototypes is not None else new_of
            rows = [r for r in range(old_index.shape[0]) if int(old_index[r, 0]) in new_of]
            sums = old_sums[rows].clone()
            counts = old_counts[rows].clone()
            index = torch.tensor(
                [[new_of[int(old_index[r, 0])], int(old_index[r, 1]), proto_map[int(old_index[r, 2])]] for r in rows],
                dtype=torch.long,
            ).reshape(-1, 3)
        return ConceptBank(
            tuple(names),
            self.references[idx].clone(),
            pick(self.text_embeddings),
            pick(self.calibration),
            dict(self.metadata),
            protos,
            owner,
            sums,
            index,
            counts,
        )

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
        cals = [r.calibration for r in refs if r.calibration is not None]
        if refs and len(cals) == len(refs):
            calibration = torch.stack([c.float() for c in cals])
        protos = owner = None
        if any(r.prototypes is not None for r in refs):
            protos = torch.cat([r.vectors.float() for r in refs])
            owner = torch.cat([torch.full((r.vectors.shape[0],), i, dtype=torch.long) for i, r in enumerate(refs)])
        sums = index = counts = None
        if refs and all(r.member_sums is not None for r in refs):
            s_rows, i_rows, c_rows, base = [], [], [], 0
            for ci, r in enumerate(refs):
                assert r.member_sums is not None and r.member_counts is not None  # all checked above
                k, p, _ = r.member_sums.shape
                s_rows.append(r.member_sums.reshape(k * p, -1).float())
                c_rows.append(r.member_counts.reshape(-1).float())
                jj, pp = torch.meshgrid(torch.arange(k), torch.arange(p), indexing="ij")
                i_rows.append(
                    torch.stack(
                        [
                            torch.full((k * p,), ci),
                            jj.reshape(-1),
                            (pp.reshape(-1) + base) if protos is not None else torch.full((k * p,), ci),
                        ],
                        dim=1,
                    )
                )
                base += p
            sums, index, counts = torch.cat(s_rows), torch.cat(i_rows).long(), torch.cat(c_rows)
        return cls(tuple(r.name for r in refs), references, text, calibration, meta, protos, owner, sums, index, counts)

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
        ``context_archives``, or from the vocabulary's own archive of that name (or alias) where
        ``context_archives`` lacks one (:func:`reco.config.resolve_context`: the others are left
        out with a warning and listed in ``metadata["context_dropped"]``); with
        ``context_from_vocabulary`` the concepts are then built one after the other in
        :func:`build_order`, each eliminating every concept built before it. The bank keeps the
        vocabulary order of ``archives``.
        """
        names = list(archives)
        if not names:
            raise EmptyArchiveError("no concepts given")
        for n in names:
            if len(archives[n]) == 0:
                raise EmptyArchiveError(f"archive of concept {n!r} holds no usable image")
        given = {n: a for n, a in (context_archives or {}).items() if len(a)}
        cfg, dropped = resolve_context(builder.config, [*given, *names])  # warns about the dropped
        ctx_archives = (
            {c: given[c] if c in given else archives[c] for c in cfg.context_concepts}
            if cfg.context_elimination
            else {}
        )
        resolved = builder
        if cfg is not builder.config:  # a shallow copy with the resolved config (the caller's is left as it was)
            resolved = copy.copy(builder)
            resolved.config = cfg
        resolved._memo = {}
        try:
            bank = cls._build(names, archives, resolved, ctx_archives, archive_ids, archive_mode)
        finally:
            resolved._memo = None
        bank.metadata["context_dropped"] = list(dropped)
        return bank

    @classmethod
    def _build(cls, names, archives, builder, context_archives, archive_ids, archive_mode) -> "ConceptBank":
        cfg = builder.config
        text = builder.text_embeddings(names) if builder.clip is not None else None
        texts = {n: text[i] for i, n in enumerate(names)} if text is not None else {}
        ctx: Dict[str, ConceptReference] = {}
        if cfg.context_elimination and cfg.context_concepts:
            ctx_texts = (
                dict(zip(cfg.context_concepts, builder.text_embeddings(cfg.context_concepts)))
                if builder.clip is not None
                else None
            )
            ctx = builder.build_context_references(context_archives or {}, ctx_texts)
        refs, order = build_vocabulary(
            builder,
            names,
            lambda n: builder.prepare(archives[n], texts.get(n)),
            {n: len(archives[n]) for n in names},
            ctx,
        )
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
        refs, order = build_vocabulary(
            builder,
            names,
            lambda n: (features[n], (language or {}).get(n)),
            {n: int(features[n].shape[0]) for n in names},
            context or {},
        )
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
        member_sums, idx, member_counts = self._member_rows()
        totals = torch.zeros_like(vectors).index_add_(0, idx[:, 2], member_sums.float())
        counts = torch.zeros(vectors.shape[0]).index_add_(0, idx[:, 2], member_counts.float())
        for ci, pos in hits:
            rows = (idx[:, 0] == ci) & (idx[:, 1] == pos)
            for r in torch.nonzero(rows).flatten().tolist():
                p = int(idx[r, 2])
                totals[p] -= member_sums[r].float()
                counts[p] -= float(member_counts[r])
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
            tensors["prototype_concept"] = self._prototype_owner().long().contiguous()
        if self.member_sums is not None:
            member_sums, member_index, member_counts = self._member_rows()
            tensors["member_sums"] = member_sums.float().contiguous()
            tensors["member_index"] = member_index.long().contiguous()
            tensors["member_counts"] = member_counts.float().contiguous()
        return save(tensors, metadata={_HEADER_KEY: json.dumps(self._header(), sort_keys=True)})

    def _header(self) -> Dict[str, Any]:
        return {"format_version": BANK_FORMAT_VERSION, "names": list(self.names), "metadata": self.metadata}

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "<bytes>", bank_json: Optional[bytes] = None) -> "ConceptBank":
        """Inverse of :meth:`to_bytes`; ``source`` names the origin in error messages.

        ``bank_json``: the readable header copy, used only for a format-1 blob (see
        :func:`needs_bank_json`), whose names and metadata lived there alone."""
        from safetensors.torch import load

        try:
            header = safetensors_metadata(data).get(_HEADER_KEY)
            tensors = load(data)
        except Exception as exc:
            raise ReCoError(f"concept bank at {source} is unreadable: {exc}") from exc
        if header is None and bank_json is not None:  # format 1: names + metadata in bank.json
            try:
                return cls._from_parts(json.loads(bank_json), tensors, source)
            except ReCoError:
                raise
            except Exception as exc:
                raise ReCoError(f"concept bank at {source} is unreadable: {exc}") from exc
        if header is None:
            raise ReCoError(
                f"concept bank at {source} has no {_HEADER_KEY!r} header (not written by reco-cluster >= 2)"
            )
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
            return cls(
                tuple(meta["names"]),
                tensors["references"],
                tensors.get("text_embeddings"),
                tensors.get("calibration"),
                dict(meta.get("metadata", {})),
                tensors.get("prototypes"),
                tensors.get("prototype_concept"),
                tensors.get("member_sums"),
                tensors.get("member_index"),
                tensors.get("member_counts"),
            )
        except ValueError as exc:
            raise ReCoError(f"concept bank at {source} is inconsistent: {exc}") from exc


def needs_bank_json(data: bytes, source: str = "<bytes>") -> bool:
    """True for a format-1 bank blob, whose names and metadata are in ``bank.json`` rather than
    in its own header (``ReCoError`` for a blob that is not safetensors)."""
    try:
        return _HEADER_KEY not in safetensors_metadata(data)
    except Exception as exc:
        raise ReCoError(f"concept bank at {source} is unreadable: {exc}") from exc


def bank_json_bytes(bank: "ConceptBank") -> bytes:
    """The readable ``bank.json`` copy of a bank's header (names, format, metadata)."""
    return json.dumps(bank._header(), indent=2, sort_keys=True).encode()


def safetensors_metadata(data: bytes) -> Dict[str, str]:
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
    dense = builder.dense
    if dense is None:
        raise ReCoError("bank metadata names the dense encoder: this ConceptBuilder holds none (features-only)")
    return {
        "dense_encoder": dense.name,
        "dense_weights": dense.weights,
        "dense_weights_id": weights_id(dense),
        "dense_weights_spec": getattr(dense, "weights_spec", None),
        "clip": None if builder.clip is None else builder.clip.name,
        "clip_weights": None if builder.clip is None else builder.clip.weights,
        "clip_weights_id": None if builder.clip is None else weights_id(builder.clip),
        "clip_weights_spec": None if builder.clip is None else getattr(builder.clip, "weights_spec", None),
        "clip_dense_head": None if builder.clip is None else getattr(builder.clip, "dense_head", "maskclip"),
        "archive_mode": archive_mode,
        "language_guidance": builder.uses_language,
        "context_elimination": list(builder.config.context_concepts) if builder.config.context_elimination else [],
        "context_from_vocabulary": (builder.config.context_order if builder.config.context_from_vocabulary else None),
        "config": to_dict(builder.config),
        "bank_config_hash": config_hash(builder.config),
        "concepts": {n: {"archive": list(ids)} for n, ids in (archive_ids or {}).items()},
    }


def weights_id(encoder: Union[DenseEncoder, ClipModel]) -> str:
    """Portable identity of an encoder's weights: the content digest the loader recorded where
    there is one (the same file at another path on another node compares equal), else the
    weights label (a hub tag, "random-init")."""
    return str(getattr(encoder, "weights_id", None) or encoder.weights)


__all__ = [
    "BANK_FORMAT_VERSION",
    "ConceptBank",
    "ConceptBuilder",
    "ConceptReference",
    "ContextLike",
    "bank_json_bytes",
    "bank_metadata",
    "build_order",
    "build_vocabulary",
    "claimed_share",
    "context_vectors",
    "otsu_threshold",
    "ownership_margins",
    "reused_reference",
    "safetensors_metadata",
    "similarity_stats",
    "threshold_stats",
    "weights_id",
]
