"""Issue #8/5b: the store's writer lock (no Ray). Two writers on one store must never both
believe they committed while one's shards are lost."""

import json
import logging
import os
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from conftest import REPO

from index.store import LOCK_FILE, EmbeddingStore, StoreError, StoreLockedError

MODEL = {"clip_model": "m"}


def _store(tmp_path, name="s"):
    st = EmbeddingStore(tmp_path / name)
    st.create_or_check(MODEL, 4)
    return st


def _emb(n, seed=0):
    return np.random.default_rng(seed).normal(size=(n, 4))


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _fake_lock(root, host, pid, job="other-job", age_s=0.0):
    path = root / LOCK_FILE
    path.write_text(
        json.dumps({"host": host, "pid": pid, "job": job, "since": "2020-01-01T00:00:00", "token": "feedfacefeedface"})
    )
    t = time.time() - age_s
    os.utime(path, (t, t))
    return path


def test_second_writer_is_refused_naming_the_owner(tmp_path):
    st = _store(tmp_path)
    other = EmbeddingStore(tmp_path / "s")
    with st.writer(job="first-job"):
        assert (tmp_path / "s" / LOCK_FILE).is_file()
        with pytest.raises(StoreLockedError) as info:
            with other.writer(job="second-job"):
                pass
        msg = str(info.value)
        assert "first-job" in msg and socket.gethostname() in msg and f"pid {os.getpid()}" in msg and "since" in msg
        # an implicit commit from another store object is refused too, and writes nothing
        with pytest.raises(StoreLockedError):
            other.commit_shard(0, ["x"], ["ux"], _emb(1), [1], [1])
        st.commit_shard(0, ["a"], ["ua"], _emb(1), [1], [1])
        with st.writer(job="nested"):  # reentrant on the owning object
            st.commit_shard(1, ["b"], ["ub"], _emb(1), [1], [1])
    assert not (tmp_path / "s" / LOCK_FILE).exists()  # released
    other.commit_shard(2, ["c"], ["uc"], _emb(1), [1], [1])  # free again
    assert EmbeddingStore(tmp_path / "s").committed_ids() == {"a", "b", "c"}


def test_manifest_is_reread_under_the_lock(tmp_path):
    """A store object that read the manifest before another writer committed must not commit over
    that writer's shard (the old code trusted its cached manifest and overwrote shard 0)."""
    st = _store(tmp_path)
    stale = EmbeddingStore(tmp_path / "s")
    assert stale.next_shard_index() == 0  # caches the manifest: no shard yet
    st.commit_shard(0, ["a", "b"], ["ua", "ub"], _emb(2), [1, 1], [1, 1])
    with pytest.raises(StoreError, match="already committed"):
        stale.commit_shard(0, ["x"], ["ux"], _emb(1, 1), [1], [1])
    with stale.writer(job="late"):
        assert stale.next_shard_index() == 1  # re-read on taking the lock
        stale.commit_shard(stale.next_shard_index(), ["x"], ["ux"], _emb(1, 1), [1], [1])
    _, ids, _ = EmbeddingStore(tmp_path / "s").load_all()
    assert ids == ["a", "b", "x"]


def test_lock_of_a_dead_process_on_this_host_is_broken_with_a_warning(tmp_path, caplog):
    st = _store(tmp_path)
    pid = _dead_pid()
    _fake_lock(st.root, socket.gethostname(), pid)
    with caplog.at_level(logging.WARNING, logger="index.store"):
        with st.writer(job="next"):
            st.commit_shard(0, ["a"], ["ua"], _emb(1), [1], [1])
    assert any(
        "breaking the stale writer lock" in r.message and f"pid {pid}" in r.message and r.levelno == logging.WARNING
        for r in caplog.records
    )
    assert st.committed_ids() == {"a"}


def test_lock_without_heartbeat_is_broken_and_a_live_one_is_not(tmp_path, caplog):
    st = _store(tmp_path)
    _fake_lock(st.root, "some-other-host", 12345, age_s=10.0)  # fresh heartbeat on another host
    with pytest.raises(StoreLockedError, match="some-other-host.*pid 12345"):
        with st.writer(job="me", heartbeat_s=0.5, stale_after_s=60):
            pass
    _fake_lock(st.root, "some-other-host", 12345, age_s=120.0)  # no heartbeat for 2 minutes
    with caplog.at_level(logging.WARNING, logger="index.store"):
        with st.writer(job="me", heartbeat_s=0.5, stale_after_s=60):
            pass
    assert any("no heartbeat for" in r.message for r in caplog.records)
    # an unreadable lock file (its writer died between create and write) is stale only by age
    (st.root / LOCK_FILE).write_text("")
    with pytest.raises(StoreLockedError, match="unknown writer"):
        with st.writer(job="me", heartbeat_s=0.5, stale_after_s=60):
            pass
    t = time.time() - 300
    os.utime(st.root / LOCK_FILE, (t, t))
    with st.writer(job="me", heartbeat_s=0.5, stale_after_s=60):
        pass


