"""``reco evaluate`` (jobs/evaluate.py, cluster/evaluate.py): every dataset layout end to end on a
tiny fixture made here (tiny random encoders from conftest), metrics checked by hand, the
in-domain exemplar protocol (split, archives, baselines, ceiling, CV), the background threshold
chosen by cross-validation, and the Ray Data path giving the same numbers as the in-process one."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_VIT, make_image
from index.datasets import dataset_spec, list_datasets, open_dataset, read_mask

# ----------------------------------------------------------------------------------------------
# fixtures: one tiny tree per dataset, masks written with the dataset's raw ids

W, H = 48, 40


def _raw_for(name: str, train_id: int) -> int:
    lut = dataset_spec(name).lut()
    return int(np.nonzero(lut[:256] == train_id)[0][0])


def _ignore_raw(name: str) -> int:
    lut = dataset_spec(name).lut()
    return int(np.nonzero(lut[:256] == dataset_spec(name).ignore_index)[0][0])


def _mask_values(name: str, seed: int) -> np.ndarray:
    """Left part class 0, right part class 1, one ignored row (raw ids of the dataset)."""
    m = np.full((H, W), _raw_for(name, 0), dtype=np.uint8)
    m[:, W // 2 + seed:] = _raw_for(name, 1)
    m[0, :] = _ignore_raw(name)
    return m


def _save(path: Path, img: Image.Image) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


LAYOUTS = {
    "voc": lambda stem: (f"images/{stem}.jpg", f"masks/{stem}.png"),
    "context59": lambda stem: (f"VOC2010/JPEGImages/{stem}.jpg", f"VOC2010/SegmentationClassContext/{stem}.png"),
    "context60": lambda stem: (f"VOC2010/JPEGImages/{stem}.jpg", f"VOC2010/SegmentationClassContext/{stem}.png"),
    "cocostuff171": lambda stem: (f"images/val2017/{stem}.jpg", f"annotations/val2017/{stem}.png"),
    "cocostuff27": lambda stem: (f"images/val2017/{stem}.jpg", f"annotations/val2017/{stem}.png"),
    "cityscapes19": lambda stem: (f"leftImg8bit/val/aachen/{stem}_leftImg8bit.png",
                                  f"gtFine/val/aachen/{stem}_gtFine_labelIds.png"),
    "cityscapes27": lambda stem: (f"leftImg8bit/val/aachen/{stem}_leftImg8bit.png",
                                  f"gtFine/val/aachen/{stem}_gtFine_labelIds.png"),
    "kitti-step": lambda stem: (f"images/val/0002/{stem}.png", f"panoptic_maps/val/0002/{stem}.png"),
    "ade150": lambda stem: (f"ADEChallengeData2016/images/validation/{stem}.jpg",
                            f"ADEChallengeData2016/annotations/validation/{stem}.png"),
    "camvid": lambda stem: (f"images/{stem}.jpg", f"masks/{stem}.png"),
}


def make_dataset(root: Path, name: str, n: int = 2) -> Path:
    stems = [f"00000{i}" for i in range(n)]
    for i, stem in enumerate(stems):
        img_rel, mask_rel = LAYOUTS[name](stem)
        _save(root / img_rel, make_image(100 + i, (W, H)))
        raw = _mask_values(name, i % 3)
        if name == "kitti-step":  # R = semantic id, G/B = instance id
            rgb = np.stack([raw, np.full_like(raw, 1), np.full_like(raw, 7)], axis=-1)
            _save(root / mask_rel, Image.fromarray(rgb, "RGB"))
        else:
            _save(root / mask_rel, Image.fromarray(raw, "L"))
    if name in ("context59", "context60"):
        lst = root / "VOC2010/ImageSets/SegmentationContext/val.txt"
        lst.parent.mkdir(parents=True, exist_ok=True)
        lst.write_text("\n".join(stems) + "\n")
    return root


def _bank_for(names, tiny_dense, path: Path) -> Path:
    from reco import BankConfig, ConceptBank, ConceptBuilder

    cfg = BankConfig(image_size=64, block_size=64)
    imgs = [make_image(i, (64, 64)) for i in range(4)]
    bank = ConceptBank.build({names[0]: imgs[:2], names[1]: imgs[2:]}, ConceptBuilder(tiny_dense, None, cfg))
    bank.save(path)
    return path


def _enc_args():
    return ["--dense-kwargs", json.dumps(TINY_VIT)]


def _hand_metrics(pred: np.ndarray, truth: np.ndarray, n: int, ignore: int):
    inter, union = np.zeros(n), np.zeros(n)
    valid = truth != ignore
    for c in range(n):
        p, g = (pred == c) & valid, (truth == c) & valid
        inter[c] += (p & g).sum()
        union[c] += (p | g).sum()
    present = union > 0
    return float(np.mean(inter[present] / union[present])), float((pred[valid] == truth[valid]).mean())


# ----------------------------------------------------------------------------------------------
# every dataset, end to end


@pytest.mark.parametrize("name", list_datasets())
def test_evaluate_runs_on_every_dataset_fixture(name, tmp_path, tiny_dense):
    from jobs.cli import main

    root = make_dataset(tmp_path / "data", name)
    spec = dataset_spec(name)
    bank = _bank_for([spec.classes[0], spec.classes[1]], tiny_dense, tmp_path / "bank")
    out = tmp_path / "out"
    assert main(["evaluate", "--dataset", name, "--root", str(root), "--bank", str(bank), "--out", str(out),
                 "--protocol", "full", "--overlays", "1", *_enc_args()]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["dataset"] == name and report["images"]["evaluated"] == 2
    n = spec.num_classes
    cm = np.asarray(report["metrics"]["confusion_matrix"])
    assert cm.shape == (n, n)
    assert cm.sum() == 2 * (H - 1) * W  # every pixel but the ignored row, at full resolution
    assert cm[:, 2:].sum() == 0  # the bank only predicts classes 0 and 1
    assert report["miou"] == pytest.approx(
        np.nanmean([cm[c, c] / (cm[c].sum() + cm[:, c].sum() - cm[c, c]) for c in range(n)
                    if cm[c].sum() + cm[:, c].sum() > 0]))
    assert report["pixel_accuracy"] == pytest.approx(np.trace(cm) / cm.sum())
    assert set(report["metrics"]["iou"]) == set(spec.classes)
    for key in ("protocol", "encoders", "bank", "seconds_per_image", "mode", "executor"):
        assert report[key] is not None
    assert report["encoders"]["dense_encoder"] == "dino_vits16" and report["bank"]["config_hash"]
    assert report["executor"] == "local" and report["seconds_per_image"] > 0
    assert len(report["overlays"]) == 1 and (out / report["overlays"][0]).is_file()
    assert (out / "legend.png").is_file()


def test_metrics_are_the_hand_computed_ones_under_the_paper_protocol(tmp_path, tiny_dense):
    """The report's numbers equal IoU / accuracy recomputed here pixel by pixel from an
    independent segmentation of the protocol's crops."""
    from cluster.evaluate import Protocol, apply_protocol
    from jobs.cli import main
    from reco import ConceptBank, Segmenter, SegmenterConfig

    root = make_dataset(tmp_path / "data", "camvid", n=3)
    spec, items = open_dataset("camvid", root)
    bank_dir = _bank_for(["road", "sky"], tiny_dense, tmp_path / "bank")
    out = tmp_path / "out"
    assert main(["evaluate", "--dataset", "camvid", "--root", str(root), "--bank", str(bank_dir), "--out", str(out),
                 "--protocol", "paper", "--protocol-size", "32", *_enc_args()]) == 0
    report = json.loads((out / "report.json").read_text())
    seg = Segmenter(ConceptBank.load(bank_dir), tiny_dense, None, SegmenterConfig())
    lut = np.array([spec.classes.index(c) for c in seg.class_names])
    preds, truths = [], []
    for it in items:
        img = Image.open(it.image_uri).convert("RGB")
        mask = read_mask(spec, Path(it.mask_uri).read_bytes())
        img, mask = apply_protocol(img, mask, Protocol("paper", 32))
        assert img.size == (32, 32) and mask.shape == (32, 32)
        preds.append(lut[seg(img)[0].labels.numpy()])
        truths.append(mask)
    miou, acc = _hand_metrics(np.concatenate(preds), np.concatenate(truths), spec.num_classes, spec.ignore_index)
    assert report["miou"] == pytest.approx(miou, abs=1e-12)
    assert report["pixel_accuracy"] == pytest.approx(acc, abs=1e-12)
    assert report["protocol"]["name"] == "paper" and report["protocol"]["size"] == 32


