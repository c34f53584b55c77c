"""Concept references: the builder (spec steps 2-4) and the :class:`ConceptBank` facade."""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from .coseg import cosegment
from .config import BankConfig, to_dict
from .encoders import ClipModel, DenseEncoder
from .errors import ClipUnavailableError, EmptyArchiveError, ReCoError, UnknownConceptError
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


class ConceptBuilder:
    """Turns a concept's archive (k images) into a reference embedding.

    Holds the encoders; one instance per process/actor. Language guidance needs CLIP with a
    dense head and a text embedding; without CLIP it is switched off and reported as such.
    """

    def __init__(self, dense: DenseEncoder, clip: Optional[ClipModel] = None, config: BankConfig = BankConfig()):
        self.dense = dense.eval()
        self.clip = clip.eval() if clip is not None else None
        self.config = config

    @property
    def device(self) -> torch.device:
        return next(self.dense.parameters()).device

    @property
    def uses_language(self) -> bool:
        return bool(self.config.language_guidance and self.clip is not None and self.clip.supports_dense)

    def _prepare(self, images: Sequence[ImageLike], size: int) -> torch.Tensor:
        return torch.stack([resize_center_crop(to_pil(im), size) for im in images])

    @torch.no_grad()
    def archive_features(self, images: Sequence[ImageLike]) -> torch.Tensor:
        """k images -> (k, D, h, w) dense features at ``config.image_size`` (centre crops)."""
        if len(images) == 0:
            raise EmptyArchiveError("archive is empty")
        size = _snap(self.config.image_size, self.dense.patch_size)
        out = []
        bs = self.config.batch_size
        for i in range(0, len(images), bs):
            x = self._prepare(images[i : i + bs], size).to(self.device)
            out.append(self.dense(self.dense.normalize(x)).float().cpu())
        return torch.cat(out, dim=0)

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
    def build(
        self,
        name: str,
        images: Sequence[ImageLike],
        text: Optional[torch.Tensor] = None,
        context: Optional[Mapping[str, torch.Tensor]] = None,
    ) -> ConceptReference:
        """Co-segment one concept's archive.

        Args:
            name: concept name.
            images: its k archive images.
            text: (E,) its text embedding (needed for language guidance).
            context: ordered context-concept references {name: (D,)} to eliminate. A concept
                that is itself in ``context`` reuses that reference.
        """
        context = dict(context or {})
        if name in context:
            ref = F.normalize(context[name].float(), dim=0)
            return ConceptReference(name, ref, torch.empty(0, dtype=torch.long), (0, 0), 0, False, (), True)
        if len(images) == 0:
            raise EmptyArchiveError(f"archive of concept {name!r} holds no usable image")
        feats = self.archive_features(images)
        k, _, h, w = feats.shape
        weights = torch.ones(k, h, w)
        use_lang = self.uses_language and text is not None
        if use_lang:
            weights = weights * language_weights(
                self.archive_dense_clip(images), text, (h, w), self.config.language_temperature
            )
        used_ctx: Tuple[str, ...] = ()
        if self.config.context_elimination and context:
            used_ctx = tuple(context)
            weights = weights * context_weights(feats, torch.stack([context[c] for c in used_ctx]))
        res = cosegment(feats, weights, self.config.block_size, self.config.exclude_own_image)
        seed_scores = res.scores.reshape(k, -1).gather(1, res.seed_index[:, None])[:, 0]
        return ConceptReference(name, res.reference, res.seed_index, (h, w), k, use_lang, used_ctx,
                                seed_scores=seed_scores)

    def build_context(
        self,
        archives: Mapping[str, Sequence[ImageLike]],
        texts: Optional[Mapping[str, torch.Tensor]] = None,
    ) -> Dict[str, torch.Tensor]:
        """Context references in order, each built with the earlier ones eliminated."""
        refs: Dict[str, torch.Tensor] = {}
        for name in self.config.context_concepts:
            if name not in archives:
                raise EmptyArchiveError(f"no archive given for context concept {name!r}")
            r = self.build(name, archives[name], (texts or {}).get(name), refs)
            refs[name] = r.reference
        return refs


def _snap(size: int, patch: int) -> int:
    return max(patch, round(size / patch) * patch)


