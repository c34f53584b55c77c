"""Ray Data embedding into the store: folder, Parquet and S3 inputs, bad files, resume, CLI."""

import io
import json
import logging
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO, make_image, write_corrupt_files

from cluster.config import ActorConfig
from cluster.embed import run_embed
from index.sources import list_folder, list_source
from index.store import EmbeddingStore
from jobs.cli import main

pytestmark = pytest.mark.slow
ACTORS = ActorConfig(num_actors=1, cpus_per_actor=0.5, batch_size=4)


def _folder(root, n, start=0, size=(40, 30)):
    root.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + n):
        sub = root / ("sub" if i % 2 else "")
        sub.mkdir(exist_ok=True)
        make_image(i, size).save(sub / f"img_{i:03d}.jpg")
    return root


def test_folder_with_bad_files_counts_every_skip(ray_local, tiny_clip_spec, tmp_path):
    src = _folder(tmp_path / "src", 9)
    bad = write_corrupt_files(src / "bad")
    from PIL import Image

    Image.new("CMYK", (30, 20)).save(src / "cmyk.jpg")
    Image.new("L", (3, 2)).save(src / "tiny_grey.png")
    items = list_folder(str(src))
    store = EmbeddingStore(tmp_path / "store")
    rep = run_embed(items, store, tiny_clip_spec, ACTORS, shard_size=4)
    assert rep.embedded == 11 and set(rep.skipped) == {f"bad/{b.name}" for b in bad}
    assert all(r.startswith("decode:") for r in rep.skipped.values())
    emb, ids, _ = store.load_all()
    assert emb.shape == (11, 32) and len(set(ids)) == 11
    assert store.committed_ids() == {i.id for i in items}  # every input is accounted for
    assert rep.shards_committed == [0, 1, 2, 3]
    # a rerun has nothing to do; an incremental add embeds only the new files
    assert run_embed(items, store, tiny_clip_spec, ACTORS, shard_size=4).embedded == 0
    _folder(src, 3, start=100)
    rep2 = run_embed(list_folder(str(src)), store, tiny_clip_spec, ACTORS, shard_size=4)
    assert rep2.embedded == 3 and rep2.already_done == len(items) and rep2.shards_committed == [4]
    assert len(store) == 14 and len(set(store.load_all()[1])) == 14


def test_parquet_source_with_embedded_bytes(ray_local, tiny_clip_spec, tmp_path):
    blobs = []
    for i in range(6):
        b = io.BytesIO()
        make_image(i).save(b, format="JPEG")
        blobs.append(b.getvalue())
    blobs[4] = b"corrupt"
    pq.write_table(
        pa.table({"id": [f"row{i}" for i in range(6)], "jpg": blobs}), tmp_path / "c.parquet", row_group_size=4
    )
    store = EmbeddingStore(tmp_path / "store")
    rep = run_embed(list_source(str(tmp_path / "c.parquet")), store, tiny_clip_spec, ACTORS, shard_size=10)
    assert rep.embedded == 5 and list(rep.skipped) == ["row4"]
    assert sorted(store.load_all()[1]) == ["row0", "row1", "row2", "row3", "row5"]


def test_s3_source_through_a_local_endpoint(ray_local, tiny_clip_spec, s3_server, tmp_path):
    import boto3
    import s3fs

    boto3.client(
        "s3",
        endpoint_url=s3_server["endpoint_url"],
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    ).create_bucket(Bucket="corpus-bucket")
    fs = s3fs.S3FileSystem(**s3_server)
    for i in range(5):
        b = io.BytesIO()
        make_image(i).save(b, format="PNG")
        fs.pipe(f"corpus-bucket/imgs/{i}.png", b.getvalue())
    fs.pipe("corpus-bucket/imgs/broken.png", b"\x89PNG broken")
    items = list_folder("s3://corpus-bucket/imgs", s3_server)
    assert [i.id for i in items] == ["0.png", "1.png", "2.png", "3.png", "4.png", "broken.png"]
    store = EmbeddingStore(tmp_path / "store")
    rep = run_embed(items, store, tiny_clip_spec, ACTORS, shard_size=3, storage_options=s3_server)
    assert rep.embedded == 5 and list(rep.skipped) == ["broken.png"]
    with pytest.raises(FileNotFoundError):
        list_folder("s3://corpus-bucket/nothing", s3_server)
    with pytest.raises(OSError, match="cannot list"):
        list_folder(
            "s3://no-such-bucket-xyz/imgs",
            dict(s3_server, key="wrong", secret="wrong", endpoint_url="http://127.0.0.1:9"),
        )


