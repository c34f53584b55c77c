import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import make_image
from PIL import Image

from index.storage import load_bank, save_bank
from reco import (
    BankConfig,
    ConceptBank,
    ConceptBuilder,
    CRFConfig,
    EmptyArchiveError,
    Segmenter,
    SegmenterConfig,
    UnknownConceptError,
)
from reco.errors import ConfigError, ReCoError


def _cfg(**kw):
    # single seed tokens: a 64 px image has 16 tokens, fewer than the default's 100-token seed region
    base = dict(image_size=64, context_elimination=False, block_size=16, batch_size=2, seed_tokens=1)
    base.update(kw)
    return BankConfig(**base)


def test_build_without_clip_reports_exemplar_mode(tiny_dense, images):
    builder = ConceptBuilder(tiny_dense, None, _cfg())
    bank = ConceptBank.build({"cat": images[:3], "dog": images[2:]}, builder, archive_ids={"cat": ["a", "b", "c"]})
    assert bank.names == ("cat", "dog")
    assert bank.references.shape == (2, 32)
    assert torch.allclose(bank.references.norm(dim=1), torch.ones(2), atol=1e-5)
    assert bank.text_embeddings is None
    assert bank.metadata["archive_mode"] == "exemplar" and bank.metadata["language_guidance"] is False
    assert bank.metadata["concepts"]["cat"]["archive"] == ["a", "b", "c"]
    assert len(bank.metadata["concepts"]["cat"]["seed_index"]) == 3


def test_save_load_roundtrip_without_pickle(tmp_path, tiny_dense, images):
    bank = ConceptBank.build({"cat": images[:2], "dog": images[2:]}, ConceptBuilder(tiny_dense, None, _cfg()))
    bank.calibrate(tiny_dense(tiny_dense.normalize(torch.rand(2, 3, 64, 64))))
    d = tmp_path / "bank"
    save_bank(bank, str(d))
    assert sorted(p.name for p in d.iterdir()) == ["bank.json", "bank.safetensors"]
    json.loads((d / "bank.json").read_text())
    back = load_bank(str(d))
    assert back.names == bank.names
    assert torch.equal(back.references, bank.references)
    assert torch.equal(back.calibration, bank.calibration)
    assert back.metadata == json.loads(json.dumps(bank.metadata))


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a concept bank"):
        load_bank(str(tmp_path))
    (tmp_path / "bank.json").write_text("{broken")
    (tmp_path / "bank.safetensors").write_bytes(b"nope")
    with pytest.raises(ReCoError, match="unreadable"):
        load_bank(str(tmp_path))


def test_unknown_concept_and_empty_archive(tiny_dense, images):
    builder = ConceptBuilder(tiny_dense, None, _cfg())
    bank = ConceptBank.build({"cat": images}, builder)
    with pytest.raises(UnknownConceptError, match="unknown concept 'zebra'.*cat"):
        bank.subset(["zebra"])
    with pytest.raises(EmptyArchiveError, match="'dog'"):
        ConceptBank.build({"cat": images, "dog": []}, builder)
    strict = _cfg(context_elimination=True, context_required=True)
    with pytest.raises(ConfigError, match=r"context concepts \['tree', 'sky', 'building', 'road', 'person'\]"):
        ConceptBank.build({"cat": images}, ConceptBuilder(tiny_dense, None, strict))


def test_context_elimination_changes_the_reference(tiny_dense, images):
    ctx = {"tree": [make_image(10), make_image(11)], "sky": [make_image(12)]}
    plain = ConceptBuilder(tiny_dense, None, _cfg(context_elimination=False))
    elim = ConceptBuilder(tiny_dense, None, _cfg(context_elimination=True, context_concepts=("tree", "sky")))
    refs = elim.build_context(ctx)
    assert list(refs) == ["tree", "sky"]
    a = plain.build("cat", images)
    b = elim.build("cat", images, context=refs)
    assert b.context == ("tree", "sky")
    assert not torch.allclose(a.reference, b.reference)
    # a target that is itself a context concept reuses the context reference
    again = elim.build("sky", images, context=refs)
    assert again.reused_context and torch.allclose(again.reference, refs["sky"])


def test_language_guidance_with_clip(tiny_dense, tiny_clip, images):
    cfg = _cfg()
    with_lang = ConceptBank.build({"cat": images, "dog": images[::-1]}, ConceptBuilder(tiny_dense, tiny_clip, cfg))
    no_lang = ConceptBank.build(
        {"cat": images, "dog": images[::-1]}, ConceptBuilder(tiny_dense, tiny_clip, _cfg(language_guidance=False))
    )
    assert with_lang.metadata["language_guidance"] is True
    assert with_lang.text_embeddings.shape == (2, 32)
    assert no_lang.metadata["language_guidance"] is False
    assert with_lang.metadata["clip_dense_head"] == tiny_clip.dense_head
    # the direction of the effect is pinned in test_inference.py (seed moves to the text region)


