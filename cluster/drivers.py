"""The driver side of the Ray jobs ``embed``, ``build-bank`` and ``pseudo-label``.

Each function checks everything a user can get wrong on the driver first (locations, vocabulary,
the encoders themselves: loaded here on the CPU), then starts Ray, runs the job, writes its
report, and returns the job's exit status (:attr:`index.report.JobReport.exit_code`: 0 ok, 1 most
inputs failed for good, 3 a rerun is needed: inputs failed transiently).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from reco.errors import ConfigError

from . import runtime
from .models import EncoderSpec, load_on_driver
from .report import write_job_report

logger = logging.getLogger(__name__)


def _listed(source: str, kind: str, storage: Mapping[str, Any]) -> list:
    from index.sources import list_source

    items = list_source(source, kind, storage)
    if not items:
        raise FileNotFoundError(f"{source} holds no images")
    return items


def embed_job(
    source: str,
    store_uri: str,
    kind: str,
    encoders: EncoderSpec,
    cluster,
    shard_size: int,
    storage: Dict[str, Any],
    decode_cpus: float,
    device_decode: bool,
    config: Dict[str, Any],
) -> int:
    import yaml

    from index.sources import RetryPolicy
    from index.store import EmbeddingStore
    from reco.config import to_dict

    from .config import redact
    from .embed import clip_dims, model_identity, run_embed

    retry = RetryPolicy.from_env()
    _, dim = clip_dims(encoders)
    store = EmbeddingStore(store_uri, storage_options=storage)
    store.check_location()
    store.check_compatible(model_identity(encoders), dim)
    load_on_driver(encoders, dense=False)
    with store.writer(job="embed"):  # a second job on this store is refused here, before listing and Ray
        items = _listed(source, kind, storage)
        logger.info("%d images listed in %s", len(items), source)
        runtime.init_ray(cluster.ray)
        report = run_embed(
            items,
            store,
            encoders,
            cluster.embed,
            shard_size,
            storage,
            decode_cpus,
            device_decode=device_decode,
            retry=retry,
        )
        out = store.root  # a Path, or the store's URL
        report.report.configure(config, cluster.jobs.max_failed_fraction)
        _write_text(out, "embed_report.json", json.dumps(report.as_dict(), indent=2), storage)
        write_job_report(report.report, str(out), storage)
        _write_text(
            out,
            "embed_config.yaml",
            yaml.safe_dump(
                redact({"args": config, "encoders": to_dict(encoders), "cluster": to_dict(cluster)}), sort_keys=False
            ),
            storage,
        )
    logger.info(
        "embedded %d, skipped %d (reasons in %s), failed transiently %d, %d already in the store; "
        "%d shards committed; %.1f img/s; store now holds %d",
        report.embedded,
        len(report.skipped),
        _join(out, "skipped"),
        len(report.failed_transient),
        report.already_done,
        len(report.shards_committed),
        report.images_per_second,
        len(store),
    )
    if report.failed_transient:
        logger.warning(
            "%d input(s) failed transiently and were NOT committed (see failed_transient in %s): "
            "rerun the same command to retry them",
            len(report.failed_transient),
            _join(out, "embed_report.json"),
        )
    return report.report.exit_code


def _join(root, name: str):
    return root / name if isinstance(root, Path) else f"{root}/{name}"


def _write_text(root, name: str, text: str, storage: Mapping[str, Any]) -> None:
    """A side file of the store (report, config): written in place locally, one PUT on an object store."""
    if isinstance(root, Path):
        (root / name).write_text(text)
        return
    from index.storage import write_bytes

    write_bytes(_join(root, name), text.encode(), storage)


def build_bank_job(
    vocab,
    out: str,
    cfg,
    encoders: EncoderSpec,
    cluster,
    storage: Dict[str, Any],
    *,
    exemplars: Optional[str],
    index: Optional[str],
    actors: Optional[int],
    commit_every: int,
    overwrite: bool,
    browser: bool,
    config: Dict[str, Any],
    exact_store: bool = False,
) -> int:
    """``vocab``: an :class:`index.vocab.Vocabulary`; ``cfg`` the :class:`reco.config.BankConfig`;
    ``exact_store``: ``index`` is an embedding store, searched exactly (:mod:`cluster.retrieval`)."""
    from dataclasses import replace

    from index.outputs import check_output_folder
    from reco.config import alias_context, resolve_context

    from .bank_inputs import exemplar_archives, retrieve_archives, text_embeddings_remote
    from .bank_job import ConceptTask, run_build_bank

    if index and not encoders.clip_model:
        raise ConfigError("--index retrieval needs CLIP text embeddings: give --clip-model (and --clip-weights)")
    if not index and not exemplars and not any(c.exemplars for c in vocab.concepts):
        raise ConfigError("no archives: give --exemplars DIR, exemplars: in a YAML vocabulary, or --index")
    if exemplars and not Path(exemplars).is_dir():
        raise FileNotFoundError(f"exemplar folder {exemplars} does not exist")
    check_output_folder(out, storage)
    pool = cluster.bank if actors is None else replace(cluster.bank, num_actors=actors)
    ctx_names = list(cfg.context_concepts) if cfg.context_elimination else []
    in_vocab = {c.name: c for c in vocab.concepts}
    all_names = list(dict.fromkeys(vocab.names + ctx_names))
    archives = exemplar_archives(all_names, {c.name: c.exemplars for c in vocab.concepts}, exemplars, storage)
    source = {n: "exemplars" for n in archives}
    # context concepts take the vocabulary's concept of their name or alias (person -> pedestrian)
    # before anything is retrieved for them; without --index, run_build_bank leaves out (and
    # reports) those with no archive at all, or refuses them here with bank.context_required
    have = [n for n, a in archives.items() if a]
    cfg = alias_context(cfg, have + (list(vocab.names) if index else []))
    ctx_names = list(cfg.context_concepts) if cfg.context_elimination else []
    all_names = list(dict.fromkeys(vocab.names + ctx_names))
    if not index and cfg.context_required:
        resolve_context(cfg, have)
    load_on_driver(encoders)
    runtime.init_ray(cluster.ray)
    texts: Dict[str, Any] = {}
    if encoders.clip_model:
        texts = text_embeddings_remote(
            encoders, {n: (in_vocab[n].synonyms if n in in_vocab else ()) for n in all_names}
        )
    if index:
        found = retrieve_archives(
            index,
            [n for n in all_names if n not in archives],
            texts,
            cfg.k,
            storage,
            exact_store=exact_store,
            serve_actors=cluster.index.serve_actors,
        )
        archives.update(found)
        source.update({n: "retrieval" for n in found})

    def task(n: str) -> ConceptTask:
        return ConceptTask(
            n, tuple(archives.get(n, ())), texts.get(n), source.get(n, "none (no exemplar folder, no --index)")
        )

    tasks, ctx_tasks = [task(n) for n in vocab.names], [task(n) for n in ctx_names]
    mode = "clip-retrieval" if index else "exemplar"
    if index and any(s == "exemplars" for s in source.values()):
        mode = "clip-retrieval + exemplars"
    logger.info(
        "%d concepts (%d context), archives: %s",
        len(tasks),
        len(ctx_tasks),
        json.dumps({s: sum(1 for t in tasks if t.source == s) for s in {t.source for t in tasks}}),
    )
    bank, rep = run_build_bank(
        tasks,
        encoders,
        cfg,
        out,
        pool,
        ctx_tasks,
        mode,
        commit_every,
        overwrite,
        storage,
        cluster.jobs.max_failed_fraction,
        config,
    )
    logger.info(
        "built %d, failed %d, %d already done, %d left for a rerun; %.1f concepts/min -> %s",
        rep.built,
        len(rep.failed),
        rep.already_done,
        len(rep.failed_transient),
        rep.concepts_per_minute,
        out,
    )
    for name, why in list(rep.failed.items())[:10]:
        logger.warning("failed: %s: %s", name, why)
    if browser and bank is not None:
        from .bank_report import write_report

        logger.info("archive browser: %s", write_report(out, storage_options=storage))
    return rep.report.exit_code


def check_segmenter(bank, encoders: EncoderSpec, cfg):
    """The encoders loaded here and the segmenter built from them: every mismatch between the
    bank, the weights and the settings is one error before any worker starts. Returns the segmenter."""
    from reco.segmenter import Segmenter

    dense, clip = load_on_driver(encoders)
    assert dense is not None
    return Segmenter(bank, dense, clip, cfg)


def pseudo_label_job(
    source: str,
    kind: str,
    bank_uri: str,
    out: str,
    vocab: Optional[List[str]],
    cfg,
    overrides: Dict[str, Any],
    cluster,
    storage: Dict[str, Any],
    *,
    overlays: int,
    confidence_maps: bool,
    commit_every: int,
    overwrite: bool,
    config: Dict[str, Any],
) -> int:
    """``overrides``: keyword arguments of :func:`cluster.models.encoders_for_bank`."""
    from index.outputs import check_output_folder
    from index.storage import load_bank

    from .models import encoders_for_bank
    from .pseudo_label import run_pseudo_label

    check_output_folder(out, storage)
    bank = load_bank(bank_uri, storage)
    encoders = encoders_for_bank(bank, **overrides)
    check_segmenter(bank.subset(vocab) if vocab else bank, encoders, cfg)
    items = _listed(source, kind, storage)
    logger.info("%d images listed in %s; bank %s (%d concepts)", len(items), source, bank_uri, len(bank))
    runtime.init_ray(cluster.ray)
    rep = run_pseudo_label(
        items,
        bank_uri,
        encoders,
        cfg,
        out,
        cluster.segment,
        storage,
        vocab,
        overlays,
        confidence_maps,
        commit_every,
        overwrite,
        cluster.jobs.max_failed_fraction,
        config,
    )
    logger.info(
        "pseudo-labelled %d, skipped %d (bad input), %d failed transiently, %d already done; %.2f img/s -> %s",
        rep.labelled,
        len(rep.skipped),
        len(rep.failed_transient),
        rep.already_done,
        rep.images_per_second,
        out,
    )
    return rep.report.exit_code
