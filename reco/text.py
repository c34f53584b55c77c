"""Prompt-ensembled CLIP text embeddings (spec step 0).

A concept's embedding is the mean of its per-template embeddings, each L2-normalised, and the
mean renormalised. The template list is the 80 CLIP ImageNet templates plus the five
"... in the scene" templates used by MaskCLIP/ReCo for dense prediction (85 in all).
"""

from __future__ import annotations

from typing import Callable, Sequence, Tuple

import torch
import torch.nn.functional as F

SCENE_TEMPLATES: Tuple[str, ...] = (
    "there is a {} in the scene.",
    "there is the {} in the scene.",
    "this is a {} in the scene.",
    "this is the {} in the scene.",
    "this is one {} in the scene.",
)


def imagenet_templates() -> Tuple[str, ...]:
    """The 85 prompt templates (each with one ``{}`` for the concept name)."""
    from open_clip import OPENAI_IMAGENET_TEMPLATES

    base = tuple(t("{}") for t in OPENAI_IMAGENET_TEMPLATES)
    return base + tuple(t for t in SCENE_TEMPLATES if t not in base)


def text_embeddings(
    encode_text: Callable[[Sequence[str]], torch.Tensor],
    names: Sequence[str],
    templates: Sequence[str] | None = None,
) -> torch.Tensor:
    """Prompt-ensembled embeddings.

    Args:
        encode_text: maps N strings to (N, E) embeddings (e.g. ``ClipModel.encode_text``).
        names: C concept names; underscores are read as spaces.
        templates: T templates with one ``{}``; default :func:`imagenet_templates`.
    Returns:
        (C, E) L2-normalised embeddings.
    """
    templates = tuple(templates) if templates is not None else imagenet_templates()
    if not templates or any("{}" not in t for t in templates):
        raise ValueError("every prompt template must contain '{}'")
    out = []
    for name in names:
        readable = name.replace("_", " ")
        emb = F.normalize(encode_text([t.format(readable) for t in templates]).float(), dim=-1)
        out.append(F.normalize(emb.mean(dim=0), dim=-1))
    if not out:
        raise ValueError("no concept names given")
    return torch.stack(out, dim=0)
