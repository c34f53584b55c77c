"""Issue 15: references that cannot cascade. A diffuse archive (pole crops: mostly road and
building, the pole itself thin and varied) seeds on the road it shares; with sequential peeling
its road-like reference then peels the road from every concept built after it, road included.
The ``ownership`` order (reco/vocabulary.py) lets only concepts whose reference is about their own
archive peel, so road keeps its region and pole is built with road and building peeled off."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_improvements import Stub, archive, e

from reco import ConceptBank, ConceptBuilder, Segmenter, SegmenterConfig
from reco.bank import build_order, ownership_margins
from reco.config import BankConfig
from reco.errors import ConfigError

D = 48
BUILDING, POLE, ROAD, PAVEMENT = 0, 1, 2, 3


def _street(k: int = 4):
    """Equal archive sizes (as with k = 50 crops), vocabulary order building, pole, road."""
    uniq = iter(range(8, D))
    building = [
        [
            e(BUILDING, noise=0.1, seed=i),
            e(BUILDING, noise=0.1, seed=100 + i),
            e(next(uniq)),
            e(ROAD, noise=0.6, seed=200 + i),
        ]
        for i in range(k)
    ]
    # pole crops: road and building around a thin, varied pole
    pole = [
        [
            e(ROAD, noise=0.15, seed=300 + i),
            e(BUILDING, noise=0.3, seed=400 + i),
            e(POLE, noise=1.0, seed=500 + i),
            e(next(uniq)),
        ]
        for i in range(k)
    ]
    # road crops: road, and the pavement beside it (the second most shared region)
    road = [
        [
            e(ROAD, noise=0.1, seed=600 + i),
            e(ROAD, noise=0.1, seed=700 + i),
            e(ROAD, noise=0.1, seed=800 + i),
            e(PAVEMENT, noise=0.2, seed=900 + i),
        ]
        for i in range(k)
    ]
    return {"building": archive(building), "pole": archive(pole), "road": archive(road)}


def _cfg(**kw) -> BankConfig:
    """Peeling with single seed tokens (the earlier default), so each order's mechanism shows."""
    base = dict(
        calibration="none",
        block_size=64,
        context_elimination=False,
        context_from_vocabulary=True,
        seed_tokens=1,
        exclude_own_image=True,
    )
    base.update(kw)
    return BankConfig(**base)


def _cos(bank: ConceptBank, name: str, axis: int) -> float:
    return float(F.normalize(bank.references[bank.index(name)], dim=0)[axis])


def test_archive_size_order_cascades_pole_steals_road():
    """Today's mechanism: equal archive sizes fall back to vocabulary order; pole, built before
    road, seeds on road, and road (with pole peeled) loses its own region."""
    feats = _street()
    cfg = _cfg(context_order="archive-size")
    assert build_order(cfg, list(feats), {n: 4 for n in feats}) == ["building", "pole", "road"]
    bank = ConceptBank.build_from_features(feats, ConceptBuilder(Stub(), None, cfg))
    assert _cos(bank, "pole", ROAD) > 0.9  # pole's seeds landed on road
    assert _cos(bank, "road", ROAD) < 0.5  # ...and peeled it from road
    assert _cos(bank, "road", PAVEMENT) > 0.9


def test_ownership_margins_single_out_the_diffuse_concept():
    feats = _street()
    builder = ConceptBuilder(Stub(), None, _cfg(context_from_vocabulary=False))
    plain = {n: builder.build_from_features(n, f) for n, f in feats.items()}
    m = ownership_margins(plain, feats, 20.0, 0.6)
    assert m["pole"] < 0 < m["building"] and m["road"] > 0


@pytest.mark.parametrize("owners_peel", [True, False])
def test_ownership_order_cannot_cascade(owners_peel):
    """The same archives with ``context_order="ownership"`` (fails with the default archive-size
    order, see above): road keeps road, pole finds the pole, and a street image's road pixels are
    labelled road."""
    feats = _street()
    cfg = _cfg(context_order="ownership", owners_peel=owners_peel)
    bank = ConceptBank.build_from_features(feats, ConceptBuilder(Stub(), None, cfg))
    assert _cos(bank, "road", ROAD) > 0.9
    assert _cos(bank, "building", BUILDING) > 0.9
    assert _cos(bank, "pole", POLE) > max(_cos(bank, "pole", ROAD), _cos(bank, "pole", BUILDING))
    assert bank.metadata["build_order"][-1] == "pole"  # the diffuse concept is built last
    assert "pole" not in bank.metadata["concepts"]["road"]["context_eliminated"]
    image = torch.stack(
        [
            e(ROAD, noise=0.1, seed=1000),
            e(BUILDING, noise=0.1, seed=1001),
            e(POLE, noise=0.3, seed=1002),
            e(ROAD, noise=0.1, seed=1003),
        ]
    ).T.reshape(1, D, 2, 2)
    seg = Segmenter(bank, Stub(image), None, SegmenterConfig(image_size=16, calibrate=False))
    labels = seg(torch.zeros(3, 16, 16))[0].labels
    names = [seg.class_names[int(i)] for i in labels[[0, 0, 15, 15], [0, 15, 0, 15]]]
    assert names == ["road", "building", "pole", "road"]


