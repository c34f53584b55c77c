"""Ray Data CLIP image embedding (used for text->image retrieval of concept archives)."""
from __future__ import annotations

import logging
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from reco.errors import ImageDecodeError
from reco.image import resize_center_crop

from .config import ActorConfig
from .models import EncoderSpec, autocast_for

logger = logging.getLogger(__name__)


class ClipEmbedUDF:
    """``map_batches`` callable class: rows {uri} -> {uri, embedding (E,) float32, status, error}."""

    def __init__(self, encoders: EncoderSpec, threads: Optional[int] = None):
        if not encoders.has_clip:
            raise ValueError("CLIP embedding needs encoders.clip_model")
        torch.set_num_threads(threads or 1)
        from reco.encoders import create_clip

        self.device = encoders.resolve_device()
        self.clip = create_clip(encoders.clip_model, encoders.clip_weights, device=self.device)

    def __call__(self, batch: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
        from index.readers import read_image

        uris = [str(u) for u in batch["uri"]]
        tensors, ok, errors = [], [], []
        for uri in uris:
            try:
                tensors.append(resize_center_crop(read_image(uri), self.clip.image_size))
                ok.append(True)
                errors.append("")
            except (ImageDecodeError, OSError) as exc:
                ok.append(False)
                errors.append(f"{type(exc).__name__}: {exc}")
        emb = np.zeros((len(uris), self.clip.embed_dim), dtype=np.float32)
        if tensors:
            x = self.clip.normalize(torch.stack(tensors).to(self.device))
            with autocast_for(self.device):
                e = self.clip.encode_image(x).float().cpu().numpy()
            emb[np.array(ok)] = e
        return {
            "uri": np.array(uris, dtype=object),
            "embedding": emb,
            "status": np.array(["ok" if o else "skipped" for o in ok], dtype=object),
            "error": np.array(errors, dtype=object),
        }


def embed_images(
    uris: Sequence[str], encoders: EncoderSpec, actors: ActorConfig = ActorConfig()
) -> Tuple[np.ndarray, List[str], Dict[str, str]]:
    """Embed images with an actor pool; returns (embeddings (N, E), kept uris, skipped {uri: why})."""
    import ray.data

    ds = ray.data.from_items([{"uri": u} for u in uris]).map_batches(
        ClipEmbedUDF,
        fn_constructor_kwargs=dict(encoders=encoders, threads=actors.torch_threads),
        batch_size=actors.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors.num_actors),
        num_cpus=actors.cpus_per_actor,
        num_gpus=actors.gpus_per_actor or None,
    )
    rows = ds.take_all()
    kept = [r for r in rows if r["status"] == "ok"]
    skipped = {str(r["uri"]): str(r["error"]) for r in rows if r["status"] != "ok"}
    if not kept:
        raise ValueError(f"no image of {len(uris)} could be embedded")
    order = sorted(range(len(kept)), key=lambda i: str(kept[i]["uri"]))
    emb = np.stack([np.asarray(kept[i]["embedding"], dtype=np.float32) for i in order])
    return emb, [str(kept[i]["uri"]) for i in order], skipped
