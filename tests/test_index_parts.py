"""#17.2 / #17.6: an IVF index built by Ray tasks in parts sharing one trained quantiser, written
exactly once (a rerun redoes only missing parts), merged in RAM / on disk or kept as shards, and
updated with the shards committed since."""

import json

import numpy as np
import pytest
from test_exact_pass import store_of
from test_faiss import clustered

from cluster.index_build import build_index_parts
from cluster.index_config import IndexClusterConfig
from index.faiss_index import load_index
from reco.errors import ConfigError


def ivf_ids(index):
    """Every id held by the inverted lists of an IVF index (or of the IVF inside a transform)."""
    import faiss

    ivf = faiss.extract_index_ivf(index)
    inv = ivf.invlists
    out = []
    for li in range(ivf.nlist):
        n = inv.list_size(li)
        if n:
            out.append(faiss.rev_swig_ptr(inv.get_ids(li), n).copy())
    return np.concatenate(out)


@pytest.fixture()
def store(tmp_path):
    return store_of(tmp_path / "s", clustered(3000, 32, seed=11), [500] * 6)


def _parts(out):
    return sorted(p.name for p in (out / "parts").iterdir())


def test_parts_merged_hold_every_row_once_and_resume_redoes_only_missing(store, tmp_path, ray_local):
    out = tmp_path / "ix"
    cfg = IndexClusterConfig(part_rows=1000, workers=2)
    rep = build_index_parts(store, str(out), "IVF16,Flat", cfg=cfg, num_queries=100, train_size=1500)
    assert rep.n == 3000 and rep.recall_at_10 >= 0.95
    index, meta = load_index(out)
    ids = ivf_ids(index)
    assert sorted(ids.tolist()) == list(range(3000))  # every store row exactly once
    assert len(meta["parts"]) == 3 and meta["layout"] == "merged"
    assert meta["build_stages"]["parts_written"] == 3
    # peak memory of the Ray tasks is reported (bench/results/index_scale.md: flat in corpus size)
    assert meta["build_stages"]["part_peak_rss"] > 0 and meta["build_stages"]["train_peak_rss"] > 0
    names = _parts(out)
    assert len(names) == 3 and all(n.startswith("part-") for n in names)
    kept = {n: (out / "parts" / n).stat().st_mtime_ns for n in names}
    (out / "parts" / names[1]).unlink()  # a build killed before this part was written
    build_index_parts(store, str(out), "IVF16,Flat", cfg=cfg, num_queries=100, train_size=1500)
    meta = json.loads((out / "index.json").read_text())
    assert meta["build_stages"]["parts_written"] == 1 and meta["build_stages"]["parts_reused"] == 2
    report = json.loads((out / "job_report.json").read_text())  # the uniform job report beside the index
    assert report["job"] == "build-index" and report["status"] == "ok" and report["unit"] == "vectors"
    assert report["inputs"]["processed"] == 1000 and report["inputs"]["already_done"] == 2000
    assert report["extra"]["parts_written"] == 1 and report["extra"]["parts_reused"] == 2
    assert report["peak_memory_bytes"]["part task (largest)"]["rss"] > 0
    for n in (names[0], names[2]):
        assert (out / "parts" / n).stat().st_mtime_ns == kept[n]
    assert sorted(ivf_ids(load_index(out)[0]).tolist()) == list(range(3000))


def test_parts_with_refine_codes_and_opq_reach_the_target(store, tmp_path, ray_local):
    out = tmp_path / "ix"
    rep = build_index_parts(
        store,
        str(out),
        "OPQ8,IVF16,PQ8x4,Refine(SQfp16)",
        num_queries=100,
        train_size=2000,
        cfg=IndexClusterConfig(part_rows=1500),
    )
    assert rep.recall_at_10 >= 0.95 and rep.search_params["k_factor"] >= 1
    index, meta = load_index(out)
    assert index.ntotal == 3000 and len(meta["parts"]) == 2