def _street_image() -> torch.Tensor:
    return torch.stack(
        [
            e(ROAD, noise=0.1, seed=1000),
            e(BUILDING, noise=0.1, seed=1001),
            e(POLE, noise=0.3, seed=1002),
            e(ROAD, noise=0.1, seed=1003),
        ]
    ).T.reshape(1, D, 2, 2)


def test_without_any_context_the_diffuse_concept_is_road():
    """What enrichment has to fix: co-segmented alone, pole's archive agrees most on the road."""
    feats = _street()
    bank = ConceptBank.build_from_features(feats, ConceptBuilder(Stub(), None, _cfg(context_from_vocabulary=False)))
    assert _cos(bank, "pole", ROAD) > 0.9


def test_enrichment_cannot_cascade():
    """``context_order="enrichment"`` on the pole-steals-road archives (the archive-size order
    and plain co-segmentation both fail here, above): the pole archive's road tokens are matched
    better by the road archive than by the pole archive, so pole seeds on the pole; nothing is
    peeled, so road keeps road; the street image is labelled road / building / pole."""
    feats = _street()
    cfg = _cfg(context_order="enrichment", enrichment_temperature=1000.0)
    bank = ConceptBank.build_from_features(feats, ConceptBuilder(Stub(), None, cfg))
    assert _cos(bank, "road", ROAD) > 0.9
    assert _cos(bank, "building", BUILDING) > 0.9
    assert _cos(bank, "pole", POLE) > 0.5 > max(_cos(bank, "pole", ROAD), _cos(bank, "pole", BUILDING))
    assert all(not bank.metadata["concepts"][n]["context_eliminated"] for n in feats)  # nothing peeled
    seg = Segmenter(bank, Stub(_street_image()), None, SegmenterConfig(image_size=16, calibrate=False))
    labels = seg(torch.zeros(3, 16, 16))[0].labels
    names = [seg.class_names[int(i)] for i in labels[[0, 0, 15, 15], [0, 15, 0, 15]]]
    assert names == ["road", "building", "pole", "road"]
    # order-free: the vocabulary order changes nothing
    back = ConceptBank.build_from_features(
        {n: feats[n] for n in reversed(list(feats))}, ConceptBuilder(Stub(), None, cfg)
    )
    for n in feats:
        assert torch.allclose(back.references[back.index(n)], bank.references[bank.index(n)], atol=1e-6)


def _margins_dense(archives):
    """Brute force of reco.enrichment.enrichment_margins: every pair of images at once."""
    flat = [F.normalize(f.permute(0, 2, 3, 1).reshape(f.shape[0], -1, f.shape[1]), dim=2) for f in archives]
    out = []
    for c, own in enumerate(flat):
        # aff[c2][p, j]: token p's best match in image j of archive c2
        aff = [torch.einsum("ipd,jqd->ipjq", own, pool).amax(dim=3) for pool in flat]
        k = own.shape[0]
        mask = ~torch.eye(k, dtype=torch.bool)[:, None, :].expand(k, own.shape[1], k)
        own_score = (aff[c] * mask).sum(2) / (k - 1)
        other = torch.stack([a.mean(2) for c2, a in enumerate(aff) if c2 != c]).amax(0)
        out.append((own_score - other).reshape(k, *archives[c].shape[2:]))
    return out


