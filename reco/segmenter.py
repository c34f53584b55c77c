"""The :class:`Segmenter` facade: images in, full-resolution label maps and scores out."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, List, Optional, Sequence, Tuple, Union, cast

import numpy as np
import torch

from .bank import ConceptBank, weights_id
from .config import BankConfig, SegmenterConfig
from .crf import dense_crf
from .encoders import ClipModel, DenseEncoder
from .errors import ConfigError
from .image import Box, ImageLike, inference_size, resize_for_inference, resize_window, scale_box, to_pil, window_boxes
from .inference import calibrate, combine_scores, concept_similarity, text_similarity
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
        if config.exclude_own_archive and not bank.has_members:
            raise ConfigError(
                "segmenter.exclude_own_archive needs a bank that keeps its archive members "
                "(build it with bank.keep_members: true)"
            )
        mismatch = encoder_mismatches(bank, dense, clip if (config.dense_clip and bank.has_text) else None)
        if mismatch:
            msg = "the bank does not fit these encoders: " + "; ".join(mismatch)
            if not config.allow_encoder_mismatch:
                raise ConfigError(
                    msg + " (rebuild the bank with these encoders, or set "
                    "segmenter.allow_encoder_mismatch if you know they are interchangeable)"
                )
            logger.warning("%s (allowed by segmenter.allow_encoder_mismatch)", msg)
        self.bank = bank
        self.dense = dense.eval()
        self.clip = clip.eval() if clip is not None else None
        self.config = config
        self.use_dense_clip = bool(config.dense_clip and clip is not None and clip.supports_dense and bank.has_text)
        if config.dense_clip and not self.use_dense_clip:
            logger.info("dense CLIP unavailable (no CLIP weights or no text embeddings): reference matching only")
        self.calibrated = bool(
            bank.calibration is not None
            and (config.calibrate is True or (config.calibrate is None and config.background_threshold is not None))
        )
        names = tuple(bank.names)
        self.class_names: Tuple[str, ...] = (
            ((BACKGROUND,) + names) if config.background_threshold is not None else names
        )

    @property
    def mode(self) -> str:
        parts = ["reference" + ("(calibrated)" if self.calibrated else "")]
        if self.use_dense_clip:
            parts.append("dense-clip")
        if self.bank.prototypes is not None:
            parts[0] += f"[{self.bank.prototypes.shape[0]} prototypes]"
        mode = " x ".join(parts)
        if self.config.window is not None:
            mode += f", windows {self.config.window:g} at {self.window_size}px"
        if self.config.background_threshold is not None:
            mode += f", background<{self.config.background_threshold:g}"
        if self.config.crf is not None:
            mode += ", crf"
        if self.config.exclude_own_archive:
            mode += ", leave-own-archive-out"
        return mode

    @property
    def window_size(self) -> int:
        """Side (px) each sliding window is encoded at: ``segmenter.window_image_size``, else the
        side the bank's archive images were encoded at (``bank.image_size`` in its metadata)."""
        return window_side(self.config, self.bank)

    @property
    def device(self) -> torch.device:
        return next(self.dense.parameters()).device

    @torch.no_grad()
    def scores(self, image: ImageLike, image_id: Optional[str] = None) -> torch.Tensor:
        """One image -> (C', H, W) float32 class scores at the image's own resolution."""
        return self.scores_batch([image], None if image_id is None else [image_id])[0]

    @torch.no_grad()
    def scores_batch(self, images: Sequence[ImageLike], ids: Optional[Sequence[str]] = None) -> List[torch.Tensor]:
        """Many images -> one (C', H, W) float32 score map each, at each image's resolution.

        Images whose inference inputs have the same size share an encoder forward pass, in
        batches of at most ``config.batch_size``; similarities and sigmoids are float32 even
        when the encoders run under bf16 autocast. ``ids`` (one per image) name the images for
        ``exclude_own_archive``.
        """
        pils = [to_pil(im) for im in images]
        if ids is not None and len(ids) != len(pils):
            raise ValueError(f"{len(ids)} ids for {len(pils)} images")
        out: List[Optional[torch.Tensor]] = [None] * len(pils)
        if self.config.window is not None:  # one image at a time, its windows batched
            return [self.windowed_scores(p, None if ids is None else str(ids[i])) for i, p in enumerate(pils)]
        patches = [self.dense.patch_size] + ([self.clip.patch_size] if self.use_dense_clip and self.clip else [])
        for idx in _batches(pils, self.config, patches):
            sub_ids = None if ids is None else [ids[i] for i in idx]
            for i, s in zip(idx, self._scores_same_size([pils[i] for i in idx], sub_ids)):
                out[i] = s
        return [s for s in out if s is not None]

    @torch.no_grad()
    def features(self, pils: Sequence["Image.Image"]) -> torch.Tensor:
        """(B, D, h, w) dense features of same-size images at the inference resolution."""
        x = torch.stack([resize_for_inference(p, self.config.image_size, self.dense.patch_size) for p in pils])
        return self.dense(self.dense.normalize(x.to(self.device)))

    @torch.no_grad()
    def views(self, pil: "Image.Image") -> Tuple[List[Box], torch.Tensor]:
        """One image -> (boxes, (n, D, h, w) dense features) of the n views inference scores:
        its sliding windows (``config.window``; boxes in image pixels, each window encoded at
        :attr:`window_size`, ``4 x config.batch_size`` windows per forward pass), or, without
        windows, the whole image at ``config.image_size`` as one box."""
        hw = (pil.size[1], pil.size[0])
        if self.config.window is None:
            return [(0, 0, hw[1], hw[0])], self.features([pil])
        boxes = window_boxes(hw, self.config.window, self.config.window_stride)
        dense = self.dense
        return boxes, self._encode_windows(
            pil, boxes, self.window_size, dense.patch_size, lambda x: dense(dense.normalize(x)), self.device
        )

    def _encode_windows(self, pil, boxes, size: int, patch: int, encode, device) -> torch.Tensor:
        """``encode`` ((B, 3, s, s) in [0, 1] -> (B, D, h, w)) over the ``boxes`` of ``pil``, each
        resized to ``size`` px, ``4 x config.batch_size`` windows per forward pass."""
        step = 4 * self.config.batch_size
        out = []
        for i in range(0, len(boxes), step):
            x = torch.stack([resize_window(pil, b, size, patch) for b in boxes[i : i + step]])
            out.append(encode(x.to(device)))
        return torch.cat(out)

    @torch.no_grad()
    def windowed_scores(self, pil: "Image.Image", image_id: Optional[str] = None) -> torch.Tensor:
        """One image -> (C', H, W) scores from its views (:meth:`views`), averaged where they
        overlap (:meth:`assemble`); dense CLIP, when used, scores the same windows."""
        boxes, feats = self.views(pil)
        logits = self.concept_logits(feats, None if image_id is None else [image_id] * len(boxes))
        text_sim = None
        if self.use_dense_clip:
            assert self.clip is not None and self.bank.text_embeddings is not None
            clip = self.clip
            size = getattr(clip, "image_size", self.window_size)
            dense_clip = self._encode_windows(
                pil, boxes, size, clip.patch_size, lambda x: clip.dense(clip.normalize(x)), clip.device
            )
            text_sim = text_similarity(dense_clip, self.bank.text_embeddings.to(clip.device))
        hw = (pil.size[1], pil.size[0])
        return self.assemble(logits, boxes, hw, hw, text_sim)

    @torch.no_grad()
    def assemble(
        self,
        logits: torch.Tensor,
        boxes: Sequence[Box],
        image_hw: Tuple[int, int],
        out_hw: Tuple[int, int],
        text_sim: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """(n, C, h, w) logits of an image's n views -> (C', H, W) scores at ``out_hw``.

        Each view is finished (:meth:`finish_scores`) at its box (given in ``image_hw`` pixels,
        mapped onto ``out_hw``) and the scores are averaged where boxes overlap; a single
        whole-image box is exactly :meth:`finish_scores`."""
        if len(boxes) == 1 and tuple(boxes[0]) == (0, 0, image_hw[1], image_hw[0]):
            return self.finish_scores(logits, out_hw, text_sim)[0]
        total: Optional[torch.Tensor] = None
        count = torch.zeros(tuple(out_hw))
        for i, box in enumerate(boxes):
            x0, y0, x1, y1 = scale_box(box, image_hw, out_hw)
            t = None if text_sim is None else text_sim[i : i + 1]
            s = self.finish_scores(logits[i : i + 1], (y1 - y0, x1 - x0), t)[0]
            if total is None:
                total = torch.zeros((s.shape[0],) + tuple(out_hw))
            total[:, y0:y1, x0:x1] += s
            count[y0:y1, x0:x1] += 1
        assert total is not None, "no views"
        return total / count.clamp_min(1)

    @torch.no_grad()
    def concept_logits(self, feats: torch.Tensor, ids: Optional[Sequence[Optional[str]]] = None) -> torch.Tensor:
        """(B, D, h, w) dense features -> (B, C, h, w) per-concept logits: the best prototype's
        cosine, standardised by the bank's calibration when it is used, each image scored
        without its own archive contributions when ``exclude_own_archive`` (and ``ids``)."""
        dev = feats.device
        with full_precision():
            vectors, owner = self.bank.concept_vectors()
            c = len(self.bank.names)
            logits = concept_similarity(feats, vectors.to(dev), owner, c)
            if self.config.exclude_own_archive and ids is not None:
                memo: dict = {}  # the windows of one image share its id: rebuild its references once
                for i, image_id in enumerate(ids):
                    if image_id is not None and str(image_id) not in memo:
                        memo[str(image_id)] = self.bank.leave_one_out(str(image_id))
                    loo = None if image_id is None else memo[str(image_id)]
                    if loo is not None:
                        logits[i : i + 1] = concept_similarity(feats[i : i + 1], loo[0].to(dev), loo[1], c)
            if self.calibrated:
                assert self.bank.calibration is not None
                logits = calibrate(logits, self.bank.calibration)
        return logits

    def _scores_same_size(
        self, pils: Sequence["Image.Image"], ids: Optional[Sequence[str]] = None
    ) -> List[torch.Tensor]:
        logits = self.concept_logits(self.features(pils), ids)
        text_sim = None
        if self.use_dense_clip:
            assert self.clip is not None and self.bank.text_embeddings is not None
            xc = torch.stack([resize_for_inference(p, self.config.image_size, self.clip.patch_size) for p in pils])
            xc = xc.to(self.clip.device)
            text_sim = text_similarity(
                self.clip.dense(self.clip.normalize(xc)), self.bank.text_embeddings.to(xc.device)
            )
        out = []
        for i, p in enumerate(pils):
            t = None if text_sim is None else text_sim[i : i + 1]
            out.append(self.finish_scores(logits[i : i + 1], (p.size[1], p.size[0]), t)[0])
        return out

    @torch.no_grad()
    def finish_scores(
        self, logits: torch.Tensor, size: Tuple[int, int], text_sim: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """(B, C, h, w) logits -> (B, C', H, W) scores: sigmoid, upsampled, x dense CLIP when
        given, with the constant background class first when a threshold is configured."""
        s = combine_scores(logits, size, text_sim, self.config.text_temperature).float().cpu()
        if self.config.background_threshold is not None:
            bg = torch.full((s.shape[0], 1) + tuple(s.shape[2:]), float(self.config.background_threshold))
            s = torch.cat([bg, s], dim=1)
        return s

    def labels(self, scores: torch.Tensor, image: Optional[np.ndarray] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """(C', H, W) scores -> ((H, W) labels, the scores after CRF when configured)."""
        if self.config.crf is not None:
            if image is None:
                raise ValueError("the CRF needs the image")
            scores = dense_crf(image, scores, self.config.crf)
        with full_precision():
            labels = scores.float().argmax(dim=0)
        return labels, scores

    def __call__(
        self, images: Union[ImageLike, Sequence[ImageLike]], ids: Optional[Sequence[str]] = None
    ) -> List[SegmentationOutput]:
        """Segment one image or a list of images (PIL, (H, W, 3) uint8 array, (3, H, W) tensor).
        ``ids`` name the images (for ``exclude_own_archive``)."""
        if isinstance(images, (list, tuple)):
            batch: Sequence[ImageLike] = images
        else:  # anything but a list or tuple is one image
            batch = [cast(ImageLike, images)]
            ids = None if ids is None else ([ids] if isinstance(ids, str) else list(ids))
        pils = [to_pil(im) for im in batch]
        outs = []
        for pil, s in zip(pils, self.scores_batch(pils, ids)):
            labels, s = self.labels(s, np.asarray(pil, dtype=np.uint8) if self.config.crf is not None else None)
            outs.append(SegmentationOutput(labels, s, self.class_names, self.mode))
        return outs


def window_side(config: SegmenterConfig, bank: ConceptBank) -> int:
    """The side (px) sliding windows are encoded at: ``config.window_image_size``, else the side
    ``bank``'s archive images were encoded at (its recorded ``bank.image_size``), else the
    default ``bank.image_size``. Banks made elsewhere (supervised prototypes) should be given
    the run's side explicitly."""
    if config.window_image_size is not None:
        return int(config.window_image_size)
    cfg = bank.metadata.get("config")
    size = cfg.get("image_size") if isinstance(cfg, dict) else None
    return int(size) if size else BankConfig().image_size


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