def test_cli_embed_build_index_search(ray_local, tiny_clip_dir, tmp_path, capsys):
    src = _folder(tmp_path / "src", 12)
    store, index = tmp_path / "store", tmp_path / "index"
    clip = f"local-dir:{tiny_clip_dir}"
    assert main(["embed", str(src), "--store", str(store), "--clip-model", clip, "--shard-size", "5"]) == 0
    report = json.loads((store / "embed_report.json").read_text())
    assert report["embedded"] == 12 and report["shards_committed"] == [0, 1, 2]
    job = json.loads((store / "job_report.json").read_text())  # the uniform job report
    assert job["job"] == "embed" and job["inputs"]["seen"] == 12 and job["inputs"]["processed"] == 12
    assert {s["name"] for s in job["stages"]} >= {"job", "image tower (per-image sum)"}
    assert main(["build-index", "--store", str(store), "--index", str(index)]) == 0
    job = json.loads((index / "job_report.json").read_text())
    assert job["job"] == "build-index" and job["inputs"]["processed"] == 12 and job["unit"] == "vectors"
    meta = json.loads((index / "index.json").read_text())
    assert meta["report"]["factory"] == "Flat" and meta["report"]["recall_at_10"] == 1.0
    capsys.readouterr()
    sheet = tmp_path / "sheet.png"
    assert (
        main(
            [
                "search",
                "a photo of a fire extinguisher",
                "-k",
                "5",
                "--index",
                str(index),
                "--contact-sheet",
                str(sheet),
            ]
        )
        == 0
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 6 and "top 5 of 12" in lines[0]
    faiss_hits = [ln.split()[2] for ln in lines[1:]]
    assert main(["search", "a photo of a fire extinguisher", "-k", "5", "--index", str(index), "--exact"]) == 0
    exact_hits = [ln.split()[2] for ln in capsys.readouterr().out.strip().splitlines()[1:]]
    assert faiss_hits == exact_hits
    from PIL import Image

    assert Image.open(sheet).size == (800, 176)


def test_killed_job_resumes_with_exactly_once_ids(tiny_clip_dir, tmp_path):
    """SIGKILL the embedding job part-way (a separate process with its own Ray), rerun it, and
    check every id is stored exactly once."""
    src = _folder(tmp_path / "src", 40)
    store = tmp_path / "store"
    cfg = tmp_path / "ray.yaml"
    cfg.write_text(
        "ray:\n  num_cpus: 2\n  object_store_memory_mb: 256\n"
        "embed:\n  num_actors: 1\n  cpus_per_actor: 0.5\n  batch_size: 2\n"
    )
    cmd = [
        sys.executable,
        "-m",
        "jobs.cli",
        "embed",
        str(src),
        "--store",
        str(store),
        "--clip-model",
        f"local-dir:{tiny_clip_dir}",
        "--shard-size",
        "4",
        "--ray-config",
        str(cfg),
    ]
    env = dict(
        os.environ,
        RECO_FAULT_HOOKS=str(REPO / "tests" / "fault_hooks.py"),
        RECO_TEST_EMBED_DELAY_S="0.3",
        PYTHONPATH=str(REPO),
    )
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    manifest = store / "manifest.json"
    deadline = time.time() + 180
    committed = 0
    try:
        while time.time() < deadline and proc.poll() is None:
            if manifest.is_file():
                try:
                    committed = len(json.loads(manifest.read_text())["shards"])
                except (json.JSONDecodeError, KeyError):
                    committed = 0
                if committed >= 2:
                    break
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    partial = EmbeddingStore(store)
    assert 2 <= len(partial.shards) < 10, "the job must have been killed part-way"
    done_before = partial.committed_ids()
    env.pop("RECO_TEST_EMBED_DELAY_S")
    rerun = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    final = EmbeddingStore(store)
    emb, ids, _ = final.load_all()
    assert sorted(ids) == sorted(i.id for i in list_folder(str(src)))
    assert len(ids) == len(set(ids)) == 40 and emb.shape == (40, 32)
    assert done_before <= set(ids)
    assert [s.index for s in final.shards] == list(range(len(final.shards)))


def test_device_decode_path_matches_the_cpu_decoder(ray_local, tiny_clip_spec, tmp_path):
    """The GPU-host path (bytes to the actor, torchvision/nvJPEG decode there) run on the CPU:
    same ids and skips as the PIL path, near-identical embeddings."""
    src = _folder(tmp_path / "src", 6, size=(64, 48))
    make_image(50, (30, 40)).save(src / "a.png")  # non-JPEG: falls back to PIL inside the actor
    bad = write_corrupt_files(src / "bad")
    items = list_folder(str(src))
    a, b = EmbeddingStore(tmp_path / "a"), EmbeddingStore(tmp_path / "b")
    ra = run_embed(items, a, tiny_clip_spec, ACTORS, shard_size=5)
    rb = run_embed(items, b, tiny_clip_spec, ACTORS, shard_size=5, device_decode=True)
    assert rb.embedded == ra.embedded == 7 and set(rb.skipped) == set(ra.skipped) == {f"bad/{p.name}" for p in bad}
    ea, ia, _ = a.load_all()
    eb, ib, _ = b.load_all()
    assert ia == ib
    cos = (ea * eb).sum(1)
    assert cos.min() > 0.98
    meta = {r["id"]: (r["width"], r["height"]) for r in b.shard_metadata(b.shards[0]).to_pylist()}
    assert meta["img_000.jpg"] == (64, 48)


def test_tensor_crop_matches_pil_crop():
    import torch

    from cluster.embed import _crop_tensor
    from reco.image import resize_center_crop

    img = make_image(3, (90, 60))
    pil = (resize_center_crop(img, 32) * 255).round()
    t = _crop_tensor(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1), 32).float()
    assert t.shape == (3, 32, 32)
    assert (pil - t).abs().mean() < 1.0  # grey levels; measured 0.16 (PIL vs torch antialiased bicubic)