def _bank(tiny_dense, images, clip=None):
    return ConceptBank.build({"cat": images[:2], "dog": images[2:]}, ConceptBuilder(tiny_dense, clip, _cfg()))


def test_segmenter_full_resolution_and_modes(tiny_dense, tiny_clip, images):
    img = make_image(99, size=(70, 45))
    for window, mode in ((None, "reference"), (0.5, "reference, windows 0.5 at 64px")):
        seg = Segmenter(_bank(tiny_dense, images), tiny_dense, None, SegmenterConfig(image_size=64, window=window))
        out = seg(img)[0]
        assert out.labels.shape == (45, 70) and out.scores.shape == (2, 45, 70)
        assert out.labels.dtype == torch.int64 and set(out.labels.unique().tolist()) <= {0, 1}
        assert out.mode == mode and out.class_names == ("cat", "dog")
        assert torch.equal(out.labels, out.scores.argmax(0))

    bank = _bank(tiny_dense, images, tiny_clip)
    full = Segmenter(bank, tiny_dense, tiny_clip, SegmenterConfig(image_size=64, window=None))
    assert full.mode == "reference x dense-clip"
    ref_only = Segmenter(bank, tiny_dense, tiny_clip, SegmenterConfig(image_size=64, dense_clip=False, window=None))
    s_full, s_ref = full.scores(img), ref_only.scores(img)
    # the full score is the reference-only score times sigmoid(10 cos(dense CLIP, text)), upsampled
    from reco.image import resize_for_inference
    from reco.inference import text_similarity

    xc = resize_for_inference(img, 64, tiny_clip.patch_size)[None]
    t = torch.sigmoid(10 * text_similarity(tiny_clip.dense(tiny_clip.normalize(xc)), bank.text_embeddings))
    t = torch.nn.functional.interpolate(t, size=(45, 70), mode="bilinear", align_corners=False)[0]
    assert torch.allclose(s_full, s_ref * t, atol=1e-5)


def test_window_boxes_cover_every_pixel_flush_with_the_edges():
    from reco.image import scale_box, window_boxes

    boxes = window_boxes((360, 480), 0.667, 0.5)  # the default on a CamVid frame: 240 px every 120 px
    assert boxes == [(x, y, x + 240, y + 240) for y in (0, 120) for x in (0, 120, 240)]
    boxes = window_boxes((360, 480), 0.5, 0.5)  # 180 px, about every 90 px, both edges flush
    assert sorted({b[0] for b in boxes}) == [0, 100, 200, 300] and sorted({b[1] for b in boxes}) == [0, 90, 180]
    for hw, fraction, stride in (
        ((360, 480), 0.5, 0.5),
        ((333, 500), 0.667, 0.5),
        ((45, 70), 0.3, 1.0),
        ((7, 300), 1, 1),
    ):
        cover = np.zeros(hw, dtype=int)
        for x0, y0, x1, y1 in window_boxes(hw, fraction, stride):
            assert x1 - x0 == y1 - y0 == round(fraction * min(hw))
            cover[y0:y1, x0:x1] += 1
        assert cover.min() >= 1  # every pixel covered
    # a square image gets 2 x 2 windows, not a near-duplicate third one 1 px from the second
    assert window_boxes((320, 320), 0.667, 0.5) == [
        (0, 0, 213, 213),
        (107, 0, 320, 213),
        (0, 107, 213, 320),
        (107, 107, 320, 320),
    ]
    assert window_boxes((45, 70), 1.0, 0.5) == [(0, 0, 45, 45), (25, 0, 70, 45)]
    assert window_boxes((10, 10), 1.0, 1.0) == [(0, 0, 10, 10)]
    assert scale_box((300, 180, 480, 360), (360, 480), (180, 240)) == (150, 90, 240, 180)
    with pytest.raises(ValueError, match="fraction"):
        window_boxes((10, 10), 0.0, 0.5)
    for bad in ({"window": 1.5}, {"window": 0}, {"window_stride": 0}, {"window_image_size": 8}):
        with pytest.raises(ConfigError, match="segmenter.window"):
            SegmenterConfig(**bad)