def test_evaluator_confusion_by_hand():
    """A segmenter stand-in with known labels: the confusion matrix is the hand-made one."""
    from cluster.evaluate import Evaluator, Protocol, metrics_of
    from index.datasets import DatasetSpec

    class Fixed:
        class_names = ("x", "y", "z")

        def __call__(self, images, ids=None):
            from reco.segmenter import SegmentationOutput

            lab = torch.tensor([[0, 1, 2, 2], [1, 1, 0, 2]])
            return [SegmentationOutput(lab, torch.zeros(3, 2, 4), self.class_names, "fixed")]

    spec = DatasetSpec("toy", ("a", "b", "c"), ignore_index=255)
    ev = Evaluator(Fixed(), spec, [2, 0, 1], Protocol("full"))  # x -> c, y -> a, z -> b
    truth = np.array([[2, 0, 1, 0], [255, 0, 2, 1]])
    res = ev(Image.new("RGB", (4, 2)), truth)
    # predictions in dataset ids: [[2, 0, 1, 1], [0, 0, 2, 1]]; the 255 pixel is ignored
    expected = np.array([[2, 1, 0],   # truth a: predicted a, b, a
                         [0, 2, 0],   # truth b: b, b
                         [0, 0, 2]])  # truth c: c, c
    assert res.confusion.tolist() == expected.tolist()
    m = metrics_of(res.confusion, spec)
    assert m["miou"] == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)
    assert m["pixel_accuracy"] == pytest.approx(6 / 7)