def test_heartbeat_refreshes_the_lock_and_a_lost_lock_stops_commits(tmp_path):
    st = _store(tmp_path)
    lock = tmp_path / "s" / LOCK_FILE
    with st.writer(job="beating", heartbeat_s=0.05, stale_after_s=5):
        os.utime(lock, (0, 0))
        deadline = time.time() + 5
        while os.stat(lock).st_mtime < time.time() - 60 and time.time() < deadline:
            time.sleep(0.02)
        assert os.stat(lock).st_mtime > time.time() - 60, "the heartbeat did not refresh the lock"
        owner = json.loads(lock.read_text())
        assert owner["job"] == "beating" and owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
        # someone broke our lock and took the store: nothing more may be committed
        lock.write_text(json.dumps(dict(owner, token="0" * 16, job="intruder")))
        with pytest.raises(StoreLockedError, match="lost the writer lock.*intruder"):
            st.commit_shard(0, ["a"], ["ua"], _emb(1), [1], [1])
    assert EmbeddingStore(tmp_path / "s").committed_ids() == set()
    assert json.loads(lock.read_text())["job"] == "intruder"  # not removed by the loser


# -- two processes, the real API ---------------------------------------------------------

_RACER = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    import numpy as np
    from index.store import EmbeddingStore, StoreError

    root, tag, barrier = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    st = EmbeddingStore(root)
    st.manifest()  # both read the manifest before either commits
    (barrier / tag).touch()
    while len(list(barrier.iterdir())) < 2:
        time.sleep(0.01)
    try:
        for k in range(3):
            ids = [f"{tag}-{k}-{j}" for j in range(4)]
            st.commit_shard(st.next_shard_index(), ids, ["u-" + i for i in ids],
                            np.random.default_rng(k).normal(size=(4, 4)), [1] * 4, [1] * 4)
            print("COMMITTED " + json.dumps(ids), flush=True)
            time.sleep(0.05)
    except StoreError as exc:
        print("REFUSED " + str(exc), flush=True)
        sys.exit(3)
""")


def test_two_processes_committing_never_lose_a_reported_commit(tmp_path):
    """Two processes that read the manifest, then commit shards through commit_shard: every
    shard a process was told is committed is in the store exactly once; the loser of a race is
    refused with a clear error (the old store let both commit shard 0 and kept only one)."""
    _store(tmp_path)
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RACER, str(tmp_path / "s"), tag, str(barrier)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for tag in ("A", "B")
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    reported = []
    for p, (out, err) in zip(procs, outs):
        assert p.returncode in (0, 3), err[-2000:]
        for line in out.splitlines():
            if line.startswith("COMMITTED "):
                reported += json.loads(line[len("COMMITTED ") :])
        if p.returncode == 3:
            assert any(w in out for w in ("already committed", "locked by another writer")), out
    final = EmbeddingStore(tmp_path / "s")
    emb, ids, _ = final.load_all()
    assert len(ids) == len(set(ids)) and emb.shape == (len(ids), 4)
    assert sorted(ids) == sorted(reported), "a commit reported as done is missing (or one was not reported)"
    assert [s.index for s in final.shards] == list(range(len(final.shards)))


_EMBED_LIKE = textwrap.dedent("""
    import sys, time
    import numpy as np
    from index.store import EmbeddingStore, StoreLockedError

    from pathlib import Path

    root, tag, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    hold = Path(sys.argv[4]) if len(sys.argv) > 4 else None  # keep the lock until this file exists
    st = EmbeddingStore(root)
    listed = [f"img-{i:03d}" for i in range(n)]
    try:
        with st.writer(job=f"embed-{tag}"):
            print("LOCKED", flush=True)
            pending = [i for i in listed if i not in st.committed_ids()]
            for k in range(0, len(pending), 5):
                ids = pending[k:k + 5]
                st.commit_shard(st.next_shard_index(), ids, ids, np.ones((len(ids), 4)), [1] * len(ids), [1] * len(ids))
                time.sleep(0.02)
            while hold is not None and not hold.exists():
                time.sleep(0.02)
    except StoreLockedError as exc:
        print("REFUSED " + str(exc), flush=True)
        sys.exit(3)
""")


def test_concurrent_jobs_one_is_refused_and_a_rerun_completes(tmp_path):
    """The reported bug: two jobs of 60 images each on one store both 'succeeded' with 60 of 120
    ids stored. With the lock the second is refused naming the first; rerun, every id once."""
    _store(tmp_path)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    root = str(tmp_path / "s")
    hold = tmp_path / "first_may_finish"
    first = subprocess.Popen(
        [sys.executable, "-c", _EMBED_LIKE, root, "one", "60", str(hold)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert first.stdout.readline().strip() == "LOCKED"
        second = subprocess.run(
            [sys.executable, "-c", _EMBED_LIKE, root, "two", "120"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        hold.touch()
    out, err = first.communicate(timeout=120)
    assert first.returncode == 0, err[-2000:]
    assert second.returncode == 3, second.stderr[-2000:]
    assert "locked by another writer" in second.stdout and "embed-one" in second.stdout
    assert f"pid {first.pid}" in second.stdout
    assert sorted(EmbeddingStore(root).committed_ids()) == [f"img-{i:03d}" for i in range(60)]
    rerun = subprocess.run(
        [sys.executable, "-c", _EMBED_LIKE, root, "two", "120"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    _, ids, _ = EmbeddingStore(root).load_all()
    assert sorted(ids) == [f"img-{i:03d}" for i in range(120)]