# -- issue #8: transient failures, bad inputs, argument checks ---------------------------


def test_transient_failures_are_not_committed_and_a_rerun_picks_them_up(
    ray_local, tiny_clip_spec, tmp_path, monkeypatch
):
    """Files listed but unreadable at embed time (here: moved away, as on a node that lacks them)
    are retried, reported as transient and NOT committed; the group's other rows are; a rerun
    embeds them into a new shard. The old code committed them as 'skipped' for good."""
    monkeypatch.setenv("RECO_FETCH_ATTEMPTS", "2")
    monkeypatch.setenv("RECO_FETCH_BACKOFF_S", "0.01")
    src = _folder(tmp_path / "src", 9)
    (src / "bad.jpg").write_bytes(b"not an image")
    items = list_folder(str(src))  # 10 items in groups of 3: [0-2] [3-5] [6-8] [9]
    ids = [i.id for i in items]
    away = tmp_path / "away"
    away.mkdir()
    gone = [items[k] for k in (1, 3, 4, 5)]  # one row of group 0 and all of group 1
    for it in gone:
        os.rename(it.uri, away / it.id.replace("/", "_"))
    store = EmbeddingStore(tmp_path / "store")
    rep = run_embed(items, store, tiny_clip_spec, ACTORS, shard_size=3)
    assert store.committed_ids() == set(ids) - {it.id for it in gone}  # the old code: committed as skipped
    assert set(rep.skipped) == {"bad.jpg"} and rep.embedded == 5
    assert set(rep.failed_transient) == {it.id for it in gone}
    assert all(r.startswith("io: ") and "cannot read" in r for r in rep.failed_transient.values())
    assert rep.shards_committed == [0, 1, 2]  # the all-transient group commits nothing; indices stay contiguous
    assert rep.as_dict()["failed_transient_count"] == 4
    for it in gone:
        os.rename(away / it.id.replace("/", "_"), it.uri)
    rep2 = run_embed(items, store, tiny_clip_spec, ACTORS, shard_size=3)
    assert rep2.embedded == 4 and not rep2.failed_transient and rep2.already_done == 6
    assert rep2.shards_committed == [3, 4]
    final = EmbeddingStore(tmp_path / "store")
    _, stored, _ = final.load_all()
    assert sorted(stored) == sorted(set(ids) - {"bad.jpg"}) and len(stored) == len(set(stored))
    assert final.committed_ids() == set(ids) and set(final.skipped()) == {"bad.jpg"}


