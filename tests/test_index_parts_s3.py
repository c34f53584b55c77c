"""#17.2 on S3 (the moto server on 127.0.0.1): a store and an index URI on ``s3://``; Ray tasks
create the parts under the index URI exactly once, a rerun after a lost part redoes only that part,
the merged index read back from S3 holds every store row exactly once, and the parts kept as
shards are served by Ray actors with the same results as the merged index."""

import json
import secrets

import numpy as np
import pytest
from conftest import make_bucket
from test_faiss import clustered
from test_index_parts import ivf_ids

from cluster.index_build import build_index_parts
from cluster.index_config import IndexClusterConfig
from index import storage
from index.index_files import load_index
from index.store import EmbeddingStore

BUCKET = "reco-index-parts-test"


@pytest.fixture()
def s3(s3_server):
    """(an s3:// prefix holding a 2,000-row store of 4 shards, storage options, the store)."""
    make_bucket(s3_server, BUCKET)
    opts = dict(s3_server)
    base = f"s3://{BUCKET}/{secrets.token_hex(4)}"
    st = EmbeddingStore(f"{base}/store", storage_options=opts)
    st.create_or_check({"clip_model": "test"}, 32)
    x = clustered(2000, 32, seed=5)
    for i in range(4):
        rows = range(500 * i, 500 * (i + 1))
        st.commit_shard(
            i, [f"id{j}" for j in rows], [f"u{j}" for j in rows], x[rows.start : rows.stop], [1] * 500, [1] * 500
        )
    return base, opts, st


def _part_names(uri, opts):
    fs, path = storage.filesystem(uri, opts)
    return sorted(p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))


def test_parts_built_into_s3_exactly_once_and_a_lost_part_redone_alone(s3, ray_local):
    base, opts, st = s3
    out = f"{base}/ix"
    cfg = IndexClusterConfig(part_rows=1000, workers=2)
    rep = build_index_parts(st, out, "IVF16,Flat", cfg=cfg, num_queries=100, train_size=1500, storage_options=opts)
    assert rep.n == 2000 and rep.recall_at_10 >= 0.95
    index, meta = load_index(out, opts)
    assert meta["layout"] == "merged" and meta["build_stages"]["parts_written"] == 2
    names = _part_names(f"{out}/parts", opts)
    assert names == sorted(f"part-{p['name']}.faiss" for p in meta["parts"]) and len(names) == 2
    assert sorted(ivf_ids(index).tolist()) == list(range(2000))  # every store row exactly once

    fs, _ = storage.filesystem(out, opts)
    kept = fs.info(f"{out}/parts/{names[0]}".removeprefix("s3://"))
    fs.rm(f"{out}/parts/{names[1]}".removeprefix("s3://"))  # a build that died before this part
    build_index_parts(st, out, "IVF16,Flat", cfg=cfg, num_queries=100, train_size=1500, storage_options=opts)
    meta = json.loads(storage.read_bytes(f"{out}/index.json", opts))
    assert meta["build_stages"]["parts_written"] == 1 and meta["build_stages"]["parts_reused"] == 1
    fs.invalidate_cache()
    again = fs.info(f"{out}/parts/{names[0]}".removeprefix("s3://"))
    assert again["ETag"] == kept["ETag"] and again["LastModified"] == kept["LastModified"]  # not rewritten
    report = json.loads(storage.read_bytes(f"{out}/job_report.json", opts))
    assert report["inputs"]["processed"] == 1000 and report["inputs"]["already_done"] == 1000
    assert sorted(ivf_ids(load_index(out, opts)[0]).tolist()) == list(range(2000))


def test_parts_on_s3_served_as_shards_equal_the_merged_index(s3, ray_local):
    from cluster.retrieval import open_index
    from index import parts as P

    base, opts, st = s3
    out = f"{base}/ix"
    cfg = IndexClusterConfig(part_rows=500, layout="shards")
    build_index_parts(
        st, out, "IVF16,PQ8", cfg=cfg, num_queries=100, train_size=1500, allow_low_recall=True, storage_options=opts
    )
    assert not storage.exists(f"{out}/index.faiss", opts)
    meta = json.loads(storage.read_bytes(f"{out}/index.json", opts))
    assert len(meta["parts"]) == 4 and meta["layout"] == "shards"
    merged = P.merge_parts(
        storage.read_bytes(f"{out}/trained.faiss", opts),
        None,
        [(storage.read_bytes(f"{out}/parts/part-{p['name']}.faiss", opts), None) for p in meta["parts"]],
    )
    merged.nprobe = meta["report"]["search_params"]["nprobe"]
    q = clustered(40, 32, seed=23)
    want_s, want_r = merged.search(q, 10)
    retriever, _, _ = open_index(out, storage_options=opts, serve_actors=2)
    try:
        got = retriever.search(q, 10)
    finally:
        retriever.close()
    for g, ws, wr in zip(got, want_s, want_r):
        assert g.rows.tolist() == wr.tolist()
        np.testing.assert_allclose(g.scores, ws, rtol=1e-6)
