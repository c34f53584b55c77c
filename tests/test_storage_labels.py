"""Storage URIs (local and s3:// through a local moto endpoint), label files, output names."""

import io

import numpy as np
import pytest
import torch
from conftest import TINY_VIT, make_bucket, make_image
from PIL import Image

from index.labels import decode_labels, encode_labels, output_name
from index.storage import fetch_to_cache, join, load_bank, read_bytes, save_bank, write_bytes
from reco import BankConfig, ConceptBank, ConceptBuilder, SegmenterConfig

# -- output names ------------------------------------------------------------------------


def test_output_names_keep_folders_and_extensions_apart():
    ids = [
        "a/0001.jpg",
        "b/0001.jpg",
        "0001.jpg",
        "0001.png",
        "a b/caf\u00e9.jpg",
        "x.parquet#12",
        "..",
        "a/../b",
        "%41",
        "A",
        "a//b",
        "a/b",
        "/abs/p.jpg",
    ]
    names = [output_name(i) for i in ids]
    assert len(set(names)) == len(ids)  # injective: no two inputs share an output
    assert output_name("a/0001.jpg") == "a/0001.jpg.png"
    assert output_name("x.parquet#12") == "x.parquet%2312.png"
    for n in names:  # nothing escapes the output root
        parts = n.split("/")
        assert ".." not in parts and "." not in parts and parts[0] != ""
        assert all(c.isalnum() or c in "._-%/" for c in n)
    with pytest.raises(ValueError):
        output_name("")


# -- label PNGs --------------------------------------------------------------------------


def test_labels_are_palette_png_up_to_256_classes():
    lab = np.arange(256, dtype=np.int64).reshape(16, 16)
    data = encode_labels(lab)
    img = Image.open(io.BytesIO(data))
    assert img.mode == "P" and img.getpalette()[3:6] == [128, 0, 0]  # VOC colour of class 1
    assert np.array_equal(decode_labels(data), lab)


def test_300_concepts_give_16_bit_labels_that_round_trip():
    rng = np.random.default_rng(0)
    lab = rng.integers(0, 300, size=(37, 53))
    lab[0, 0] = 299
    data = encode_labels(lab)
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    back = decode_labels(data)
    assert back.dtype == np.int64 and np.array_equal(back, lab)  # nothing wraps at 256
    with pytest.raises(ValueError):
        encode_labels(np.full((2, 2), 70000))
    with pytest.raises(ValueError):
        decode_labels(_rgb_png())


def _rgb_png() -> bytes:
    b = io.BytesIO()
    make_image(1).save(b, format="PNG")
    return b.getvalue()


# -- storage URIs ------------------------------------------------------------------------


@pytest.fixture()
def bucket(s3_server):

    name = "reco-test-bucket"
    make_bucket(s3_server, name)
    return f"s3://{name}"


def test_local_write_is_atomic_and_read_errors_name_the_uri(tmp_path):
    uri = join(str(tmp_path), "a", "b.bin")
    write_bytes(uri, b"one")
    write_bytes(uri, b"two")
    assert read_bytes(uri) == b"two"
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["b.bin"]  # no temp files left
    with pytest.raises(FileNotFoundError, match="nope"):
        read_bytes(str(tmp_path / "nope"))


def test_bank_and_weights_through_s3(bucket, s3_server, tiny_dense, images, tmp_path, monkeypatch):
    bank = ConceptBank.build(
        {"cat": images[:2], "dog": images[2:]},
        ConceptBuilder(tiny_dense, None, BankConfig(image_size=64, context_elimination=False)),
    )
    uri = f"{bucket}/banks/voc"
    save_bank(bank, uri, s3_server)
    back = load_bank(uri, s3_server)
    assert back.names == bank.names and torch.equal(back.references, bank.references)
    with pytest.raises(FileNotFoundError, match="not a concept bank"):
        load_bank(f"{bucket}/banks/none", s3_server)
    # weights named by URL are fetched once into the node's cache
    monkeypatch.setenv("RECO_CACHE_DIR", str(tmp_path / "cache"))
    write_bytes(f"{bucket}/w/model.bin", b"weights", s3_server)
    p = fetch_to_cache(f"{bucket}/w/model.bin", s3_server)
    assert p.read_bytes() == b"weights" and str(p).startswith(str(tmp_path / "cache"))