def test_enrichment_margins_blockwise_equal_brute_force():
    from reco.enrichment import enrichment_margins, enrichment_weights

    g = torch.Generator().manual_seed(0)
    archives = [
        torch.randn(3, 8, 2, 3, generator=g),
        torch.randn(4, 8, 2, 2, generator=g),
        torch.randn(2, 8, 3, 3, generator=g),
    ]
    want = _margins_dense(archives)
    for block, pool_tokens in ((7, 5), (64, 1000), (1, 1)):
        got = enrichment_margins(archives, block, pool_tokens)
        assert [tuple(m.shape) for m in got] == [(3, 2, 3), (4, 2, 2), (2, 3, 3)]
        for a, b in zip(got, want):
            assert torch.allclose(a, b, atol=1e-5)
    # the own-archive term is the plain co-segmentation score (its own image excluded)
    from reco.coseg import coseg_scores

    others = torch.stack(
        [
            a.mean(2)
            for a in [
                torch.einsum(
                    "ipd,jqd->ipjq",
                    *[F.normalize(x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, 8), dim=2) for x in (archives[0], b)],
                ).amax(3)
                for b in archives[1:]
            ]
        ]
    ).amax(0)
    own = coseg_scores(archives[0], None, 4, exclude_own_image=True).reshape(3, -1)
    assert torch.allclose(want[0].reshape(3, -1), own - others, atol=1e-5)
    # a vocabulary of one has nothing to compete with
    assert torch.isinf(enrichment_margins(archives[:1])[0]).all()
    w = enrichment_weights(torch.tensor([-1.0, -0.01, 0.0, 0.01, float("inf")]), 100.0)
    assert torch.allclose(w, torch.tensor([0.0, 2 / (1 + 2.718281828), 1.0, 1.0, 1.0]), atol=1e-6)


def test_enrichment_has_no_build_order_and_validates():
    with pytest.raises(ConfigError, match="enrichment"):
        build_order(BankConfig(context_order="enrichment"), ["a", "b"], {"a": 1, "b": 1})
    with pytest.raises(ConfigError, match="enrichment_temperature"):
        BankConfig(enrichment_temperature=0.0)


def test_others_peels_every_other_plain_reference_in_any_order():
    """``context_order="others"``: each concept is rebuilt with every other concept's *plain*
    reference peeled, whatever the vocabulary order. It is not cascade-proof in the strict sense:
    pole's plain reference is road, and with the sharp default weight that removes road from the
    road archive in one step (road seeds on the pavement), which enrichment avoids (above)."""
    feats = _street()
    cfg = _cfg(context_order="others")
    bank = ConceptBank.build_from_features(feats, ConceptBuilder(Stub(), None, cfg))
    for n in feats:
        assert sorted(bank.metadata["concepts"][n]["context_eliminated"]) == sorted(m for m in feats if m != n)
    back = ConceptBank.build_from_features(
        {n: feats[n] for n in reversed(list(feats))}, ConceptBuilder(Stub(), None, cfg)
    )
    assert torch.allclose(back.subset(list(feats)).references, bank.references, atol=1e-6)
    assert _cos(bank, "pole", POLE) > 0.8  # road and building peeled: pole finds the pole
    assert _cos(bank, "road", PAVEMENT) > 0.9  # ...but pole's plain (road) reference peeled road
    with pytest.raises(ConfigError, match="others"):
        build_order(cfg, list(feats), {n: 4 for n in feats})


def test_enrichment_then_peel_the_others_enrichment_references():
    """``enrichment_peel_others``: a second, order-free pass peels the other concepts'
    *enrichment* references (already about their own archives), so pole's peeled reference is
    the pole and road keeps road, unlike ``others`` with its plain (road-like) pole reference."""
    feats = _street()
    cfg = _cfg(context_order="enrichment", enrichment_temperature=1000.0, enrichment_peel_others=True)
    bank = ConceptBank.build_from_features(feats, ConceptBuilder(Stub(), None, cfg))
    for n in feats:
        assert sorted(bank.metadata["concepts"][n]["context_eliminated"]) == sorted(m for m in feats if m != n)
    assert _cos(bank, "road", ROAD) > 0.9 and _cos(bank, "building", BUILDING) > 0.9
    assert _cos(bank, "pole", POLE) > 0.5
    back = ConceptBank.build_from_features(
        {n: feats[n] for n in reversed(list(feats))}, ConceptBuilder(Stub(), None, cfg)
    )
    assert torch.allclose(back.subset(list(feats)).references, bank.references, atol=1e-6)


class _ToyBuilder(ConceptBuilder):
    """ConceptBank.build on the toy: an archive 'image' is its (D, 2, 2) feature map."""

    def archive_features(self, images):
        return torch.stack(list(images))


def _toy_build(feats, cfg: BankConfig, context_archives=None) -> ConceptBank:
    return ConceptBank.build({n: list(f) for n, f in feats.items()}, _ToyBuilder(Stub(), None, cfg), context_archives)


