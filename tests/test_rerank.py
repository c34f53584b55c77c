"""#17.4: PQ proposes k x k_factor candidates, their float16 vectors are read back from the store
(memory map locally, coalesced ranged reads on S3) and re-ranked exactly; the index holds only
PQ codes; the re-rank I/O per query is reported."""

import secrets

import numpy as np
import pytest
from test_exact_pass import store_of
from test_faiss import clustered

from index import faiss_factory as ff
from index.catalog import build_index_dir, open_retriever
from index.rerank import StoreRows
from index.retriever import ExactRetriever


@pytest.fixture()
def store(tmp_path):
    return store_of(tmp_path / "s", clustered(5000, 32, seed=31), [1200, 1800, 2000])


def test_chooser_keeps_only_pq_codes_in_ram_when_refine_codes_do_not_fit():
    # 10M x 512 at 2 GiB and 1B x 768 at 64 GiB were refused; now the store re-ranks
    for n, d, gib in ((10_000_000, 512, 2), (1_000_000_000, 768, 64)):
        f = ff.choose_factory(n, d, gib << 30)
        assert f.endswith(",Refine(store)") and ",PQ" in f, f
        assert ff.estimate_index_bytes(f, n, d) <= gib << 30
    assert ff.choose_factory(1_000_000, 512, 3 << 29).endswith("Refine(SQfp16)")  # in RAM when it fits
    with pytest.raises(ValueError, match="GiB"):
        ff.choose_factory(1_000_000_000, 768, 64 << 30, store_rerank=False)


def test_store_rerank_reaches_the_target_with_only_pq_codes(store, tmp_path):
    rep = build_index_dir(store, tmp_path / "ix", "IVF16,PQ8x4,Refine(store)", num_queries=200, train_size=3000)
    in_ram = build_index_dir(store, tmp_path / "ram", "IVF16,PQ8x4,Refine(SQfp16)", num_queries=200, train_size=3000)
    assert rep.recall_at_10 >= 0.95 and rep.search_params["k_factor"] > 1
    assert rep.index_bytes < in_ram.index_bytes - 5000 * 32 * 2 * 0.9  # no 2 bytes/dim per vector in RAM
    kf = rep.search_params["k_factor"]
    assert 0 < rep.rerank_bytes_per_query <= (rep.k + 1) * kf * 32 * 2
    retriever, _, meta = open_retriever(tmp_path / "ix")
    assert type(retriever.index).__name__ == "StoreRefine" and retriever.index.k_factor == kf
    emb, ids, _ = store.load_all()
    rng = np.random.default_rng(32)
    q = emb[rng.choice(len(emb), 30, replace=False)] + 0.05 * rng.normal(size=(30, 32)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    exact = ExactRetriever(emb, ids).search(q, 10)
    got = retriever.search(q, 10)
    hits = np.mean([len(set(g.ids) & set(e.ids)) / 10 for g, e in zip(got, exact)])
    assert hits >= 0.9
    for g in got:  # scores are exact inner products with the stored float16 vectors
        np.testing.assert_allclose(g.scores, emb[g.rows] @ q[got.index(g)], atol=1e-5)


def test_store_rows_ranged_reads_on_s3_match_local(store, s3_server):
    from conftest import make_bucket

    from index.store import EmbeddingStore

    root = f"{make_bucket(s3_server, 'rerank')}/{secrets.token_hex(4)}/store"
    x, _, _ = store.load_all()
    remote = EmbeddingStore(root, storage_options=dict(s3_server))
    remote.create_or_check({"clip_model": "test"}, 32)
    a = 0
    for s in store.shards:
        rows = range(a, a + s.count)
        remote.commit_shard(
            s.index, [f"id{j}" for j in rows], ["u"] * s.count, x[a : a + s.count], [1] * s.count, [1] * s.count
        )
        a += s.count
    rows = np.array([4999, 3, 4, 5, 1200, 1201, 2999, 3000, 17, 4], np.int64)
    local, ranged = StoreRows(store), StoreRows(remote)
    np.testing.assert_array_equal(ranged.take(rows), local.take(rows))
    np.testing.assert_array_equal(ranged.take(rows), x[rows])
    # 3..5 coalesce into one range (4 twice is read once), 17; 1200/1201 into one, 2999; 3000; 4999: 6 GETs
    assert ranged.requests == 2 * 6


def test_store_rows_take_any_order_and_the_rerank_scores(store):
    """take: sorted rows (the re-rank's unique candidates), any order with repeats, across shard
    edges, one clear error out of range; the re-rank's scores are q . x[candidate] in float32."""
    from index.rerank import StoreRefine, inner_products_by_idx

    x, _, _ = store.load_all()
    rows = StoreRows(store)
    for sel in ([0, 1199, 1200, 2999, 3000, 4999], [4999, 3, 1200, 3, 1199, 0], []):
        sel = np.array(sel, np.int64)
        np.testing.assert_array_equal(rows.take(sel), x[sel].astype(np.float32))
    for bad in ([5000], [-1, 3]):
        with pytest.raises(IndexError, match="store rows out of range"):
            rows.take(np.array(bad))
    q = clustered(7, 32, seed=2)
    pos = np.random.default_rng(0).integers(0, len(x), size=(7, 40))
    np.testing.assert_allclose(
        inner_products_by_idx(q, x.astype(np.float32), pos),
        np.einsum("qe,qke->qk", q, x[pos].astype(np.float32)),
        atol=1e-5,
    )

    class Proposals:  # a base index proposing fixed candidates (-1: none)
        def search(self, qq, kk):
            cand = np.where(np.arange(kk) < kk - 3, pos[:, :kk], -1)
            return np.zeros(cand.shape, np.float32), cand

    scores, ids = StoreRefine(Proposals(), rows, k_factor=4).search(q, 10)
    exact = np.einsum("qe,qke->qk", q, x[pos[:, :37]].astype(np.float32))
    best = np.argsort(-exact, axis=1, kind="stable")[:, :10]
    np.testing.assert_allclose(scores, np.take_along_axis(exact, best, 1), atol=1e-5)
    np.testing.assert_array_equal(np.sort(ids, 1), np.sort(np.take_along_axis(pos[:, :37], best, 1), 1))
