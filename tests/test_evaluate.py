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
from conftest import TINY_VIT, make_image
from PIL import Image

from index.datasets import dataset_spec, list_datasets, open_dataset, read_mask
from index.storage import load_bank, save_bank

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
    m[:, W // 2 + seed :] = _raw_for(name, 1)
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
    "cityscapes19": lambda stem: (
        f"leftImg8bit/val/aachen/{stem}_leftImg8bit.png",
        f"gtFine/val/aachen/{stem}_gtFine_labelIds.png",
    ),
    "cityscapes27": lambda stem: (
        f"leftImg8bit/val/aachen/{stem}_leftImg8bit.png",
        f"gtFine/val/aachen/{stem}_gtFine_labelIds.png",
    ),
    "kitti-step": lambda stem: (f"images/val/0002/{stem}.png", f"panoptic_maps/val/0002/{stem}.png"),
    "ade150": lambda stem: (
        f"ADEChallengeData2016/images/validation/{stem}.jpg",
        f"ADEChallengeData2016/annotations/validation/{stem}.png",
    ),
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
    save_bank(bank, str(path))
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
    assert (
        main(
            [
                "evaluate",
                "--dataset",
                name,
                "--root",
                str(root),
                "--bank",
                str(bank),
                "--out",
                str(out),
                "--protocol",
                "full",
                "--overlays",
                "1",
                *_enc_args(),
            ]
        )
        == 0
    )
    report = json.loads((out / "report.json").read_text())
    assert report["dataset"] == name and report["images"]["evaluated"] == 2
    n = spec.num_classes
    cm = np.asarray(report["metrics"]["confusion_matrix"])
    assert cm.shape == (n, n)
    assert cm.sum() == 2 * (H - 1) * W  # every pixel but the ignored row, at full resolution
    assert cm[:, 2:].sum() == 0  # the bank only predicts classes 0 and 1
    assert report["miou"] == pytest.approx(
        np.nanmean(
            [cm[c, c] / (cm[c].sum() + cm[:, c].sum() - cm[c, c]) for c in range(n) if cm[c].sum() + cm[:, c].sum() > 0]
        )
    )
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
    from reco import Segmenter, SegmenterConfig

    root = make_dataset(tmp_path / "data", "camvid", n=3)
    spec, items = open_dataset("camvid", root)
    bank_dir = _bank_for(["road", "sky"], tiny_dense, tmp_path / "bank")
    out = tmp_path / "out"
    assert (
        main(
            [
                "evaluate",
                "--dataset",
                "camvid",
                "--root",
                str(root),
                "--bank",
                str(bank_dir),
                "--out",
                str(out),
                "--protocol",
                "paper",
                "--protocol-size",
                "32",
                *_enc_args(),
            ]
        )
        == 0
    )
    report = json.loads((out / "report.json").read_text())
    seg = Segmenter(load_bank(str(bank_dir)), tiny_dense, None, SegmenterConfig())
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
    expected = np.array(
        [
            [2, 1, 0],  # truth a: predicted a, b, a
            [0, 2, 0],  # truth b: b, b
            [0, 0, 2],
        ]
    )  # truth c: c, c
    assert res.confusion.tolist() == expected.tolist()
    m = metrics_of(res.confusion, spec)
    assert m["miou"] == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)
    assert m["pixel_accuracy"] == pytest.approx(6 / 7)