@pytest.mark.parametrize("seed_tokens", [1, 2])
def test_default_cannot_cascade_pole_steals_road(seed_tokens, caplog):
    """The default (the paper's fixed context, taken from the vocabulary's own archives) on the
    archives where the earlier default cascaded: only the context concepts the vocabulary holds
    (building, road) are eliminated, so the diffuse pole can peel nothing; road keeps road, and
    pole, built with building and road eliminated, lands on the pole. Single seeds show it is the
    context rule, not the seed regions, that stops it."""
    cfg = BankConfig(calibration="none", block_size=64, seed_tokens=seed_tokens)
    assert cfg.context_elimination and not cfg.context_from_vocabulary
    bank = _toy_build(_street(), cfg)
    assert bank.metadata["context_elimination"] == ["building", "road"]
    assert (
        bank.metadata["context_dropped"] == ["tree", "sky", "person"] and "left out: tree, sky, person" in caplog.text
    )
    assert bank.metadata["concepts"]["pole"]["context_eliminated"] == ["building", "road"]
    assert _cos(bank, "road", ROAD) > 0.99 and _cos(bank, "building", BUILDING) > 0.99
    if seed_tokens == 1:
        assert _cos(bank, "pole", POLE) > 0.85  # pole's seeds found the pole once road and building were gone
        # the earlier default (peeling in archive-size order, single seeds) on the same archives
        old = ConceptBank.build_from_features(_street(), ConceptBuilder(Stub(), None, _cfg()))
        assert _cos(old, "road", ROAD) < 0.5


def test_a_diffuse_context_concept_still_cascades_with_single_seeds():
    """What the default does not prevent: a *context* concept whose archive is diffuse (here the
    pole crops named "tree", built first) is eliminated from every later concept. With single
    seeds it takes road's region even at the paper's flat weight; seed regions (as the default's
    100 of 256 tokens) keep road on road."""
    feats = _street()
    street = {"tree": feats["pole"], "building": feats["building"], "road": feats["road"]}
    single = _toy_build(street, BankConfig(calibration="none", block_size=64, seed_tokens=1))
    assert _cos(single, "tree", ROAD) > 0.9 and _cos(single, "road", ROAD) < 0.1
    regions = _toy_build(street, BankConfig(calibration="none", block_size=64, seed_tokens=2))
    assert _cos(regions, "road", ROAD) > 0.7 and _cos(regions, "road", BUILDING) < 0.1


def test_alias_context_renames_without_dropping():
    """Before retrieval (build-bank --index): person becomes the vocabulary's pedestrian, the
    names the vocabulary lacks stay (they are retrieved), nothing is dropped."""
    from reco.config import alias_context

    cfg = alias_context(BankConfig(), ["pedestrian", "sky", "car"])
    assert cfg.context_concepts == ("tree", "sky", "building", "road", "pedestrian")
    assert alias_context(BankConfig(), ["person", "pedestrian"]).context_concepts[-1] == "person"
    off = BankConfig(context_elimination=False)
    assert alias_context(off, ["pedestrian"]) is off


def test_context_concepts_resolve_to_vocabulary_names_and_aliases():
    """person -> the vocabulary's pedestrian (one reference for both); context archives given
    win over the vocabulary's; context_required makes a missing archive an error."""
    from reco.config import resolve_context

    cfg = BankConfig()
    got, dropped = resolve_context(cfg, ["sky", "pedestrian", "road", "car"])
    assert got.context_concepts == ("sky", "road", "pedestrian") and dropped == ("tree", "building")
    assert resolve_context(cfg, ["car"])[0].context_elimination is False
    assert resolve_context(BankConfig(context_elimination=False), ["car"]) == (
        BankConfig(context_elimination=False),
        (),
    )
    with pytest.raises(ConfigError, match=r"context concepts \['tree'"):
        resolve_context(BankConfig(context_required=True), ["sky", "building", "road", "person"])
    feats = _street()
    bank = _toy_build(
        {"road": feats["road"], "pedestrian": feats["pole"]},
        BankConfig(calibration="none", block_size=64, seed_tokens=1),
        context_archives={"building": list(feats["building"])},
    )
    assert bank.metadata["context_elimination"] == ["building", "road", "pedestrian"]
    meta = bank.metadata["concepts"]["pedestrian"]  # the context reference of person, reused
    assert meta["context_eliminated"] == ["building", "road"] and meta["reused_context_reference"]
    assert _cos(bank, "road", ROAD) > 0.99


def test_peeling_keys_without_peeling_are_reported(caplog):
    """context_from_vocabulary is off by default now: a YAML that still sets a peeling order is told
    it has no effect (instead of being silently ignored); with peeling on, nothing is said."""
    from reco.config import from_dict

    from_dict(BankConfig, {"context_order": "ownership", "peel_offset": 0.5}, "bank")
    assert "bank.context_order, bank.peel_offset have no effect without bank.context_from_vocabulary" in caplog.text
    caplog.clear()
    cfg = from_dict(BankConfig, {"context_order": "ownership", "context_from_vocabulary": True}, "bank")
    assert cfg.context_order == "ownership" and "no effect" not in caplog.text
