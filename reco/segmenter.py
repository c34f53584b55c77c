"""The :class:`Segmenter` facade: images in, full-resolution label maps and scores out."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .bank import ConceptBank, weights_id
from .config import SegmenterConfig
from .crf import dense_crf
from .encoders import ClipModel, DenseEncoder
from .errors import ConfigError
from .image import ImageLike, inference_size, resize_for_inference, to_pil
from .inference import calibrate, combine_scores, reference_similarity, text_similarity
from .precision import full_precision

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

logger = logging.getLogger(__name__)

BACKGROUND = "background"


@dataclass(frozen=True)
class SegmentationOutput:
    """Result for one image.

    labels:      (H, W) int64, indices into ``class_names`` (full input resolution)
    scores:      (C', H, W) float32 score of every class in ``class_names``
    class_names: the label space: the bank's concepts, preceded by ``"background"`` when a
                 background threshold is configured
    mode:        which evidence produced the scores (e.g. "reference" or "reference x dense-clip")
    """

    labels: torch.Tensor
    scores: torch.Tensor
    class_names: Tuple[str, ...]
    mode: str


class Segmenter:
    """ReCo inference over a :class:`ConceptBank`.

    Dense CLIP is used when the config asks for it *and* CLIP plus the bank's text embeddings
    are available; otherwise inference runs on reference matching alone (``mode`` says which).
    """

    def __init__(
        self,
        bank: ConceptBank,
        dense: DenseEncoder,
        clip: Optional[ClipModel] = None,
        config: SegmenterConfig = SegmenterConfig(),
    ):
        if len(bank) == 0:
            raise ConfigError("the concept bank is empty")
        if bank.references.shape[1] != dense.embed_dim:
            raise ConfigError(
                f"bank references have dimension {bank.references.shape[1]} but the dense encoder "
                f"{dense.name} produces {dense.embed_dim}: the bank was built with another encoder "
                f"({bank.metadata.get('dense_encoder')})"
            )
        if config.calibrate and bank.calibration is None:
            raise ConfigError("segmenter.calibrate is on but the bank has no calibration statistics")
        mismatch = encoder_mismatches(bank, dense, clip if (config.dense_clip and bank.has_text) else None)
        if mismatch:
            msg = "the bank does not fit these encoders: " + "; ".join(mismatch)
            if not config.allow_encoder_mismatch:
                raise ConfigError(msg + " (rebuild the bank with these encoders, or set "
                                  "segmenter.allow_encoder_mismatch if you know they are interchangeable)")
            logger.warning("%s (allowed by segmenter.allow_encoder_mismatch)", msg)
        self.bank = bank
        self.dense = dense.eval()
        self.clip = clip.eval() if clip is not None else None
        self.config = config
        self.use_dense_clip = bool(
            config.dense_clip and clip is not None and clip.supports_dense and bank.has_text
        )
        if config.dense_clip and not self.use_dense_clip:
            logger.info("dense CLIP unavailable (no CLIP weights or no text embeddings): reference matching only")
        names = tuple(bank.names)
        self.class_names: Tuple[str, ...] = ((BACKGROUND,) + names) if config.background_threshold is not None else names

    @property
    def mode(self) -> str:
        parts = ["reference" + ("(calibrated)" if self.config.calibrate else "")]
        if self.use_dense_clip:
            parts.append("dense-clip")
        mode = " x ".join(parts)
        if self.config.background_threshold is not None:
            mode += f", background<{self.config.background_threshold:g}"
        if self.config.crf is not None:
            mode += ", crf"
        return mode

    @property
    def device(self) -> torch.device:
        return next(self.dense.parameters()).device

    @torch.no_grad()
    def scores(self, image: ImageLike) -> torch.Tensor:
        """One image -> (C', H, W) float32 class scores at the image's own resolution."""
        return self.scores_batch([image])[0]

    @torch.no_grad()
    def scores_batch(self, images: Sequence[ImageLike]) -> List[torch.Tensor]:
        """Many images -> one (C', H, W) float32 score map each, at each image's resolution.

        Images whose inference inputs have the same size share an encoder forward pass, in
        batches of at most ``config.batch_size``; similarities and sigmoids are float32 even
        when the encoders run under bf16 autocast.
        """
        pils = [to_pil(im) for im in images]
        out: List[Optional[torch.Tensor]] = [None] * len(pils)
        patches = [self.dense.patch_size] + ([self.clip.patch_size] if self.use_dense_clip and self.clip else [])
        for idx in _batches(pils, self.config, patches):
            for i, s in zip(idx, self._scores_same_size([pils[i] for i in idx])):
                out[i] = s
        return [s for s in out if s is not None]

    def _scores_same_size(self, pils: Sequence["Image.Image"]) -> List[torch.Tensor]:
        dev = self.device
        x = torch.stack([resize_for_inference(p, self.config.image_size, self.dense.patch_size) for p in pils]).to(dev)
        feats = self.dense(self.dense.normalize(x))
        with full_precision():
            logits = reference_similarity(feats, self.bank.references.to(dev))
            if self.config.calibrate:
                logits = calibrate(logits, self.bank.calibration)
        text_sim = None
        if self.use_dense_clip:
            assert self.clip is not None and self.bank.text_embeddings is not None
            xc = torch.stack([resize_for_inference(p, self.config.image_size, self.clip.patch_size) for p in pils])
            xc = xc.to(self.clip.device)
            text_sim = text_similarity(self.clip.dense(self.clip.normalize(xc)), self.bank.text_embeddings.to(xc.device))
        out = []
        for i, p in enumerate(pils):
            t = None if text_sim is None else text_sim[i : i + 1]
            s = combine_scores(logits[i : i + 1], (p.size[1], p.size[0]), t, self.config.text_temperature)[0]
            s = s.float().cpu()
            if self.config.background_threshold is not None:
                bg = torch.full((1,) + tuple(s.shape[1:]), float(self.config.background_threshold))
                s = torch.cat([bg, s], dim=0)
            out.append(s)
        return out

    def __call__(self, images: Union[ImageLike, Sequence[ImageLike]]) -> List[SegmentationOutput]:
        """Segment one image or a list of images (PIL, (H, W, 3) uint8 array, (3, H, W) tensor)."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        pils = [to_pil(im) for im in images]
        outs = []
        for pil, s in zip(pils, self.scores_batch(pils)):
            if self.config.crf is not None:
                s = dense_crf(np.asarray(pil, dtype=np.uint8), s, self.config.crf)
            with full_precision():
                labels = s.float().argmax(dim=0)
            outs.append(SegmentationOutput(labels, s, self.class_names, self.mode))
        return outs


def _batches(pils: Sequence["Image.Image"], config: SegmenterConfig, patches: Sequence[int]) -> List[List[int]]:
    """Indices of ``pils`` grouped by encoder input size, at most ``config.batch_size`` each."""
    groups: dict = {}
    for i, p in enumerate(pils):
        key = tuple(inference_size((p.size[1], p.size[0]), config.image_size, q) for q in patches)
        groups.setdefault(key, []).append(i)
    out = []
    for idx in groups.values():
        out += [idx[j : j + config.batch_size] for j in range(0, len(idx), config.batch_size)]
    return out


def encoder_mismatches(bank: ConceptBank, dense: DenseEncoder, clip: Optional[ClipModel] = None) -> List[str]:
    """Why ``bank`` was not built with these encoders ([] when it was, or when the bank records
    nothing to compare). The dense encoder's name and weights are compared, and the CLIP model
    and weights when ``clip`` is given (dense CLIP uses the bank's text embeddings)."""
    meta = bank.metadata
    out = []

    def check(what: str, recorded: Optional[str], actual: Optional[str]) -> None:
        if recorded is not None and actual is not None and str(recorded) != str(actual):
            out.append(f"{what}: bank {recorded!r}, given {actual!r}")

    check("dense encoder", meta.get("dense_encoder"), dense.name)
    check("dense weights", meta.get("dense_weights_id", meta.get("dense_weights")), weights_id(dense))
    if clip is not None:
        check("CLIP model", meta.get("clip"), clip.name)
        check("CLIP weights", meta.get("clip_weights_id", meta.get("clip_weights")), weights_id(clip))
    return out