def test_ceiling_prototypes_average_the_tokens_inference_scores(tiny_dense):
    """Supervised prototypes ("same features, same inference") come from the segmenter's views:
    with sliding windows, every window's tokens with the ground truth under that window (mapped
    onto a mask of another resolution); without, the whole image once."""
    from cluster.evaluation_floors import view_masks, view_tokens
    from reco.bank import ConceptBank
    from reco.config import SegmenterConfig
    from reco.image import window_boxes
    from reco.segmenter import Segmenter

    img = make_image(4, size=(60, 40))
    mask = np.zeros((20, 30), dtype=np.int64)  # half the image's resolution
    mask[:, 15:] = 1
    bank = ConceptBank(("x",), torch.zeros(1, tiny_dense.embed_dim), metadata={"config": {"image_size": 32}})
    probe = Segmenter(bank, tiny_dense, None, SegmenterConfig(window=0.5, window_stride=0.5))
    feats, masks = view_tokens(probe, [(img, mask)])
    boxes = window_boxes((40, 60), 0.5, 0.5)
    assert len(feats) == len(masks) == len(boxes) == 3 * 5
    assert all(f.shape[0] == 1 and f.shape[-1] == 32 // tiny_dense.patch_size for f in feats)
    assert view_masks(mask, [(40, 20, 60, 40)], img)[0].tolist() == mask[10:20, 20:30].tolist()
    assert [m.shape for m in masks] == [(10, 10)] * 15
    whole = Segmenter(bank, tiny_dense, None, SegmenterConfig(window=None, image_size=32))
    feats, masks = view_tokens(whole, [(img, mask)])
    assert len(feats) == 1 and masks[0].shape == (20, 30)


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
    assert label_map_for(
        ["background", "Dining_Table", "water"],
        voc,
        background_concepts=["water"],
        class_map={"Dining_Table": "diningtable"},
    ) == [0, 11, 0]
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
            m[H // 2 :] = 3
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
    assert archives_from_labels(["a", "b", "c"], cov, ["x", "y", "z"], k=5, min_coverage=0.3) == {"x": [0, 2], "y": [1]}


def test_exemplars_from_split_with_baselines_ceiling_and_cv(tmp_path, tiny_dense_path):
    from jobs.cli import main

    root = _coverage_dataset(tmp_path / "cam")
    out = tmp_path / "out"
    assert (
        main(
            [
                "evaluate",
                "--dataset",
                "camvid",
                "--root",
                str(root),
                "--exemplars-from-split",
                "--out",
                str(out),
                "--protocol",
                "full",
                "--baselines",
                "--ceiling",
                "--cv",
                "--config",
                str(_small_cfg(tmp_path)),
                "--dense-encoder",
                "dino_vits16",
                "--dense-weights",
                str(tiny_dense_path),
                "--cache-features",
                *_enc_args(),
            ]
        )
        == 0
    )
    r = json.loads((out / "report.json").read_text())
    assert r["archives"]["archive_items"] == ["images/f0.jpg", "images/f1.jpg", "images/f2.jpg"]
    assert r["archives"]["scored_items"] == ["images/f3.jpg", "images/f4.jpg", "images/f5.jpg"]
    assert r["archives"]["mode"] == "frames"
    # sky in all three (equal coverage but for the void pixel of each: ties by id), road in f1,
    # tree in f0 and f2; the car covers 0.5% of f2: below the 1% rule, no archive
    arch = r["archives"]["archives"]
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


def test_archives_from_another_root_crops_and_drive_cv(tmp_path, tiny_dense_path):
    """--archives-from: archives cut from another labelled folder (crops: each class's best
    window per frame), every image of --root scored, CV leaves one drive out, floors and ceiling
    from the archive frames' labels."""
    from jobs.cli import main

    rng = np.random.default_rng(1)
    arch_root, val_root = tmp_path / "train", tmp_path / "val"
    for drive in ("A", "B"):
        for i in range(2):
            m = np.zeros((H, W), np.uint8)
            m[H // 2 :] = 3  # road below, sky above
            m[:8, :8] = 2  # a pole in the top-left corner
            _save(arch_root / f"images/{drive}_{i}.jpg", Image.fromarray(rng.integers(0, 255, (H, W, 3), np.uint8)))
            _save(arch_root / f"masks/{drive}_{i}.png", Image.fromarray(m, "L"))
    _coverage_dataset(val_root)
    out = tmp_path / "out"
    assert (
        main(
            [
                "evaluate",
                "--dataset",
                "camvid",
                "--root",
                str(val_root),
                "--archives-from",
                str(arch_root),
                "--crop-size",
                "16",
                "--crop-stride",
                "8",
                "--out",
                str(out),
                "--protocol",
                "full",
                "--baselines",
                "--ceiling",
                "--cv",
                "--config",
                str(_small_cfg(tmp_path)),
                "--dense-encoder",
                "dino_vits16",
                "--dense-weights",
                str(tiny_dense_path),
                *_enc_args(),
            ]
        )
        == 0
    )
    r = json.loads((out / "report.json").read_text())
    assert r["archives"]["mode"] == "crops" and r["images"]["evaluated"] == 6
    assert r["archives"]["archives"]["pole"][0] == "images/A_0.jpg@0,0,16,16"  # the window holding the pole
    assert r["bank"]["archive_share"]["road"] == 1.0
    assert set(r["cv"]["fold_miou"]) == {"A", "B"} and r["cv"]["folds"] == "leave one drive out"
    assert "all-majority-class (archive frames)" in r["baselines"] and r["ceiling"]["classes_seen"]


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
    mapping.write_text(
        "classes:\n  aeroplane: [a0.jpg, a1.jpg]\n  bicycle: [a2.jpg, missing.jpg]\n"
        "background:\n  water: [a3.jpg, a4.jpg]\n"
    )
    out = tmp_path / "out"
    common = [
        "evaluate",
        "--dataset",
        "voc",
        "--root",
        str(root),
        "--exemplars",
        str(mapping),
        "--archive-root",
        str(arch),
        "--config",
        str(_small_cfg(tmp_path)),
        "--dense-encoder",
        "dino_vits16",
        "--dense-weights",
        str(tiny_dense_path),
        "--baselines",
        *_enc_args(),
    ]
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
    assert "--archives-from" in caplog.text
    assert main(base + ["--bank", str(bank), "--set", "bank.nonsense=1"]) == 2
    assert "bank.nonsense" in caplog.text
    assert main(base + ["--bank", str(bank), "--background-threshold", "0.5"]) == 2
    assert "no background class" in caplog.text
    assert main(["evaluate", "--dataset", "camvid", "--root", str(tmp_path / "nothing"), "--bank", str(bank)]) == 2


@pytest.mark.parametrize(
    "extra, says",
    [
        (["--limit", "0"], "--limit must be >= 1"),
        (["--limit", "-2"], "--limit must be >= 1"),
        (["--background-threshold", "nan"], "--background-threshold must be a number in [0, 1]"),
        (["--background-threshold", "1.5"], "--background-threshold must be a number in [0, 1]"),
        (["--archive-mode", "crops"], "--archive-mode needs"),
        (["--crop-size", "0"], "--crop-size must be >= 1"),
    ],
)
def test_evaluate_refuses_bad_values_in_one_line(tmp_path, caplog, extra, says):
    """Issue 16: refused before any work, one line on stderr, exit 2."""
    from jobs.cli import main

    root = make_dataset(tmp_path / "data", "camvid")
    assert (
        main(
            [
                "evaluate",
                "--dataset",
                "camvid",
                "--root",
                str(root),
                "--bank",
                str(tmp_path / "no-bank"),
                "--out",
                str(tmp_path / "o"),
                *extra,
            ]
        )
        == 2
    )
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and says in errors[0] and "\n" not in errors[0]


def test_evaluate_out_naming_a_file_is_one_line(tmp_path, caplog):
    from jobs.cli import main

    root = make_dataset(tmp_path / "data", "camvid")
    f = tmp_path / "report.txt"
    f.write_text("x")
    assert (
        main(["evaluate", "--dataset", "camvid", "--root", str(root), "--bank", str(tmp_path / "b"), "--out", str(f)])
        == 2
    )
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "is an existing file" in errors[0] and "\n" not in errors[0]
    assert f.read_text() == "x"


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
        assert (
            main(
                [
                    "evaluate",
                    "--dataset",
                    "cityscapes27",
                    "--root",
                    str(root),
                    "--bank",
                    str(bank),
                    "--out",
                    str(out),
                    "--executor",
                    executor,
                    "--actors",
                    "1",
                    "--overlays",
                    "2",
                    "--protocol",
                    "paper",
                    "--protocol-size",
                    "28",
                    *_enc_args(),
                ]
            )
            == 0
        )
        reports[executor] = json.loads((out / "report.json").read_text())
    local, ray_ = reports["local"], reports["ray"]
    assert ray_["executor"] == "ray" and local["executor"] == "local"
    assert ray_["metrics"]["confusion_matrix"] == local["metrics"]["confusion_matrix"]
    assert ray_["miou"] == local["miou"] and ray_["pixel_accuracy"] == local["pixel_accuracy"]
    assert sorted(ray_["overlays"]) == sorted(local["overlays"]) and len(ray_["overlays"]) == 2
    assert (tmp_path / "ray" / ray_["overlays"][0]).is_file()


# ----------------------------------------------------------------------------------------------
# ReCo+: a trained model (`reco evaluate --model`), alone and side by side with ReCo

# a tiny smp DeepLabV3+ (the encoder of tests/test_train.py's toy), random init
TINY_SEG = dict(encoder="tu-mobilenetv3_small_050", output_stride=16, decoder_channels=32)


def _pseudo_label_output(root: Path, image_uris) -> Path:
    """A `reco pseudo-label` output whose manifest lists ``image_uris`` (what the model 'was trained on')."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cluster.pseudo_label import COLUMNS

    rows = [
        {
            "id": f"img{i}",
            "uri": str(u),
            "status": "ok",
            "error": "",
            "label": f"labels/img{i}.png",
            "confidence": "",
            "overlay": "",
            "width": W,
            "height": H,
            "classes": "[]",
            "shares": "[]",
            "mean_confidence": 1.0,
            "seconds": 0.0,
            "mode": "reference",
        }
        for i, u in enumerate(image_uris)
    ]
    (root / "manifest").mkdir(parents=True, exist_ok=True)
    pq.write_table(
        pa.table({c: [r[c] for r in rows] for c in COLUMNS}), root / "manifest" / "part-00000-00000000.parquet"
    )
    (root / "pseudo_label.json").write_text(
        json.dumps({"classes": ["building", "sky"], "config_hash": "toy", "bank_sha256": "abc"})
    )
    return root


def _constant_model(run: Path, classes, winner: str, labels_uri=None, selection: str = "holdout") -> Path:
    """A `reco train` run folder (RUN/model/model.safetensors + model.json, as `reco train` exports
    them) holding a DeepLabV3+ whose head is zeroed with a bias on ``winner``: it predicts that
    class at every pixel, whatever the image."""
    from reco.segmodel import SegModel, SegModelSpec, build_model

    torch.manual_seed(0)
    spec = SegModelSpec(num_classes=len(classes), **TINY_SEG)
    net = build_model(spec)
    conv = net.segmentation_head[0]
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.zero_()
        conv.bias[list(classes).index(winner)] = 5.0
    prov = {
        "checkpoint": "checkpoint_00000012",
        "step": 12,
        "selection": selection,
        "config": {"iterations": 12},
        "selection_rule": "toy rule",
        "labels_uri": str(labels_uri) if labels_uri else None,
        "encoder_init": "random init (no encoder_weights given)",
        "config_hash": "toyhash",
    }
    SegModel(net, spec, list(classes), base_size=32, training=prov).save(run / "model")
    return run


def _sky_dataset(root: Path, n: int = 3) -> Path:
    """camvid images whose ground truth is sky everywhere but a void first row."""
    for i in range(n):
        _save(root / f"images/s{i}.jpg", make_image(300 + i, (W, H)))
        m = np.full((H, W), _raw_for("camvid", 0), np.uint8)  # 0 = sky
        m[0] = _ignore_raw("camvid")
        _save(root / f"masks/s{i}.png", Image.fromarray(m, "L"))
    return root


def test_model_that_predicts_the_ground_truth_scores_100(tmp_path):
    """--model alone: the model's classes (in its own order) map to the dataset's by name; a
    model whose prediction is the ground truth gets 100 mIoU and 100% pixel accuracy; the report
    records the exported checkpoint and how it was selected."""
    from jobs.cli import main

    root = _sky_dataset(tmp_path / "cam")
    run = _constant_model(tmp_path / "run", ["building", "sky"], "sky")
    out = tmp_path / "out"
    assert (
        main(
            [
                "evaluate",
                "--dataset",
                "camvid",
                "--root",
                str(root),
                "--model",
                str(run),
                "--out",
                str(out),
                "--protocol",
                "paper",
                "--protocol-size",
                "32",
                "--overlays",
                "1",
            ]
        )
        == 0
    )
    r = json.loads((out / "report.json").read_text())
    plus = r["reco_plus"]
    assert plus["miou"] == 1.0 and plus["pixel_accuracy"] == 1.0
    assert r["miou"] == 1.0 and r["pixel_accuracy"] == 1.0 and "reco" not in r and r["bank"] is None
    assert plus["label_map"] == {"building": 1, "sky": 0}
    assert plus["images"]["evaluated"] == 3
    assert np.asarray(plus["metrics"]["confusion_matrix"]).sum() == 3 * 32 * 31  # 32x32 crops, one void row each
    ck = plus["model"]["checkpoint"]
    assert ck["exported"] == "checkpoint_00000012" and ck["step"] == 12 and ck["selection"] == "holdout"
    assert ck["evaluation_split_used_for_selection"] is False and "never ground truth" in ck["why"]
    assert plus["model"]["classes"] == ["building", "sky"] and plus["model"]["spec"]["encoder"] == TINY_SEG["encoder"]
    assert plus["overlays"] == ["reco_plus/overlays/images/s0.jpg.png"] and (out / plus["overlays"][0]).is_file()
    # the .safetensors file itself and RUN/model load the same model
    for uri in (run / "model", run / "model" / "model.safetensors"):
        assert (
            main(
                [
                    "evaluate",
                    "--dataset",
                    "camvid",
                    "--root",
                    str(root),
                    "--model",
                    str(uri),
                    "--out",
                    str(tmp_path / "o2"),
                    "--protocol",
                    "full",
                ]
            )
            == 0
        )
        assert json.loads((tmp_path / "o2" / "report.json").read_text())["reco_plus"]["miou"] == 1.0


def test_model_metrics_by_hand_and_class_map(tmp_path):
    """A model that says 'heaven' everywhere, mapped with --class-map heaven=sky, on masks half
    sky / half building: IoU and accuracy recomputed here pixel by pixel."""
    from jobs.cli import main

    root = make_dataset(tmp_path / "cam", "camvid", n=3)
    run = _constant_model(tmp_path / "run", ["heaven", "building"], "heaven", selection="last")
    base = ["evaluate", "--dataset", "camvid", "--root", str(root), "--model", str(run), "--protocol", "full"]
    assert main(base + ["--out", str(tmp_path / "bad")]) == 2  # 'heaven' is no camvid class
    out = tmp_path / "out"
    assert main(base + ["--out", str(out), "--class-map", "heaven=sky"]) == 0
    r = json.loads((out / "report.json").read_text())
    spec, items = open_dataset("camvid", root)
    truths = [read_mask(spec, Path(it.mask_uri).read_bytes()) for it in items]
    truth = np.concatenate(truths)
    miou, acc = _hand_metrics(np.zeros_like(truth), truth, spec.num_classes, spec.ignore_index)
    assert r["reco_plus"]["miou"] == pytest.approx(miou) and r["reco_plus"]["pixel_accuracy"] == pytest.approx(acc)
    assert 0 < acc < 1
    ck = r["reco_plus"]["model"]["checkpoint"]
    assert ck["selection"] == "last" and ck["evaluation_split_used_for_selection"] is False
    assert "no checkpoint selection" in ck["why"]


def test_reco_and_reco_plus_side_by_side(tmp_path, tiny_dense, capsys):
    """A bank and a model: one report with both, scored on the same images; ReCo's figures are
    the ones the bank alone gives, ReCo+'s the ones the model alone gives; a two-row table."""
    from jobs.cli import main

    root = make_dataset(tmp_path / "data", "camvid", n=3)
    bank = _bank_for(["road", "sky"], tiny_dense, tmp_path / "bank")
    run = _constant_model(tmp_path / "run", ["building", "sky"], "sky")
    base = [
        "evaluate",
        "--dataset",
        "camvid",
        "--root",
        str(root),
        "--protocol",
        "paper",
        "--protocol-size",
        "32",
        *_enc_args(),
    ]
    reports = {}
    for name, extra in (
        ("both", ["--bank", str(bank), "--model", str(run)]),
        ("bank", ["--bank", str(bank)]),
        ("model", ["--model", str(run)]),
    ):
        capsys.readouterr()
        assert main(base + extra + ["--out", str(tmp_path / name)]) == 0
        reports[name] = (json.loads((tmp_path / name / "report.json").read_text()), capsys.readouterr().out)
    both, printed = reports["both"]
    assert both["reco"]["miou"] == both["miou"] == reports["bank"][0]["miou"]
    assert both["reco"]["pixel_accuracy"] == reports["bank"][0]["pixel_accuracy"]
    assert both["reco"]["metrics"]["confusion_matrix"] == reports["bank"][0]["metrics"]["confusion_matrix"]
    assert both["reco_plus"]["miou"] == reports["model"][0]["reco_plus"]["miou"]
    assert both["reco_plus"]["metrics"]["confusion_matrix"] == reports["model"][0]["metrics"]["confusion_matrix"]
    assert both["reco"]["images"]["evaluated"] == both["reco_plus"]["images"]["evaluated"] == 3
    assert len(both["comparison"]["images"]) == 3
    assert "ReCo (this configuration)" in printed and "ReCo+ (trained model)" in printed
    assert "checkpoint_00000012" in printed
    assert "ReCo+" not in reports["bank"][1]


def test_in_domain_protocol_with_model_records_training_overlap(tmp_path, tiny_dense_path):
    """--exemplars-from-split --model: both scored on the evaluation half only; the report says
    how many of the scored images the model was trained on (read from its pseudo-label manifest)."""
    from jobs.cli import main

    root = _coverage_dataset(tmp_path / "cam")
    spec, items = open_dataset("camvid", root)
    archive = [it.image_uri for it in items[:3]]
    base = [
        "evaluate",
        "--dataset",
        "camvid",
        "--root",
        str(root),
        "--exemplars-from-split",
        "--protocol",
        "full",
        "--config",
        str(_small_cfg(tmp_path)),
        "--dense-encoder",
        "dino_vits16",
        "--dense-weights",
        str(tiny_dense_path),
        "--cache-features",
        *_enc_args(),
    ]
    clean = _constant_model(
        tmp_path / "clean", ["building", "sky"], "sky", _pseudo_label_output(tmp_path / "pl_clean", archive)
    )
    leaky = _constant_model(
        tmp_path / "leaky",
        ["building", "sky"],
        "sky",
        _pseudo_label_output(tmp_path / "pl_leaky", archive + [items[4].image_uri]),
    )
    for run, overlap in ((clean, 0), (leaky, 1)):
        out = tmp_path / f"out_{run.name}"
        assert main(base + ["--model", str(run), "--out", str(out)]) == 0
        r = json.loads((out / "report.json").read_text())
        assert r["reco"]["images"]["evaluated"] == r["reco_plus"]["images"]["evaluated"] == 3
        assert r["comparison"]["images"] == r["archives"]["scored_items"]
        td = r["reco_plus"]["model"]["training_data"]
        assert td["images"] == len(archive) + overlap and td["scored_images_trained_on"] == overlap
        assert td["overlap_ids"] == ([items[4].id] if overlap else [])
        # evaluation half: f3 all sky, f4 half road, f5 all sky (+ one void pixel each)
        valid = 3 * H * W - 3
        assert r["reco_plus"]["pixel_accuracy"] == pytest.approx((valid - (H - H // 2) * W) / valid)


def test_bad_model_arguments_give_clear_errors(tmp_path, tiny_dense, caplog):
    from jobs.cli import main

    root = make_dataset(tmp_path / "data", "camvid")
    bank = _bank_for(["road", "sky"], tiny_dense, tmp_path / "bank")
    base = ["evaluate", "--dataset", "camvid", "--root", str(root), "--out", str(tmp_path / "o")]
    caplog.clear()
    assert main(base + ["--model", str(tmp_path / "no_such_run")]) == 2
    assert "holds no trained model" in caplog.text and "reco train" in caplog.text
    assert main(base + ["--model", str(bank)]) == 2  # a bank is not a model
    assert "holds no trained model" in caplog.text
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    caplog.clear()
    assert main(base + ["--model", str(junk)]) == 2
    assert "junk.safetensors" in caplog.text
    caplog.clear()
    assert main(base) == 2  # nothing to score
    assert "--model" in caplog.text
    run = _constant_model(tmp_path / "run", ["building", "sky"], "sky")
    caplog.clear()
    assert main(base + ["--model", str(run), "--ceiling"]) == 2
    assert "--model alone" in caplog.text
    assert main(base + ["--bank", str(bank), "--save-bank", str(tmp_path / "b2")]) == 2
    assert not (tmp_path / "o" / "report.json").exists()


def test_save_bank_writes_the_bank_it_scored(tmp_path, tiny_dense_path):
    """--save-bank: the in-domain bank built here, saved; scoring with it as --bank gives the same numbers."""
    from jobs.cli import main

    root = _coverage_dataset(tmp_path / "cam")
    common = [
        "--dataset",
        "camvid",
        "--protocol",
        "full",
        "--config",
        str(_small_cfg(tmp_path)),
        "--dense-encoder",
        "dino_vits16",
        "--dense-weights",
        str(tiny_dense_path),
        *_enc_args(),
    ]
    saved = tmp_path / "bank"
    assert (
        main(
            [
                "evaluate",
                *common,
                "--root",
                str(root),
                "--exemplars-from-split",
                "--save-bank",
                str(saved),
                "--out",
                str(tmp_path / "a"),
            ]
        )
        == 0
    )
    a = json.loads((tmp_path / "a" / "report.json").read_text())
    assert a["bank"]["saved_to"] == str(saved) and (saved / "bank.safetensors").is_file()
    half = tmp_path / "eval_half"  # the evaluation half alone (f3-f5), as its own dataset root
    for i in (3, 4, 5):
        for sub, ext in (("images", "jpg"), ("masks", "png")):
            (half / sub).mkdir(parents=True, exist_ok=True)
            (half / sub / f"f{i}.{ext}").symlink_to(root / sub / f"f{i}.{ext}")
    assert main(["evaluate", *common, "--root", str(half), "--bank", str(saved), "--out", str(tmp_path / "b")]) == 0
    b = json.loads((tmp_path / "b" / "report.json").read_text())
    assert b["bank"]["concepts"] == a["bank"]["concepts"]
    assert b["metrics"]["confusion_matrix"] == a["metrics"]["confusion_matrix"]


@pytest.mark.slow
def test_ray_data_path_scores_a_model_like_the_local_one(ray_local, tmp_path):
    from jobs.cli import main

    root = make_dataset(tmp_path / "data", "camvid", n=3)
    run = _constant_model(tmp_path / "run", ["building", "sky"], "building")
    reports = {}
    for executor in ("local", "ray"):
        out = tmp_path / executor
        assert (
            main(
                [
                    "evaluate",
                    "--dataset",
                    "camvid",
                    "--root",
                    str(root),
                    "--model",
                    str(run),
                    "--out",
                    str(out),
                    "--executor",
                    executor,
                    "--actors",
                    "1",
                    "--overlays",
                    "1",
                    "--protocol",
                    "paper",
                    "--protocol-size",
                    "32",
                ]
            )
            == 0
        )
        reports[executor] = json.loads((out / "report.json").read_text())["reco_plus"]
    assert reports["ray"]["executor"] == "ray" and reports["local"]["executor"] == "local"
    assert reports["ray"]["metrics"]["confusion_matrix"] == reports["local"]["metrics"]["confusion_matrix"]
    assert (
        reports["ray"]["overlays"] == reports["local"]["overlays"]
        and (tmp_path / "ray" / reports["ray"]["overlays"][0]).is_file()
    )
