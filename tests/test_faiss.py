"""FAISS index build (issue #8): re-ranking and recall errors, GPU parameter setting, streaming
store build, disjoint tuning / evaluation queries with honest latency fields, build-index CLI
argument checks. Small corpora and tiny IVF/PQ settings keep these fast."""

import json
import logging
import tracemalloc

import numpy as np
import pyarrow.parquet as pq
import pytest

import index.faiss_index as fi
import index.tuning as tuning
import index.vectors as vectors
from index.retriever import ExactRetriever
from index.store import EmbeddingStore


def clustered(n, dim, clusters=50, noise=0.3, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    x = centres[rng.integers(0, clusters, n)] + noise * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def make_store(root, x, shard=2000):
    st = EmbeddingStore(root)
    st.create_or_check({"clip_model": "test"}, x.shape[1])
    for i, s in enumerate(range(0, len(x), shard)):
        rows = range(s, min(s + shard, len(x)))
        st.commit_shard(
            i, [f"id{j}" for j in rows], [f"u{j}" for j in rows], x[s : s + shard], [1] * len(rows), [1] * len(rows)
        )
    return st


# -- defect 1: PQ without re-ranking, low recall returned silently --------------------------


def test_pq_band_is_refined_and_counts_refine_memory_in_the_budget():
    for budget in (1 << 30, 3 << 29, 7 << 28):
        f = fi.choose_factory(1_000_000, 512, budget)
        assert ",PQ" in f and ",Refine(" in f, f
        assert fi.estimate_index_bytes(f, 1_000_000, 512) <= budget
    # 1.5 GiB holds fp16 re-ranking codes, 1 GiB only 8-bit ones
    assert fi.choose_factory(1_000_000, 512, 3 << 29).endswith("Refine(SQfp16)")
    assert fi.choose_factory(1_000_000, 512, 1 << 30).endswith("Refine(SQ8)")
    with pytest.raises(ValueError, match="GiB"):  # not even PQ8 + SQ8 codes fit (in RAM)
        fi.choose_factory(200_000_000, 768, 64 << 30, store_rerank=False)


def test_memory_estimate_matches_the_built_index():
    x = clustered(4000, 32)
    for f in ("IVF16,PQ8x4,Refine(SQ8)", "IVF16,Flat", "IVF16,PQ16x4fs,Refine(SQ8)"):
        _, rep = fi.build_index(x, f, num_queries=50, allow_low_recall=True)
        est = fi.estimate_index_bytes(f, len(x), 32)
        assert abs(est - rep.index_bytes) <= 0.1 * rep.index_bytes, (f, est, rep.index_bytes)


def test_refined_pq_reaches_the_target_by_tuning_k_factor(tmp_path):
    x = clustered(5000, 32)
    index, rep = fi.build_index(x, "IVF16,PQ8x4,Refine(SQfp16)", target_recall=0.95, num_queries=200)
    assert rep.recall_at_10 >= 0.95 and rep.target_met
    assert rep.search_params["k_factor"] > 1 and "nprobe" in rep.search_params
    fi.save_index(index, rep, tmp_path / "ix")
    back, _ = fi.load_index(tmp_path / "ix")
    assert back.k_factor == rep.search_params["k_factor"]
    q = x[:20]
    assert np.array_equal(index.search(q, 10)[1], back.search(q, 10)[1])


def test_missed_recall_target_is_an_error_with_the_figures():
    x = clustered(3000, 32)
    with pytest.raises(fi.LowRecallError) as err:
        fi.build_index(x, "IVF16,PQ8x4", target_recall=0.95, num_queries=100)
    msg = str(err.value)
    assert "below the target 0.950" in msg and "recall@10" in msg and "allow-low-recall" in msg
    assert err.value.report is not None and not err.value.report.target_met


def test_allow_low_recall_keeps_the_index_with_a_warning(tmp_path, caplog):
    x = clustered(3000, 32)
    with caplog.at_level(logging.WARNING, logger="index.faiss_index"):
        index, rep = fi.build_index(x, "IVF16,PQ8x4", target_recall=0.95, num_queries=100, allow_low_recall=True)
    assert not rep.target_met and rep.recall_at_10 < 0.95
    assert any(r.levelno == logging.WARNING and "below the target" in r.getMessage() for r in caplog.records)
    fi.save_index(index, rep, tmp_path / "ix")
    assert json.loads((tmp_path / "ix" / "index.json").read_text())["report"]["target_met"] is False


def test_tiny_corpora_build_exact_indexes():
    for n in (1, 2, 7):
        _, rep = fi.build_index(clustered(n, 8), num_queries=10)
        assert rep.factory == "Flat" and rep.recall_at_10 == 1.0 and rep.k == max(1, min(10, n - 1))


# -- defect 2: GPU tuning crashed (CPU ParameterSpace on a GpuIndexIVF) ----------------------


class GpuIndexIVFFlat:
    """Stands in for faiss.GpuIndexIVFFlat (the CPU ParameterSpace rejects it): delegates to a CPU index."""

    def __init__(self, cpu):
        self.cpu = cpu

    @property
    def nprobe(self):
        return self.cpu.nprobe

    @nprobe.setter
    def nprobe(self, v):
        self.cpu.nprobe = int(v)

    @property
    def is_trained(self):
        return self.cpu.is_trained

    @property
    def ntotal(self):
        return self.cpu.ntotal

    def train(self, x):
        self.cpu.train(x)

    def add(self, x):
        self.cpu.add(x)

    def add_with_ids(self, x, ids):
        self.cpu.add_with_ids(x, ids)

    def search(self, q, k):
        return self.cpu.search(q, k)


def test_search_params_are_set_on_the_gpu_index_itself():
    faiss = fi._faiss()
    cpu = faiss.index_factory(8, "IVF4,Flat", faiss.METRIC_INNER_PRODUCT)
    gpu = GpuIndexIVFFlat(cpu)
    fi._set_search_param(gpu, "nprobe", 3)
    assert gpu.nprobe == 3 and cpu.nprobe == 3


@pytest.fixture()
def fake_gpu(monkeypatch):
    """faiss's GPU clone functions replaced by GpuIndexIVFFlat stand-ins; yields the clones made."""
    faiss = fi._faiss()
    clones = []
    monkeypatch.setattr(faiss, "StandardGpuResources", lambda: object(), raising=False)
    monkeypatch.setattr(
        faiss, "index_cpu_to_gpu", lambda res, dev, ix: clones.append(GpuIndexIVFFlat(ix)) or clones[-1], raising=False
    )
    monkeypatch.setattr(faiss, "index_gpu_to_cpu", lambda g: g.cpu, raising=False)
    return clones


def test_gpu_build_branch_tunes_nprobe(fake_gpu):
    clones = fake_gpu
    x = clustered(4000, 32)
    index, rep = fi.build_index(x, "IVF32,Flat", num_queries=100, use_gpu=True)
    assert clones and rep.gpu and rep.recall_at_10 >= 0.95
    assert index.nprobe == rep.search_params["nprobe"]


def test_parts_train_and_add_on_the_gpu_branch(fake_gpu):
    """#17.9: index.gpus_per_task > 0 trains the quantiser and fills parts on a GPU copy of the
    index, brought back to the CPU to be written; the part equals the CPU-built one."""
    from index import parts as P
    from index.vectors import VectorSource

    clones = fake_gpu
    x = clustered(3000, 32)
    src = VectorSource.from_array(x)
    trained, _ = P.train_empty(src, "IVF16,Flat", np.arange(0, 3000, 2), gpu=True)
    assert len(clones) == 1 and trained.is_trained and trained.ntotal == 0
    on_gpu, _ = P.fill_part(P.to_bytes(trained), None, src, first_row=100, gpu=True)
    assert len(clones) == 2 and on_gpu.ntotal == 3000
    on_cpu, _ = P.fill_part(P.to_bytes(trained), None, src, first_row=100)
    on_gpu.nprobe = on_cpu.nprobe = 4
    got, want = on_gpu.search(x[:20], 5), on_cpu.search(x[:20], 5)
    assert (got[1] == want[1]).all() and (got[1] >= 100).all()  # ids are store rows from first_row


# -- defect 3: build loaded the corpus as float32 (twice) --------------------------------------


def test_exact_topk_streams_chunks_and_excludes_self():
    x = clustered(2500, 16)
    chunks = [x[:700].astype(np.float16), x[700:1800].astype(np.float16), x[1800:].astype(np.float16)]
    xf = np.concatenate(chunks).astype(np.float32)
    src = fi.VectorSource.from_arrays(chunks)
    rows = np.array([5, 699, 700, 2499])
    scores, found = fi.exact_topk(src, xf[rows], 10, exclude_rows=rows, block_rows=256)
    truth = ExactRetriever(xf, [str(i) for i in range(len(xf))]).search(xf[rows], 11)
    for r, f, s, t in zip(rows, found, scores, truth):
        assert r not in f
        expect = [int(v) for v in t.rows if v != r][:10]
        assert f.tolist() == expect
        assert np.allclose(s, xf[f] @ xf[r], atol=1e-5)
    assert np.array_equal(src.take(np.array([1801, 3, 700])), xf[[1801, 3, 700]])


def _no_load_all(self):
    raise AssertionError("the index build must not load the whole store")


def test_store_build_reads_shards_not_load_all(tmp_path, monkeypatch):
    from index.catalog import build_index_dir, open_retriever

    x = clustered(6000, 32)
    st = make_store(tmp_path / "store", x, shard=1000)
    monkeypatch.setattr(EmbeddingStore, "load_all", _no_load_all)
    rep = build_index_dir(EmbeddingStore(tmp_path / "store"), tmp_path / "ix", "IVF32,Flat")
    assert rep.n == 6000 and rep.recall_at_10 >= 0.95
    ids = pq.read_table(tmp_path / "ix" / "rows.parquet").column("id").to_pylist()
    assert ids == [f"id{j}" for j in range(6000)]
    # the same index as the in-memory build over the store's float16 data
    x16 = np.concatenate([st.shard_embeddings(s).astype(np.float32) for s in st.shards])
    mem_index, _ = fi.build_index(x16, "IVF32,Flat")
    retr, _, _ = open_retriever(tmp_path / "ix")
    q = x16[:30]
    assert [r.rows.tolist() for r in retr.search(q, 10)] == mem_index.search(q, 10)[1].tolist()


def test_store_build_memory_is_a_sample_and_a_block_not_the_corpus(tmp_path, monkeypatch):
    from index.catalog import build_index_dir

    x = clustered(12000, 256)
    make_store(tmp_path / "store", x, shard=2000)
    monkeypatch.setattr(EmbeddingStore, "load_all", _no_load_all)
    monkeypatch.setattr(vectors, "BLOCK_ROWS", 1000)  # streaming blocks
    monkeypatch.setattr(fi, "BLOCK_ROWS", 1000)  # add blocks
    tracemalloc.start()
    try:
        rep = build_index_dir(
            EmbeddingStore(tmp_path / "store"), tmp_path / "ix", "IVF32,Flat", num_queries=100, train_size=2000
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # numpy memory of the build: training sample + one block + queries, not the corpus in float32
    assert peak < x.nbytes / 3, (peak, x.nbytes)
    assert rep.n == 12000 and rep.train_size == 2000 and rep.recall_at_10 >= 0.95


# -- defect 4: tuning and evaluation queries, latency fields -----------------------------------


def test_recall_is_reported_on_queries_disjoint_from_the_tuning_queries(monkeypatch):
    calls, evaluated = [], []
    real_found, real_evaluate = fi._found, fi._evaluate

    def spy(index, queries, q_rows, k):  # every search, tuning or evaluation
        calls.append(set(np.asarray(q_rows).tolist()))
        return real_found(index, queries, q_rows, k)

    def spy_evaluate(*args):
        evaluated.append(real_evaluate(*args))
        return evaluated[-1]

    monkeypatch.setattr(fi, "_found", spy)
    monkeypatch.setattr(fi, "_evaluate", spy_evaluate)
    x = clustered(5000, 32)
    _, rep = fi.build_index(x, "IVF64,Flat", num_queries=200)
    assert len(calls) >= 2, "tuning and evaluation searches"
    eval_rows = calls[-1]  # the evaluation searches (recall@10, then @50) come last
    assert sum(c == eval_rows for c in calls) == len(evaluated) == 2
    r1, r10, _ = evaluated[0]
    tuned_on = set().union(*(c for c in calls if c != eval_rows))
    assert len(eval_rows) == rep.queries == 200 and len(tuned_on) == rep.tune_queries == 200
    assert not eval_rows & tuned_on
    assert rep.recall_at_10 == r10 and rep.recall_at_1 == r1


def test_report_has_batched_throughput_and_single_query_latency(tmp_path):
    x = clustered(4000, 32)
    index, rep = fi.build_index(x, "IVF32,Flat", num_queries=150)
    assert rep.batched_ms_per_query > 0 and rep.batched_qps == pytest.approx(1000 / rep.batched_ms_per_query, rel=1e-6)
    assert rep.single_queries == 100 and 0 < rep.single_query_ms <= rep.single_query_p95_ms
    fi.save_index(index, rep, tmp_path / "ix")
    report = json.loads((tmp_path / "ix" / "index.json").read_text())["report"]
    for key in (
        "batched_ms_per_query",
        "batched_qps",
        "single_query_ms",
        "single_query_p95_ms",
        "tune_queries",
        "queries",
        "target_met",
    ):
        assert key in report


# -- defect 5: build-index argument checks -----------------------------------------------------


def _cli(argv, caplog):
    from jobs.cli import main

    caplog.clear()
    with caplog.at_level(logging.INFO):
        rc = main(argv)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    return rc, errors


@pytest.fixture()
def small_store(tmp_path):
    return make_store(tmp_path / "store", clustered(3000, 32), shard=1000)


@pytest.mark.parametrize(
    "kind,expect",
    [
        ("missing", "no such directory"),
        ("a_file", "is a file"),
        ("not_a_store", "not an embedding store"),
        ("empty", "holds no embeddings"),
    ],
)
def test_build_index_cli_rejects_bad_stores_with_one_line(tmp_path, caplog, kind, expect):
    store = tmp_path / kind
    if kind == "a_file":
        store.write_text("x")
    elif kind == "not_a_store":
        store.mkdir()
    elif kind == "empty":
        EmbeddingStore(store).create_or_check({"clip_model": "test"}, 8)
    rc, errors = _cli(["build-index", "--store", str(store), "--index", str(tmp_path / "ix")], caplog)
    assert rc == 2
    assert len(errors) == 1 and expect in errors[0] and "\n" not in errors[0], errors
    assert not (tmp_path / "ix").exists()


@pytest.mark.parametrize("target", ["0", "-0.5", "1.5"])
def test_build_index_cli_rejects_target_recall_outside_0_1(small_store, tmp_path, caplog, target):
    rc, errors = _cli(
        ["build-index", "--store", str(small_store.root), "--index", str(tmp_path / "ix"), "--target-recall", target],
        caplog,
    )
    assert rc == 2 and len(errors) == 1 and "--target-recall" in errors[0]
    assert not (tmp_path / "ix").exists()


def test_build_index_cli_rejects_bad_factory_and_budget(small_store, tmp_path, caplog):
    rc, errors = _cli(
        ["build-index", "--store", str(small_store.root), "--index", str(tmp_path / "ix"), "--factory", "IVFnope,Flat"],
        caplog,
    )
    assert rc == 2 and "invalid FAISS factory" in errors[0]
    rc, errors = _cli(
        [
            "build-index",
            "--store",
            str(small_store.root),
            "--index",
            str(tmp_path / "ix"),
            "--memory-budget-gb",
            "0.00001",
        ],
        caplog,
    )
    assert rc == 2 and "GiB" in errors[0]
    assert not (tmp_path / "ix").exists()


def test_build_index_cli_recall_error_and_allow_low_recall(small_store, tmp_path, caplog):
    base = ["build-index", "--store", str(small_store.root), "--num-queries", "100"]
    rc, errors = _cli(base + ["--index", str(tmp_path / "low"), "--factory", "IVF16,PQ8x4"], caplog)
    assert rc == 2 and len(errors) == 1 and "below the target" in errors[0]
    assert not (tmp_path / "low" / "index.faiss").exists()
    rc, _ = _cli(base + ["--index", str(tmp_path / "low"), "--factory", "IVF16,PQ8x4", "--allow-low-recall"], caplog)
    assert rc == 0
    assert json.loads((tmp_path / "low" / "index.json").read_text())["report"]["target_met"] is False
    rc, _ = _cli(base + ["--index", str(tmp_path / "ok"), "--factory", "IVF16,Flat"], caplog)
    assert rc == 0
    line = [r.getMessage() for r in caplog.records if r.name == "cluster.index_job"][-1]
    assert "100 evaluation queries" in line and "tuned on 100 other queries" in line
    assert "ms/query" in line and "queries/s" in line and "single-query latency" in line and "median" in line


@pytest.mark.parametrize("factory", ["IVF16,PQ8", "OPQ8,IVF16,PQ8", "PQ8"])
def test_new_index_skips_polysemous_training(factory):
    """FAISS's factory turns on polysemous training for PQm (a codebook reordering only Hamming
    search uses, 20x the training time): indexes built here never do it, and train to the same codes."""
    import faiss

    from index.faiss_factory import new_index

    x = clustered(2000, 32, seed=3)
    index = new_index(32, factory)
    inner = faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexPreTransform):
        inner = faiss.downcast_index(inner.index)
    assert inner.do_polysemous_training is False
    index.train(x)
    index.add(x)
    assert index.ntotal == 2000 and index.metric_type == faiss.METRIC_INNER_PRODUCT


class _StepIndex:
    """A stand-in index whose results are the truth from ``nprobe >= need`` on (recall 0 below)."""

    def __init__(self, truth, need):
        self.truth, self.need, self.nprobe, self.calls = truth, need, 1, []

    def set_search_param(self, name, value):
        assert name == "nprobe"
        self.nprobe = int(value)

    def search(self, q, k):
        self.calls.append(self.nprobe)
        ids = self.truth[:, :k] if self.nprobe >= self.need else self.truth[:, :k] + 10_000
        return np.zeros(ids.shape, np.float32), ids


@pytest.mark.parametrize("need", [37, 64, 3, 1, 128])
def test_tuning_bisects_nprobe_below_the_doubling_grid(need):
    """nprobe doubles to its first hit, then is bisected between the last miss and the hit: the
    kept value reaches the target and lies within 1/BISECT_STEPS of the smallest that does (the
    doubling grid alone gave 64 where 37 was needed: 1.7x the scanned lists)."""
    truth = np.arange(40 * 11).reshape(40, 11)
    ix = _StepIndex(truth, need)
    params, r = tuning.tune(ix, "IVF128,Flat", np.zeros((40, 4), np.float32), np.full(40, -1), truth, 10, 0.95, False)
    nprobe = params["nprobe"]
    assert r == 1.0 and need <= nprobe <= need + max(1, nprobe // tuning.BISECT_STEPS)
    assert max(ix.calls) == 1 << (need - 1).bit_length()  # never past the doubling grid's first hit


@pytest.mark.parametrize("first", ["index.index_files", "index.faiss_index"])
def test_index_modules_import_in_either_order(first):
    """index.faiss_index re-exports index.index_files' load/save, which imports faiss_index: a fresh
    interpreter importing index_files first used to fail with a circular ImportError."""
    import subprocess
    import sys

    code = f"import {first}; from index.faiss_index import load_index, IndexFileError; import index.index_files"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


class _Clock:
    t = 0.0

    @classmethod
    def perf_counter(cls):
        return cls.t


class _CostIndex(_StepIndex):
    """Recall 1 from nprobe >= need with k_factor >= 4, or from nprobe >= need + 8 with any k_factor;
    each search advances a fake clock by nprobe + kk_cost * k_factor."""

    def __init__(self, truth, need, kk_cost):
        super().__init__(truth, need)
        self.k_factor, self.kk_cost = 1, kk_cost

    def set_search_param(self, name, value):
        if name == "k_factor":
            self.k_factor = int(value)
        else:
            super().set_search_param(name, value)

    def search(self, q, k):
        _Clock.t += self.nprobe + self.kk_cost * self.k_factor
        ok = self.nprobe >= self.need + 8 or (self.nprobe >= self.need and self.k_factor >= 4)
        ids = self.truth[:, :k] if ok else self.truth[:, :k] + 10_000
        return np.zeros(ids.shape, np.float32), ids


@pytest.mark.parametrize(
    "kk_cost, expect", [(1.0, {"nprobe": 38, "k_factor": 4}), (50.0, {"nprobe": 48, "k_factor": 1})]
)
def test_tuning_keeps_the_fastest_setting_reaching_the_target(monkeypatch, kk_cost, expect):
    """Fewer probes with more re-ranked candidates, or more probes with fewer: the tuner times both
    (probes tried: 64, bisected 48, 40, 38; k_factor 1 suffices from 45 probes, 4 below)."""
    monkeypatch.setattr(fi, "time", _Clock)
    truth = np.arange(40 * 11).reshape(40, 11)
    ix = _CostIndex(truth, 37, kk_cost)
    params, r = tuning.tune(
        ix, "IVF128,PQ8,Refine(store)", np.zeros((40, 4), np.float32), np.full(40, -1), truth, 10, 0.95, False
    )
    assert r == 1.0 and params == expect
