"""Dense CLIP heads pinned against independent computations on tiny random open_clip models.

The references below rebuild each head from the towers' parameters with plain tensor ops
(``F.layer_norm``, matrix products, ``torch.einsum``) and compare with ``ClipModel.dense``.
Every parameter and BatchNorm statistic is perturbed first, so zero-initialised biases, layer
scales and BN weights cannot hide a missing term.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_CLIP_CFG
from safetensors.torch import save_file

from reco.encoders import DENSE_CLIP_HEADS, create_clip, create_encoder
from reco.errors import ConfigError

TEXT_CFG = TINY_CLIP_CFG["text_cfg"]
# ViT towers: the conftest one (no layer scale), one with layer scales, one trained at 224x224
VIT_CFGS = {
    "plain": TINY_CLIP_CFG,
    "layerscale": {
        "embed_dim": 32,
        "vision_cfg": {**TINY_CLIP_CFG["vision_cfg"], "ls_init_value": 0.5},
        "text_cfg": TEXT_CFG,
    },
    "normformer": {  # open_clip's custom block: per-head scale, inner/attn/fc norms, qk-norm, layer scale
        "embed_dim": 32,
        "vision_cfg": {
            **TINY_CLIP_CFG["vision_cfg"],
            "ls_init_value": 0.5,
            "qk_norm": True,
            "scale_heads": True,
            "scale_attn_inner": True,
            "scale_attn": True,
            "scale_fc": True,
        },
        "text_cfg": TEXT_CFG,
    },
    "native224": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 224, "layers": 2, "width": 32, "patch_size": 32, "head_width": 16},
        "text_cfg": TEXT_CFG,
    },
}
# ModifiedResNet tower: stem width 8 -> layer4 has 32 * 8 = 256 channels, 256 / 64 = 4 pool heads;
# trained at 64x64, so the attention pool's positional embedding covers a 2x2 grid
TINY_RN_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "head_width": 64},
    "text_cfg": TEXT_CFG,
}


def _perturb(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.copy_(0.1 * torch.randn(buf.shape, generator=g))
            elif name.endswith("running_var"):
                buf.copy_(0.5 + torch.rand(buf.shape, generator=g))


def _save_local_dir(arch: str, cfg: dict, folder: Path, seed: int) -> Path:
    """A perturbed random open_clip model saved as an open_clip local-dir (config + safetensors)."""
    import open_clip

    torch.manual_seed(seed)
    model = open_clip.create_model(arch, pretrained=None, **cfg)
    _perturb(model, seed)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return folder


@pytest.fixture(scope="module")
def vit_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dense_clip_vit")
    return {k: _save_local_dir("ViT-B-32", cfg, root / k, seed) for seed, (k, cfg) in enumerate(VIT_CFGS.items())}


@pytest.fixture(scope="module")
def rn_dir(tmp_path_factory):
    return _save_local_dir("RN50", TINY_RN_CFG, tmp_path_factory.mktemp("dense_clip_rn") / "rn", 7)


def _ln(mod: torch.nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), mod.weight, mod.bias, mod.eps)


def _gamma(ls: torch.nn.Module):
    return ls.gamma if hasattr(ls, "gamma") else 1.0


@torch.no_grad()
def vit_reference(visual, images: torch.Tensor, head: str) -> torch.Tensor:
    """The dense head of an open_clip VisionTransformer, from its parameters."""
    conv = visual.conv1.weight  # (C, 3, p, p)
    p = conv.shape[-1]
    tok = F.conv2d(images, conv, stride=p)  # (B, C, h, w)
    b, c, h, w = tok.shape
    tok = tok.flatten(2).transpose(1, 2)  # (B, hw, C)
    pos = visual.positional_embedding  # (1 + g*g, C)
    g = int(round((pos.shape[0] - 1) ** 0.5))
    if (h, w) != (g, g):
        grid = pos[1:].reshape(g, g, c).permute(2, 0, 1).unsqueeze(0)
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
        pos = torch.cat([pos[:1], grid[0].permute(1, 2, 0).reshape(h * w, c)])
    x = torch.cat([visual.class_embedding.expand(b, 1, c), tok], dim=1) + pos
    x = _ln(visual.ln_pre, x)
    if (h, w) == (g, g) and hasattr(visual, "_embeds"):  # the manual embedding is open_clip's
        assert torch.allclose(x, visual._embeds(images), atol=1e-5)
    assert getattr(visual.transformer, "batch_first", True)
    for blk in visual.transformer.resblocks[:-1]:  # open_clip's own blocks
        x = blk(x)
    last = visual.transformer.resblocks[-1]
    assert isinstance(last.attn, torch.nn.MultiheadAttention) and isinstance(last.mlp.gelu, torch.nn.GELU)
    w_v = last.attn.in_proj_weight[2 * c :]
    b_v = last.attn.in_proj_bias[2 * c :]
    v = _ln(last.ln_1, x) @ w_v.T + b_v  # (B, 1+hw, C)
    a = (v @ last.attn.out_proj.weight.T + last.attn.out_proj.bias) * _gamma(last.ls_1)
    if head == "maskclip":
        x = x + a
        hidden = F.gelu(_ln(last.ln_2, x) @ last.mlp.c_fc.weight.T + last.mlp.c_fc.bias)
        x = x + (hidden @ last.mlp.c_proj.weight.T + last.mlp.c_proj.bias) * _gamma(last.ls_2)
    else:
        assert head == "maskclip-noresidual"
        x = a
    f = _ln(visual.ln_post, x[:, 1:]) @ visual.proj  # (B, hw, E)
    return F.normalize(f, dim=-1).reshape(b, h, w, -1).permute(0, 3, 1, 2)


@torch.no_grad()
def rn_reference(visual, images: torch.Tensor) -> torch.Tensor:
    """MaskCLIP on an open_clip ModifiedResNet: the attention pool's v/c projections at every
    location of layer4's output, with no positional embedding."""
    z = visual.stem(images)
    for layer in (visual.layer1, visual.layer2, visual.layer3, visual.layer4):
        z = layer(z)  # (B, C, h, w)
    pool = visual.attnpool
    v = torch.einsum("bchw,dc->bdhw", z, pool.v_proj.weight) + pool.v_proj.bias.view(1, -1, 1, 1)
    f = torch.einsum("bchw,ec->behw", v, pool.c_proj.weight) + pool.c_proj.bias.view(1, -1, 1, 1)
    return F.normalize(f, dim=1)