def test_ondisk_layout_searches_like_the_merged_index(store, tmp_path, ray_local):
    cfg = IndexClusterConfig(part_rows=1000)
    build_index_parts(store, str(tmp_path / "m"), "IVF16,Flat", cfg=cfg, num_queries=50, train_size=1500)
    build_index_parts(
        store,
        str(tmp_path / "d"),
        "IVF16,Flat",
        num_queries=50,
        train_size=1500,
        cfg=IndexClusterConfig(part_rows=1000, layout="ondisk"),
    )
    assert (tmp_path / "d" / "index.ivfdata").stat().st_size > 0
    merged, _ = load_index(tmp_path / "m")
    ondisk, meta = load_index(tmp_path / "d")
    import faiss

    lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(ondisk).invlists)
    assert meta["layout"] == "ondisk" and isinstance(lists, faiss.OnDiskInvertedLists)
    assert (tmp_path / "d" / "index.faiss").stat().st_size < (tmp_path / "d" / "index.ivfdata").stat().st_size
    q = clustered(20, 32, seed=12)
    for ix in (merged, ondisk):
        ix.nprobe = 4
    dm, im = merged.search(q, 10)
    dd, idd = ondisk.search(q, 10)
    assert (im == idd).all() and np.allclose(dm, dd)


def test_update_adds_new_shards_as_new_parts_and_refuses_replaced_ones(store, tmp_path, ray_local):
    out = tmp_path / "ix"
    cfg = IndexClusterConfig(part_rows=1000)
    build_index_parts(store, str(out), "IVF16,Flat", cfg=cfg, num_queries=50, train_size=1500)
    before = set(_parts(out))
    x = clustered(700, 32, seed=13)
    for i, (a, b) in enumerate([(0, 400), (400, 700)]):
        rows = range(3000 + a, 3000 + b)
        store.commit_shard(
            6 + i, [f"id{j}" for j in rows], [f"u{j}" for j in rows], x[a:b], [1] * (b - a), [1] * (b - a)
        )
    rep = build_index_parts(store, str(out), cfg=cfg, num_queries=50, update=True)
    assert rep.n == 3700
    after = set(_parts(out))
    assert before < after and len(after - before) == 1  # 700 new rows: one new part of whole shards
    index, meta = load_index(out)
    assert sorted(ivf_ids(index).tolist()) == list(range(3700))
    assert meta["build_stages"]["parts_written"] == 1
    # a replaced indexed shard: rebuild, one line
    m = json.loads((store.root / "manifest.json").read_text())
    m["shards"][0]["token"] = "deadbeef"
    (store.root / "manifest.json").write_text(json.dumps(m))
    from index.store import EmbeddingStore

    with pytest.raises(ConfigError, match="removed or replaced .* rebuild"):
        build_index_parts(EmbeddingStore(store.root), str(out), cfg=cfg, update=True)


@pytest.mark.parametrize("layout", ["ondisk", "merged"])
def test_fast_scan_is_refused_except_as_shards_before_any_part(store, tmp_path, layout):
    """merge_ondisk cannot write fast-scan's blocked codes (FAISS fails deep in
    merge_from_multiple) and merge_from of fast-scan lists corrupted the heap at 7-8M rows (faiss
    1.15.1, bench/results/index_scale_fastscan.md): one line before any work; shards are built."""
    with pytest.raises(ConfigError, match=f"layout {layout} cannot hold the fast-scan PQ.*layout shards"):
        build_index_parts(store, str(tmp_path / "d"), "IVF16,PQ16x4fs", cfg=IndexClusterConfig(layout=layout))
    assert not (tmp_path / "d").exists()


def test_small_fast_scan_parts_are_warned_about():
    """Fast-scan shards whose lists hold < 1024 codes on average search slower than the same rows
    in fewer parts (every part visits every probed list: 8.6 vs 6.5 ms per query for 20 vs 4 parts
    at 10M): the build says so."""
    from index.parts import PartPlan, small_fast_scan_parts

    def plans(*rows):
        return [PartPlan(f"p{i}", (), sum(rows[:i]), r) for i, r in enumerate(rows)]

    msg = small_fast_scan_parts("IVF2048,PQ256x4fs,Refine(store)", "shards", plans(*[500_000] * 20))
    assert msg is not None and "the 20 fast-scan parts hold 244 codes" in msg and "at least 2097152" in msg
    assert small_fast_scan_parts("IVF2048,PQ256x4fs", "shards", plans(2_500_000, 2_500_000, 300_000)) is None
    assert small_fast_scan_parts("IVF2048,PQ256x4fs", "shards", plans(50_000)) is None  # one shard
    assert small_fast_scan_parts("IVF2048,PQ64,Refine(store)", "shards", plans(50_000, 50_000)) is None  # 8-bit PQ
    assert small_fast_scan_parts("IVF2048,PQ256x4fs", "merged", plans(50_000, 50_000)) is None