def _latin1_jpeg(folder, seed=5):
    buf = io.BytesIO()
    make_image(seed).save(buf, format="JPEG")
    fd = os.open(os.fsencode(folder) + b"/caf\xe9.jpg", os.O_CREAT | os.O_WRONLY, 0o644)
    os.write(fd, buf.getvalue())
    os.close(fd)


def test_cli_bad_inputs_are_skipped_with_reasons_and_transient_ones_exit_3(
    ray_local, tiny_clip_dir, tmp_path, monkeypatch, caplog
):
    """A folder of bad files through `reco embed`: a Latin-1 file name (crashed every run with
    UnicodeEncodeError), a broken symlink (silently dropped), a text file (reason named a BytesIO),
    plus a file missing at embed time (transient: exit 3, WARNING, rerun embeds it)."""
    monkeypatch.setenv("RECO_FETCH_ATTEMPTS", "2")
    monkeypatch.setenv("RECO_FETCH_BACKOFF_S", "0.01")
    src = _folder(tmp_path / "src", 4)
    _latin1_jpeg(src)
    os.symlink(src / "deleted_target.jpg", src / "dangling.jpg")
    (src / "notes.jpg").write_text("shopping list: milk, eggs\n")
    store = tmp_path / "store"
    argv = ["embed", str(src), "--store", str(store), "--clip-model", f"local-dir:{tiny_clip_dir}", "--shard-size", "3"]
    real_listing = list_source

    def listing_then_file_vanishes(*a, **kw):  # listed, then missing on the node that reads it
        items = real_listing(*a, **kw)
        os.rename(src / "img_000.jpg", tmp_path / "img_000.jpg")
        return items

    monkeypatch.setattr("index.sources.list_source", listing_then_file_vanishes)
    caplog.set_level(logging.INFO)
    assert main(argv) == 3
    report = json.loads((store / "embed_report.json").read_text())
    assert list(report["failed_transient"]) == ["img_000.jpg"] and report["failed_transient_count"] == 1
    assert any(r.levelno == logging.WARNING and "rerun" in r.getMessage() for r in caplog.records)
    skipped = EmbeddingStore(store).skipped()
    assert set(skipped) == {"caf%E9.jpg", "dangling.jpg", "notes.jpg"}
    assert "not valid UTF-8" in skipped["caf%E9.jpg"]
    assert "broken symlink" in skipped["dangling.jpg"]
    assert "notes.jpg: not an image" in skipped["notes.jpg"] and "BytesIO" not in skipped["notes.jpg"]
    assert EmbeddingStore(store).committed_ids() == {
        "sub/img_001.jpg",
        "img_002.jpg",
        "sub/img_003.jpg",
        "caf%E9.jpg",
        "dangling.jpg",
        "notes.jpg",
    }
    monkeypatch.setattr("index.sources.list_source", real_listing)
    os.rename(tmp_path / "img_000.jpg", src / "img_000.jpg")
    assert main(argv) == 0
    final = EmbeddingStore(store)
    assert sorted(final.load_all()[1]) == ["img_000.jpg", "img_002.jpg", "sub/img_001.jpg", "sub/img_003.jpg"]
    assert final.committed_ids() == {i.id for i in list_folder(str(src))}
    assert main(argv) == 0 and json.loads((store / "embed_report.json").read_text())["embedded"] == 0


