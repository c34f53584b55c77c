"""Issue #8/5c: the manifest is the only commit point; shard files are named by a commit token,
so a crash mid-commit leaves only unreferenced orphans and no reader ever pairs one commit's
tensors with another commit's metadata. Plus reading format-1 stores."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import index.store as store_mod
from index.store import EmbeddingStore, StoreError

MODEL = {"clip_model": "m"}


def _unit(x):
    x = np.asarray(x, np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _crash_on_parquet_write(monkeypatch, after: int = 0):
    """Make the (after+1)-th Parquet write of a commit die, as a kill would."""
    real = store_mod._atomic_write_parquet
    calls = {"n": 0}

    def dying(table, path):
        calls["n"] += 1
        if calls["n"] > after:
            raise KeyboardInterrupt("killed mid-commit")
        return real(table, path)

    monkeypatch.setattr(store_mod, "_atomic_write_parquet", dying)


def test_crash_while_a_late_writer_commits_never_mixes_tensors_and_metadata(tmp_path, monkeypatch):
    """A writer whose manifest predates shard 0 commits 'shard 0' and dies after writing the
    tensors: the old store renamed its tensors over the committed shard's, leaving ids a, b
    paired with x, y's embeddings."""
    st = EmbeddingStore(tmp_path / "s")
    st.create_or_check(MODEL, 4)
    late = EmbeddingStore(tmp_path / "s")
    late.manifest()
    ab = np.array([[1.0, 0, 0, 0], [0, 1.0, 0, 0]])
    st.commit_shard(0, ["a", "b"], ["ua", "ub"], ab, [1, 1], [1, 1])
    _crash_on_parquet_write(monkeypatch)
    with pytest.raises((StoreError, KeyboardInterrupt)):
        late.commit_shard(0, ["x", "y"], ["ux", "uy"], np.array([[0, 0, 1.0, 0], [0, 0, 0, 1.0]]), [1, 1], [1, 1])
    monkeypatch.undo()
    emb, ids, uris = EmbeddingStore(tmp_path / "s").load_all()
    assert ids == ["a", "b"] and uris == ["ua", "ub"]
    assert np.allclose(emb, ab, atol=1e-3), "the committed shard's tensors were replaced"


@pytest.mark.parametrize("die_after", [0, 1])  # after the tensors; after tensors + metadata
def test_crash_mid_commit_leaves_only_orphans_then_a_rerun_commits_cleanly(tmp_path, monkeypatch, die_after):
    st = EmbeddingStore(tmp_path / "s")
    st.create_or_check(MODEL, 4)
    st.commit_shard(0, ["a"], ["ua"], np.array([[1.0, 0, 0, 0]]), [1], [1])
    _crash_on_parquet_write(monkeypatch, after=die_after)
    with pytest.raises(KeyboardInterrupt):
        st.commit_shard(1, ["c", "d"], ["uc", "ud"], np.array([[0, 1.0, 0, 0], [0, 0, 1.0, 0]]), [1, 1], [1, 1])
    monkeypatch.undo()
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert [s["index"] for s in manifest["shards"]] == [0]
    orphans = sorted(p.name for p in (tmp_path / "s").rglob("*_00001.*"))
    assert orphans, "the crash should have left the shard's first file(s) behind"
    fresh = EmbeddingStore(tmp_path / "s")
    assert fresh.committed_ids() == {"a"} and len(fresh) == 1  # orphans are invisible to readers
    # the rerun commits shard 1 again (other content); nothing of the dead commit is read
    cd = _unit([[0, 0, 0, 1.0], [1.0, 1.0, 0, 0]])
    fresh.commit_shard(fresh.next_shard_index(), ["c", "d"], ["uc2", "ud2"], cd, [7, 8], [9, 10])
    emb, ids, uris = EmbeddingStore(tmp_path / "s").load_all()
    assert ids == ["a", "c", "d"] and uris == ["ua", "uc2", "ud2"]
    assert np.allclose(emb[1:], cd, atol=1e-3)
    assert EmbeddingStore(tmp_path / "s").shard_metadata(fresh.shards[1]).column("width").to_pylist() == [7, 8]
    # the dead commit's files were removed when the rerun took the lock; only referenced files remain
    rec = fresh.shards[1]
    left = sorted(p.name for p in (tmp_path / "s").rglob("*_00001.*"))
    assert left == sorted([f"img_emb_{rec.name}.npy", f"metadata_{rec.name}.parquet", f"skipped_{rec.name}.parquet"])
    assert rec.token and rec.name == f"00001.{rec.token}"