@pytest.mark.parametrize("factory", ["IVF16,Flat", "IVF16,PQ8x4fs"])
def test_parts_of_one_quantizer_share_its_coarse_search(factory):
    """Parts of one trained IVF index are searched as IndexShardsIVF (the lists to probe found once
    per query) with the same results as one index; parts of different quantizers, or behind an OPQ
    transform, stay plain IndexShards."""
    import faiss

    from index import parts as P

    x = clustered(4000, 32, seed=3)
    q = clustered(40, 32, seed=4)

    def parts_of(fac, seed):  # 4 parts of x over one quantizer trained on a sample of its own
        trained = faiss.index_factory(32, fac, faiss.METRIC_INNER_PRODUCT)
        trained.train(clustered(2000, 32, seed=seed))
        blob = faiss.serialize_index(trained)
        out = [P.from_bytes(blob) for _ in range(4)]
        for i, p in enumerate(out):
            p.add_with_ids(x[i * 1000 : (i + 1) * 1000], np.arange(i * 1000, (i + 1) * 1000))
        return blob, out

    blob, parts = parts_of(factory, 1)
    shards = P.as_shards(parts)
    assert isinstance(shards, faiss.IndexShardsIVF)
    one = P.from_bytes(blob)
    one.add_with_ids(x, np.arange(len(x)))
    del parts  # the shards keep their parts and quantizer alive
    for ix in (shards, one):
        faiss.ParameterSpace().set_index_parameter(ix, "nprobe", 4)
    (d1, i1), (d2, i2) = shards.search(q, 10), one.search(q, 10)
    np.testing.assert_array_equal(d1, d2)
    # ids agree wherever the score is unique in its row and above the k-th (4-bit fast-scan scores tie)
    unique = np.array([[(r == v).sum() == 1 and v > r[-1] for v in r] for r in d1])
    assert unique.sum() > 40 and (i1[unique] == i2[unique]).all()
    # nprobe above nlist: the shared coarse search is capped like one index's (was wrong results)
    import index.faiss_index as fi

    fi._set_search_param(shards, "nprobe", 64)
    faiss.ParameterSpace().set_index_parameter(one, "nprobe", 16)
    np.testing.assert_array_equal(shards.search(q, 10)[0], one.search(q, 10)[0])
    other = parts_of(factory, 2)[1]
    assert type(P.as_shards(parts_of(factory, 1)[1][:2] + other[:2])) is faiss.IndexShards
    assert type(P.as_shards(parts_of("OPQ8," + factory, 1)[1])) is faiss.IndexShards


def test_hnsw_and_flat_cannot_be_built_in_parts(store, tmp_path, ray_local):
    for f in ("Flat", "HNSW16"):
        with pytest.raises(ConfigError, match="cannot be built in parts"):
            build_index_parts(store, str(tmp_path / f), f, num_queries=10)


@pytest.mark.parametrize(
    "bad", [{"gpus_per_task": -1}, {"train_cpus": 0}, {"cpus_per_task": -0.5}, {"layout": "tree"}, {"part_rows": 0}]
)
def test_index_section_rejects_bad_values_in_one_line(bad):
    with pytest.raises(ConfigError, match="index\\."):
        IndexClusterConfig(**bad)