def test_paper_protocol_crop_and_nearest_labels():
    from cluster.evaluate import Protocol, apply_protocol

    img = Image.fromarray(np.zeros((20, 40, 3), np.uint8))
    mask = np.zeros((20, 40), np.int64)
    mask[:, 20:] = 7
    mask[:, 10:12] = 255
    im2, m2 = apply_protocol(img, mask, Protocol("paper", 16))  # 40x20 -> 32x16 -> centre 16x16
    assert im2.size == (16, 16) and m2.shape == (16, 16)
    assert set(np.unique(m2).tolist()) == {0, 7, 255}  # nearest neighbours: no blended ids
    assert (m2[:, 8:] == 7).all() and (m2[:, :8] != 7).all()
    assert (m2[:, :2] == 255).all()  # original columns 10-11 land at the crop's left edge
    assert apply_protocol(img, mask, Protocol("full"))[1] is mask


def test_label_map_names_background_and_errors():
    from cluster.evaluate import label_map_for
    from reco.errors import ConfigError

    voc = dataset_spec("voc")
    assert label_map_for(["background", "Dining_Table", "water"], voc,
                         background_concepts=["water"], class_map={"Dining_Table": "diningtable"}) == [0, 11, 0]
    with pytest.raises(ConfigError, match="unicorn"):
        label_map_for(["unicorn"], voc)
    with pytest.raises(ConfigError, match="no background class"):
        label_map_for(["background"], dataset_spec("camvid"))


# ----------------------------------------------------------------------------------------------
# the in-domain exemplar protocol


def _coverage_dataset(root: Path) -> Path:
    """6 camvid images: class 0 (sky) everywhere, class 3 (road) big in images 1 and 4, class 8
    (car) in image 2 only with 0.5% of the pixels (below the 1% rule), class 5 (tree) in 0 and 2."""
    rng = np.random.default_rng(0)
    for i in range(6):
        m = np.zeros((H, W), np.uint8)
        if i in (1, 4):
            m[H // 2:] = 3
        if i in (0, 2):
            m[: H // 4, : W // 4] = 5
        if i == 2:
            m[-1, :10] = 8  # 10 px of 1920: 0.5%
        m[0, 0] = 11  # void
        _save(root / f"images/f{i}.jpg", Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)))
        _save(root / f"masks/f{i}.png", Image.fromarray(m, "L"))
    return root


