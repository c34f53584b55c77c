"""What ``reco build-bank`` feeds the bank actors: each concept's archive (its exemplar folder,
else CLIP retrieval from an index) and CLIP text embeddings, computed in one Ray task."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from reco.errors import ConfigError


def exemplar_folder(root: Optional[str], name: str) -> Optional[str]:
    """``root/name`` (or ``root/name_with_underscores``) when it is a folder that resolves, symlinks
    followed, inside ``root``; None when there is none; a :class:`ConfigError` when it points out."""
    if not root:
        return None
    base = Path(root).expanduser().resolve()
    for cand in (name, name.replace(" ", "_")):
        folder = base / cand
        if folder.is_dir():
            real = folder.resolve()
            if base not in real.parents:
                raise ConfigError(
                    f"exemplar folder for concept {name!r} resolves to {real}, outside --exemplars {base}"
                )
            return str(real)
    return None


def exemplar_archives(
    names: Sequence[str],
    explicit: Mapping[str, Optional[str]],
    root: Optional[str],
    storage_options: Optional[Mapping[str, Any]] = None,
) -> Dict[str, List[str]]:
    """{name: image URIs} for the concepts that have an exemplar folder (an explicit one wins)."""
    from index.readers import list_images

    out: Dict[str, List[str]] = {}
    for n in names:
        folder = explicit.get(n) or exemplar_folder(root, n)
        if folder:
            out[n] = list_images(folder, storage_options)
    return out


def retrieve_archives(
    index_uri: str,
    todo: Sequence[str],
    texts: Mapping[str, Any],
    k: int,
    storage_options: Optional[Mapping[str, Any]] = None,
    exact_store: bool = False,
    serve_actors: Optional[int] = None,
) -> Dict[str, List[str]]:
    """{name: top-``k`` image URIs for the concept's text embedding}: from the index, or exactly
    from the store ``index_uri`` when ``exact_store`` (:func:`cluster.retrieval.retrieve_archives`)."""
    from .retrieval import retrieve_archives as retrieve

    return retrieve(
        todo,
        texts,
        k,
        index_uri,
        exact_store=exact_store,
        storage_options=dict(storage_options or {}),
        serve_actors=serve_actors,
    )


def text_embeddings_remote(encoders, synonyms: Dict[str, Tuple[str, ...]]) -> Dict[str, Any]:
    """Prompt-ensembled text embeddings (synonyms averaged) computed in one Ray task."""
    import ray

    @ray.remote
    def _embed(spec, names_syn):
        import torch

        from cluster.models import node_local
        from reco.encoders import create_clip
        from reco.text import text_embeddings

        clip = create_clip(spec.clip_model, node_local(spec.clip_weights), device=spec.resolve_device())
        out = {}
        for n, syn in names_syn.items():
            e = text_embeddings(clip.encode_text, [n, *syn])
            out[n] = torch.nn.functional.normalize(e.mean(0), dim=0)
        return out

    return ray.get(_embed.remote(encoders, synonyms))
