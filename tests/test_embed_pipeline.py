"""Issue #9 item 7 (pipeline efficiency): the embedding actor's input path, its per-batch
profile, and whole-batch blocks (no short batches between full ones)."""

import platform

import numpy as np
import pytest
import torch
from conftest import make_image

from cluster.datamap import aligned_blocks
from cluster.embed import ClipEmbedUDF, crop_uint8


@pytest.mark.parametrize("size", [(90, 60), (60, 90), (224, 224), (31, 17), (500, 375)])
def test_uint8_crop_is_the_float_crop_rounded(size):
    """The decode stage skips resize_center_crop's float round trip: same pixels, bit for bit."""
    from reco.image import resize_center_crop

    img = make_image(7, size)
    ref = (resize_center_crop(img, 32) * 255.0).round().byte().permute(1, 2, 0).numpy()
    out = crop_uint8(img, 32)
    assert out.dtype == np.uint8 and out.shape == (32, 32, 3)
    assert np.array_equal(out, ref)


@pytest.mark.parametrize("n,bs", [(1000, 32), (320, 32), (7, 4), (3, 8), (100_000, 16), (1, 1)])
def test_blocks_hold_whole_batches(n, bs):
    rows = [{"id": str(i), "uri": f"u{i}", "group": i // 50, "problem": ""} for i in range(n)]
    blocks = aligned_blocks(rows, bs, max_blocks=512)
    sizes = [b.num_rows for b in blocks]
    assert sum(sizes) == n and len(blocks) <= 512
    assert all(s % bs == 0 for s in sizes[:-1]), sizes[:5]  # only the last block may hold a short batch
    assert [r for b in blocks for r in b.column("id").to_pylist()] == [r["id"] for r in rows]


@pytest.fixture(scope="module")
def udf(tiny_clip_spec):
    import ctypes

    threads = torch.get_num_threads()
    yield ClipEmbedUDF(tiny_clip_spec, threads=1, warmup_batch=2)
    torch.set_num_threads(threads)  # the actor sets process-wide state: give this test process its own back
    if platform.libc_ver()[0] == "glibc":
        mallopt = ctypes.CDLL(None).mallopt
        mallopt(-4, 65536)  # M_MMAP_MAX: glibc's default
        mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD: glibc's default


def _batch(pixels, status):
    n = len(status)
    return {
        "id": np.array([f"i{k}" for k in range(n)], dtype=object),
        "uri": np.array(["u"] * n, dtype=object),
        "group": np.zeros(n, np.int64),
        "width": np.ones(n, np.int32),
        "height": np.ones(n, np.int32),
        "status": np.array(status, dtype=object),
        "error": np.array([""] * n, dtype=object),
        "decode_s": np.zeros(n),
        "pixels": pixels,
    }


def test_fused_input_matches_the_model_normalisation(udf):
    rng = np.random.default_rng(0)
    s = udf.clip.image_size
    px = rng.integers(0, 256, (3, s, s, 3), dtype=np.uint8)
    ref = udf.clip.normalize(torch.from_numpy(px).permute(0, 3, 1, 2).float().div(255.0)).to(udf.dtype)
    x = udf._to_input(px)
    assert x.is_contiguous() and x.dtype == udf.dtype and x.shape == ref.shape
    assert torch.allclose(x.float(), ref.float(), atol=1e-5)
    with torch.inference_mode():
        want = udf.clip.encode_image(ref).numpy()
    assert np.allclose(udf._embed(px)[0], want, atol=1e-5)


def test_actor_reports_its_time_split_and_handles_skipped_rows(udf):
    s = udf.clip.image_size
    px = np.random.default_rng(1).integers(0, 256, (4, s, s, 3), dtype=np.uint8)
    full = udf(_batch(px, ["ok"] * 4))
    part = udf(_batch(px, ["ok", "skipped", "ok", "transient"]))
    assert np.allclose(part["embedding"][[0, 2]], full["embedding"][[0, 2]], atol=1e-5)
    assert not part["embedding"][[1, 3]].any()
    for out in (full, part):
        assert (out["forward_s"] > 0).all() and (out["input_s"] >= 0).all() and (out["output_s"] >= 0).all()
        assert np.allclose(out["model_s"], out["model_s"][0])
        assert (out["model_s"] >= out["input_s"] + out["forward_s"] + out["output_s"] - 1e-9).all()
        assert (out["batch_rows"] == 4).all() and (out["torch_threads"] == 1).all()
    assert udf.warmup_s > 0
    assert udf.malloc_tuned == (platform.libc_ver()[0] == "glibc")  # a CPU actor keeps freed memory
    none = udf(_batch(px[:2], ["skipped", "skipped"]))
    assert not none["embedding"].any() and (none["forward_s"] == 0).all()


@pytest.mark.slow
def test_run_embed_gives_the_actor_whole_batches(ray_local, tiny_clip_spec, tmp_path):
    from cluster.config import ActorConfig
    from cluster.embed import run_embed
    from index.sources import list_folder
    from index.store import EmbeddingStore

    src = tmp_path / "src"
    src.mkdir()
    for i in range(11):
        make_image(i, (40, 30)).save(src / f"img_{i:03d}.jpg")
    rep = run_embed(
        list_folder(str(src)),
        EmbeddingStore(tmp_path / "store"),
        tiny_clip_spec,
        ActorConfig(num_actors=1, cpus_per_actor=0.5, batch_size=4),
        shard_size=5,
    )
    assert rep.embedded == 11
    assert rep.batch_sizes == {3: 1, 4: 2}  # from_items(override_num_blocks=2) gave 4 + 2, 4 + 1
    assert rep.actor_torch_threads >= 1 and rep.actor_warmup_seconds > 0
    assert 0 < rep.forward_seconds_per_image <= rep.model_seconds_per_image
    assert rep.steady_images_per_second > 0
