"""The :class:`Segmenter` facade: images in, full-resolution label maps and scores out."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .bank import ConceptBank
from .config import SegmenterConfig
from .crf import dense_crf
from .encoders import ClipModel, DenseEncoder
from .errors import ConfigError
from .image import ImageLike, resize_for_inference, to_pil
from .inference import calibrate, combine_scores, reference_similarity, text_similarity

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

    @torch.no_grad()
    def scores(self, image: ImageLike) -> torch.Tensor:
        """One image -> (C', H, W) class scores at the image's own resolution."""
        pil = to_pil(image)
        out_size = (pil.size[1], pil.size[0])
        dev = next(self.dense.parameters()).device
        x = resize_for_inference(pil, self.config.image_size, self.dense.patch_size)[None].to(dev)
        feats = self.dense(self.dense.normalize(x))
        logits = reference_similarity(feats, self.bank.references.to(feats.device))
        if self.config.calibrate:
            logits = calibrate(logits, self.bank.calibration)
        text_sim = None
        if self.use_dense_clip:
            assert self.clip is not None and self.bank.text_embeddings is not None
            xc = resize_for_inference(pil, self.config.image_size, self.clip.patch_size)[None].to(self.clip.device)
            text_sim = text_similarity(self.clip.dense(self.clip.normalize(xc)), self.bank.text_embeddings.to(xc.device))
        s = combine_scores(logits, out_size, text_sim, self.config.text_temperature)[0].float().cpu()
        if self.config.background_threshold is not None:
            bg = torch.full((1,) + tuple(s.shape[1:]), float(self.config.background_threshold))
            s = torch.cat([bg, s], dim=0)
        return s

    def __call__(self, images: Union[ImageLike, Sequence[ImageLike]]) -> List[SegmentationOutput]:
        """Segment one image or a list of images (PIL, (H, W, 3) uint8 array, (3, H, W) tensor)."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        outs = []
        for im in images:
            pil = to_pil(im)
            s = self.scores(pil)
            if self.config.crf is not None:
                s = dense_crf(np.asarray(pil, dtype=np.uint8), s, self.config.crf)
            outs.append(SegmentationOutput(s.argmax(dim=0), s, self.class_names, self.mode))
        return outs
