"""Bad input to build-bank, pseudo-label, segment, embed, show-bank, submit: one line, exit 2, before Ray.

Each case was a traceback after Ray had started (ActorDiedError after 16-24 s), a silently ignored
value, or garbage reported as success (``--background-threshold nan``: exit 0, every pixel
background). Here every case must exit 2 with exactly one ERROR line naming the problem, without
Ray being started and within seconds.
"""

from __future__ import annotations

import json
import logging
import os
import time

import pytest
from conftest import TINY_VIT, make_image

from jobs.cli import main

DENSE_KW = json.dumps(TINY_VIT)


@pytest.fixture
def no_ray(monkeypatch):
    """Starting Ray (through the job runtime or ray.init itself) fails the test."""
    import ray

    import cluster.runtime

    def refuse(*a, **kw):
        raise AssertionError("Ray must not start for bad input")

    monkeypatch.setattr(cluster.runtime, "init_ray", refuse)
    monkeypatch.setattr(ray, "init", refuse)


def refused(caplog, argv, message, seconds=30.0):
    """``reco ARGV`` exits 2 with one one-line ERROR containing ``message``, in under ``seconds``."""
    caplog.clear()
    t0 = time.perf_counter()
    with caplog.at_level(logging.INFO):
        rc = main([str(a) for a in argv])
    took = time.perf_counter() - t0
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert rc == 2 and len(errors) == 1, (argv, rc, errors)
    assert message in errors[0] and "\n" not in errors[0], (argv, errors)
    assert took < seconds, (argv, took)
    return errors[0]


@pytest.fixture
def exemplars(tmp_path):
    root = tmp_path / "ex"
    for c, name in enumerate(("cat", "dog")):
        (root / name).mkdir(parents=True)
        for i in range(2):
            make_image(10 * c + i, (64, 64)).save(root / name / f"{i}.png")
    return root


@pytest.fixture
def bank_dir(tmp_path, tiny_dense_path):
    from index.storage import save_bank
    from reco import BankConfig, ConceptBank, ConceptBuilder
    from reco.encoders import create_dense_encoder

    dense = create_dense_encoder("dino_vits16", tiny_dense_path, **TINY_VIT)
    imgs = [make_image(i, (64, 64)) for i in range(4)]
    bank = ConceptBank.build(
        {"cat": imgs[:2], "dog": imgs[2:]},
        ConceptBuilder(dense, None, BankConfig(image_size=64, context_elimination=False)),
    )
    return save_bank(bank, str(tmp_path / "bank"))


@pytest.fixture
def broken_weights(tmp_path, tiny_dense_path):
    """{case: weight file}: truncated, not weights at all, of another architecture."""
    from safetensors.torch import save_file

    from reco.encoders import create_dense_encoder

    data = tiny_dense_path.read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.safetensors").write_bytes(os.urandom(4096))
    (tmp_path / "garbage.pth").write_bytes(os.urandom(4096))
    other = create_dense_encoder("dino_vits16", None, **dict(TINY_VIT, embed_dim=48, num_heads=3))
    save_file({k: v.contiguous() for k, v in other.model.state_dict().items()}, str(tmp_path / "other.safetensors"))
    return {
        name: tmp_path / f"{name}"
        for name in (
            "truncated.safetensors",
            "garbage.safetensors",
            "garbage.pth",
            "other.safetensors",
            "missing.safetensors",
        )
    }