def test_every_commit_writes_new_files_named_in_the_manifest(tmp_path):
    st = EmbeddingStore(tmp_path / "s")
    st.create_or_check(MODEL, 2)
    st.commit_shard(0, ["a"], ["ua"], np.ones((1, 2)), [1], [1], skipped=[("z", "uz", "decode: bad")])
    m = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert m["format_version"] == store_mod.FORMAT_VERSION == 2
    tok = m["shards"][0]["token"]
    for f in (
        f"img_emb/img_emb_00000.{tok}.npy",
        f"metadata/metadata_00000.{tok}.parquet",
        f"skipped/skipped_00000.{tok}.parquet",
    ):
        assert (tmp_path / "s" / f).is_file()
    assert st.skipped() == {"z": "decode: bad"} and st.committed_ids() == {"a", "z"}
    assert not list((tmp_path / "s").rglob("*.tmp"))


def _write_v1_store(root, dim=2):
    """A store as the format-1 code wrote it (no commit tokens)."""
    for sub in ("img_emb", "metadata", "skipped"):
        (root / sub).mkdir(parents=True)
    np.save(root / "img_emb" / "img_emb_00000.npy", np.array([[1, 0], [0, 1]], np.float16))
    pq.write_table(
        pa.table(
            {
                "id": ["a", "b"],
                "uri": ["ua", "ub"],
                "width": pa.array([1, 2], pa.int32()),
                "height": pa.array([3, 4], pa.int32()),
                "shard": pa.array([0, 0], pa.int32()),
                "row": pa.array([0, 1], pa.int32()),
            }
        ),
        root / "metadata" / "metadata_00000.parquet",
    )
    pq.write_table(
        pa.table({"id": ["c"], "uri": ["uc"], "reason": ["decode: bad"]}), root / "skipped" / "skipped_00000.parquet"
    )
    (root / "manifest.json").write_text(
        json.dumps(
            {
                "format_version": 1,
                "model": MODEL,
                "dim": dim,
                "created": "2025-01-01T00:00:00",
                "shards": [{"index": 0, "count": 2, "skipped": 1}],
                "total": 2,
                "skipped": 1,
            }
        )
    )


def test_format_1_stores_are_read_and_upgraded_on_the_next_commit(tmp_path):
    root = tmp_path / "v1"
    _write_v1_store(root)
    st = EmbeddingStore(root)
    assert len(st) == 2 and st.committed_ids() == {"a", "b", "c"} and st.skipped() == {"c": "decode: bad"}
    emb, ids, _ = st.load_all()
    assert ids == ["a", "b"] and emb.shape == (2, 2)
    st.commit_shard(st.next_shard_index(), ["d"], ["ud"], np.ones((1, 2)), [1], [1])
    m = json.loads((root / "manifest.json").read_text())
    assert m["format_version"] == 2 and "token" not in m["shards"][0] and m["shards"][1]["token"]
    emb, ids, _ = EmbeddingStore(root).load_all()
    assert ids == ["a", "b", "d"] and emb.shape == (3, 2)
    assert (root / "img_emb" / "img_emb_00000.npy").is_file()  # referenced format-1 files are kept


def test_unknown_format_is_a_clear_error(tmp_path):
    root = tmp_path / "v9"
    _write_v1_store(root)
    m = json.loads((root / "manifest.json").read_text())
    (root / "manifest.json").write_text(json.dumps(dict(m, format_version=9)))
    with pytest.raises(StoreError, match="unsupported store format 9"):
        EmbeddingStore(root).committed_ids()


def test_store_path_that_is_a_file_is_refused(tmp_path):
    f = tmp_path / "not_a_dir"
    f.write_text("x")
    for root in (f, f / "sub"):
        with pytest.raises(StoreError, match="is a file, not a directory"):
            EmbeddingStore(root).create_or_check(MODEL, 2)