def test_cli_refuses_bad_arguments_in_one_line_before_ray_starts(tiny_clip_dir, tmp_path, monkeypatch, caplog):
    import cluster.runtime

    def no_ray(*a, **kw):
        raise AssertionError("Ray must not start for a bad command line")

    monkeypatch.setattr(cluster.runtime, "init_ray", no_ray)
    src = _folder(tmp_path / "src", 2)
    clip = f"local-dir:{tiny_clip_dir}"
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    other = EmbeddingStore(tmp_path / "other_model")
    other.create_or_check({"clip_model": "ViT-B-16", "clip_weights": "/w.bin"}, 32)
    locked = EmbeddingStore(tmp_path / "locked")
    cases = [
        (["--store", str(a_file)], "is a file, not a directory"),
        (["--store", str(a_file / "store")], "is a file, not a directory"),
        (["--store", str(tmp_path / "s"), "--shard-size", "0"], "--shard-size must be >= 1"),
        (["--store", str(tmp_path / "other_model")], "refusing to add"),
        (["--store", str(tmp_path / "s"), "--ray-config", str(tmp_path / "missing.yaml")], "no such file"),
        (["--store", str(tmp_path / "locked")], "locked by another writer: job 'someone-else'"),
    ]

    def check(extra, message):
        caplog.clear()
        with caplog.at_level(logging.INFO):
            rc = main(["embed", str(src), "--clip-model", clip, *extra])
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert rc == 2 and len(errors) == 1 and message in errors[0], (extra, rc, errors)

    for extra, message in cases[:-1]:
        check(extra, message)
    with locked.writer(job="someone-else"):  # another job is writing this store
        check(*cases[-1])
    caplog.clear()
    assert main(["embed", str(src), "--store", str(tmp_path / "s"), "--clip-model", "local-dir:/no/such/clip"]) == 2
    assert "open_clip_config.json does not exist" in caplog.text
    assert not (tmp_path / "s" / "manifest.json").exists()


def test_ray_config_resolution(tmp_path, monkeypatch):
    from cluster import config as cc
    from reco.errors import ConfigError

    assert cc.resolve_cluster_config(None) == cc.load_cluster_config(REPO / "configs" / "cluster.yaml")
    assert cc.cluster_config_path(None) == REPO / "configs" / "cluster.yaml"
    with pytest.raises(ConfigError, match="cluster-launcher config"):  # ray_config.yaml is for `ray up`
        cc.resolve_cluster_config(str(REPO / "ray_config.yaml"))
    mine = tmp_path / "mine.yaml"
    mine.write_text("embed:\n  num_actors: 3\n")
    assert cc.resolve_cluster_config(str(mine)).embed.num_actors == 3
    with pytest.raises(ConfigError, match="no such file"):
        cc.resolve_cluster_config(str(tmp_path / "typo.yaml"))
    with pytest.raises(ConfigError, match="not a file"):
        cc.resolve_cluster_config(str(tmp_path))
    monkeypatch.setattr(cc, "DEFAULT_RAY_CONFIG", tmp_path / "absent.yaml")
    assert cc.resolve_cluster_config(None) == cc.ClusterConfig()