def test_build_bank_checks_encoders_and_numbers_before_ray(
    no_ray, caplog, tmp_path, exemplars, tiny_dense_path, broken_weights
):
    vocab = tmp_path / "names.txt"
    vocab.write_text("cat\ndog\n")
    cfg = tmp_path / "bank.yaml"
    cfg.write_text("bank:\n  image_size: 64\n  context_elimination: false\n")
    base = [
        "build-bank",
        "--vocab",
        vocab,
        "--exemplars",
        exemplars,
        "--out",
        tmp_path / "bank",
        "--config",
        cfg,
        "--dense-encoder",
        "dino_vits16",
    ]
    good = ["--dense-weights", tiny_dense_path, "--dense-kwargs", DENSE_KW]
    for name, path in broken_weights.items():
        msg = "does not exist" if name.startswith("missing") else str(path)
        refused(caplog, [*base, "--dense-weights", path, "--dense-kwargs", DENSE_KW], msg)
    refused(caplog, [*base, "--dense-weights", tiny_dense_path], "does not fit")  # tiny weights, full-size ViT
    refused(caplog, [*base[:-1], "no_such_encoder", *good], "unknown dense encoder 'no_such_encoder'")
    refused(
        caplog,
        [*base, "--dense-weights", tiny_dense_path, "--dense-kwargs", json.dumps(dict(TINY_VIT, no_such_key=1))],
        "--dense-kwargs",
    )
    refused(caplog, [*base, *good, "--clip-model", "local-dir:/no/such/clip"], "open_clip_config.json")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    refused(caplog, [*base[:-5], a_file, *base[-4:], *good], "is a file, not a folder")
    refused(caplog, [*base[:-5], a_file / "bank", *base[-4:], *good], "is a file, not a folder")
    for option, value, message in (
        ("--k", "0", "--k must be >= 1"),
        ("--k", "nan", "--k must be an integer"),
        ("--actors", "0", "--actors must be >= 1"),
        ("--actors=-3", None, "--actors must be >= 1"),
        ("--commit-every", "0", "--commit-every must be >= 1"),
    ):
        refused(caplog, [*base, *good, option, *([value] if value else [])], message, seconds=5)
    assert not (tmp_path / "bank").exists()


def test_vocabulary_names_are_names_never_paths(no_ray, caplog, tmp_path, exemplars, tiny_dense_path):
    from index.vocab import read_vocabulary

    outside = tmp_path / "outside"
    outside.mkdir()
    make_image(1, (64, 64)).save(outside / "0.png")
    base = [
        "build-bank",
        "--exemplars",
        exemplars,
        "--out",
        tmp_path / "bank",
        "--dense-encoder",
        "dino_vits16",
        "--dense-weights",
        tiny_dense_path,
        "--dense-kwargs",
        DENSE_KW,
    ]
    for i, (line, message) in enumerate(
        (
            ("../ex/cat", "path separator"),
            (str(outside), "path separator"),
            ("..", "only dots"),
            (".", "only dots"),
            ("a\\b", "path separator"),
            ("c\x00t", "control character"),
            ("c\x1bt", "control character"),
        )
    ):
        vocab = tmp_path / f"v{i}.txt"
        vocab.write_text(f"dog\n{line}\n", encoding="utf-8")
        refused(caplog, [*base, "--vocab", vocab], message, seconds=5)
    # a BOM is not part of the first name
    bom = tmp_path / "bom.txt"
    bom.write_bytes(b"\xef\xbb\xbfcat\ndog\n")
    assert read_vocabulary(str(bom)).names == ["cat", "dog"]
    # an exemplar folder that is a symlink out of --exemplars is refused
    (exemplars / "bird").symlink_to(outside, target_is_directory=True)
    vocab = tmp_path / "birds.txt"
    vocab.write_text("bird\n")
    refused(caplog, [*base, "--vocab", vocab], "outside --exemplars", seconds=5)


def test_exemplar_folders_resolve_inside_the_exemplar_root(tmp_path):
    from cluster.bank_inputs import exemplar_folder
    from reco.errors import ConfigError

    root = tmp_path / "ex"
    (root / "cat").mkdir(parents=True)
    (root / "big_cat").mkdir()
    (tmp_path / "secret").mkdir()
    assert exemplar_folder(str(root), "cat") == str((root / "cat").resolve())
    assert exemplar_folder(str(root), "big cat") == str((root / "big_cat").resolve())
    assert exemplar_folder(str(root), "dog") is None
    for name in ("../secret", str(tmp_path / "secret"), "cat/../../secret"):
        with pytest.raises(ConfigError, match="outside --exemplars"):
            exemplar_folder(str(root), name)