def test_split_archives_follow_the_written_rule():
    from cluster.evaluate import archives_from_labels, coverage, split_halves
    from index.datasets import EvalItem

    items = [EvalItem(f"f{i}", f"u{i}", f"m{i}") for i in (3, 0, 5, 1, 4, 2)]
    a, b = split_halves(items)
    assert [it.id for it in a] == ["f0", "f1", "f2"] and [it.id for it in b] == ["f3", "f4", "f5"]
    assert [it.id for it in split_halves(items[:5])[0]] == ["f0", "f1", "f3"]  # ceil(5/2) of f0 f1 f3 f4 f5
    masks = [np.array([[0, 0, 0, 1]]), np.array([[0, 1, 1, 1]]), np.array([[0, 0, 2, 255]])]
    cov = coverage(masks, 3)
    assert cov.tolist() == [[0.75, 0.25, 0.0], [0.25, 0.75, 0.0], [0.5, 0.0, 0.25]]
    ar = archives_from_labels(["a", "b", "c"], cov, ["x", "y", "z"], k=2, min_coverage=0.25)
    assert ar == {"x": [0, 2], "y": [1, 0], "z": [2]}  # largest coverage first, up to k
    assert archives_from_labels(["a", "b", "c"], cov, ["x", "y", "z"], k=5, min_coverage=0.3) == \
        {"x": [0, 2], "y": [1]}