@dataclass
class ConceptBank:
    """Named reference embeddings, optionally with text embeddings and calibration.

    names:           C concept names
    references:      (C, D) L2-normalised reference embeddings (dense-encoder space)
    text_embeddings: (C, E) prompt-ensembled CLIP text embeddings, or None (no CLIP)
    calibration:     (C, 2) per-concept (mean, std) of cos(f, ref_c) on a pool, or None
    metadata:        JSON-serialisable provenance (encoders, weights, modes, archives, config)
    """

    names: Tuple[str, ...]
    references: torch.Tensor
    text_embeddings: Optional[torch.Tensor] = None
    calibration: Optional[torch.Tensor] = None
    metadata: Dict[str, Any] = field(default_factory=dict)

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

    def __len__(self) -> int:
        return len(self.names)

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise UnknownConceptError(
                f"unknown concept {name!r}; the bank holds: {', '.join(self.names) or '(none)'}"
            ) from None

    def subset(self, names: Sequence[str]) -> "ConceptBank":
        idx = [self.index(n) for n in names]
        pick = lambda t: None if t is None else t[idx].clone()  # noqa: E731
        return ConceptBank(tuple(names), self.references[idx].clone(), pick(self.text_embeddings),
                           pick(self.calibration), dict(self.metadata))

    @property
    def has_text(self) -> bool:
        return self.text_embeddings is not None

    @classmethod
    def from_references(
        cls,
        refs: Sequence[ConceptReference],
        text: Optional[torch.Tensor] = None,
        metadata: Optional[Dict[str, Any]] = None,
    ) -> "ConceptBank":
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
            )
        return cls(tuple(r.name for r in refs), torch.stack([r.reference for r in refs]).float(), text, None, meta)

    @classmethod
    def build(
        cls,
        archives: Mapping[str, Sequence[ImageLike]],
        builder: ConceptBuilder,
        context_archives: Optional[Mapping[str, Sequence[ImageLike]]] = None,
        archive_ids: Optional[Mapping[str, Sequence[str]]] = None,
        archive_mode: str = "exemplar",
    ) -> "ConceptBank":
        """Build a bank in this process (see ``cluster`` for the distributed version)."""
        names = list(archives)
        if not names:
            raise EmptyArchiveError("no concepts given")
        text = builder.text_embeddings(names) if builder.clip is not None else None
        texts = {n: text[i] for i, n in enumerate(names)} if text is not None else {}
        ctx: Dict[str, torch.Tensor] = {}
        if builder.config.context_elimination and builder.config.context_concepts:
            ctx_texts = (
                dict(zip(builder.config.context_concepts, builder.text_embeddings(builder.config.context_concepts)))
                if builder.clip is not None else None
            )
            ctx = builder.build_context(context_archives or {}, ctx_texts)
        refs = [builder.build(n, archives[n], texts.get(n), ctx) for n in names]
        meta = bank_metadata(builder, archive_mode, archive_ids)
        return cls.from_references(refs, text, meta)

    @torch.no_grad()
    def calibrate(self, pool_features: torch.Tensor) -> None:
        """Store per-concept (mean, std) of cos(f, ref_c) over a pool of (N, D, h, w) features."""
        feats = F.normalize(pool_features.float(), dim=1).permute(0, 2, 3, 1).reshape(-1, pool_features.shape[1])
        sim = feats @ F.normalize(self.references.float(), dim=1).T  # (tokens, C)
        self.calibration = torch.stack([sim.mean(0), sim.std(0)], dim=1)
        self.metadata["calibration_pool_tokens"] = int(feats.shape[0])

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
        return cls(tuple(meta["names"]), tensors["references"], tensors.get("text_embeddings"),
                   tensors.get("calibration"), dict(meta.get("metadata", {})))

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
        "config": to_dict(builder.config),
        "concepts": {n: {"archive": list(ids)} for n, ids in (archive_ids or {}).items()},
    }


def weights_id(encoder: Union[DenseEncoder, ClipModel]) -> str:
    """Portable identity of an encoder's weights: the content digest the loader recorded where
    there is one (the same file at another path on another node compares equal), else the
    weights label (a hub tag, "random-init")."""
    return str(getattr(encoder, "weights_id", None) or encoder.weights)
