"""Distributed concept-bank building: a pool of Ray actors, each holding one ConceptBuilder."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from reco.bank import ConceptBank, ConceptBuilder, ConceptReference, bank_metadata
from reco.config import BankConfig
from reco.errors import EmptyArchiveError, ReCoError

from .config import ActorConfig
from .models import EncoderSpec, autocast_for

logger = logging.getLogger(__name__)


class BankWorker:
    """Actor body (plain class so it is testable without Ray): reads archives, co-segments."""

    def __init__(self, encoders: EncoderSpec, config: BankConfig, threads: Optional[int] = None,
                 storage_options: Optional[Mapping[str, object]] = None):
        self.storage_options = dict(storage_options or {})
        dense, clip, self.device = encoders.load(threads)
        self.builder = ConceptBuilder(dense, clip, config)
        self.encoders = encoders

    def text_embeddings(self, names: Sequence[str]) -> Optional[torch.Tensor]:
        return self.builder.text_embeddings(names) if self.builder.clip is not None else None

    def build(
        self, name: str, uris: Sequence[str], text: Optional[torch.Tensor], context: Mapping[str, torch.Tensor]
    ) -> Tuple[Optional[ConceptReference], Dict[str, object]]:
        from index.readers import read_images

        t0 = time.perf_counter()
        images, kept, report = read_images(list(uris), storage_options=self.storage_options)
        info: Dict[str, object] = {"name": name, "archive": kept, "read": report.as_dict()}
        try:
            with autocast_for(self.device):
                ref = self.builder.build(name, images, text, context)
        except (EmptyArchiveError, ReCoError) as exc:
            info["error"] = str(exc)
            ref = None
        info["seconds"] = time.perf_counter() - t0
        return ref, info

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


@dataclass
class BankBuildReport:
    concepts_ok: List[str] = field(default_factory=list)
    concepts_failed: Dict[str, str] = field(default_factory=dict)
    images_skipped: Dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> Dict[str, object]:
        return {
            "concepts_ok": len(self.concepts_ok),
            "concepts_failed": dict(self.concepts_failed),
            "images_skipped": dict(self.images_skipped),
        }


def build_bank_distributed(
    archives: Mapping[str, Sequence[str]],
    encoders: EncoderSpec,
    config: BankConfig,
    actors: ActorConfig = ActorConfig(),
    context_archives: Optional[Mapping[str, Sequence[str]]] = None,
    calibration_pool: Optional[Sequence[str]] = None,
    archive_mode: str = "exemplar",
) -> Tuple[ConceptBank, BankBuildReport]:
    """Build a bank with ``actors.num_actors`` Ray actors (Ray must be initialised).

    Context concepts are built first, in order, on one actor (each with the earlier ones
    eliminated); then every target concept is co-segmented in parallel. Concepts whose
    archive yields no readable image are skipped and reported, never silently dropped.
    """
    import ray
    from ray.util import ActorPool
    from tqdm import tqdm

    if not archives:
        raise EmptyArchiveError("no concepts to build")
    Remote = ray.remote(BankWorker)
    opts = dict(num_cpus=actors.cpus_per_actor, num_gpus=actors.gpus_per_actor)
    workers = [
        Remote.options(**opts).remote(encoders, config, actors.torch_threads) for _ in range(actors.num_actors)
    ]
    try:
        report = BankBuildReport()
        names = list(archives)
        texts: Dict[str, torch.Tensor] = {}
        if encoders.has_clip:
            all_names = names + [c for c in config.context_concepts if c not in names]
            emb = ray.get(workers[0].text_embeddings.remote(all_names))
            texts = {n: emb[i] for i, n in enumerate(all_names)}

        context: Dict[str, torch.Tensor] = {}
        if config.context_elimination and config.context_concepts:
            for c in config.context_concepts:
                uris = (context_archives or {}).get(c)
                if not uris:
                    raise EmptyArchiveError(f"no archive given for context concept {c!r}")
                ref, info = ray.get(workers[0].build.remote(c, uris, texts.get(c), dict(context)))
                report.images_skipped.update(info["read"]["skipped_files"])
                if ref is None:
                    raise EmptyArchiveError(f"context concept {c!r}: {info.get('error')}")
                context[c] = ref.reference

        pool = ActorPool(workers)
        refs: Dict[str, ConceptReference] = {}
        infos: Dict[str, Dict[str, object]] = {}
        jobs = pool.map_unordered(
            lambda w, n: w.build.remote(n, archives[n], texts.get(n), context), names
        )
        for ref, info in tqdm(jobs, total=len(names), desc="concepts", unit="concept"):
            report.images_skipped.update(info["read"]["skipped_files"])
            name = str(info["name"])
            infos[name] = info
            if ref is None:
                report.concepts_failed[name] = str(info.get("error"))
                logger.warning("concept %s skipped: %s", name, info.get("error"))
                continue
            refs[name] = ref
        ordered = [refs[n] for n in names if n in refs]
        if not ordered:
            raise EmptyArchiveError(f"no concept could be built: {report.concepts_failed}")
        report.concepts_ok = [r.name for r in ordered]
        meta = ray.get(workers[0].metadata.remote(archive_mode))
        meta["concepts"] = {n: {"archive": infos[n]["archive"]} for n in report.concepts_ok}
        text = torch.stack([texts[r.name] for r in ordered]) if texts else None
        bank = ConceptBank.from_references(ordered, text, meta)
        if calibration_pool:
            feats = ray.get(workers[0].features.remote(list(calibration_pool)))
            bank.calibrate(feats)
    finally:  # actors hold models: never leak them, also when a build raises
        for w in workers:
            ray.kill(w)
    return bank, report