def test_windowed_scores_are_the_mean_of_each_windows_scores(tiny_dense, images, monkeypatch):
    """Sliding windows: each window is encoded like an archive image (resized to the bank's
    image_size), finished at its box and averaged where windows overlap."""
    from reco.image import resize_window, window_boxes

    bank = _bank(tiny_dense, images)
    img = make_image(7, size=(70, 45))
    cfg = SegmenterConfig(image_size=64, window=0.5, window_stride=0.5, batch_size=2)
    seg = Segmenter(bank, tiny_dense, None, cfg)
    assert seg.window_size == _cfg().image_size  # the bank's archive side
    calls = []
    forward = type(tiny_dense).forward
    monkeypatch.setattr(type(tiny_dense), "forward", lambda self, x: calls.append(tuple(x.shape)) or forward(self, x))
    got = seg.scores(img)
    boxes = window_boxes((45, 70), 0.5, 0.5)
    assert len(boxes) == 3 * 5  # side 22 px, about every 11 px, both edges flush
    side = seg.window_size
    assert [c[0] for c in calls] == [8, 7] and all(c[2:] == (side, side) for c in calls)  # 4 x batch_size per pass
    total, count = torch.zeros(2, 45, 70), torch.zeros(45, 70)
    for x0, y0, x1, y1 in boxes:
        x = resize_window(img, (x0, y0, x1, y1), side, tiny_dense.patch_size)[None]
        f = forward(tiny_dense, tiny_dense.normalize(x))
        s = seg.finish_scores(seg.concept_logits(f), (y1 - y0, x1 - x0))[0]
        total[:, y0:y1, x0:x1] += s
        count[y0:y1, x0:x1] += 1
    assert got.shape == (2, 45, 70) and torch.allclose(got, total / count, atol=1e-5)
    assert count[0, 0] == 1 and count.min() >= 1 and count.max() > 1  # a corner: one window; overlaps averaged
    # the same image labelled as a list (the batch path) gives the same scores
    assert torch.allclose(seg([img, img])[1].scores, got, atol=1e-5)
    # window 1.0 on a square image: one window, the whole image at the window size
    sq = make_image(3, size=(50, 50))
    one = Segmenter(bank, tiny_dense, None, replace(cfg, window=1.0, window_image_size=48))
    whole = Segmenter(bank, tiny_dense, None, replace(cfg, window=None, image_size=48))
    assert torch.allclose(one.scores(sq), whole.scores(sq), atol=1e-5)


def test_segmenter_background_and_crf(tiny_dense, images):
    bank = _bank(tiny_dense, images)
    img = np.asarray(make_image(5, size=(64, 48)))
    seg = Segmenter(bank, tiny_dense, None, SegmenterConfig(image_size=64, background_threshold=1.0))
    out = seg([img, img])
    assert len(out) == 2 and out[0].class_names == ("background", "cat", "dog")
    assert (out[0].labels == 0).all()  # sigmoid(cos) < 1 everywhere
    crf = Segmenter(bank, tiny_dense, None, SegmenterConfig(image_size=64, crf=CRFConfig(iterations=2)))
    o = crf(Image.fromarray(img))[0]
    assert o.scores.shape == (2, 48, 64) and o.mode.endswith("crf")


def test_segmenter_rejects_incompatible_bank(tiny_dense):
    bank = ConceptBank(("a",), torch.randn(1, 7))
    with pytest.raises(ConfigError, match="dimension 7"):
        Segmenter(bank, tiny_dense)
    bank = ConceptBank(("a",), torch.randn(1, 32))
    with pytest.raises(ConfigError, match="calibration"):
        Segmenter(bank, tiny_dense, None, SegmenterConfig(calibrate=True))


def test_segmenter_refuses_a_bank_built_with_another_encoder(tiny_dense, images):
    """dinov2_vits14 and dino_vits16 are both 384-d: size alone cannot tell them apart."""
    bank = _bank(tiny_dense, images)
    assert bank.metadata["dense_encoder"] == "dino_vits16"
    other_name = ConceptBank(bank.names, bank.references, metadata=dict(bank.metadata, dense_encoder="dinov2_vits14"))
    with pytest.raises(ConfigError, match="dense encoder: bank 'dinov2_vits14', given 'dino_vits16'"):
        Segmenter(other_name, tiny_dense)
    other_weights = ConceptBank(
        bank.names,
        bank.references,
        metadata=dict(bank.metadata, dense_weights="/x/other.safetensors", dense_weights_id="sha256:0000"),
    )
    with pytest.raises(ConfigError, match="dense weights"):
        Segmenter(other_weights, tiny_dense)
    # experts may override; the matching bank passes untouched
    Segmenter(other_name, tiny_dense, None, SegmenterConfig(allow_encoder_mismatch=True))
    Segmenter(bank, tiny_dense)


