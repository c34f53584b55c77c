import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_image
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
    base = dict(image_size=64, context_elimination=False, block_size=16, batch_size=2)
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
    d = bank.save(tmp_path / "bank")
    assert sorted(p.name for p in d.iterdir()) == ["bank.json", "bank.safetensors"]
    json.loads((d / "bank.json").read_text())
    back = ConceptBank.load(d)
    assert back.names == bank.names
    assert torch.equal(back.references, bank.references)
    assert torch.equal(back.calibration, bank.calibration)
    assert back.metadata == json.loads(json.dumps(bank.metadata))


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a concept bank"):
        ConceptBank.load(tmp_path)
    (tmp_path / "bank.json").write_text("{broken")
    (tmp_path / "bank.safetensors").write_bytes(b"nope")
    with pytest.raises(ReCoError, match="unreadable"):
        ConceptBank.load(tmp_path)


def test_unknown_concept_and_empty_archive(tiny_dense, images):
    builder = ConceptBuilder(tiny_dense, None, _cfg())
    bank = ConceptBank.build({"cat": images}, builder)
    with pytest.raises(UnknownConceptError, match="unknown concept 'zebra'.*cat"):
        bank.subset(["zebra"])
    with pytest.raises(EmptyArchiveError, match="'dog'"):
        ConceptBank.build({"cat": images, "dog": []}, builder)
    with pytest.raises(EmptyArchiveError, match="context concept 'tree'"):
        ConceptBank.build({"cat": images}, ConceptBuilder(tiny_dense, None, _cfg(context_elimination=True)))


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
    no_lang = ConceptBank.build({"cat": images, "dog": images[::-1]},
                                ConceptBuilder(tiny_dense, tiny_clip, _cfg(language_guidance=False)))
    assert with_lang.metadata["language_guidance"] is True
    assert with_lang.text_embeddings.shape == (2, 32)
    assert no_lang.metadata["language_guidance"] is False
    assert not torch.allclose(with_lang.references, no_lang.references)


def _bank(tiny_dense, images, clip=None):
    return ConceptBank.build({"cat": images[:2], "dog": images[2:]}, ConceptBuilder(tiny_dense, clip, _cfg()))


def test_segmenter_full_resolution_and_modes(tiny_dense, tiny_clip, images):
    img = make_image(99, size=(70, 45))
    seg = Segmenter(_bank(tiny_dense, images), tiny_dense, None, SegmenterConfig(image_size=64))
    out = seg(img)[0]
    assert out.labels.shape == (45, 70) and out.scores.shape == (2, 45, 70)
    assert out.labels.dtype == torch.int64 and set(out.labels.unique().tolist()) <= {0, 1}
    assert out.mode == "reference" and out.class_names == ("cat", "dog")
    assert torch.equal(out.labels, out.scores.argmax(0))

    bank = _bank(tiny_dense, images, tiny_clip)
    full = Segmenter(bank, tiny_dense, tiny_clip, SegmenterConfig(image_size=64))
    assert full.mode == "reference x dense-clip"
    ref_only = Segmenter(bank, tiny_dense, tiny_clip, SegmenterConfig(image_size=64, dense_clip=False))
    s_full, s_ref = full.scores(img), ref_only.scores(img)
    assert (s_full <= s_ref + 1e-6).all() and not torch.allclose(s_full, s_ref)


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
