"""index/: sources, embedding store, FAISS vs exact retrieval."""

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import make_image

from index.faiss_index import FaissRetriever, build_index, choose_factory, load_index, recall_at, save_index
from index.retriever import ExactRetriever
from index.sources import ParquetRowReader, fetch_bytes, list_folder, list_parquet, list_source
from index.store import EmbeddingStore, StoreError


def _png(seed, size=(40, 30)) -> bytes:
    b = io.BytesIO()
    make_image(seed, size).save(b, format="PNG")
    return b.getvalue()


def clustered(n, dim, clusters=50, noise=0.3, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    x = centres[rng.integers(0, clusters, n)] + noise * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


# -- sources -----------------------------------------------------------------------------


def test_folder_listing_is_recursive_sorted_and_filtered(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "x.JPG").write_bytes(_png(1))
    (tmp_path / "y.png").write_bytes(_png(2))
    (tmp_path / "notes.txt").write_text("not an image")
    items = list_folder(str(tmp_path))
    assert [i.id for i in items] == ["a/b/x.JPG", "y.png"]
    assert fetch_bytes(items[1].uri) == (tmp_path / "y.png").read_bytes()
    with pytest.raises(FileNotFoundError):
        list_folder(str(tmp_path / "missing"))


def test_parquet_with_bytes_struct_and_paths(tmp_path):
    imgs = [_png(i) for i in range(5)]
    pq.write_table(
        pa.table({"key": [f"k{i}" for i in range(5)], "image": imgs}), tmp_path / "a.parquet", row_group_size=2
    )
    struct = pa.array(
        [{"bytes": b, "path": None} for b in imgs[:2]], pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    )
    pq.write_table(pa.table({"image": struct}), tmp_path / "b.parquet")
    items = list_parquet(str(tmp_path))
    ids = [i.id for i in items]
    assert ids == sorted(["b.parquet#0", "b.parquet#1"] + [f"k{i}" for i in range(5)])
    reader = ParquetRowReader()
    by_id = {i.id: i for i in items}
    assert fetch_bytes(by_id["k3"].uri, parquet=reader) == imgs[3]
    assert fetch_bytes(by_id["b.parquet#1"].uri, parquet=reader) == imgs[1]
    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    (img_dir / "p.png").write_bytes(imgs[0])
    pq.write_table(pa.table({"path": [str(img_dir / "p.png")]}), tmp_path / "paths.parquet")
    it = list_parquet(str(tmp_path / "paths.parquet"))
    assert it[0].uri == str(img_dir / "p.png") and it[0].id == "paths.parquet#0"
    assert list_source(str(tmp_path / "paths.parquet"))[0].uri == it[0].uri


def test_parquet_errors(tmp_path):
    pq.write_table(pa.table({"caption": ["x"]}), tmp_path / "c.parquet")
    with pytest.raises(ValueError, match="no image column"):
        list_parquet(str(tmp_path / "c.parquet"))
    pq.write_table(pa.table({"id": ["a", "a"], "image": [b"1", b"2"]}), tmp_path / "d.parquet")
    with pytest.raises(ValueError, match="duplicate ids"):
        list_parquet(str(tmp_path / "d.parquet"))
    with pytest.raises(FileNotFoundError):
        list_parquet(str(tmp_path / "nothing_here"))


# -- store -------------------------------------------------------------------------------


def test_store_commits_normalised_float16_shards(tmp_path):
    st = EmbeddingStore(tmp_path / "s")
    st.create_or_check({"clip_model": "m"}, 4)
    st.commit_shard(
        0,
        ["a", "b"],
        ["ua", "ub"],
        np.array([[3.0, 0, 0, 4], [0, 2, 0, 0]]),
        [10, 20],
        [5, 6],
        skipped=[("c", "uc", "decode: bad")],
    )
    st.commit_shard(1, ["d"], ["ud"], np.array([[1.0, 1, 1, 1]]), [1], [1])
    assert len(st) == 3 and st.manifest()["skipped"] == 1
    e = st.shard_embeddings(st.shards[0])
    assert e.dtype == np.float16 and np.allclose(np.linalg.norm(e.astype(np.float32), axis=1), 1, atol=1e-3)
    meta = st.shard_metadata(st.shards[0]).to_pydict()
    assert meta["id"] == ["a", "b"] and meta["width"] == [10, 20] and meta["shard"] == [0, 0] and meta["row"] == [0, 1]
    assert st.committed_ids() == {"a", "b", "c", "d"}
    assert st.skipped() == {"c": "decode: bad"}
    emb, ids, uris = EmbeddingStore(tmp_path / "s").load_all()
    assert emb.shape == (3, 4) and ids == ["a", "b", "d"] and uris == ["ua", "ub", "ud"]
    with pytest.raises(StoreError, match="already committed"):
        st.commit_shard(1, ["z"], ["uz"], np.ones((1, 4)), [1], [1])
    with pytest.raises(StoreError, match="refusing"):
        EmbeddingStore(tmp_path / "s").create_or_check({"clip_model": "other"}, 4)


def test_store_ignores_files_not_in_the_manifest(tmp_path):
    """A crash after writing a shard's files but before the manifest: the shard is not committed."""
    st = EmbeddingStore(tmp_path / "s")
    st.create_or_check({"clip_model": "m"}, 2)
    st.commit_shard(0, ["a"], ["ua"], np.ones((1, 2)), [1], [1])
    np.save(tmp_path / "s" / "img_emb" / "img_emb_00001.npy", np.ones((5, 2), np.float16))
    (tmp_path / "s" / "manifest.json.tmp").write_text("{half")
    st2 = EmbeddingStore(tmp_path / "s")
    assert len(st2) == 1 and st2.next_shard_index() == 1 and st2.committed_ids() == {"a"}
    st2.commit_shard(1, ["b"], ["ub"], np.ones((1, 2)), [1], [1])  # overwrites the orphan
    assert st2.load_all()[0].shape == (2, 2)
    with pytest.raises(StoreError, match="not an embedding store"):
        EmbeddingStore(tmp_path / "nope").manifest()


# -- FAISS -------------------------------------------------------------------------------


def test_choose_factory_by_size_and_budget():
    assert choose_factory(50_000, 512) == "Flat"
    assert choose_factory(1_000_000, 512) == "IVF4096,Flat"
    assert choose_factory(1_000_000, 512, 1 << 30).startswith("OPQ64,IVF")
    assert choose_factory(5_000_000, 512, 32 << 30).startswith("IVF") and choose_factory(
        5_000_000, 512, 32 << 30
    ).endswith(",Flat")
    assert "_HNSW32" in choose_factory(200_000_000, 768, 256 << 30)
    assert choose_factory(1_000_000, 512, 1 << 30).endswith(",Refine(SQ8)")  # PQ is always re-ranked
    with pytest.raises(ValueError):
        choose_factory(10**9, 512, 1 << 30)


def test_flat_faiss_agrees_exactly_with_exact_search():
    x = clustered(3000, 32)
    q = clustered(20, 32, seed=1)
    index, rep = build_index(x, "Flat", num_queries=100)
    assert rep.recall_at_1 == 1.0 and rep.recall_at_10 == 1.0
    ids = [f"id{i}" for i in range(len(x))]
    f = FaissRetriever(index, ids).search(q, 10)
    e = ExactRetriever(x, ids, block=700).search(q, 10)
    for a, b in zip(f, e):
        assert a.ids == b.ids
        assert np.allclose(a.scores, b.scores, atol=1e-5)


@pytest.mark.parametrize("factory", ["HNSW32,Flat", "IVF64,Flat"])
def test_approximate_indexes_reach_target_recall(factory):
    x = clustered(5000, 32)
    index, rep = build_index(x, factory, target_recall=0.95, num_queries=200)
    assert rep.recall_at_10 >= 0.95
    assert rep.search_params
    ids = [str(i) for i in range(len(x))]
    q = x[:50] + 0.01
    found = np.stack([r.rows for r in FaissRetriever(index, ids).search(q, 10)])
    truth = np.stack([r.rows for r in ExactRetriever(x, ids).search(q, 10)])
    assert recall_at(found, truth, 10) >= 0.9


def test_index_round_trip_keeps_results_and_search_params(tmp_path):
    x = clustered(4000, 16)
    index, rep = build_index(x, "IVF32,Flat", num_queries=100)
    save_index(index, rep, tmp_path / "ix", {"note": "t"})
    back, meta = load_index(tmp_path / "ix")
    assert meta["report"]["factory"] == "IVF32,Flat" and meta["note"] == "t"
    q = x[:10]
    assert np.array_equal(index.search(q, 5)[1], back.search(q, 5)[1])
    with pytest.raises(ValueError, match="ids"):
        FaissRetriever(back, ["only-one"])
    with pytest.raises(FileNotFoundError, match="build-index"):
        load_index(tmp_path / "missing")
