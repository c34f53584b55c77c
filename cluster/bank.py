"""The concept-bank actor body: one :class:`reco.bank.ConceptBuilder` per actor (see
:mod:`cluster.bank_job` for the job that drives a pool of them)."""

from __future__ import annotations

import logging
import time
from typing import Dict, Mapping, Optional, Sequence, Tuple

import torch

from reco.bank import ConceptBuilder, ConceptReference, ContextLike, bank_metadata
from reco.config import BankConfig
from reco.errors import EmptyArchiveError, ReCoError

from . import faults
from .models import EncoderSpec, autocast_for

logger = logging.getLogger(__name__)


class BankWorker:
    """Actor body (plain class so it is testable without Ray): reads archives, encodes them and
    co-segments. Every method is a pure function of its arguments (the job retries them)."""

    def __init__(
        self,
        encoders: EncoderSpec,
        config: BankConfig,
        threads: Optional[int] = None,
        storage_options: Optional[Mapping[str, object]] = None,
    ):
        self.storage_options = dict(storage_options or {})
        dense, clip, self.device = encoders.load(threads)
        self.builder = ConceptBuilder(dense, clip, config)
        self.encoders = encoders

    def text_embeddings(self, names: Sequence[str]) -> Optional[torch.Tensor]:
        return self.builder.text_embeddings(names) if self.builder.clip is not None else None

    def _read(self, name: str, uris: Sequence[str]):
        from index.readers import read_images

        images, kept, report = read_images(list(uris), storage_options=self.storage_options)
        return images, {"name": name, "archive": kept, "read": report.as_dict()}

    def build(
        self,
        name: str,
        uris: Sequence[str],
        text: Optional[torch.Tensor],
        context: Mapping[str, ContextLike],
        peel: Optional[Mapping[str, ContextLike]] = None,
    ) -> Tuple[Optional[ConceptReference], Dict[str, object]]:
        """Read and co-segment one concept's archive (``context``/``peel``: see
        :meth:`reco.bank.ConceptBuilder.build`). Returns (reference or None, info); a bad
        archive gives None with ``info["error"]``."""
        t0 = time.perf_counter()
        images, info = self._read(name, uris)
        try:
            with autocast_for(self.device):
                ref = self.builder.build(name, images, text, context, peel)
        except (EmptyArchiveError, ReCoError) as exc:
            info["error"] = str(exc)
            ref = None
        info["seconds"] = time.perf_counter() - t0
        faults.fire("bank.concept", name)
        return ref, info

    def prepare(
        self, name: str, uris: Sequence[str], text: Optional[torch.Tensor]
    ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Dict[str, object]]:
        """Read and encode one concept's archive without co-segmenting it: ((k, D, h, w)
        features, (k, h, w) language weights or None, info). The co-segmentation then runs
        where the earlier concepts are known (sequential peeling in :mod:`cluster.bank_job`).
        A bad archive gives (None, None, info) with ``info["error"]``."""
        t0 = time.perf_counter()
        images, info = self._read(name, uris)
        feats = lang = None
        try:
            if not images:
                raise EmptyArchiveError(f"archive of concept {name!r} holds no usable image")
            with autocast_for(self.device):
                feats, lang = self.builder.prepare(images, text)
        except (EmptyArchiveError, ReCoError) as exc:
            info["error"] = str(exc)
        info["seconds"] = time.perf_counter() - t0
        faults.fire("bank.concept", name)
        return feats, lang, info

    def confidence(
        self, name: str, uris: Sequence[str], text: Optional[torch.Tensor]
    ) -> Tuple[float, Dict[str, object]]:
        """How strongly a concept's archive agrees on one region (NaN for a bad archive): the
        key of ``bank.context_order: confidence``."""
        feats, lang, info = self.prepare(name, uris, text)
        if feats is None:
            return float("nan"), info
        return self.builder.confidence(feats, lang), info

    def features(self, uris: Sequence[str]) -> torch.Tensor:
        from index.readers import read_images

        images, _, _ = read_images(list(uris), storage_options=self.storage_options)
        if not images:
            raise EmptyArchiveError("calibration pool holds no readable image")
        with autocast_for(self.device):
            return self.builder.archive_features(images)

    def peak_rss_mb(self) -> float:
        """Peak resident memory of this actor's process (MiB), for reports and benchmarks."""
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0

    def metadata(self, archive_mode: str) -> Dict[str, object]:
        return bank_metadata(self.builder, archive_mode)