def test_segmenter_refuses_text_embeddings_of_another_clip(tiny_dense, tiny_clip, images):
    bank = _bank(tiny_dense, images, tiny_clip)
    other = ConceptBank(
        bank.names, bank.references, bank.text_embeddings, metadata=dict(bank.metadata, clip="ViT-L-14")
    )
    with pytest.raises(ConfigError, match="CLIP model"):
        Segmenter(other, tiny_dense, tiny_clip)
    # without dense CLIP the bank's text embeddings are unused: no CLIP check
    Segmenter(other, tiny_dense, tiny_clip, SegmenterConfig(dense_clip=False))


def test_batched_inference_equals_one_by_one(tiny_dense, images, monkeypatch):
    bank = _bank(tiny_dense, images)
    imgs = [make_image(i, (70, 45)) for i in range(3)] + [make_image(9, (40, 64)), make_image(8, (70, 45))]
    single = Segmenter(bank, tiny_dense, None, SegmenterConfig(image_size=64, batch_size=1, window=None))
    batched = Segmenter(bank, tiny_dense, None, SegmenterConfig(image_size=64, batch_size=3, window=None))
    calls = []
    forward = type(tiny_dense).forward
    monkeypatch.setattr(type(tiny_dense), "forward", lambda self, x: calls.append(x.shape[0]) or forward(self, x))
    a = single(imgs)
    assert calls == [1] * 5
    calls.clear()
    b = batched(imgs)
    assert sorted(calls) == [1, 1, 3]  # 4 same-size images -> 3 + 1, the odd one alone
    for x, y in zip(a, b):
        assert x.scores.shape == y.scores.shape
        assert torch.allclose(x.scores, y.scores, atol=1e-5)
        assert torch.equal(x.labels, y.labels)


def test_bank_save_has_one_commit_point(tmp_path, tiny_dense, images, monkeypatch):
    """A crash between writing tensors and names must not pair one save's tensors with another
    save's names (the old save renamed two files one after the other)."""
    import os

    builder = ConceptBuilder(tiny_dense, None, _cfg())
    a = ConceptBank.build({"cat": images[:2], "dog": images[2:]}, builder)
    b = ConceptBank(("dog", "cat"), a.references.flip(0).clone(), metadata={"note": "b"})
    d = tmp_path / "bank"
    save_bank(a, str(d))
    real_replace = os.replace
    calls = []

    def crash_after_first(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("simulated crash")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_after_first)
    with pytest.raises(OSError, match="simulated crash"):
        save_bank(b, str(d))
    monkeypatch.setattr(os, "replace", real_replace)
    back = load_bank(str(d))
    # whichever save won, names and tensors belong together
    assert (back.names, back.metadata.get("note")) in ((a.names, None), (b.names, "b"))
    want = a if back.names == a.names else b
    assert torch.equal(back.references, want.references)
    # the bytes form round-trips through the same single blob
    again = ConceptBank.from_bytes(b.to_bytes())
    assert again.names == b.names and torch.equal(again.references, b.references)


def test_format1_banks_still_load(tmp_path):
    """Banks saved before the header moved into the safetensors file (format 1) still load."""
    from safetensors.torch import save_file

    refs = torch.nn.functional.normalize(torch.randn(2, 4), dim=1)
    save_file({"references": refs}, str(tmp_path / "bank.safetensors"))
    (tmp_path / "bank.json").write_text(json.dumps({"format_version": 1, "names": ["a", "b"], "metadata": {}}))
    back = load_bank(str(tmp_path))
    assert back.names == ("a", "b") and torch.equal(back.references, refs)


def test_weights_identity_is_the_file_content_not_its_path(tmp_path, tiny_dense_path, images):
    """The same checkpoint at another path (another node's cache) is the same encoder; another
    checkpoint of the same architecture under the same name is not."""
    import shutil

    from conftest import TINY_VIT

    from reco.encoders import create_dense_encoder

    a = create_dense_encoder("dino_vits16", tiny_dense_path, **TINY_VIT)
    copy = tmp_path / "elsewhere" / tiny_dense_path.name
    copy.parent.mkdir()
    shutil.copy(tiny_dense_path, copy)
    b = create_dense_encoder("dino_vits16", copy, **TINY_VIT)
    assert a.weights_id == b.weights_id and a.weights_id.startswith("sha256:")
    bank = ConceptBank.build({"cat": images[:2], "dog": images[2:]}, ConceptBuilder(a, None, _cfg()))
    assert bank.metadata["dense_weights_spec"] == str(tiny_dense_path)
    Segmenter(bank, b)  # same bytes, other path: accepted
    from safetensors.torch import load_file, save_file

    sd = load_file(str(tiny_dense_path))
    sd = {k: v + 0.01 for k, v in sd.items()}
    other = tmp_path / "other.safetensors"
    save_file(sd, str(other))
    c = create_dense_encoder("dino_vits16", other, **TINY_VIT)
    with pytest.raises(ConfigError, match="dense weights"):
        Segmenter(bank, c)