@pytest.mark.parametrize("factory", ["IVF16,PQ8", "IVF16,PQ16x4fs"])
def test_sharded_serving_equals_the_merged_index(store, tmp_path, ray_local, factory):
    """#17.3: parts kept as shards, served by 2 Ray actors: same ids and scores as the same parts
    merged into one index; build-bank/search open it through cluster.retrieval.open_index. Also
    with FAISS's SIMD fast-scan PQ (4-bit codes in blocks; the actors' memory is declared from
    its estimate)."""
    from cluster.index_serve import ShardedRetriever
    from cluster.retrieval import open_index
    from index import parts as P

    out = tmp_path / "ix"
    build_index_parts(
        store,
        str(out),
        factory,
        num_queries=100,
        train_size=1500,
        allow_low_recall=True,
        cfg=IndexClusterConfig(part_rows=500, layout="shards"),
    )
    assert not (out / "index.faiss").exists()
    meta = json.loads((out / "index.json").read_text())
    assert len(meta["parts"]) == 6 and meta["layout"] == "shards"
    trained = (out / "trained.faiss").read_bytes()
    merged = P.merge_parts(
        trained, None, [((out / "parts" / f"part-{p['name']}.faiss").read_bytes(), None) for p in meta["parts"]]
    )
    merged.nprobe = meta["report"]["search_params"]["nprobe"]
    q = clustered(50, 32, seed=21)
    want_s, want_r = merged.search(q, 10)
    retriever, uris, _ = open_index(str(out), serve_actors=2)
    assert isinstance(retriever, ShardedRetriever) and len(retriever.actors) == 2
    got = retriever.search(q, 10)
    for g, ws, wr in zip(got, want_s, want_r):
        np.testing.assert_allclose(g.scores, ws, rtol=1e-6)
        assert g.ids == [f"id{r}" for r in g.rows] and all(uris[i] == f"u{i[2:]}" for i in g.ids)
        if "fs" not in factory:
            assert g.rows.tolist() == wr.tolist()
            continue
        # fast-scan scores are quantised: equal scores (ties) may come in another order, and the
        # last tie group may be cut at k differently; every other group holds the same rows
        last = ws[-1]
        for s in set(ws.tolist()) - {last}:
            assert set(g.rows[g.scores == s].tolist()) == set(wr[ws == s].tolist())
    retriever.close()


def test_build_index_cli_parts_update_and_lag(store, tmp_path, ray_local, caplog):
    import logging

    from cluster.retrieval import open_index
    from jobs.cli import main

    out = tmp_path / "ix"
    cfg = tmp_path / "cluster.yaml"
    cfg.write_text("index: {part_rows: 1000, workers: 2}\n")
    args = [
        "build-index",
        "--store",
        str(store.root),
        "--index",
        str(out),
        "--ray-config",
        str(cfg),
        "--num-queries",
        "50",
        "--train-size",
        "1500",
    ]
    assert main(args + ["--parts"]) == 0
    meta = json.loads((out / "index.json").read_text())
    assert meta["report"]["factory"].startswith("IVF") and len(meta["parts"]) == 3
    report = json.loads((out / "job_report.json").read_text())
    assert report["config"]["parts"] is True and report["inputs"]["processed"] == 3000
    x = clustered(300, 32, seed=22)
    store.commit_shard(6, [f"id{j}" for j in range(3000, 3300)], ["u"] * 300, x, [1] * 300, [1] * 300)
    with caplog.at_level(logging.WARNING):
        open_index(str(out))
    assert "lacks 300 store row(s)" in caplog.text
    assert main(args + ["--update"]) == 0
    assert json.loads((out / "index.json").read_text())["store_total"] == 3300
    assert main(args + ["--update", "--factory", "IVF8,Flat"]) == 2


def test_parts_served_by_actors_and_reranked_from_the_store(store, tmp_path, ray_local):
    """#17.3 + #17.4: only PQ codes in the actors; candidates re-ranked from the store's files."""
    from cluster.index_serve import ShardedRetriever
    from cluster.retrieval import open_index

    out = tmp_path / "ix"
    rep = build_index_parts(
        store,
        str(out),
        "IVF16,PQ8x4,Refine(store)",
        num_queries=100,
        train_size=1500,
        cfg=IndexClusterConfig(part_rows=1000, layout="shards"),
    )
    assert rep.recall_at_10 >= 0.95 and rep.rerank_bytes_per_query > 0
    retriever, _, _ = open_index(str(out), serve_actors=2)
    assert type(retriever.index).__name__ == "StoreRefine" and isinstance(retriever.index.base, ShardedRetriever)
    emb, _, _ = store.load_all()
    q = emb[:20]
    for qi, hit in zip(q, retriever.search(q, 5)):
        np.testing.assert_allclose(hit.scores, emb[hit.rows] @ qi, atol=1e-5)
    assert [h.rows[0] for h in retriever.search(q, 5)] == list(range(20))  # each row finds itself first
    retriever.index.base.close()