def _images(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g)


@pytest.mark.parametrize("head", DENSE_CLIP_HEADS)
@pytest.mark.parametrize("kind", ["plain", "layerscale"])
@pytest.mark.parametrize("hw", [(32, 32), (40, 48)])
def test_vit_heads_match_the_formula(vit_dirs, kind, head, hw):
    clip = create_clip(f"local-dir:{vit_dirs[kind]}", dense_head=head)
    assert clip.dense_head == head and clip.patch_size == 8 and clip.supports_dense
    x = _images((2, 3) + hw)
    out = clip.dense(x)
    assert out.shape == (2, 32, hw[0] // 8, hw[1] // 8) and out.dtype == torch.float32
    assert torch.allclose(out.norm(dim=1), torch.ones(2, hw[0] // 8, hw[1] // 8), atol=1e-5)
    ref = vit_reference(clip.model.visual, x, head)
    assert (out - ref).abs().max() < 1e-5


@pytest.mark.parametrize("head", DENSE_CLIP_HEADS)
@pytest.mark.parametrize("kind", ["plain", "layerscale", "normformer"])
@torch.no_grad()
def test_vit_heads_are_the_last_block_with_self_only_attention(vit_dirs, kind, head):
    """Second pin, through open_clip's own modules: MaskCLIP's last block is the block itself
    with each token attending only to itself (a diagonal attention mask)."""
    clip = create_clip(f"local-dir:{vit_dirs[kind]}", dense_head=head)
    visual = clip.model.visual
    x_img = _images((2, 3, 32, 32), seed=8)
    x = visual._embeds(x_img)  # (B, 1 + 16, C)
    for blk in visual.transformer.resblocks[:-1]:
        x = blk(x)
    last = visual.transformer.resblocks[-1]
    n = x.shape[1]
    self_only = torch.full((n, n), float("-inf")).fill_diagonal_(0.0)
    if head == "maskclip":
        x = last(x, attn_mask=self_only)
    elif isinstance(last.attn, torch.nn.MultiheadAttention):
        x = last.ls_1(last.attention(q_x=last.ln_1(x), attn_mask=self_only))
    else:
        x = last.ls_1(last.ln_attn(last.attn(last.ln_1(x), attn_mask=self_only)))
    ref = F.normalize(visual.ln_post(x[:, 1:]) @ visual.proj, dim=-1).reshape(2, 4, 4, -1).permute(0, 3, 1, 2)
    assert (clip.dense(x_img) - ref).abs().max() < 1e-5


def test_default_head_keeps_the_last_block_residual_and_mlp(vit_dirs):
    """The old residual-free code fails here: MaskCLIP's output depends on the last MLP."""
    d = vit_dirs["plain"]
    default = create_clip(f"local-dir:{d}")
    nores = create_clip(f"local-dir:{d}", dense_head="maskclip-noresidual")
    assert default.dense_head == "maskclip" and DENSE_CLIP_HEADS[0] == "maskclip"
    x = _images((2, 3, 32, 40), seed=1)
    a, b = default.dense(x), nores.dense(x)
    assert (a - b).abs().max() > 0.05
    mlp_out = default.model.visual.transformer.resblocks[-1].mlp.c_proj
    with torch.no_grad():
        mlp_out.weight.mul_(3.0)
    assert (default.dense(x) - a).abs().max() > 0.01  # the MLP is on the path
    last = nores.model.visual.transformer.resblocks[-1]
    with torch.no_grad():
        last.mlp.c_proj.weight.mul_(3.0)
        last.ln_2.weight.mul_(2.0)
    assert torch.allclose(nores.dense(x), b, atol=1e-6)  # and it is not on the no-residual path


def test_224_position_embedding_is_resampled_to_other_grids(vit_dirs):
    clip = create_clip(f"local-dir:{vit_dirs['native224']}")
    assert clip.image_size == 224 and clip.patch_size == 32
    for hw in [(224, 224), (160, 288), (96, 64)]:
        x = _images((1, 3) + hw, seed=2)
        out = clip.dense(x)
        assert out.shape == (1, 32, hw[0] // 32, hw[1] // 32)
        assert (out - vit_reference(clip.model.visual, x, "maskclip")).abs().max() < 1e-5


def test_resnet_maskclip_matches_the_formula_without_positional_embedding(rn_dir):
    clip = create_clip(f"local-dir:{rn_dir}")
    visual = clip.model.visual
    assert type(visual).__name__ == "ModifiedResNet"
    assert clip.supports_dense and clip.dense_head == "maskclip"
    assert clip.patch_size == 32 and clip.image_size == 64 and clip.embed_dim == 32
    for hw in [(64, 64), (96, 160), (32, 32)]:
        x = _images((2, 3) + hw, seed=3)
        out = clip.dense(x)
        assert out.shape == (2, 32, hw[0] // 32, hw[1] // 32) and out.dtype == torch.float32
        assert (out - rn_reference(visual, x)).abs().max() < 1e-5
    # neither the pool's positional embedding nor its query/key projections are on the path ...
    x = _images((1, 3, 64, 96), seed=4)
    before = clip.dense(x)
    pool = visual.attnpool
    with torch.no_grad():
        for t in (pool.positional_embedding, pool.q_proj.weight, pool.k_proj.weight, pool.q_proj.bias):
            t.add_(torch.randn_like(t))
    assert torch.allclose(clip.dense(x), before, atol=1e-6)
    # ... its value projection is
    with torch.no_grad():
        pool.v_proj.bias.add_(torch.randn_like(pool.v_proj.bias))
    assert (clip.dense(x) - before).abs().max() > 1e-2


def test_resnet_clip_loads_through_the_real_loader(rn_dir):
    import open_clip

    clip = create_encoder(f"clip:local-dir:{rn_dir}")
    t = clip.encode_text(["a photo of a cat.", "a dog"])
    assert t.shape == (2, 32)
    x = _images((2, 3, 64, 64), seed=5)
    assert clip.encode_image(x).shape == (2, 32)
    # the loader restored every tensor: same dense output as the model the files came from
    torch.manual_seed(7)
    src = open_clip.create_model("RN50", pretrained=None, **TINY_RN_CFG).eval()
    _perturb(src, 7)
    assert torch.allclose(clip.dense(x), rn_reference(src.visual, x), atol=1e-5)
    with pytest.raises(ConfigError, match="ViT"):
        create_clip(f"local-dir:{rn_dir}", dense_head="maskclip-noresidual")


def test_dense_head_names_are_checked(vit_dirs):
    d = vit_dirs["plain"]
    assert DENSE_CLIP_HEADS == ("maskclip", "maskclip-noresidual")
    with pytest.raises(ConfigError) as err:
        create_clip(f"local-dir:{d}", dense_head="clearclip")
    assert all(h in str(err.value) for h in DENSE_CLIP_HEADS)
    with pytest.raises(ConfigError, match="maskclip-noresidual"):
        create_encoder(f"local-dir:{d}", dense_head="MaskCLIP")
    assert create_encoder(f"local-dir:{d}", dense_head="maskclip-noresidual").dense_head == "maskclip-noresidual"
    with pytest.raises(ConfigError, match="CLIP encoders only"):
        create_encoder("dino_vits16", dense_head="maskclip")


def test_dense_rejects_sizes_that_are_not_cell_multiples(vit_dirs, rn_dir):
    with pytest.raises(ValueError, match="multiple"):
        create_clip(f"local-dir:{vit_dirs['plain']}").dense(torch.zeros(1, 3, 36, 32))
    with pytest.raises(ValueError, match="multiple"):
        create_clip(f"local-dir:{rn_dir}").dense(torch.zeros(1, 3, 64, 80))


@pytest.mark.parametrize("which,head", [("vit", "maskclip"), ("vit", "maskclip-noresidual"), ("rn", "maskclip")])
def test_dense_heads_under_bf16_weights(vit_dirs, rn_dir, which, head):
    d = vit_dirs["layerscale"] if which == "vit" else rn_dir
    clip = create_clip(f"local-dir:{d}", dense_head=head)
    x = _images((2, 3, 64, 64), seed=6)
    ref = clip.dense(x)
    clip.set_precision("bf16")
    out = clip.dense(x)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert torch.allclose(out.norm(dim=1), torch.ones_like(out[:, 0]), atol=1e-4)
    assert F.cosine_similarity(out, ref, dim=1).min() > 0.98
