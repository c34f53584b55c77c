import pytest
import torch
from conftest import TINY_VIT
from safetensors.torch import save_file

from reco.encoders import create_clip, create_dense_encoder, create_encoder
from reco.errors import ConfigError, WeightsMismatchError, WeightsNotFoundError


def test_dense_encoder_roundtrip_through_the_real_loader(tiny_dense_path):
    torch.manual_seed(0)
    a = create_dense_encoder("dino_vits16", tiny_dense_path, **TINY_VIT)
    b = create_encoder("dino_vits16", str(tiny_dense_path), **TINY_VIT)
    x = torch.rand(2, 3, 64, 96)
    fa = a(a.normalize(x))
    assert fa.shape == (2, 32, 4, 6)
    assert torch.allclose(fa, b(b.normalize(x)), atol=1e-6)
    assert a.weights == str(tiny_dense_path)


def test_missing_weight_file_names_file_and_architecture(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(WeightsNotFoundError) as err:
        create_dense_encoder("dinov2_vits14", missing)
    assert str(missing) in str(err.value) and "vit_small_patch14_dinov2" in str(err.value)


def test_mismatched_weight_file_is_a_clear_error(tmp_path, tiny_dense_path):
    bad = tmp_path / "wrong.safetensors"
    save_file({"foo": torch.zeros(3)}, str(bad))
    with pytest.raises(WeightsMismatchError) as err:
        create_dense_encoder("dino_vits16", bad, **TINY_VIT)
    assert str(bad) in str(err.value) and "vit_small_patch16_224" in str(err.value)
    # right keys, wrong widths: tiny weights into the full ViT-S/16
    with pytest.raises(WeightsMismatchError, match="does not fit"):
        create_dense_encoder("dino_vits16", tiny_dense_path)


def test_unknown_encoder_and_non_multiple_input(tiny_dense):
    with pytest.raises(ConfigError, match="registered"):
        create_dense_encoder("resnet9000")
    with pytest.raises(ValueError, match="multiple"):
        tiny_dense(torch.zeros(1, 3, 50, 64))


def test_clip_local_dir_loads_and_maskclip_shapes(tiny_clip):
    t = tiny_clip.encode_text(["a photo of a cat.", "a dog"])
    assert t.shape == (2, 32) and torch.allclose(t.norm(dim=-1), torch.ones(2), atol=1e-5)
    x = tiny_clip.normalize(torch.rand(2, 3, 32, 48))
    d = tiny_clip.dense(x)
    assert tiny_clip.dense_head == "maskclip" and tiny_clip.patch_size == 8
    assert d.shape == (2, 32, 4, 6)
    assert torch.allclose(d.norm(dim=1), torch.ones(2, 4, 6), atol=1e-4)
    assert tiny_clip.encode_image(tiny_clip.normalize(torch.rand(1, 3, 32, 32))).shape == (1, 32)


def test_maskclip_is_the_value_path(tiny_clip):
    """At the native grid, MaskCLIP's output must not depend on query/key weights of the last block."""
    x = tiny_clip.normalize(torch.rand(1, 3, 32, 32))
    before = tiny_clip.dense(x)
    attn = tiny_clip.model.visual.transformer.resblocks[-1].attn
    width = attn.embed_dim
    saved = attn.in_proj_weight.data.clone()
    try:
        attn.in_proj_weight.data[: 2 * width] = torch.randn(2 * width, width)
        assert torch.allclose(tiny_clip.dense(x), before, atol=1e-5)
        attn.in_proj_weight.data[2 * width :] = torch.randn(width, width)
        assert not torch.allclose(tiny_clip.dense(x), before, atol=1e-3)
    finally:
        attn.in_proj_weight.data.copy_(saved)


def test_clip_weight_errors(tmp_path, tiny_clip_dir):
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        create_clip("ViT-B-32", tmp_path / "missing.pt")
    with pytest.raises(WeightsNotFoundError, match="neither a file nor a pretrained tag"):
        create_clip("ViT-B-32", "no-such-tag")
    with pytest.raises(WeightsMismatchError, match="do not fit"):
        create_clip("ViT-B-32", tiny_clip_dir / "open_clip_model.safetensors")
    with pytest.raises(ConfigError):
        create_clip("NoSuchModel-42")
    with pytest.raises(WeightsNotFoundError, match="open_clip_config.json"):
        create_clip(f"local-dir:{tmp_path}")


def test_bf16_precision_keeps_embeddings(tiny_clip_dir):
    from reco.encoders import create_clip

    clip = create_clip(f"local-dir:{tiny_clip_dir}")
    x = clip.normalize(torch.rand(3, 3, 32, 32))
    ref = clip.encode_image(x)
    clip.set_precision("bf16")
    assert clip.dtype == torch.bfloat16
    out = clip.encode_image(x)
    assert out.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(ref, out).min() > 0.99
    assert clip.set_precision("fp32").dtype == torch.float32
    with pytest.raises(ConfigError):
        clip.set_precision("fp8")