@pytest.mark.slow
def test_segmentation_reads_bank_and_writes_outputs_by_uri(ray_local, s3_server, bucket, tiny_dense_path, tmp_path):
    """Workers get the bank as bytes and write labels to the output URI: here both are in S3,
    so nothing the actors touch is a driver-local path."""
    import s3fs

    from cluster.config import ActorConfig
    from cluster.models import EncoderSpec
    from cluster.segment import run_segmentation
    from reco.encoders import create_dense_encoder

    spec = EncoderSpec("dino_vits16", str(tiny_dense_path), dense_kwargs=TINY_VIT)
    dense = create_dense_encoder("dino_vits16", tiny_dense_path, **TINY_VIT)
    imgs = [make_image(i, (64, 64)) for i in range(4)]
    bank = ConceptBank.build(
        {"cat": imgs[:2], "dog": imgs[2:]},
        ConceptBuilder(dense, None, BankConfig(image_size=64, context_elimination=False)),
    )
    bank_uri = f"{bucket}/seg/bank"
    save_bank(bank, bank_uri, s3_server)
    items = []
    for i, name in enumerate(["x/1.png", "y/1.png"]):
        b = io.BytesIO()
        imgs[i].save(b, format="PNG")
        write_bytes(f"{bucket}/seg/in/{name}", b.getvalue(), s3_server)
        items.append({"id": name, "uri": f"{bucket}/seg/in/{name}", "mask_uri": ""})
    rows = run_segmentation(
        items,
        bank_uri,
        spec,
        SegmenterConfig(image_size=64),
        [0, 1],
        2,
        None,
        f"{bucket}/seg/out",
        ActorConfig(num_actors=1, cpus_per_actor=0.5),
        storage_options=s3_server,
    )
    assert sorted(r["status"] for r in rows) == ["ok", "ok"]
    fs = s3fs.S3FileSystem(**s3_server)
    written = sorted(fs.find(f"{bucket}/seg/out/labels".removeprefix("s3://")))
    assert [w.split("/labels/")[1] for w in written] == ["x/1.png.png", "y/1.png.png"]
    lab = decode_labels(read_bytes(f"{bucket}/seg/out/labels/x/1.png.png", s3_server))
    assert lab.shape == (64, 64) and set(np.unique(lab)) <= {0, 1}


@pytest.mark.slow
def test_pseudo_label_job_from_and_to_s3(ray_local, s3_server, bucket, tiny_dense_path):
    """Corpus listed from S3, bank read from S3, labels + manifest written to S3; a rerun commits
    nothing twice."""
    from cluster.config import ActorConfig
    from cluster.models import EncoderSpec
    from cluster.pseudo_label import committed_rows, run_pseudo_label
    from index.sources import list_folder
    from reco.encoders import create_dense_encoder

    dense = create_dense_encoder("dino_vits16", tiny_dense_path, **TINY_VIT)
    imgs = [make_image(i, (64, 48)) for i in range(4)]
    bank = ConceptBank.build(
        {"cat": imgs[:2], "dog": imgs[2:]},
        ConceptBuilder(dense, None, BankConfig(image_size=64, context_elimination=False)),
    )
    save_bank(bank, f"{bucket}/pl/bank", s3_server)
    for i, name in enumerate(["p/1.png", "q/1.png", "q/2.png"]):
        b = io.BytesIO()
        imgs[i].save(b, format="PNG")
        write_bytes(f"{bucket}/pl/in/{name}", b.getvalue(), s3_server)
    write_bytes(f"{bucket}/pl/in/q/broken.png", b"\x89PNG broken", s3_server)
    items = list_folder(f"{bucket}/pl/in", s3_server)
    spec = EncoderSpec("dino_vits16", str(tiny_dense_path), dense_kwargs=TINY_VIT)
    out = f"{bucket}/pl/out"
    rep = run_pseudo_label(
        items,
        f"{bucket}/pl/bank",
        spec,
        SegmenterConfig(image_size=64),
        out,
        ActorConfig(num_actors=1, cpus_per_actor=0.5),
        s3_server,
        commit_every=2,
    )
    assert rep.labelled == 3 and list(rep.skipped) == ["q/broken.png"]
    rows = committed_rows(out, s3_server)
    assert sorted(r["id"] for r in rows) == ["p/1.png", "q/1.png", "q/2.png", "q/broken.png"]
    lab = decode_labels(
        read_bytes(join(out, rows[0]["label"]) if rows[0]["label"] else join(out, "labels/p/1.png.png"), s3_server)
    )
    assert lab.shape == (48, 64)
    again = run_pseudo_label(
        items,
        f"{bucket}/pl/bank",
        spec,
        SegmenterConfig(image_size=64),
        out,
        ActorConfig(num_actors=1, cpus_per_actor=0.5),
        s3_server,
    )
    assert again.already_done == 4 and len(committed_rows(out, s3_server)) == 4


@pytest.mark.slow
def test_bank_job_reads_archives_from_s3_with_an_endpoint(ray_local, s3_server, bucket, tiny_dense_path, tmp_path):
    """Bank actors read archive images with the job's storage options (a custom endpoint such as
    MinIO or moto), not only through the default AWS chain."""
    from cluster.bank_job import ConceptTask, run_build_bank
    from cluster.config import ActorConfig
    from cluster.models import EncoderSpec

    tasks = []
    for name, seeds in {"cat": [1, 2], "dog": [3, 4]}.items():
        uris = []
        for s in seeds:
            b = io.BytesIO()
            make_image(s, (64, 64)).save(b, format="PNG")
            uri = f"{bucket}/archives/{name}/{s}.png"
            write_bytes(uri, b.getvalue(), s3_server)
            uris.append(uri)
        tasks.append(ConceptTask(name, tuple(uris)))
    spec = EncoderSpec("dino_vits16", str(tiny_dense_path), dense_kwargs=TINY_VIT)
    bank, rep = run_build_bank(
        tasks,
        spec,
        BankConfig(image_size=64, context_elimination=False),
        f"{bucket}/banks/from-s3",
        ActorConfig(num_actors=1, cpus_per_actor=0.5),
        storage_options=s3_server,
    )
    assert rep.failed_transient == {} and bank.names == ("cat", "dog")
    assert load_bank(f"{bucket}/banks/from-s3", s3_server).names == ("cat", "dog")
