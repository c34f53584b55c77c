"""Ray glue: distributed bank building and Ray Data segmentation with tiny models."""

import json

import numpy as np
import pytest
from conftest import REPO, TINY_VIT, make_image, write_corrupt_files

from cluster.bank import BankWorker
from cluster.config import ActorConfig, load_cluster_config
from cluster.models import EncoderSpec
from cluster.segment import run_segmentation
from index.storage import save_bank
from reco import BankConfig, ConceptBank, SegmenterConfig
from reco.errors import ConfigError


def test_ray_config_file_parses_and_rejects_typos(tmp_path):
    cfg = load_cluster_config(REPO / "configs" / "cluster.yaml")
    assert cfg.ray.address is None and cfg.bank.num_actors >= 1
    assert cfg.ray.env_vars["HF_HUB_OFFLINE"] == "1"
    bad = tmp_path / "bad.yaml"
    bad.write_text("bank:\n  num_actor: 3\n")
    with pytest.raises(ConfigError, match="bank.num_actor"):
        load_cluster_config(bad)
    bad.write_text("bank: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_cluster_config(bad)
    with pytest.raises(ConfigError, match="num_actors"):
        load_cluster_config({"segment": {"num_actors": 0}})


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    d = tmp_path_factory.mktemp("archive")
    uris = {}
    for c, seeds in {"cat": [1, 2, 3], "dog": [4, 5], "tree": [6, 7], "sky": [8]}.items():
        uris[c] = []
        for s in seeds:
            p = d / f"{c}_{s}.png"
            make_image(s, (64, 64)).save(p)
            uris[c].append(str(p))
    bad = write_corrupt_files(d / "bad")
    return uris, [str(b) for b in bad]


def _spec(tiny_dense_path):
    """Workers rebuild encoders from this spec: the tiny ViT saved once, loaded by the real loader."""
    return EncoderSpec("dino_vits16", str(tiny_dense_path), dense_kwargs=TINY_VIT)


def test_bank_worker_skips_and_counts_corrupt_images(archive, tiny_dense_path):
    uris, bad = archive
    w = BankWorker(_spec(tiny_dense_path), BankConfig(image_size=64, context_elimination=False))
    ref, info = w.build("cat", uris["cat"] + bad, None, {})
    assert ref is not None and ref.num_images == 3
    assert set(info["read"]["skipped_files"]) == set(bad)
    ref, info = w.build("ghost", bad, None, {})
    assert ref is None and "no usable image" in info["error"]


@pytest.mark.slow
def test_ray_data_segmentation_writes_labels_and_counts_bad_inputs(ray_local, archive, tiny_dense_path, tmp_path):
    uris, bad = archive
    spec = _spec(tiny_dense_path)
    worker = BankWorker(spec, BankConfig(image_size=64, context_from_vocabulary=False))
    bank = ConceptBank.from_references(
        [worker.build(c, uris[c], None, {})[0] for c in ("cat", "dog")], metadata=worker.metadata("exemplar")
    )
    bank_dir = save_bank(bank, str(tmp_path / "bank"))
    masks = tmp_path / "masks"
    masks.mkdir()
    from PIL import Image

    items = []
    # two inputs with the same file name in different folders: outputs must not collide
    for i, (u, item_id) in enumerate(zip(uris["cat"][:2], ["a/cat.png", "b/cat.png"])):
        m = masks / f"{i}.png"
        gt = np.zeros((64, 64), np.uint8)
        gt[:, 32:] = 2
        gt[0, 0] = 255
        Image.fromarray(gt).save(m)
        items.append({"id": item_id, "uri": u, "mask_uri": str(m)})
    items.append({"id": "bad.png", "uri": bad[1], "mask_uri": ""})
    items.append({"id": "gone.png", "uri": str(tmp_path / "vanished.png"), "mask_uri": ""})
    out = tmp_path / "out"
    rows = run_segmentation(
        items,
        str(bank_dir),
        spec,
        SegmenterConfig(image_size=64),
        [1, 2],
        3,
        255,
        str(out),
        ActorConfig(num_actors=1, cpus_per_actor=0.5, batch_size=2),
    )
    by_id = {r["id"]: r for r in rows}
    assert len(rows) == 4
    assert by_id["bad.png"]["status"] == "skipped" and "not an image" in by_id["bad.png"]["error"]
    # an unreadable (missing) input is a transient failure, not a bad input
    assert by_id["gone.png"]["status"] == "failed"
    ok = by_id["a/cat.png"]
    assert (ok["width"], ok["height"]) == (64, 64)
    shares = dict(zip(json.loads(ok["classes"]), json.loads(ok["shares"])))
    assert set(shares) <= {1, 2} and sum(shares.values()) == pytest.approx(1.0, abs=1e-4)
    assert 0.0 < ok["mean_confidence"] < 1.0
    for it in items[:2]:
        r = by_id[it["id"]]
        assert r["status"] == "ok"
        cm = np.asarray(r["confusion"]).reshape(3, 3)
        assert cm.sum() == 64 * 64 - 1  # the ignore pixel is excluded
        assert cm.sum(axis=1).tolist() == [32 * 64 - 1, 0, 32 * 64]  # truth rows
        assert cm[:, 0].sum() == 0  # the label map never writes class 0
    labels = sorted(p.relative_to(out / "labels").as_posix() for p in (out / "labels").rglob("*.png"))
    assert labels == ["a/cat.png.png", "b/cat.png.png"]
    assert by_id["a/cat.png"]["label"] == "labels/a/cat.png.png"
    lab_img = Image.open(out / "labels" / "a" / "cat.png.png")
    assert lab_img.mode == "P"  # 8-bit palette PNG for <= 256 classes
    lab = np.array(lab_img)
    assert lab.shape == (64, 64) and set(np.unique(lab)) <= {1, 2}
    assert (out / "overlays" / "b" / "cat.png.png").is_file()
