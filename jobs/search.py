"""``reco search "a photo of a fire extinguisher" -k 20 --index DIR``: text -> image top-k.

``--store STORE`` instead of ``--index`` searches the store exactly (one Ray Data pass over its
shards, no index: :mod:`cluster.retrieval`); ``--index DIR --exact`` does the same over the store
the index was built from. Bad arguments and unreadable indexes are one line, exit 2.
"""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path
from typing import List, Optional

from reco.errors import ConfigError

from .common import JobParser, add_cluster_args, parse_storage_options, positive_int

logger = logging.getLogger(__name__)
_PROMPT_PREFIX = re.compile(r"^(a|an|the)?\s*(photo|picture|image) of (a |an |the )?", re.IGNORECASE)


def concept_name(query: str) -> str:
    """The concept inside a prompt-like query ("a photo of a fire extinguisher" -> "fire extinguisher")."""
    return _PROMPT_PREFIX.sub("", query.strip()).rstrip(".").strip() or query.strip()


def _check_args(args) -> None:
    if bool(args.index) == bool(args.store):
        raise ConfigError("give one of --index DIR (FAISS, or --exact over its store) and --store STORE (exact)")
    if args.store and args.exact:
        raise ConfigError("--exact applies to --index; --store is always exact")
    if args.contact_sheet:
        sheet = Path(args.contact_sheet)
        if sheet.is_dir() or sheet.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
            raise ConfigError(
                f"--contact-sheet {sheet}: give an image file name ending in .png or .jpg, not a directory"
            )


def _open(args, storage):
    """(retriever, {id: uri} or None (the retriever's own ``uris``), metadata, dim, label)."""
    if args.store:
        from cluster.config import resolve_cluster_config
        from cluster.retrieval import StoreExactRetriever
        from cluster.runtime import init_ray
        from index.store import EmbeddingStore, StoreError

        store = EmbeddingStore(args.store, storage_options=storage)
        try:
            manifest = store.manifest()
        except StoreError as exc:
            raise ConfigError(f"--store {args.store}: {exc}") from None
        init_ray(resolve_cluster_config(args.ray_config).ray)
        return StoreExactRetriever(store), None, {"model": manifest.get("model", {})}, store.dim, "exact, Ray Data pass"
    from cluster.retrieval import open_index

    retriever, uris, meta = open_index(
        args.index,
        storage,
        exact=args.exact,  # parts: served by Ray actors
        ray_config=args.ray_config,
    )
    dim = retriever.embeddings.shape[1] if args.exact else int(meta["report"]["dim"])
    return retriever, uris, meta, dim, "exact" if args.exact else meta["report"]["factory"]


def main(argv: Optional[List[str]] = None) -> int:
    p = JobParser(prog="reco search", description=__doc__)
    p.add_argument("query")
    p.add_argument("-k", type=positive_int, default=20)
    p.add_argument("--index", help="index directory or fsspec URL from `reco build-index`")
    p.add_argument("--store", help="search this embedding store exactly (Ray Data pass, no index)")
    p.add_argument("--exact", action="store_true", help="exact search over the index's store instead of FAISS")
    p.add_argument("--raw", action="store_true", help="embed the query text as is (default: 85-template ensemble)")
    p.add_argument("--clip-model", help="override the CLIP recorded in the store")
    p.add_argument("--clip-weights")
    p.add_argument("--contact-sheet", help="write a PNG grid of the hits here")
    add_cluster_args(p)  # --ray-config (--store, served parts) and --storage-options (index, store, images)
    args = p.parse_args(argv)
    storage = parse_storage_options(args.storage_options)
    _check_args(args)

    from reco.encoders import create_clip
    from reco.text import text_embeddings

    retriever, uris, meta, dim, what = _open(args, storage)
    model = meta.get("model", {})
    clip = create_clip(args.clip_model or model.get("clip_model"), args.clip_weights or model.get("clip_weights"))
    if args.raw:
        q = clip.encode_text([args.query]).numpy()
    else:
        q = text_embeddings(clip.encode_text, [concept_name(args.query)]).numpy()
    if q.shape[-1] != dim:
        raise ConfigError(
            f"the CLIP {args.clip_model or model.get('clip_model')} gives {q.shape[-1]}-d text "
            f"embeddings but {args.store or args.index} holds {dim}-d image embeddings: use the CLIP "
            "the store was embedded with"
        )
    hit = retriever.search(q, args.k)[0]
    uris = uris if uris is not None else retriever.uris
    out = sys.stdout
    out.write(f"# {args.query!r}: top {len(hit.ids)} of {len(retriever)} ({what})\n")
    for rank, (i, s) in enumerate(zip(hit.ids, hit.scores), 1):
        out.write(f"{rank:>3}  {float(s):.4f}  {i}  {uris[i]}\n")
    if args.contact_sheet:
        from index.contact_sheet import write_contact_sheet

        path = write_contact_sheet(
            [(uris[i], float(s)) for i, s in zip(hit.ids, hit.scores)],
            Path(args.contact_sheet),
            storage_options=storage,
        )
        logger.info("contact sheet: %s", path)
    return 0
