"""#9 item 5: the embedding store and the FAISS index on S3 (the moto server on 127.0.0.1).

The same rules as the local store (tests/test_store_commit.py, tests/test_store_lock.py): the
manifest, one PUT, is the only commit point; a crash between the shard files and the manifest
leaves nothing visible and its orphans are deleted by the next writer; the writer lock is a
conditional create (``If-None-Match: *``), its heartbeat and takeovers ``If-Match``; a writer that
lost its lock (or whose manifest was replaced behind it) commits nothing. The index is built
locally, uploaded with ``index.json`` last, and read through the node cache keyed by content."""

import json
import logging
import secrets
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from conftest import make_bucket

import index.storage as storage
import index.store as store_mod
from index.store import LOCK_FILE, EmbeddingStore, ObjectStoreLock, StoreError, StoreLockedError

MODEL = {"clip_model": "m"}
BUCKET = "reco-store-test"


@pytest.fixture()
def s3root(s3_server):
    """(a fresh s3:// store root, storage options, an s3fs client)."""
    import s3fs

    make_bucket(s3_server, BUCKET)
    fs = s3fs.S3FileSystem(**s3_server)
    return f"s3://{BUCKET}/{secrets.token_hex(4)}/store", dict(s3_server), fs


def _keys(fs, root):
    fs.invalidate_cache()
    base = root.removeprefix("s3://")
    return sorted(k[len(base) + 1 :] for k in fs.find(base))


