"""`reco train` (ReCo+): config, boundaries, data pipeline, export, and Ray Train runs that are
killed and resumed (whole job, and one worker mid-run) on pseudo-labels made here.

The toy: blocky random colour images whose pseudo-label is the dominant RGB channel (a function
of the pixels, so learnable), with confidence maps; written in the layout of `reco pseudo-label`.
"""

from __future__ import annotations

import io
import json
import os
import struct
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image

CLASSES = ["red", "green", "blue"]
SIZES = ((64, 48), (72, 56), (56, 64))
# a tiny smp DeepLabV3+ (timm MobileNetV3-small-0.5 encoder, random init): ~0.34M parameters
TOY = dict(
    encoder="tu-mobilenetv3_small_050",
    output_stride=16,
    decoder_channels=32,
    iterations=12,
    batch_size=4,
    crop_size=48,
    base_size=56,
    lr_head=1e-2,
    lr_encoder=1e-2,
    jitter_hue=0.0,
    checkpoint_every=4,
    log_every=2,
    num_workers=2,
    loader_workers=0,
    cpus_per_worker=0.5,
)


def toy_image(i: int, size=(64, 48)) -> np.ndarray:
    w, h = size
    rng = np.random.default_rng(100 + i)
    blocks = rng.integers(0, 256, size=(h // 8 + 1, w // 8 + 1, 3)).astype(np.uint8)
    return np.kron(blocks, np.ones((8, 8, 1), np.uint8))[:h, :w]


def write_pseudo_labels(root: Path, n: int = 12, confidence: bool = True, skipped_only: bool = False) -> Path:
    """A `reco pseudo-label` output (OUT/pseudo_label.json, labels/, confidence/, manifest/part-*.parquet)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cluster.pseudo_label import COLUMNS, skipped_row
    from index.labels import encode_labels

    out, imgs = root / "labels_out", root / "images"
    rows = []
    for i in range(0 if skipped_only else n):
        arr = toy_image(i, SIZES[i % len(SIZES)])
        lab = arr.argmax(-1)
        srt = np.sort(arr.astype(np.int16), -1)
        conf = np.clip((srt[..., 2] - srt[..., 1]) * 2, 0, 255).astype(np.uint8)
        iid = f"{'ab'[i % 2]}/{i:04d}.png"
        for p in (imgs / iid, out / "labels" / iid, out / "confidence" / iid):
            p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(imgs / iid)
        (out / "labels" / iid).write_bytes(encode_labels(lab))
        if confidence:
            Image.fromarray(conf).save(out / "confidence" / iid)
        rows.append(
            {
                "id": iid,
                "uri": str(imgs / iid),
                "status": "ok",
                "error": "",
                "label": f"labels/{iid}",
                "confidence": f"confidence/{iid}" if confidence else "",
                "overlay": "",
                "width": arr.shape[1],
                "height": arr.shape[0],
                "classes": "[0, 1, 2]",
                "shares": "[]",
                "mean_confidence": float(conf.mean() / 255),
                "seconds": 0.0,
            }
        )
    rows.append(skipped_row(SimpleNamespace(id="bad.jpg", uri=str(root / "bad.jpg"), problem="corrupt")))
    (out / "manifest").mkdir(parents=True, exist_ok=True)
    pq.write_table(
        pa.table({c: [r.get(c, "") for r in rows] for c in COLUMNS}), out / "manifest" / "part-00000-0a1b2c3d.parquet"
    )
    (out / "pseudo_label.json").write_text(json.dumps({"classes": CLASSES, "config_hash": "toy"}))
    return out


@pytest.fixture(scope="module")
def toy_labels(tmp_path_factory) -> Path:
    return write_pseudo_labels(tmp_path_factory.mktemp("toy"))


def exit_once_after(step: int, rank: int, marker) -> Callable[[], None]:
    """A ``worker_setup`` for run_training: in every Ray Train worker it registers a hook on the
    fault point ``train.step`` that ends the process of ``rank`` (as if killed) the first time it
    finishes ``step``; ``marker`` (a file) records that it fired, so the restarted worker group
    goes on. Ray pickles this closure by value: the workers need not import the tests."""
    marker, want = str(marker), (step, rank)

    def setup() -> None:
        from cluster import faults

        def on_step(step: int, rank: int) -> None:
            if (step, rank) == want and not os.path.exists(marker):
                with open(marker, "w") as f:
                    f.write(str(step))
                os._exit(1)

        faults.register("train.step", on_step)

    return setup


def _cfg(**kw):
    from cluster.train import TrainConfig

    return TrainConfig(**{**TOY, **kw})


# -- config and boundaries (no Ray) ---------------------------------------------------------------


def test_defaults_are_the_paper_recipe_and_yaml_is_strict():
    from cluster.train import OPERATIONAL, TrainConfig, config_hash, load_train_config
    from reco.errors import ConfigError

    c = TrainConfig()
    assert (c.encoder, c.output_stride, c.iterations, c.batch_size, c.crop_size) == ("resnet101", 8, 20000, 8, 320)
    assert (c.lr_head, c.lr_encoder, c.weight_decay, c.poly_power) == (5e-4, 5e-5, 2e-4, 0.9)
    assert (c.scale_min, c.scale_max, c.hflip, c.selection, c.encoder_weights) == (0.5, 2.0, True, "last", None)
    assert load_train_config({"iterations": 100, "confidence_threshold": 0.5}).confidence_threshold == 0.5
    for bad in (
        {"lr": 1e-3},
        {"iterations": "many"},
        {"iterations": 0},
        {"selection": "val"},
        {"batch_size": 8, "num_workers": 3},
        {"crop_size": 50},
        {"precision": "fp16"},
    ):
        with pytest.raises(ConfigError):
            load_train_config(bad)
    # operational settings may change on a resume; what is learned may not
    h0, _ = config_hash(c, "d", None)
    assert config_hash(replace(c, num_workers=2, checkpoint_every=5, use_gpu=True), "d", None)[0] == h0
    assert config_hash(replace(c, lr_head=1e-3), "d", None)[0] != h0
    assert config_hash(c, "other data", None)[0] != h0 and config_hash(c, "d", "sha")[0] != h0
    assert {"num_workers", "max_failures", "precision"} <= OPERATIONAL and "iterations" not in OPERATIONAL


def test_errors_at_the_boundaries_come_before_ray(tmp_path, toy_labels):
    from cluster.train import plan_training
    from jobs.cli import main
    from reco.errors import ConfigError, WeightsNotFoundError

    runs = str(tmp_path / "runs")
    with pytest.raises(FileNotFoundError, match="not a pseudo-label output"):
        plan_training(str(tmp_path / "nothing"), runs, "r", _cfg())
    no_manifest = tmp_path / "nm"
    no_manifest.mkdir()
    (no_manifest / "pseudo_label.json").write_text(json.dumps({"classes": CLASSES}))
    with pytest.raises(FileNotFoundError, match="no manifest"):
        plan_training(str(no_manifest), runs, "r", _cfg())
    with pytest.raises(ConfigError, match="none with status ok"):
        plan_training(str(write_pseudo_labels(tmp_path / "empty", skipped_only=True)), runs, "r", _cfg())
    with pytest.raises(ConfigError, match="unknown encoder"):
        plan_training(str(toy_labels), runs, "r", _cfg(encoder="resnet7"))
    with pytest.raises(WeightsNotFoundError) as err:
        plan_training(str(toy_labels), runs, "r", _cfg(encoder_weights=str(tmp_path / "missing.pth")))
    assert isinstance(err.value, FileNotFoundError)
    with pytest.raises(ConfigError, match="confidence map"):
        plan_training(
            str(write_pseudo_labels(tmp_path / "noconf", n=3, confidence=False)),
            runs,
            "r",
            _cfg(confidence_threshold=0.3),
        )
    with pytest.raises(ConfigError, match="run name"):
        plan_training(str(toy_labels), runs, "a/b", _cfg())
    plan = plan_training(str(toy_labels), runs, "r", _cfg(selection="holdout", holdout_fraction=0.25))
    assert (plan.n_train, plan.n_holdout) == (9, 3) and plan.data.classes == tuple(CLASSES)
    assert not Path(runs).exists()  # planning writes nothing
    # the CLI: exit status 2, and the errors come before Ray is started
    import ray

    ray_was_up = ray.is_initialized()  # (another test module may have started the session's Ray)
    assert main(["train", str(tmp_path / "nothing"), "--name", "r", "--storage", runs]) == 2
    bad_yaml = tmp_path / "t.yaml"
    bad_yaml.write_text("train:\n  learning_rate: 0.1\n")
    assert main(["train", str(toy_labels), "--name", "r", "--storage", runs, "--config", str(bad_yaml)]) == 2
    assert ray.is_initialized() == ray_was_up


def test_sampler_and_augmentation_are_indexed_by_step(toy_labels):
    from cluster.train import (
        IGNORE,
        PseudoLabelDataset,
        StepSampler,
        augment,
        load_sample,
        read_pseudo_labels,
        split_holdout,
        target_ids,
    )

    cfg = _cfg(confidence_threshold=0.2, selection="holdout", holdout_fraction=0.25)
    data = read_pseudo_labels(str(toy_labels))
    assert len(data.samples) == 12 and [s.id for s in data.samples] == sorted(s.id for s in data.samples)
    train, held = split_holdout(data.samples, cfg)
    assert len(held) == 3 and not {s.id for s in train} & {s.id for s in held}
    assert split_holdout(data.samples, cfg) == (train, held)  # deterministic
    # the global batches of steps [0, 5): ranks are disjoint and together make each global batch
    full = [list(StepSampler(len(train), 4, r, 2, 0, 5, seed=0)) for r in range(2)]
    for step in range(5):
        got = sorted(p for r in range(2) for _, p in full[r][2 * step : 2 * step + 2])
        assert got == list(range(4 * step, 4 * step + 4))
    # resuming at step 3 yields exactly the tail of the uninterrupted stream
    assert list(StepSampler(len(train), 4, 1, 2, 3, 5, seed=0)) == full[1][6:]
    # every epoch visits every training image once
    one = [i for i, _ in StepSampler(len(train), 3, 0, 1, 0, 3, seed=0)]
    assert sorted(one) == list(range(len(train)))
    ds = PseudoLabelDataset(train, cfg, 3)
    x1, y1 = ds[(0, 17)]
    x2, y2 = ds[(0, 17)]
    assert x1.shape == (3, 48, 48) and y1.shape == (48, 48) and y1.dtype == torch.int64
    assert torch.equal(x1, x2) and torch.equal(y1, y2)  # the augmentation is seeded by the position
    assert not torch.equal(ds[(0, 18)][0], x1)
    # ignore: label ids >= num_classes (255) and pixels below the confidence threshold
    img, lab, conf = load_sample(train[0])
    lab[0, 0] = 255
    y = target_ids(lab, conf, 3, 0.2)
    assert y[0, 0] == IGNORE and ((conf < 0.2 * 255) <= (y == IGNORE)).all() and (y[conf >= 51] >= 0).all()
    # a crop larger than the scaled image is padded with ignore
    small = replace(cfg, base_size=16, scale_min=1.0, scale_max=1.0, crop_size=32)
    _, yp = augment(img, y, small, np.random.default_rng(0), (0.5,) * 3, (0.5,) * 3)
    assert (yp == IGNORE).float().mean() > 0.3


def test_encoder_weights_load_from_a_local_file(tmp_path):
    from safetensors.torch import save_file

    from reco.errors import WeightsMismatchError, WeightsNotFoundError
    from reco.segmodel import SegModelSpec, build_model, load_encoder_weights, read_state_dict

    torch.manual_seed(1)
    src = build_model(SegModelSpec("resnet18", 3, 16, 16))
    # an ImageNet-style checkpoint: torchvision names plus the classifier smp drops
    state = {
        **{k: v.clone() for k, v in src.encoder.state_dict().items()},
        "fc.weight": torch.zeros(1000, 512),
        "fc.bias": torch.zeros(1000),
    }
    save_file(state, str(tmp_path / "r18.safetensors"))
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "r18.pth")
    for f in ("r18.safetensors", "r18.pth"):
        torch.manual_seed(2)
        dst = build_model(SegModelSpec("resnet18", 3, 16, 16))
        assert not torch.equal(dst.encoder.conv1.weight, src.encoder.conv1.weight)
        n = load_encoder_weights(dst, read_state_dict(tmp_path / f), f)
        assert n >= 60 and torch.equal(dst.encoder.conv1.weight, src.encoder.conv1.weight)
        assert torch.equal(dst.encoder.layer4[1].bn2.running_var, src.encoder.layer4[1].bn2.running_var)
    with pytest.raises(WeightsNotFoundError):
        read_state_dict(tmp_path / "absent.pth")
    with pytest.raises(WeightsMismatchError, match="does not fit"):
        load_encoder_weights(
            build_model(SegModelSpec("tu-mobilenetv3_small_050", 3, 16, 16)),
            read_state_dict(tmp_path / "r18.safetensors"),
            "r18",
        )


def test_export_is_safetensors_and_json_and_reloads(tmp_path):
    from index.outputs import load_segmodel
    from reco.errors import WeightsMismatchError
    from reco.segmodel import SegModel, SegModelSpec, build_model

    torch.manual_seed(0)
    spec = SegModelSpec("tu-mobilenetv3_small_050", 3, 16, 16)
    model = build_model(spec)
    model.eval()
    seg = SegModel(model, spec, CLASSES, base_size=40, training={"config_hash": "abc", "encoder_init": "random init"})
    seg.save(tmp_path / "model")
    raw = (tmp_path / "model" / "model.safetensors").read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    assert raw[8:9] == b"{" and "reco_segmodel" in json.loads(raw[8 : 8 + n])["__metadata__"]  # not a pickle
    meta = json.loads((tmp_path / "model" / "model.json").read_text())
    assert meta["classes"] == CLASSES and meta["spec"]["encoder"] == spec.encoder
    assert meta["normalisation"]["mean"] == [0.485, 0.456, 0.406] and meta["training"]["config_hash"] == "abc"
    img = Image.fromarray(toy_image(3, (70, 50)))
    want, names = seg.predict(img)
    assert want.shape == (50, 70) and want.dtype == np.int64 and names == CLASSES
    for uri in (tmp_path / "model", tmp_path, tmp_path / "model" / "model.safetensors"):
        got, names2 = load_segmodel(str(uri)).predict(img)
        assert np.array_equal(got, want) and names2 == CLASSES
    # `reco segment --model` runs the exported model like the bank path: labels, overlay, legend
    from jobs.cli import main

    img.save(tmp_path / "photo.png")
    assert (
        main(
            ["segment", str(tmp_path / "photo.png"), "--model", str(tmp_path / "model"), "--out", str(tmp_path / "seg")]
        )
        == 0
    )
    assert np.array_equal(np.array(Image.open(tmp_path / "seg" / "photo.png.labels.png")), want)
    assert (tmp_path / "seg" / "legend.png").is_file() and (tmp_path / "seg" / "photo.png.overlay.png").is_file()
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "model.safetensors").write_bytes(raw)  # the header alone is enough
    assert np.array_equal(load_segmodel(str(tmp_path / "bare")).predict(img)[0], want)
    tampered = bytearray(raw)
    tampered[-1] ^= 1
    (tmp_path / "model" / "model.safetensors").write_bytes(bytes(tampered))
    with pytest.raises(WeightsMismatchError, match="sha256"):
        load_segmodel(str(tmp_path / "model"))
    with pytest.raises(FileNotFoundError):
        load_segmodel(str(tmp_path / "nowhere"))


def test_holdout_selection_and_curve_in_one_process(tmp_path, toy_labels):
    """The same loop without Ray (`run_local`): checkpoints carry the mIoU on the held-out slice
    of the pseudo-labelled training images, and selection picks the best of them."""
    from safetensors.torch import save_file

    from cluster.train import plan_training, render_curve, run_local, select_checkpoint
    from reco.segmodel import SegModelSpec, build_model, file_sha256

    torch.manual_seed(5)  # "ImageNet" weights for the encoder, given as a local file
    enc = build_model(SegModelSpec(TOY["encoder"], 3, 16, 32)).encoder.state_dict()
    save_file({k: v.contiguous() for k, v in enc.items()}, str(tmp_path / "enc.safetensors"))
    cfg = _cfg(
        num_workers=1,
        cpus_per_worker=1,
        batch_size=2,
        iterations=4,
        checkpoint_every=2,
        log_every=1,
        selection="holdout",
        holdout_fraction=0.25,
        encoder_weights=str(tmp_path / "enc.safetensors"),
    )
    plan = plan_training(str(toy_labels), str(tmp_path / "runs"), "w", cfg)
    assert plan.settings["encoder_weights_sha256"] == file_sha256(tmp_path / "enc.safetensors")
    state = run_local(str(toy_labels), str(tmp_path / "run"), cfg)
    assert state["step"] == 4 and [h["step"] for h in state["history"]] == [1, 2, 3, 4]
    assert state["holdout"]["count"] == 3 and len(state["holdout"]["ids"]) == 3
    metrics = [json.loads((tmp_path / "run" / f"checkpoint_{s:08d}" / "metrics.json").read_text()) for s in (2, 4)]
    assert all(0.0 <= m["holdout_miou"] <= 1.0 for m in metrics)
    ck = [
        ("a", {"step": 2, "holdout_miou": 0.4}),
        ("b", {"step": 4, "holdout_miou": 0.3}),
        ("c", {"step": 6, "holdout_miou": 0.4}),
    ]
    assert select_checkpoint(ck, cfg)[0] == "c" and select_checkpoint(ck[:2], cfg)[0] == "a"
    assert select_checkpoint(ck[:2], replace(cfg, selection="last"))[0] == "b"
    png = Image.open(io.BytesIO(render_curve(state["history"], "toy")))
    assert png.size == (900, 640) and png.mode == "RGB"


# -- Ray Train (2 workers, gloo, fractional CPUs) -------------------------------------------------


def _final_weights(ckpt_dir) -> dict:
    from safetensors.torch import load

    return load(Path(ckpt_dir, "model.safetensors").read_bytes())


@pytest.fixture(scope="module")
def resumed_run(ray_local, toy_labels, tmp_path_factory):
    """The whole job dies after its first checkpoint (a worker exits at step 6, max_failures=0),
    then the same command runs again with the same name and storage path."""
    from cluster.train import TrainingFailed, run_training

    runs = tmp_path_factory.mktemp("runs")
    cfg = _cfg(max_failures=0)
    marker = runs / "fault_fired"
    with pytest.raises(TrainingFailed, match="rerun the same command"):
        run_training(str(toy_labels), str(runs), "toy", cfg, worker_setup=exit_once_after(6, 1, marker))
    assert marker.read_text() == "6"
    after_kill = sorted(p.name for p in (runs / "toy").glob("checkpoint_0*") if p.is_dir())
    res = run_training(str(toy_labels), str(runs), "toy", cfg)
    return runs, cfg, res, after_kill


@pytest.mark.slow
def test_killed_run_resumes_with_its_step_and_optimiser(resumed_run):
    from safetensors.torch import load_file

    runs, cfg, res, after_kill = resumed_run
    rep = res.report
    assert after_kill == ["checkpoint_00000004"]
    assert rep["steps"] == cfg.iterations == 12
    assert [a["start_step"] for a in rep["attempts"]] == [0, 4]  # continued from the checkpoint, not from 0
    assert [h["step"] for h in rep["history"]] == [2, 4, 6, 8, 10, 12]  # one entry per logged step
    opt = load_file(str(runs / "toy" / "checkpoint_00000012" / "optimizer.safetensors"))
    steps = {float(v) for k, v in opt.items() if k.endswith(".step")}
    assert steps == {12.0}  # Adam's own step counters were restored (8.0 if they had restarted)
    losses = [h["loss"] for h in rep["history"]]
    assert np.mean(losses[-2:]) < np.mean(losses[:2]) - 0.1, losses  # the toy is learnt
    assert rep["encoder_init"].startswith("random init") and rep["selection"]["mode"] == "last"
    assert rep["selection"]["checkpoint"] == "checkpoint_00000012" and not rep["selection"]["evaluation_split_used"]
    assert [c["step"] for c in rep["checkpoints"]] == [4, 8, 12]
    run = runs / "toy"
    assert Image.open(run / "train_curve.png").size == (900, 640)
    assert json.loads((run / "train_report.json").read_text())["config_hash"] == rep["config_hash"]
    assert "lr_head: 0.01" in (run / "train_config.yaml").read_text()


@pytest.mark.slow
def test_another_config_under_the_same_name_is_refused(resumed_run, toy_labels):
    from cluster.train import plan_training, run_training
    from reco.errors import ConfigError

    runs, cfg, _, _ = resumed_run
    with pytest.raises(ConfigError, match="another configuration.*lr_head"):
        run_training(str(toy_labels), str(runs), "toy", replace(cfg, lr_head=5e-3))
    # operational settings (workers, checkpoint period, failures) may change on a resume
    plan_training(str(toy_labels), str(runs), "toy", replace(cfg, num_workers=1, checkpoint_every=2, max_failures=3))


@pytest.mark.slow
def test_worker_killed_mid_run_recovers_on_s3_and_export_matches(resumed_run, toy_labels, s3_server, tmp_path):
    """S3 (moto) for pseudo-labels, images and the run; a worker dies at step 10 with
    max_failures=1: Ray Train restarts the group from checkpoint 8 and the run finishes with the
    weights of the run that was killed at step 6 and resumed from 4 (both equal an uninterrupted run)."""
    import boto3
    import s3fs

    from cluster.train import run_training
    from index.outputs import load_segmodel
    from reco.segmodel import SegModelSpec, build_model, predict_logits

    boto3.client(
        "s3",
        endpoint_url=s3_server["endpoint_url"],
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    ).create_bucket(Bucket="reco-train")
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs = s3fs.S3FileSystem(**s3_server)
    local = write_pseudo_labels(tmp_path / "s3copy")  # the same toy, its image uris rewritten to S3
    part = next((local / "manifest").glob("*.parquet"))
    rows = pq.read_table(part).to_pylist()
    for r in rows:
        r["uri"] = r["uri"].replace(str(tmp_path / "s3copy" / "images"), "s3://reco-train/images")
    pq.write_table(pa.Table.from_pylist(rows), part)
    fs.put(str(tmp_path / "s3copy" / "images") + "/", "reco-train/images/", recursive=True)
    fs.put(str(local) + "/", "reco-train/labels/", recursive=True)

    runs_uri = "s3://reco-train/runs"
    runs, cfg, resumed, _ = resumed_run
    res = run_training(
        "s3://reco-train/labels",
        runs_uri,
        "toy",
        replace(cfg, max_failures=1),
        s3_server,
        worker_setup=exit_once_after(10, 1, tmp_path / "fault_fired"),
    )
    rep = res.report
    assert (tmp_path / "fault_fired").exists() and rep["steps"] == 12
    assert [a["start_step"] for a in rep["attempts"]] == [0, 8]
    assert rep["config_hash"] == resumed.report["config_hash"]  # same learning config and data
    ck = tmp_path / "ck"
    fs.get("reco-train/runs/toy/checkpoint_00000012/", str(ck) + "/", recursive=True)
    mine, theirs = _final_weights(ck), _final_weights(runs / "toy" / "checkpoint_00000012")
    assert mine.keys() == theirs.keys()
    for k in mine:
        assert torch.allclose(mine[k].float(), theirs[k].float(), atol=1e-5, rtol=1e-4), k
    # the export reloads (from S3) and predicts what the last checkpoint predicts
    assert res.model_uri == "s3://reco-train/runs/toy/model"
    seg = load_segmodel(runs_uri + "/toy", s3_server)
    assert seg.class_names == CLASSES and seg.training["checkpoint"] == "checkpoint_00000012"
    assert seg.training["encoder_init"].startswith("random init") and seg.training["selection"] == "last"
    spec = SegModelSpec(cfg.encoder, 3, cfg.output_stride, cfg.decoder_channels)
    raw = build_model(spec)
    raw.load_state_dict(mine)
    for i in range(3):
        img = Image.fromarray(toy_image(i, SIZES[i]))
        want = predict_logits(raw, img, cfg.base_size, seg.mean, seg.std).argmax(0).numpy()
        got, names = seg.predict(img)
        assert np.array_equal(got, want) and names == CLASSES
    assert json.loads(fs.cat("reco-train/runs/toy/train_report.json"))["attempts"][1]["start_step"] == 8
    assert fs.cat("reco-train/runs/toy/train_curve.png")[:4] == b"\x89PNG"


@pytest.mark.slow
def test_cli_train_with_relative_paths_and_its_job_report(ray_local, tmp_path, monkeypatch):
    """`reco train` given paths relative to the caller's directory: Ray Train workers run in
    directories of their own, so the job hands them absolute paths (it once failed there)."""
    import json

    import yaml

    from jobs.cli import main

    write_pseudo_labels(tmp_path, n=6)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "t.yaml").write_text(
        yaml.safe_dump({"train": {**TOY, "num_workers": 1, "iterations": 4, "checkpoint_every": 2}})
    )
    assert main(["train", "labels_out", "--name", "rel", "--storage", "runs", "--config", "t.yaml"]) == 0
    rep = json.loads((tmp_path / "runs" / "rel" / "train_report.json").read_text())
    assert rep["steps"] == 4 and rep["labels"] == str(tmp_path / "labels_out")
    job = json.loads((tmp_path / "runs" / "rel" / "job_report.json").read_text())
    assert job["job"] == "train" and job["inputs"] == {
        "seen": 4,
        "processed": 4,
        "already_done": 0,
        "skipped": 0,
        "failed_transient": 0,
    }


# -- bad inputs: one line, exit 2, before Ray -----------------------------------------------------


def test_bad_train_inputs_are_one_line_errors_before_ray(tmp_path, toy_labels, caplog, capsys):
    import logging

    import ray

    from jobs.cli import main

    ray_was_up = ray.is_initialized()
    runs = tmp_path / "runs"
    base = ["train", str(toy_labels), "--name", "r", "--storage", str(runs)]

    def refused(args, *words):
        caplog.clear()
        assert main(args) == 2, args
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and "\n" not in errors[0], (args, errors)
        assert all(w in errors[0] for w in words), (args, errors[0])

    # numbers: NaN, infinities and out-of-range values (flags and YAML)
    for flag, value, word in [
        ("--cpus-per-worker", "nan", "cpus_per_worker"),
        ("--cpus-per-worker", "inf", "finite"),
        ("--confidence-threshold", "nan", "confidence_threshold"),
        ("--confidence-threshold", "-inf", "confidence_threshold"),
        ("--iterations", "0", "iterations"),
        ("--batch-size", "-4", "batch_size"),
        ("--num-workers", "0", "num_workers"),
        ("--max-failures", "-2", "max_failures"),
        ("--checkpoint-every", "0", "checkpoint_every"),
        ("--loader-workers", "-1", "loader_workers"),
    ]:
        refused(base + [f"{flag}={value}"], word)
    for yaml_value in (".inf", ".nan", "-.inf"):
        (tmp_path / "t.yaml").write_text(f"train:\n  lr_head: {yaml_value}\n")
        refused(base + ["--config", str(tmp_path / "t.yaml")], "lr_head")
    # --storage naming a file; the run folder being a file
    (tmp_path / "afile").write_text("x")
    refused(["train", str(toy_labels), "--name", "r", "--storage", str(tmp_path / "afile")], "is a file")
    runs.mkdir()
    (runs / "f").write_text("x")
    refused(["train", str(toy_labels), "--name", "f", "--storage", str(runs)], "is a file")
    # a damaged train_settings.json
    (runs / "r").mkdir()
    (runs / "r" / "train_settings.json").write_bytes(b"\xff{ garbage")
    refused(base, "train_settings.json", "corrupt")
    (runs / "r" / "train_settings.json").write_text("[1, 2]")
    refused(base, "train_settings.json", "corrupt")
    # encoder weights checked on the driver: another architecture, NaN values
    from safetensors.torch import save_file

    from reco.segmodel import SegModelSpec, build_model

    def weights(encoder, path, poison=False):
        state = {
            k: v.clone().contiguous()
            for k, v in build_model(SegModelSpec(encoder, 3, 16, 16)).encoder.state_dict().items()
        }
        if poison:
            k = next(k for k, v in state.items() if v.is_floating_point())
            state[k][...] = float("nan")
        save_file(state, str(path))
        return str(path)

    small = ["train", str(toy_labels), "--name", "w", "--storage", str(runs), "--encoder", TOY["encoder"]]
    refused(small + ["--encoder-weights", weights("resnet18", tmp_path / "r18.safetensors")], "does not fit")
    refused(
        small + ["--encoder-weights", weights(TOY["encoder"], tmp_path / "nan.safetensors", poison=True)], "NaN/Inf"
    )
    assert ray.is_initialized() == ray_was_up
    # --help names the default it uses (configs/cluster.yaml), which a job then accepts
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "default: the repository's configs/cluster.yaml" in text
    assert "repository's ray_config.yaml" not in text
    from cluster.config import cluster_config_path, resolve_cluster_config

    assert cluster_config_path(None).name == "cluster.yaml" and resolve_cluster_config(None).ray is not None


def test_a_label_set_with_every_image_skipped_exits_2_every_time(tmp_path):
    """It once exited 134 ("terminate called without an active exception") in about 1 run of 3:
    the manifest's Arrow buffers over Python bytes were released on an Arrow thread while the
    interpreter shut down. The CLI says it in one line with exit 2; then six fresh processes
    that read that manifest (with torch imported, as the job does) and exit at once must exit 0."""
    import os
    import subprocess
    import sys

    from conftest import REPO

    from jobs.cli import main

    labels = write_pseudo_labels(tmp_path, skipped_only=True)
    assert main(["train", str(labels), "--name", "r", "--storage", str(tmp_path / "runs")]) == 2
    assert not (tmp_path / "runs").exists()
    code = f"import torch\nfrom cluster.pseudo_label import committed_rows\nassert len(committed_rows({str(labels)!r})) == 1"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    codes = [
        subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=120).returncode
        for _ in range(6)
    ]
    assert codes == [0] * 6, codes