def test_pseudo_label_checks_before_ray(no_ray, caplog, tmp_path, bank_dir, broken_weights):
    src = tmp_path / "src"
    src.mkdir()
    make_image(3, (64, 48)).save(src / "x.png")
    base = ["pseudo-label", src, "--bank", bank_dir, "--out", tmp_path / "pl"]
    good = ["--dense-kwargs", DENSE_KW]
    refused(caplog, [*base, *good, "--background-threshold", "nan"], "--background-threshold must be a finite", 5)
    refused(caplog, [*base, *good, "--background-threshold", "1.5"], "--background-threshold must be <= 1", 5)
    yaml_nan = tmp_path / "nan.yaml"
    yaml_nan.write_text("segmenter:\n  background_threshold: .nan\n")
    refused(caplog, [*base, *good, "--config", yaml_nan], "background_threshold must be a number in [0, 1]", 5)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9\n".encode("latin-1"))
    refused(caplog, [*base, *good, "--vocab", latin1], "not valid UTF-8", 5)
    dup = tmp_path / "dup.txt"
    dup.write_text("cat\ndog\nCat\n")
    refused(caplog, [*base, *good, "--vocab", dup], "duplicate concept", 5)
    refused(caplog, [*base, *good, "--vocab", "cat,dog,cat"], "duplicate concept", 5)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    refused(caplog, [*base[:-1], a_file, *good], "is a file, not a folder", 5)
    refused(caplog, [*base, "--dense-weights", broken_weights["truncated.safetensors"], *good], "truncated.safetensors")
    refused(caplog, [*base, "--dense-weights", broken_weights["missing.safetensors"], *good], "does not exist")
    refused(caplog, [*base, "--dense-kwargs", json.dumps(dict(TINY_VIT, no_such_key=1))], "--dense-kwargs")
    refused(caplog, [*base, *good, "--clip-model", "local-dir:/no/such/clip"], "open_clip_config.json")
    assert not (tmp_path / "pl").exists()


def test_segment_refuses_nan_thresholds_files_as_out_and_duplicate_vocab(no_ray, caplog, tmp_path, bank_dir):
    img = tmp_path / "x.png"
    make_image(4, (64, 48)).save(img)
    base = ["segment", img, "--bank", bank_dir, "--dense-kwargs", DENSE_KW]
    refused(caplog, [*base, "--background-threshold", "nan"], "--background-threshold must be a finite", 5)
    refused(caplog, [*base, "--background-threshold=-inf"], "--background-threshold must be a finite", 5)
    refused(caplog, [*base, "--vocab", "cat,CAT"], "duplicate concept", 5)
    refused(caplog, [*base, "--vocab", "../cat"], "path separator", 5)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    refused(caplog, [*base, "--out", a_file], "is a file, not a folder")
    assert not list(tmp_path.glob("*.labels.png"))


def test_embed_show_bank_submit_numbers(no_ray, caplog, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    make_image(5).save(src / "x.png")
    embed = ["embed", src, "--store", tmp_path / "store", "--clip-model", "ViT-B-32"]
    refused(caplog, [*embed, "--decode-cpus", "nan"], "--decode-cpus must be a finite number", 5)
    refused(caplog, [*embed, "--decode-cpus", "0"], "--decode-cpus must be > 0", 5)
    refused(caplog, [*embed, "--clip-weights", tmp_path / "no_such_clip.bin"], "does not exist", 10)
    refused(caplog, ["show-bank", tmp_path / "bank", "--max-images", "0"], "--max-images must be >= 1", 5)
    address = ["--address", "http://127.0.0.1:1"]
    refused(caplog, ["submit", *address, "--entrypoint-num-cpus", "nan", "embed"], "--entrypoint-num-cpus", 5)
    refused(caplog, ["submit", *address, "--entrypoint-num-gpus", "inf", "embed"], "--entrypoint-num-gpus", 5)
    refused(caplog, ["logs", *address, "raysubmit_x", "--tail=-1"], "--tail must be >= 0", 5)
    refused(caplog, ["stop", *address, "raysubmit_x", "--timeout", "nan"], "--timeout must be a finite", 5)


def test_number_types_refuse_nan_infinities_and_out_of_range():
    import argparse

    from jobs.common import finite_float, int_range, positive_float, positive_int, threshold

    assert positive_int("3") == 3 and int_range(0, 5)("5") == 5 and threshold("0.25") == 0.25
    assert finite_float(-1, 1)("-1") == -1.0 and positive_float("1e-3") == 1e-3
    for parse, text in (
        (positive_int, "0"),
        (positive_int, "1.5"),
        (positive_int, "nan"),
        (int_range(0, 5), "6"),
        (threshold, "nan"),
        (threshold, "inf"),
        (threshold, "-0.1"),
        (threshold, "1.01"),
        (positive_float, "0"),
        (positive_float, "-inf"),
        (finite_float(), "NaN"),
        (finite_float(), "x"),
    ):
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)