def _unit(x):
    x = np.asarray(x, np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _fake_lock(root, opts, host, pid, job="other-job"):
    storage.write_bytes(
        f"{root}/{LOCK_FILE}",
        json.dumps(
            {"host": host, "pid": pid, "job": job, "since": "2020-01-01T00:00:00", "token": "feedfacefeedface"}
        ).encode(),
        opts,
    )


def test_commit_and_read_back_with_the_local_layout(s3root):
    root, opts, fs = s3root
    st = EmbeddingStore(root, storage_options=opts)
    assert st.is_url and st.root == root and not st.exists
    st.create_or_check(MODEL, 4)
    ab = _unit([[1.0, 0, 0, 0], [0, 1.0, 0, 0]])
    rec = st.commit_shard(0, ["a", "b"], ["ua", "ub"], ab, [1, 2], [3, 4], skipped=[("z", "uz", "decode: bad")])
    m = json.loads(storage.read_bytes(f"{root}/manifest.json", opts))
    assert m["format_version"] == 2 and m["shards"] == [{"index": 0, "count": 2, "skipped": 1, "token": rec.token}]
    assert _keys(fs, root) == sorted(
        [
            "manifest.json",
            f"img_emb/img_emb_{rec.name}.npy",
            f"metadata/metadata_{rec.name}.parquet",
            f"skipped/skipped_{rec.name}.parquet",
        ]
    )
    back = EmbeddingStore(root + "/", storage_options=opts)  # a trailing slash names the same store
    emb, ids, uris = back.load_all()
    assert ids == ["a", "b"] and uris == ["ua", "ub"] and np.allclose(emb, ab, atol=1e-3)
    assert back.shard_embeddings(back.shards[0]).dtype == np.float16
    assert back.committed_ids() == {"a", "b", "z"} and back.skipped() == {"z": "decode: bad"} and len(back) == 2
    assert back.shard_metadata(back.shards[0]).column("width").to_pylist() == [1, 2]
    with pytest.raises(StoreError, match="already committed"):
        back.commit_shard(0, ["x"], ["ux"], np.ones((1, 4)), [1], [1])
    with pytest.raises(StoreError, match="holds embeddings of"):
        back.create_or_check({"clip_model": "other"}, 4)
    with pytest.raises(StoreError, match="not an embedding store"):
        EmbeddingStore(root + "-nope", storage_options=opts).manifest()
    storage.write_bytes(root + "-file", b"x", opts)
    with pytest.raises(StoreError, match="is a file"):
        EmbeddingStore(root + "-file", storage_options=opts).create_or_check(MODEL, 4)


@pytest.mark.parametrize("die", ["after_tensors", "after_metadata", "before_manifest"])
def test_crash_between_shard_files_and_manifest_leaves_nothing_visible_then_resume(s3root, monkeypatch, die):
    root, opts, fs = s3root
    st = EmbeddingStore(root, storage_options=opts)
    st.create_or_check(MODEL, 4)
    st.commit_shard(0, ["a"], ["ua"], np.array([[1.0, 0, 0, 0]]), [1], [1])
    if die == "before_manifest":

        def dying(self, data):
            raise KeyboardInterrupt("killed before the manifest PUT")

        monkeypatch.setattr(EmbeddingStore, "_put_manifest", dying)
    else:
        real, calls = store_mod._atomic_write_parquet, {"n": 0}

        def dying(table, path, *a):
            calls["n"] += 1
            if calls["n"] > (0 if die == "after_tensors" else 1):
                raise KeyboardInterrupt("killed mid-commit")
            return real(table, path, *a)

        monkeypatch.setattr(store_mod, "_atomic_write_parquet", dying)
    with pytest.raises(KeyboardInterrupt):
        st.commit_shard(1, ["c", "d"], ["uc", "ud"], np.array([[0, 1.0, 0, 0], [0, 0, 1.0, 0]]), [1, 1], [1, 1])
    monkeypatch.undo()
    orphans = [k for k in _keys(fs, root) if "_00001." in k]
    assert orphans, "the crash should have left the shard's first file(s) behind"
    m = json.loads(storage.read_bytes(f"{root}/manifest.json", opts))
    assert [s["index"] for s in m["shards"]] == [0]
    assert LOCK_FILE not in _keys(fs, root)  # released on the way out
    fresh = EmbeddingStore(root, storage_options=opts)
    assert fresh.committed_ids() == {"a"} and len(fresh) == 1  # orphans are invisible to readers
    # the resumed run commits shard 1 again (other content); the dead commit's files are deleted
    cd = _unit([[0, 0, 0, 1.0], [1.0, 1.0, 0, 0]])
    fresh.commit_shard(fresh.next_shard_index(), ["c", "d"], ["uc2", "ud2"], cd, [7, 8], [9, 10])
    emb, ids, uris = EmbeddingStore(root, storage_options=opts).load_all()
    assert ids == ["a", "c", "d"] and uris == ["ua", "uc2", "ud2"] and np.allclose(emb[1:], cd, atol=1e-3)
    rec = fresh.shards[1]
    assert [k for k in _keys(fs, root) if "_00001." in k] == sorted(
        [
            f"img_emb/img_emb_{rec.name}.npy",
            f"metadata/metadata_{rec.name}.parquet",
            f"skipped/skipped_{rec.name}.parquet",
        ]
    )


def test_second_writer_is_refused_naming_the_owner_and_the_lock_is_released(s3root):
    root, opts, fs = s3root
    st = EmbeddingStore(root, storage_options=opts)
    st.create_or_check(MODEL, 4)
    other = EmbeddingStore(root, storage_options=opts)
    with st.writer(job="first-job"):
        assert LOCK_FILE in _keys(fs, root)
        owner = json.loads(storage.read_bytes(f"{root}/{LOCK_FILE}", opts))
        assert owner["job"] == "first-job" and owner["host"] == socket.gethostname()
        with pytest.raises(StoreLockedError) as info:
            with other.writer(job="second-job"):
                pass
        assert "first-job" in str(info.value) and root in str(info.value)
        with pytest.raises(StoreLockedError):
            other.commit_shard(0, ["x"], ["ux"], np.ones((1, 4)), [1], [1])
        st.commit_shard(0, ["a"], ["ua"], np.ones((1, 4)), [1], [1])
        with st.writer(job="nested"):  # reentrant on the owning object
            st.commit_shard(1, ["b"], ["ub"], np.ones((1, 4)), [1], [1])
    assert LOCK_FILE not in _keys(fs, root)
    other.commit_shard(2, ["c"], ["uc"], np.ones((1, 4)), [1], [1])
    assert EmbeddingStore(root, storage_options=opts).committed_ids() == {"a", "b", "c"}


def test_racing_writers_exactly_one_takes_the_lock(s3root):
    """Conditional create: of writers that all find no lock, exactly one gets it."""
    root, opts, _ = s3root
    EmbeddingStore(root, storage_options=opts).create_or_check(MODEL, 4)
    for _ in range(3):
        n = 4
        barrier, won, refused, release = threading.Barrier(n), [], [], threading.Event()

        def race(i):
            st = EmbeddingStore(root, storage_options=opts)
            barrier.wait()
            try:
                with st.writer(job=f"racer-{i}"):
                    won.append(i)
                    release.wait(30)
            except StoreLockedError:
                refused.append(i)
                if len(refused) == n - 1:
                    release.set()

        threads = [threading.Thread(target=race, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(won) == 1 and len(refused) == n - 1, (won, refused)


def test_stale_locks_are_broken_with_a_warning_and_live_ones_are_not(s3root, caplog):
    root, opts, _ = s3root
    st = EmbeddingStore(root, storage_options=opts)
    st.create_or_check(MODEL, 4)
    pid = _dead_pid()
    _fake_lock(root, opts, socket.gethostname(), pid)  # its process is gone on this host
    with caplog.at_level(logging.WARNING, logger="index.store"):
        with st.writer(job="next"):
            st.commit_shard(0, ["a"], ["ua"], np.ones((1, 4)), [1], [1])
    assert any("breaking the stale writer lock" in r.message and f"pid {pid}" in r.message for r in caplog.records)
    _fake_lock(root, opts, "some-other-host", 12345)  # fresh heartbeat on another host
    with pytest.raises(StoreLockedError, match="some-other-host.*pid 12345"):
        with st.writer(job="me", heartbeat_s=0.5, stale_after_s=2.0):
            pass
    time.sleep(3.2)  # no heartbeat for longer than stale_after_s, by the server's clock
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="index.store"):
        with st.writer(job="me", heartbeat_s=0.5, stale_after_s=2.0):
            st.commit_shard(1, ["b"], ["ub"], np.ones((1, 4)), [1], [1])
    assert any("no heartbeat for" in r.message for r in caplog.records)
    assert EmbeddingStore(root, storage_options=opts).committed_ids() == {"a", "b"}


def test_heartbeat_rewrites_the_lock_and_a_lost_lock_or_replaced_manifest_commits_nothing(s3root):
    root, opts, _ = s3root
    st = EmbeddingStore(root, storage_options=opts)
    st.create_or_check(MODEL, 4)
    lock_uri = f"{root}/{LOCK_FILE}"
    with st.writer(job="beating", heartbeat_s=0.1, stale_after_s=5):
        first = json.loads(storage.read_bytes(lock_uri, opts))["heartbeat_epoch"]
        deadline = time.time() + 10
        while json.loads(storage.read_bytes(lock_uri, opts))["heartbeat_epoch"] == first and time.time() < deadline:
            time.sleep(0.05)
        owner = json.loads(storage.read_bytes(lock_uri, opts))
        assert owner["heartbeat_epoch"] > first and owner["job"] == "beating", "the heartbeat did not refresh"
        # someone broke our lock and took the store: nothing more may be committed
        storage.write_bytes(lock_uri, json.dumps(dict(owner, token="0" * 16, job="intruder")).encode(), opts)
        with pytest.raises(StoreLockedError, match="lost the writer lock.*intruder"):
            st.commit_shard(0, ["a"], ["ua"], np.ones((1, 4)), [1], [1])
    assert EmbeddingStore(root, storage_options=opts).committed_ids() == set()
    assert json.loads(storage.read_bytes(lock_uri, opts))["job"] == "intruder"  # not removed by the loser
    storage.remove_files([lock_uri], opts)
    # the manifest is replaced behind a writer that still holds its lock: its commit is refused
    with st.writer(job="holder"):
        m = json.loads(storage.read_bytes(f"{root}/manifest.json", opts))
        storage.write_bytes(f"{root}/manifest.json", json.dumps(dict(m, note="other writer")).encode(), opts)
        with pytest.raises(StoreLockedError, match="replaced by another writer"):
            st.commit_shard(0, ["a"], ["ua"], np.ones((1, 4)), [1], [1])
    assert json.loads(storage.read_bytes(f"{root}/manifest.json", opts))["note"] == "other writer"


def test_a_retried_conditional_write_that_had_landed_is_recognised(s3root, monkeypatch):
    """The client retries a PUT whose answer was lost: the retry fails its own condition. The
    lock (create) and the manifest (commit) are read back and kept when they are this writer's."""
    root, opts, _ = s3root
    st = EmbeddingStore(root, storage_options=opts)
    st.create_or_check(MODEL, 4)
    real = storage.write_conditional

    def lands_then_fails(uri, data, so=None, if_version=None):
        real(uri, data, so, if_version)
        raise storage.ConditionFailedError(f"{uri}: precondition failed (the retry)")

    monkeypatch.setattr(storage, "write_conditional", lands_then_fails)
    lock = ObjectStoreLock(f"{root}/{LOCK_FILE}", "retried", storage_options=opts)
    lock._check_enforced = lambda data: None
    lock.acquire()
    monkeypatch.undo()
    lock.verify()
    lock.release()
    monkeypatch.setattr(storage, "write_conditional", lands_then_fails)
    with st.writer(job="retried", heartbeat_s=30, stale_after_s=60):
        monkeypatch.setattr(ObjectStoreLock, "touch", lambda self: None)
        st.commit_shard(0, ["a"], ["ua"], np.ones((1, 4)), [1], [1])
    monkeypatch.undo()
    assert EmbeddingStore(root, storage_options=opts).committed_ids() == {"a"}


def test_an_endpoint_ignoring_conditional_writes_is_reported(s3root, monkeypatch, caplog):
    root, opts, _ = s3root
    real = storage.write_conditional
    monkeypatch.setattr(
        storage, "write_conditional", lambda uri, data, so=None, if_version=None: real(uri, data, so, None)
    )
    with caplog.at_level(logging.WARNING, logger="index.store"):
        lock = ObjectStoreLock(f"{root}/{LOCK_FILE}", "probe", storage_options=opts).acquire()
    lock.release()
    assert not lock.atomic and any("ignores conditional writes" in r.message for r in caplog.records)


# -- the FAISS index on S3 ---------------------------------------------------------------


def _clustered(n, dim, seed=0):
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(20, dim))
    x = c[rng.integers(0, 20, n)] + 0.3 * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_index_built_into_s3_and_read_through_the_cache_by_content(s3root, tmp_path, monkeypatch):
    from index.catalog import build_index_dir, open_retriever
    from index.faiss_index import load_index

    root, opts, fs = s3root
    monkeypatch.setenv("RECO_CACHE_DIR", str(tmp_path / "cache"))
    x = _clustered(1500, 16)
    st = EmbeddingStore(root, storage_options=opts)
    st.create_or_check({"clip_model": "test"}, 16)
    for i, s in enumerate(range(0, len(x), 500)):
        st.commit_shard(
            i,
            [f"id{j}" for j in range(s, s + 500)],
            [f"u{j}" for j in range(s, s + 500)],
            x[s : s + 500],
            [1] * 500,
            [1] * 500,
        )
    ix = root.rsplit("/", 1)[0] + "/index"
    rep = build_index_dir(
        EmbeddingStore(root, storage_options=opts), ix, "IVF16,Flat", num_queries=100, storage_options=opts
    )
    assert rep.n == 1500 and rep.target_met
    assert _keys(fs, ix) == ["index.faiss", "index.json", "rows.parquet"]
    meta = json.loads(storage.read_bytes(f"{ix}/index.json", opts))
    assert meta["store"] == root and set(meta["files"]) == {"index.faiss", "rows.parquet"}
    faiss_r, uris, meta2 = open_retriever(ix, storage_options=opts)
    exact_r, _, _ = open_retriever(ix, exact=True, storage_options=opts)  # the store, read from S3
    q = x[:50] + 0.01
    found = [set(h.ids) for h in faiss_r.search(q, 10)]
    truth = [set(h.ids) for h in exact_r.search(q, 10)]
    assert np.mean([len(f & t) / 10 for f, t in zip(found, truth)]) >= 0.9
    assert uris["id7"] == "u7" and meta2["report"]["factory"] == "IVF16,Flat"
    cached = sorted(p for p in (tmp_path / "cache").rglob("*") if p.is_file())
    assert {p.name for p in cached} == {"index.faiss", "rows.parquet"}
    open_retriever(ix, storage_options=opts)  # unchanged: served from the cache
    assert sorted(p for p in (tmp_path / "cache").rglob("*") if p.is_file()) == cached
    # a rebuild (other factory) is fetched again
    build_index_dir(EmbeddingStore(root, storage_options=opts), ix, "Flat", num_queries=50, storage_options=opts)
    index, meta3 = load_index(ix, opts)
    assert meta3["report"]["factory"] == "Flat" and index.ntotal == 1500
    assert len([p for p in (tmp_path / "cache").rglob("index.faiss")]) == 2
    # an index.faiss replaced behind index.json (a rebuild under way) is refused, never mixed (on a
    # node whose cache does not hold the verified copy already)
    import shutil

    shutil.rmtree(tmp_path / "cache")
    storage.write_bytes(f"{ix}/index.faiss", storage.read_bytes(f"{ix}/index.faiss", opts)[:-8] + b"\0" * 8, opts)
    with pytest.raises(storage.ObjectChangedError, match="replaced while being read"):
        open_retriever(ix, storage_options=opts)
    with pytest.raises(FileNotFoundError, match="build-index"):
        open_retriever(ix + "-none", storage_options=opts)


def test_an_object_replaced_while_it_is_read_is_read_whole(s3root):
    """Readers of an object that another process keeps replacing (the manifest during commits,
    the lock during heartbeats) get one whole version every time, never FileExpired/OSError:
    storage.read_bytes is one GET (the old read through an s3fs file object pinned the ETag of a
    HEAD and failed when the object changed before its GET)."""
    root, opts, _ = s3root
    uri = f"{root}/replaced.bin"
    versions = [bytes([i]) * (1000 + 997 * i) for i in range(8)]
    storage.write_bytes(uri, versions[0], opts)
    stop = threading.Event()
    writes = {"n": 0}

    def replace_continuously():
        i = 0
        while not stop.is_set():
            i = (i + 1) % len(versions)
            storage.write_bytes(uri, versions[i], opts)
            writes["n"] += 1

    writer = threading.Thread(target=replace_continuously)
    writer.start()
    try:
        seen = set()
        for _ in range(150):
            data = storage.read_bytes(uri, opts)
            assert data in versions, f"a torn read: {len(data)} bytes"
            seen.add(data[0])
    finally:
        stop.set()
        writer.join(30)
    assert writes["n"] > 50 and len(seen) > 2, (writes, seen)  # the object really changed under the reader
