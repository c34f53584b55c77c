"""#17.1: exact retrieval for a vocabulary in one Ray Data pass over the store, equal to ExactRetriever
(ids and scores), ties included, fewer rows than k, 1,000 concepts; the bf16 GPU path's re-check."""

import numpy as np
import pytest
from test_faiss import clustered

from index import topk
from index.retriever import ExactRetriever
from index.store import EmbeddingStore


def store_of(root, x, sizes, model=None):
    st = EmbeddingStore(root)
    st.create_or_check(model or {"clip_model": "test"}, x.shape[1])
    a = 0
    for i, n in enumerate(sizes):
        rows = range(a, a + n)
        st.commit_shard(i, [f"id{j}" for j in rows], [f"u{j}" for j in rows], x[a : a + n], [1] * n, [1] * n)
        a += n
    assert a == len(x)
    return st


def assert_same_as_exact(store, queries, k):
    from cluster.retrieval import StoreExactRetriever

    emb, ids, _ = store.load_all()
    want = ExactRetriever(emb, ids, block=97).search(queries, k)
    r = StoreExactRetriever(store)
    got = r.search(queries, k)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.ids == w.ids
        np.testing.assert_allclose(g.scores, w.scores, rtol=0, atol=1e-6)
    assert r.last_stats.shards == len([s for s in store.shards if s.count])
    return got


def test_exact_pass_equals_exact_retriever(tmp_path, ray_local):
    x = clustered(2500, 32, seed=3)
    st = store_of(tmp_path / "s", x, [700, 1, 999, 800])
    q = clustered(9, 32, seed=4)
    assert_same_as_exact(st, q, 17)


def test_exact_pass_ties_break_to_the_lower_row(tmp_path, ray_local):
    # one-hot vectors: scores are exactly 0 or 1 in any summation order, so there are many exact ties
    rng = np.random.default_rng(0)
    x = np.eye(8, dtype=np.float32)[rng.integers(0, 8, 300)]
    st = store_of(tmp_path / "s", x, [100, 50, 150])
    q = np.eye(8, dtype=np.float32)[:5]
    got = assert_same_as_exact(st, q, 12)
    rows = np.flatnonzero(x[:, 0] == 1)[:12]
    assert [int(v) for v in got[0].rows] == rows.tolist()  # the 12 lowest rows among the tied ones
    assert (got[0].scores == 1).all()


def test_exact_pass_with_fewer_images_than_k(tmp_path, ray_local):
    x = clustered(6, 16, seed=5)
    st = store_of(tmp_path / "s", x, [4, 2])
    got = assert_same_as_exact(st, clustered(3, 16, seed=6), 10)
    assert all(len(g.ids) == 6 for g in got)


def test_exact_pass_with_1000_concepts(tmp_path, ray_local):
    x = clustered(3000, 64, seed=7)
    st = store_of(tmp_path / "s", x, [1000, 1000, 1000])
    got = assert_same_as_exact(st, clustered(1000, 64, seed=8), 20)
    assert len(got) == 1000 and all(len(g.ids) == 20 for g in got)


def test_exact_pass_rejects_queries_of_another_width(tmp_path, ray_local):
    from cluster.retrieval import exact_search_store

    st = store_of(tmp_path / "s", clustered(10, 16), [10])
    with pytest.raises(ValueError, match="dimension 32"):
        exact_search_store(st, clustered(2, 32), 5)


def test_select_keeps_every_tie_at_the_boundary():
    s = np.array([[0.5, 0.9, 0.5, 0.5, 0.1, 0.5]], np.float32)
    sc, r = topk.select(s, 100, 3)
    assert r.tolist() == [[101, 100, 102]] and sc.tolist() == [[pytest.approx(0.9), 0.5, 0.5]]
    # merging partial lists in any order gives the same list
    a, b = topk.select(s[:, :3], 100, 3), topk.select(s[:, 3:], 103, 3)
    for m in (topk.merge(a, b, 3), topk.merge(b, a, 3)):
        assert m[1].tolist() == r.tolist()


def test_bf16_path_rechecks_in_float32_and_equals_the_float32_path():
    pytest.importorskip("torch")
    # near-duplicates: bf16 scores cannot tell them apart, the float32 re-check must
    base = clustered(200, 64, seed=9)
    x = np.concatenate([base, base + 1e-3 * np.random.default_rng(1).normal(size=base.shape)]).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = clustered(40, 64, seed=10)
    want = topk.block_topk(q, x, 5, 25)
    got = topk.block_topk(q, x, 5, 25, device="cpu")
    assert (got[1] == want[1]).all()
    np.testing.assert_allclose(got[0], want[0], atol=1e-6)
    import torch

    bf16 = (torch.tensor(q).bfloat16() @ torch.tensor(x).bfloat16().T).float()
    bf16_rows = torch.topk(bf16, 25, dim=1).indices.numpy() + 5
    assert (np.sort(bf16_rows, 1) != np.sort(want[1], 1)).any()  # bf16 alone would get some wrong