def test_exemplars_from_split_with_baselines_ceiling_and_cv(tmp_path, tiny_dense_path):
    from jobs.cli import main

    root = _coverage_dataset(tmp_path / "cam")
    out = tmp_path / "out"
    assert main(["evaluate", "--dataset", "camvid", "--root", str(root), "--exemplars-from-split", "--out", str(out),
                 "--protocol", "full", "--baselines", "--ceiling", "--cv", "--config", str(_small_cfg(tmp_path)),
                 "--dense-encoder", "dino_vits16", "--dense-weights", str(tiny_dense_path),
                 "--cache-features", *_enc_args()]) == 0
    r = json.loads((out / "report.json").read_text())
    assert r["split"]["archive_half"] == ["images/f0.jpg", "images/f1.jpg", "images/f2.jpg"]
    assert r["split"]["evaluation_half"] == ["images/f3.jpg", "images/f4.jpg", "images/f5.jpg"]
    # sky in all three (equal coverage but for the void pixel of each: ties by id), road in f1,
    # tree in f0 and f2; the car covers 0.5% of f2: below the 1% rule, no archive
    arch = r["split"]["archives"]
    assert arch["road"] == ["images/f1.jpg"] and sorted(arch["tree"]) == ["images/f0.jpg", "images/f2.jpg"]
    assert arch["sky"][0] == "images/f0.jpg" and "car" not in arch
    assert "car" in r["bank"]["classes_without_archive"]
    assert r["images"]["evaluated"] == 3  # only the evaluation half is scored
    b = r["baselines"]
    # archive-half pixels: sky is the majority; on the evaluation half (f3 all sky, f4 half road,
    # f5 all sky) predicting sky everywhere is right on every pixel but f4's road half
    maj = b["all-majority-class (archive half)"]
    assert maj["class"] == "sky"
    valid = 3 * H * W - 3
    assert maj["pixel_accuracy"] == pytest.approx((valid - (H - H // 2) * W) / valid)
    prior = b["per-pixel class prior (archive half)"]
    assert prior["miou"] is not None and 0 <= prior["pixel_accuracy"] <= 1
    assert r["ceiling"]["classes_seen"] and r["ceiling"]["seconds_per_image"] > 0
    assert 0 <= r["cv"]["miou"] <= 1 and len(r["cv"]["fold_miou"]) == 2


def _small_cfg(tmp_path: Path) -> Path:
    p = tmp_path / "cfg.yaml"
    p.write_text("bank:\n  image_size: 64\n  block_size: 64\nsegmenter:\n  image_size: 64\n")
    return p


def test_exemplar_mapping_protocol_and_background_threshold_cv(tmp_path, tiny_dense_path):
    """VOC-style: archives from an unlabelled folder by a written mapping, stuff concepts scored
    as background, the background threshold chosen on alternate halves of the scored images."""
    from jobs.cli import main

    root = make_dataset(tmp_path / "voc", "voc", n=4)
    arch = tmp_path / "archive"
    arch.mkdir()
    for i in range(5):
        make_image(200 + i, (64, 64)).save(arch / f"a{i}.jpg")
    mapping = tmp_path / "map.yaml"
    mapping.write_text("classes:\n  aeroplane: [a0.jpg, a1.jpg]\n  bicycle: [a2.jpg, missing.jpg]\n"
                       "background:\n  water: [a3.jpg, a4.jpg]\n")
    out = tmp_path / "out"
    common = ["evaluate", "--dataset", "voc", "--root", str(root), "--exemplars", str(mapping), "--archive-root",
              str(arch), "--config", str(_small_cfg(tmp_path)), "--dense-encoder", "dino_vits16",
              "--dense-weights", str(tiny_dense_path), "--baselines", *_enc_args()]
    assert main(common + ["--out", str(out), "--background-threshold", "cv", "--ceiling", "--overlays", "2"]) == 0
    r = json.loads((out / "report.json").read_text())
    assert r["label_map"]["water"] == 0 and r["label_map"]["aeroplane"] == 1
    assert r["label_map"]["background"] == 0  # the threshold class
    cv = r["background_threshold_cv"]
    assert len(cv["chosen"]) == 2 and all(t in cv["grid"] for t in cv["chosen"])
    assert "(calibrated)" in r["mode"]  # a threshold compares calibrated scores
    assert len(r["overlays"]) == 2 and all((out / o).is_file() for o in r["overlays"])
    assert r["bank"]["archive_sizes"] == {"aeroplane": 2, "bicycle": 1, "water": 2}
    assert "all-background" in r["baselines"]
    # no labelled archive half: the prior and the ceiling come from the other images (leave one out)
    loo = r["baselines"]["per-pixel class prior (other scored images, leave one out)"]
    # every fixture mask is background | aeroplane with the split a little further right in each
    assert loo["pixel_accuracy"] > 0.9
    assert r["ceiling"]["miou"] is not None and "leave one image out" in r["ceiling"]["definition"]
    # a fixed threshold of 1.0 (above every sigmoid) labels everything background: = the baseline
    out2 = tmp_path / "out2"
    assert main(common + ["--out", str(out2), "--background-threshold", "1.0"]) == 0
    r2 = json.loads((out2 / "report.json").read_text())
    assert r2["miou"] == pytest.approx(r2["baselines"]["all-background"]["miou"])


def test_evaluate_refuses_inconsistent_arguments(tmp_path, tiny_dense, caplog):
    from jobs.cli import main

    root = make_dataset(tmp_path / "data", "camvid")
    bank = _bank_for(["road", "sky"], tiny_dense, tmp_path / "bank")
    base = ["evaluate", "--dataset", "camvid", "--root", str(root), "--out", str(tmp_path / "o"), *_enc_args()]
    assert main(base + ["--bank", str(bank), "--cv"]) == 2
    assert "exemplars-from-split" in caplog.text
    assert main(base + ["--bank", str(bank), "--set", "bank.nonsense=1"]) == 2
    assert "bank.nonsense" in caplog.text
    assert main(base + ["--bank", str(bank), "--background-threshold", "0.5"]) == 2
    assert "no background class" in caplog.text
    assert main(["evaluate", "--dataset", "camvid", "--root", str(tmp_path / "nothing"), "--bank", str(bank)]) == 2


# ----------------------------------------------------------------------------------------------
# Ray Data path = in-process path


@pytest.mark.slow
def test_ray_data_path_gives_the_same_numbers(ray_local, tmp_path, tiny_dense):
    from jobs.cli import main

    root = make_dataset(tmp_path / "data", "cityscapes27", n=3)
    bank = _bank_for(["road", "sidewalk"], tiny_dense, tmp_path / "bank")
    reports = {}
    for executor in ("local", "ray"):
        out = tmp_path / executor
        assert main(["evaluate", "--dataset", "cityscapes27", "--root", str(root), "--bank", str(bank),
                     "--out", str(out), "--executor", executor, "--actors", "1", "--overlays", "2",
                     "--protocol", "paper", "--protocol-size", "28", *_enc_args()]) == 0
        reports[executor] = json.loads((out / "report.json").read_text())
    local, ray_ = reports["local"], reports["ray"]
    assert ray_["executor"] == "ray" and local["executor"] == "local"
    assert ray_["metrics"]["confusion_matrix"] == local["metrics"]["confusion_matrix"]
    assert ray_["miou"] == local["miou"] and ray_["pixel_accuracy"] == local["pixel_accuracy"]
    assert sorted(ray_["overlays"]) == sorted(local["overlays"]) and len(ray_["overlays"]) == 2
    assert (tmp_path / "ray" / ray_["overlays"][0]).is_file()
